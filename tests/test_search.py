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


def test_bad_runs_and_indexes(tiny_run, tmp_path):
    with pytest.raises(UserError, match='no checkpoint.pt'):
        search.main(['index', f'RUN={tmp_path}'])
    other = tmp_path / 'other'
    shutil.copytree(tiny_run, other)
    state = torch.load(other / 'checkpoint.pt', weights_only=True)
    state['txt_net']['fc2.bias'] += 1   # another run's networks
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
