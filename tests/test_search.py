"""search.py: FAISS ranking against a stable sort and metric.py, shards, and the index /
query commands on a tiny run trained in-process."""
import glob
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import datasets
import demo
import metric
import search
import settings
import train
from settings import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ===== references =====
def hamming(q, db):
    """Hamming distances of +-1 codes, counted bit by bit."""
    return (np.asarray(q)[:, None, :] != np.asarray(db)[None, :, :]).sum(2)


def stable_ranking(q, db, k):
    dist = hamming(q, db)
    ids = np.argsort(dist, axis=1, kind='stable')[:, :k]
    return np.take_along_axis(dist, ids, 1), ids


def tied_codes(rng, n, nbits, free_bits):
    """+-1 codes that differ only in their first free_bits bits: massive ties."""
    codes = np.ones((n, nbits), np.int8)
    codes[:, :free_bits] = rng.choice(np.array([-1, 1], np.int8), size=(n, free_bits))
    return codes


def random_labels(rng, n, c, density=0.25):
    return (rng.random((n, c)) < density).astype(np.uint8)


# ===== the engine =====
@pytest.mark.parametrize('nbits, free_bits, n_db, k', [
    (8, 8, 3000, 50), (16, 5, 2000, 7), (64, 6, 1500, 1500), (128, 10, 1200, 300),
    (12, 12, 500, 499)])
def test_ranking_equals_stable_sort_with_ties(nbits, free_bits, n_db, k):
    rng = np.random.default_rng(nbits)
    db, q = tied_codes(rng, n_db, nbits, free_bits), tied_codes(rng, 70, nbits, free_bits)
    dist, ids = search.ranking(search.flat_index(search.pack_codes(db)),
                               search.pack_codes(q), k)
    ref_dist, ref_ids = stable_ranking(q, db, k)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(dist, ref_dist)


def test_pack_codes_pads_to_whole_bytes():
    codes = np.array([[1, -1, 1, 1, 1, 1, 1, 1, 1, -1, -1, 1],
                      [-1, -1, 1, 1, 1, 1, 1, 1, 1, 1, -1, -1]], np.int8)
    packed = search.pack_codes(codes)
    assert packed.shape == (2, 2)
    np.testing.assert_array_equal(packed[0], [0b10111111, 0b10010000])
    dist, ids = search.ranking(search.flat_index(packed), packed[:1], 2)
    np.testing.assert_array_equal(dist, [[0, 3]])   # bits 0, 9 and 11 differ
    with pytest.raises(ValueError):
        search.pack_codes(np.array([[0, 1]]))


def test_average_precision_by_hand():
    """The AP that faiss_top_map applies to FAISS's ranking (metric.average_precision)."""
    relevant = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 1, 1]], dtype=torch.bool)
    expected = [(1 / 1 + 2 / 3) / 2, 0.0, (1 / 2 + 2 / 3 + 3 / 4) / 3]
    np.testing.assert_allclose(metric.average_precision(relevant).numpy(), expected, rtol=0,
                               atol=1e-15)


@pytest.mark.parametrize('nbits, free_bits', [(8, 8), (32, 6), (64, 64)])
def test_faiss_map_equals_metric_on_tied_codes(nbits, free_bits):
    rng = np.random.default_rng(free_bits)
    q, db = tied_codes(rng, 120, nbits, free_bits), tied_codes(rng, 2500, nbits, free_bits)
    q_lab, db_lab = random_labels(rng, 120, 6), random_labels(rng, 2500, 6)
    for topk in (1, 50, 777):
        ours = search.faiss_top_map(q, db, q_lab, db_lab, topk)
        assert abs(ours - metric.calculate_top_map(q, db, q_lab, db_lab, topk)) <= 1e-12
    ours = search.faiss_map(q, db, q_lab, db_lab)
    assert abs(ours - metric.calculate_map(q, db, q_lab, db_lab)) <= 1e-12
    assert 0 < ours < 1


def test_faiss_map_chunks_queries(monkeypatch):
    """Several chunks of queries give the same mAP as one."""
    rng = np.random.default_rng(5)
    q, db = tied_codes(rng, 50, 16, 6), tied_codes(rng, 400, 16, 6)
    q_lab, db_lab = random_labels(rng, 50, 4), random_labels(rng, 400, 4)
    whole = search.faiss_top_map(q, db, q_lab, db_lab, 30)
    monkeypatch.setattr(search, 'QUERY_CHUNK_BYTES', 16 * 30 * 7)   # 7 queries a chunk
    assert search.faiss_top_map(q, db, q_lab, db_lab, 30) == whole


@pytest.mark.parametrize('k', [1, 40, 900])
def test_shards_equal_one_index(k):
    import faiss
    rng = np.random.default_rng(k)
    db, q = tied_codes(rng, 900, 16, 5), tied_codes(rng, 30, 16, 5)
    packed, queries = search.pack_codes(db), search.pack_codes(q)
    one = search.ranking(search.flat_index(packed), queries, k)
    bounds = [0, 100, 101, 550, 900]   # uneven shards, one of a single item
    shards = [(search.flat_index(packed[a:b]), a) for a, b in zip(bounds, bounds[1:])]
    merged = search.search_shards(shards, queries, k)
    np.testing.assert_array_equal(merged[1], one[1])
    np.testing.assert_array_equal(merged[0], one[0])
    threaded = faiss.IndexBinaryShards(16, True, True)   # FAISS's own shard container
    for index, _ in shards:
        threaded.add_shard(index)
    dist, ids = threaded.search(queries, k)
    np.testing.assert_array_equal(ids, one[1])


# ===== a tiny run =====
@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
    """A 160-pair DEMO run (144 database pairs, 16 bits) trained one epoch in-process."""
    import train
    base = tmp_path_factory.mktemp('search')
    demo.make_demo(str(base / 'demo'), n_pairs=160)
    cfg = settings.resolve(DATASET='DEMO', DATA_DIR=str(base / 'demo'), BATCH_SIZE=16,
                           CODE_LEN=16, NUM_EPOCH=1, NUM_WORKERS=0, EVAL_BATCH_SIZE=64,
                           EVAL_UNTRAINED=False, OUT_DIR=str(base / 'runs'), RUN_NAME='r',
                           DEVICE='cpu')
    run = train.Run(cfg)
    run.train_to_end()
    search.main(['index', f'RUN={run.dir}'])
    return run.dir


def saved_codes(run_dir):
    (path,) = glob.glob(os.path.join(run_dir, 'codes', 'epoch_001.npz'))
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def query(run_dir, *args):
    return search.cmd_query(search.parse(['query', f'RUN={run_dir}', *args])[1])


def test_index_holds_the_database_codes(tiny_run):
    import faiss
    codes = saved_codes(tiny_run)
    split = np.load(os.path.join(tiny_run, 'split.npz'))
    run = search.open_run(tiny_run)
    for modality, key in (('image', 'db_img'), ('text', 'db_txt')):
        index, meta = search.load_index(run, 'database', modality)
        stored = faiss.vector_to_array(index.xb).reshape(index.ntotal, -1)
        np.testing.assert_array_equal(stored, np.packbits(codes[key] > 0, axis=1))
        np.testing.assert_array_equal(meta['items'], split['database'])
        np.testing.assert_array_equal(meta['labels'], codes['db_labels'])


def test_faiss_map_equals_metric_on_demo_codes(tiny_run):
    codes = saved_codes(tiny_run)
    for q, db in (('query_img', 'db_txt'), ('query_txt', 'db_img')):
        task = codes[q], codes[db], codes['query_labels'], codes['db_labels']
        assert abs(search.faiss_top_map(*task, 50) - metric.calculate_top_map(*task, 50)) <= 1e-12
        assert abs(search.faiss_map(*task) - metric.calculate_map(*task)) <= 1e-12


def test_text_query_ranks_like_metric(tiny_run, capsys):
    words = search.demo_vocabulary()
    hits = query(tiny_run, f'TEXT="{words[3]} {words[40]} nosuchword"', 'K=20')
    err = capsys.readouterr().err
    assert 'nosuchword' in err and words[3] not in err
    run = search.open_run(tiny_run)
    vector = np.zeros((1, len(words)), np.float32)
    vector[0, [3, 40]] = 1
    code = search.encode_texts(run, vector)
    codes = saved_codes(tiny_run)
    dist, rows = stable_ranking(code, codes['db_img'], 20)
    database = np.load(os.path.join(tiny_run, 'split.npz'))['database']
    assert [h.item for h in hits.rows] == list(database[rows[0]])
    assert [h.distance for h in hits.rows] == list(dist[0])
    assert [h.rank for h in hits.rows] == list(range(1, 21))
    np.testing.assert_array_equal([h.labels for h in hits.rows], codes['db_labels'][rows[0]])


def test_image_query_returns_texts_with_tags(tiny_run, tmp_path, capsys):
    run = search.open_run(tiny_run)
    data = search.run_data(run)
    pair = int(data.database[3])
    path = tmp_path / 'q.png'
    data.images.pil(pair).save(path)   # lossless: encodes to its saved code
    hits = query(tiny_run, f'IMAGE={path}', 'K=5')
    out = capsys.readouterr().out.splitlines()
    words = search.demo_vocabulary()
    for hit, line in zip(hits.rows, out[2:]):
        tags = [words[c] for c in np.flatnonzero(data.texts[hit.item])]
        assert line.split()[:3] == [str(hit.rank), str(hit.distance), 'pair']
        assert line.endswith(' '.join(tags))
    image_hits = query(tiny_run, f'IMAGE={path}', f'K={len(data.database)}', 'TARGET=image')
    assert {h.item: h.distance for h in image_hits.rows}[pair] == 0


def test_pair_query_writes_grid(tiny_run, tmp_path, capsys):
    grid = tmp_path / 'grid.png'
    hits = query(tiny_run, 'TEXT_OF=5', 'K=7', '--grid', str(grid))
    assert 'query labels' in capsys.readouterr().out
    with Image.open(grid) as img:
        assert img.size[0] > 600 and img.size[1] > 200
    assert len(hits.rows) == 7


def test_database_encoded_again_without_codes_file(tiny_run, tmp_path):
    """With no codes file of the checkpoint's epoch, index encodes the database with the
    networks: the same codes train.py saved."""
    copy = tmp_path / 'copy'
    shutil.copytree(tiny_run, copy)
    shutil.rmtree(copy / 'codes')
    shutil.rmtree(copy / 'search')
    search.main(['index', f'RUN={copy}'])
    original, encoded = search.open_run(tiny_run), search.open_run(str(copy))
    for modality in ('image', 'text'):
        a = search.load_index(original, 'database', modality)[0]
        b = search.load_index(encoded, 'database', modality)[0]
        import faiss
        np.testing.assert_array_equal(faiss.vector_to_array(a.xb), faiss.vector_to_array(b.xb))


def test_folder_index_skips_bad_files(tiny_run, tmp_path, capsys):
    folder = tmp_path / 'photos'
    (folder / 'sub').mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, size in (('a.jpg', (40, 90)), ('sub/b.PNG', (300, 120)), ('c.jpeg', (64, 64))):
        Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(folder / name)
    (folder / 'broken.jpg').write_bytes(b'not an image')
    (folder / 'notes.txt').write_text('ignored')
    search.main(['index', f'RUN={tiny_run}', f'IMAGES={folder}'])
    out = capsys.readouterr().out
    assert f"skipped (cannot be decoded): {folder / 'broken.jpg'}" in out
    hits = query(tiny_run, f"IMAGE={folder / 'sub' / 'b.PNG'}", 'COLLECTION=images', 'K=3')
    assert len(hits.rows) == 3
    assert {h.item: h.distance for h in hits.rows}[str(folder / 'sub' / 'b.PNG')] == 0
    assert sorted(h.item for h in hits.rows) == [str(folder / n) for n in
                                                 ('a.jpg', 'c.jpeg', 'sub/b.PNG')]


@pytest.mark.parametrize('args, message', [
    (['TEXT="nosuchword other"'], 'no word of it is in the DEMO vocabulary'),
    (['K=145', 'TEXT=red00'], 'K=145: the database image index holds only 144 items'),
    (['IMAGE=__missing.png'], "IMAGE='__missing.png': no such file"),
    (['TEXT=red00', 'IMAGE_OF=3'], 'expected exactly one of'),
    (['TEXT_OF=160'], 'TEXT_OF=160: expected a pair number from 0 to 159'),
    (['TEXT_OF=-1'], 'TEXT_OF=-1: expected a pair number of at least 0'),   # not "none given"
    (['IMAGE_OF=-7'], 'IMAGE_OF=-7: expected a pair number of at least 0'),
    (['TEXT=red00', 'TARGET=sound'], "TARGET='sound'"),
    (['TEXT=red00', 'COLLECTION=images'], 'no images image index'),
    (['TEXT=red00', 'VOCAB=__none.txt'], 'no tag vocabulary __none.txt'),
])
def test_bad_queries(tiny_run, args, message):
    if any(a.startswith('COLLECTION') for a in args):
        for path in search.index_paths(tiny_run, 'images', 'image'):
            if os.path.exists(path):
                os.remove(path)
    with pytest.raises(UserError, match=message.replace('(', r'\(')):
        query(tiny_run, *args)


def test_unreadable_query_image(tiny_run, tmp_path):
    bad = tmp_path / 'bad.png'
    bad.write_bytes(b'\x89PNG truncated')
    with pytest.raises(UserError, match='cannot be decoded'):
        query(tiny_run, f'IMAGE={bad}')
    huge = tmp_path / 'huge.png'   # valid, but past PIL's decompression-bomb limit
    Image.new('1', (14000, 14000)).save(huge)
    with pytest.raises(UserError, match="huge.png'?: more pixels than PIL's limit"):
        query(tiny_run, f'IMAGE={huge}')


def test_bad_runs_and_indexes(tiny_run, tmp_path):
    with pytest.raises(UserError, match='no checkpoint.pt'):
        search.main(['index', f'RUN={tmp_path}'])
    other = tmp_path / 'other'
    shutil.copytree(tiny_run, other)
    state = torch.load(other / 'checkpoint.pt', weights_only=True)
    state['txt_net']['fc2.bias'] += 1   # another run's networks
    state[train.DIGEST_KEY] = train.checkpoint_digest(state)   # written so by train.py
    torch.save(state, other / 'checkpoint.pt')
    with pytest.raises(UserError, match='built from another run'):
        query(str(other), 'TEXT=red00')
    index_path, meta_path = search.index_paths(str(other), 'database', 'image')
    shutil.copy(search.index_paths(str(other), 'database', 'text')[0], index_path)
    with pytest.raises(UserError, match='is not the one'):
        query(str(other), 'TEXT=red00')
    (other / 'checkpoint.pt').write_bytes(b'garbage')
    with pytest.raises(UserError, match='checkpoint .* cannot be read'):
        query(str(other), 'TEXT=red00')


def test_failed_index_write_keeps_the_old_files(tiny_run, tmp_path, monkeypatch):
    copy = tmp_path / 'copy'
    shutil.copytree(tiny_run, copy)
    before = {p: open(p, 'rb').read() for p in glob.glob(str(copy / 'search' / '*'))}
    def broken_savez(f, **arrays):
        f.write(b'half a file')
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(np, 'savez', broken_savez)
    with pytest.raises(UserError, match='no space left on the device while writing'):
        search.main(['index', f'RUN={copy}'])
    after = {p: open(p, 'rb').read() for p in glob.glob(str(copy / 'search' / '*'))}
    assert after == before   # no temporary file left, nothing half-written


@pytest.mark.slow   # two processes that load torch and FAISS: 11 s
def test_command_line(tiny_run, tmp_path):
    """The real entry point: hits on stdout, rank first; a bad query is one line, exit 2."""
    cmd = [sys.executable, os.path.join(ROOT, 'search.py'), 'query', f'RUN={tiny_run}']
    ok = subprocess.run(cmd + ['TEXT=red01 green02', 'K=3'], capture_output=True, text=True,
                        cwd=ROOT, timeout=120)
    assert ok.returncode == 0, ok.stderr
    lines = ok.stdout.splitlines()
    assert [line.split()[0] for line in lines[-3:]] == ['1', '2', '3']
    bad = subprocess.run(cmd + ['TEXT=zzz'], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.count('\n') == 1 and bad.stderr.startswith('error: TEXT=')


def test_help_prints_the_usage():
    """--help (alone or after a command) is the usage on stdout and exit status 0."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, 'search.py'), '--help'],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and out.stderr == '', out.stderr
    assert 'python search.py query RUN=' in out.stdout
    listed = out.stdout.split('Settings (KEY=VALUE')[1]
    assert all(f"  {key} " in listed for key in search.SETTINGS)
    with pytest.raises(settings.HelpRequested):
        search.parse(['query', 'RUN=x', '-h'])


# ===== runs trained on stored features =====
@pytest.fixture(scope='module')
def feature_runs(tmp_path_factory):
    """Two 160-pair DEMO runs on stored image features (16 bits, one epoch): 'img' with the
    dataset's bags of words, 'both' also on TEXT_FEATURES (and the hash layer alone on the
    features, FEATURE_HIDDEN=0)."""
    import train
    base = tmp_path_factory.mktemp('search_features')
    demo.make_demo(str(base / 'demo'), n_pairs=160)
    rng = np.random.default_rng(0)
    np.save(base / 'img.npy', rng.random((160, 24)).astype(np.float32))
    np.save(base / 'txt.npy', rng.random((160, 12)).astype(np.float32))
    runs = {}
    for name, extra in (('img', dict(FEATURE_HIDDEN=8)),
                        ('both', dict(FEATURE_HIDDEN=0, TEXT_FEATURES=str(base / 'txt.npy')))):
        cfg = settings.resolve(DATASET='DEMO', DATA_DIR=str(base / 'demo'), BATCH_SIZE=16,
                               IMAGE_FEATURES=str(base / 'img.npy'), CODE_LEN=16, NUM_EPOCH=1,
                               NUM_WORKERS=0, EVAL_BATCH_SIZE=64, EVAL_UNTRAINED=False,
                               OUT_DIR=str(base / 'runs'), RUN_NAME=name, DEVICE='cpu', **extra)
        run = train.Run(cfg)
        run.train_to_end()
        search.main(['index', f'RUN={run.dir}'])
        runs[name] = run.dir
    return runs


def hits_of(hits):
    return [h.item for h in hits.rows], [h.distance for h in hits.rows]


@pytest.mark.parametrize('name', ['img', 'both'])
def test_pair_queries_on_a_features_run_rank_the_saved_codes(feature_runs, name):
    """TEXT_OF and IMAGE_OF a query pair give the codes train.py's evaluation saved for it
    (the text network, the feature MLP on the pair's stored row), ranked like a stable sort."""
    run_dir = feature_runs[name]
    codes = saved_codes(run_dir)
    k = len(codes['db_img'])
    for key, code, db in (('TEXT_OF', 'query_txt', 'db_img'), ('IMAGE_OF', 'query_img', 'db_txt')):
        pair = int(codes['query_index'][2])
        hits = query(run_dir, f'{key}={pair}', f'K={k}')
        dist, rows = stable_ranking(codes[code][2:3], codes[db], k)
        assert hits_of(hits) == (list(codes['db_index'][rows[0]]), list(dist[0]))


def test_text_query_on_a_features_run(feature_runs, tmp_path):
    """TEXT= needs only the text network: the hits are the ranking of the code of an
    independently built TxtNet, against the image codes the run saved."""
    import models
    run_dir = feature_runs['img']
    words = search.demo_vocabulary()
    grid = tmp_path / 'hits.png'
    hits = query(run_dir, f'TEXT={words[3]} {words[40]}', 'K=30', f'GRID={grid}')
    state = torch.load(os.path.join(run_dir, 'checkpoint.pt'), weights_only=True)
    net = models.TxtNet(len(words), 16)
    net.load_state_dict(state['txt_net'])
    vector = torch.zeros(1, len(words))
    vector[0, [3, 40]] = 1
    code = models.binarize(net.eval()(vector)[1]).numpy()
    codes = saved_codes(run_dir)
    dist, rows = stable_ranking(code, codes['db_img'], 30)
    assert hits_of(hits) == (list(codes['db_index'][rows[0]]), list(dist[0]))
    with Image.open(grid) as img:   # image hits drawn as named panels: no picture exists
        assert img.size[0] > 600


def test_features_run_encodes_its_database_again(feature_runs, tmp_path):
    """Without the codes file, index encodes the database from the stored features and
    the texts: the codes train.py saved."""
    import faiss
    for name, run_dir in feature_runs.items():
        copy = tmp_path / name
        shutil.copytree(run_dir, copy)
        codes = saved_codes(run_dir)
        shutil.rmtree(copy / 'codes')
        search.main(['index', f'RUN={copy}'])
        run = search.open_run(str(copy))
        for modality, key in (('image', 'db_img'), ('text', 'db_txt')):
            index, meta = search.load_index(run, 'database', modality)
            stored = faiss.vector_to_array(index.xb).reshape(index.ntotal, -1)
            np.testing.assert_array_equal(stored, np.packbits(codes[key] > 0, axis=1))


def test_text_features_run_shows_the_tags(feature_runs, capsys):
    """A TEXT_FEATURES run's text hits show the dataset's own tags, not its vectors."""
    run_dir = feature_runs['both']
    hits = query(run_dir, 'IMAGE_OF=7', 'K=4')
    data = datasets.load(settings.resolve(DATASET='DEMO', DATA_DIR=search.open_run(
        run_dir).cfg.DATA_DIR), generate=False, verbose=False)
    words = search.demo_vocabulary()
    for hit in hits.rows:
        assert hit.words == [words[c] for c in np.flatnonzero(data.texts[hit.item])]
    assert capsys.readouterr().out.splitlines()[-1].endswith(' '.join(hits.rows[-1].words))


@pytest.mark.parametrize('name, args, message', [
    ('img', ['IMAGE={photo}'], "IMAGE=.*trained on stored image features .*IMAGE_FEATURES="),
    ('both', ['TEXT=red00'], "TEXT: this run's text network reads TEXT_FEATURES="),
])
def test_what_a_features_run_cannot_do(feature_runs, tmp_path, name, args, message):
    photo = tmp_path / 'photo.png'
    Image.new('RGB', (32, 32)).save(photo)
    with pytest.raises(UserError, match=message):
        query(feature_runs[name], *[a.format(photo=photo) for a in args])
    with pytest.raises(UserError, match='cannot encode an image file'):
        search.main(['index', f"RUN={feature_runs['img']}", f'IMAGES={tmp_path}'])
    with pytest.raises(UserError, match='COLLECTION=images: this run was trained on stored'):
        query(feature_runs[name], 'TEXT_OF=1', 'COLLECTION=images')


# ===== hostile input: one line, exit status 2, nothing written =====
def spoil(run_dir, tmp_path, case):
    """A copy of a run spoiled one way, and the arguments that meet it."""
    copy = tmp_path / 'run'
    shutil.copytree(run_dir, copy)
    codes = copy / 'codes' / 'epoch_001.npz'
    meta = copy / 'search' / 'database_image.npz'
    query_args = ['query', f'RUN={copy}', 'TEXT=red00']
    if case == 'truncated codes':
        codes.write_bytes(codes.read_bytes()[:700])
        return ['index', f'RUN={copy}']
    if case in ('codes of 0 and 1', 'codes of another split'):
        with np.load(codes) as z:
            arrays = dict(z)
        if case == 'codes of 0 and 1':
            arrays['db_img'] = (arrays['db_img'] > 0).astype(np.int8)
        else:
            arrays['db_index'] = arrays['db_index'][::-1].copy()
        np.savez(codes, **arrays)
        return ['index', f'RUN={copy}']
    if case == 'truncated index':
        meta.write_bytes(meta.read_bytes()[:300])
    elif case == 'index without items':
        with np.load(meta) as z:
            np.savez(meta, **{k: z[k] for k in z.files if k != 'items'})
    elif case == 'settings.json a list':
        (copy / 'settings.json').write_text('[1, 2]')
    elif case == 'settings.json bad value':
        (copy / 'settings.json').write_text('{"CODE_LEN": "sixteen"}')
    elif case == 'RUN a file':
        return ['query', f"RUN={copy / 'checkpoint.pt'}", 'TEXT=red00']
    elif case == 'search a file':
        shutil.rmtree(copy / 'search')
        (copy / 'search').write_text('mine')
        return ['index', f'RUN={copy}']
    return query_args


SPOILED = {
    'truncated codes': ['epoch_001.npz', 'cannot be read'],
    'codes of 0 and 1': ['epoch_001.npz', 'db_img', '-1 and +1'],
    'codes of another split': ['epoch_001.npz', "database split"],
    'truncated index': ['database_image.npz', 'cannot be read', 'search.py index'],
    'index without items': ['database_image.npz', 'items', 'search.py index'],
    'settings.json a list': ['settings.json', 'JSON list'],
    'settings.json bad value': ['settings.json', 'CODE_LEN'],
    'RUN a file': ['checkpoint.pt', 'is a file'],
    'search a file': ['search', 'cannot make the folder'],
}
BAD_ARGS = {   # arguments after `query` -> words of the one-line error
    ('RUN={run}', 'TEXT=red00', '--grid', '{tmp}/hits.txt'): ['GRID=', '.txt is not a picture',
                                                            '.png'],
    ('RUN={run}', 'TEXT=red00', '--grid', '{tmp}'): ['GRID=', 'is a folder'],
    ('RUN={run}', 'TEXT=red00', '--grid', '{tmp}/no/hits.png'): ['GRID=', 'no folder'],
    ('RUN={run}', 'IMAGE_OF=3', 'K=0'): ['K and BATCH', 'at least 1'],
    ('RUN={run}', 'IMAGE_OF=3', 'K=ten'): ['K=', 'expected an integer'],
    ('RUN={run}', 'IMAGE_OF=500'): ['IMAGE_OF=500', 'from 0 to 159'],
    ('RUN={run}', 'TEXT=red00', 'VOCAB={tmp}'): ['no tag vocabulary', 'VOCAB='],
    ('RUN={run}', 'TEXT=red00', 'VOCAB={tmp}/binary.txt'): ['binary.txt', 'not UTF-8'],
    ('RUN={run}', 'TEXT=red00', 'VOCAB={tmp}/short.txt'): ['short.txt', '2 words', 'expected 300'],
    ('RUN={run}', 'TEXT_OF=3', 'DATA_DIR={tmp}'): ['missing file mirflickr25k-yall.mat'],
    ('RUN={tmp}', 'TEXT=red00'): ['RUN=', 'no checkpoint.pt'],
    ('TEXT=red00',): ['setting RUN', 'expected the run directory'],
    ('RUN={run}', 'IMAGE_OF=3', 'K={{[1]}}'): ['K=', 'expected an integer'],
}


def one_line_error(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        settings.run_cli(search.main, argv)
    assert stop.value.code == 2
    captured = capsys.readouterr()
    assert captured.err.startswith('error: ') and captured.err.count('\n') == 1, captured.err
    return captured.err


@pytest.mark.parametrize('case', list(SPOILED))
def test_spoiled_run_is_one_line(feature_runs, tmp_path, capsys, case):
    argv = spoil(feature_runs['img'], tmp_path, case)
    before = {p: p.read_bytes() for p in (tmp_path / 'run').rglob('*') if p.is_file()}
    err = one_line_error(argv, capsys)
    for word in SPOILED[case]:
        assert word in err, err
    after = {p: p.read_bytes() for p in (tmp_path / 'run').rglob('*') if p.is_file()}
    assert after == before   # nothing changed, nothing left behind


@pytest.mark.parametrize('args, words', list(BAD_ARGS.items()),
                         ids=[' '.join(args) for args in BAD_ARGS])
def test_bad_arguments_are_one_line(feature_runs, tmp_path, capsys, args, words):
    (tmp_path / 'binary.txt').write_bytes(b'\xff\xfe\x00red\n')
    (tmp_path / 'short.txt').write_text('red00\nred01\n')
    args = [a.format(tmp=tmp_path, run=feature_runs['img']) for a in args]
    err = one_line_error(['query', *args], capsys)
    for word in words:
        assert word in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ['binary.txt', 'short.txt']


def test_data_that_is_not_the_runs(tiny_run, feature_runs, tmp_path, capsys):
    """DATA_DIR holding other data than the run's: its split or its widths do not fit."""
    demo.make_demo(str(tmp_path / 'small'), n_pairs=100)
    err = one_line_error(['query', f"RUN={tiny_run}", 'TEXT_OF=3',
                          f"DATA_DIR={tmp_path / 'small'}"], capsys)
    assert 'its split indexes pairs beyond the 100' in err
    run = search.open_run(feature_runs['both'])
    run.state['txt_net']['fc1.weight'] = torch.zeros(4096, 7)
    with pytest.raises(UserError, match='its text input is 7-d, .* gives 12-d'):
        search.run_data(run)


def test_grid_never_overwrites_the_query_image(tiny_run, tmp_path, capsys):
    photo = tmp_path / 'photo.png'
    Image.new('RGB', (40, 40), 'red').save(photo)
    before = photo.read_bytes()
    err = one_line_error(['query', f'RUN={tiny_run}', f'IMAGE={photo}', '--grid', str(photo)],
                         capsys)
    assert 'is the query image' in err and photo.read_bytes() == before


# ===== bench.py search's helpers =====
def test_bench_search_helpers():
    import bench
    rng = np.random.default_rng(0)
    codes, centres = bench.clustered_codes(20000, 8, 4, seed=1)
    flips = np.unpackbits(codes[:, None] ^ centres[None], axis=2).sum(2).min(1)
    assert abs(flips.mean() - 64 / 16) < 0.2   # each bit flipped with probability 1/16
    db = rng.integers(0, 256, (3000, 8), dtype=np.uint8)
    q = rng.integers(0, 256, 8, dtype=np.uint8)
    top = bench.numpy_scan(np.ascontiguousarray(db).view(np.uint64), q.view(np.uint64), 10)
    signs = lambda b: np.where(np.unpackbits(b, axis=-1) > 0, 1, -1)
    ref_dist, ref_ids = stable_ranking(signs(q[None]), signs(db), 10)
    assert set(top) <= set(np.flatnonzero(hamming(signs(q[None]), signs(db))[0]
                                          <= ref_dist[0, -1]))
    assert list(hamming(signs(q[None]), signs(db[top]))[0]) == list(ref_dist[0])
    # recall counts an item tied with the k-th exact distance as found
    exact_dist = np.array([[0, 1, 1]])
    small = np.array([[0], [1], [3], [7]], np.uint8)   # distances 0, 1, 2, 3 to query 0
    assert bench.recall_at_k(small, np.array([[0]], np.uint8), np.array([[0, 1, 2]]),
                             exact_dist, 3) == pytest.approx(2 / 3)
    assert bench.recall_at_k(small, np.array([[0]], np.uint8), np.array([[0, 1, -1]]),
                             np.array([[0, 1, 2]]), 3) == pytest.approx(2 / 3)
