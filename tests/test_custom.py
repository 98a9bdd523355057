"""DATASET='Custom': the vocabulary (against a plain reference written here)."""
import csv
import json
import os
import pathlib
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

import custom
import datasets
import demo
import metric
import pairs
import search
import settings
from settings import UserError
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS


# ===== the vocabulary =====
def ref_vocabulary(texts, vocab_size, min_count):
    """Words of 2+ word characters, lower-cased, no stop words; counted once per text; the
    most frequent first, ties alphabetical."""
    counts = Counter()
    for text in texts:
        counts.update({w for w in re.findall(r'\b\w\w+\b', text.lower())
                       if w not in ENGLISH_STOP_WORDS})
    kept = sorted((w for w in counts if counts[w] >= min_count), key=lambda w: (-counts[w], w))
    return kept[:vocab_size]


def test_vocabulary_by_hand():
    texts = ['A red dog and a blue cat', 'the red car', 'Red, red, RED!', 'blue sky 42', 'x y']
    # red: 3 texts (once each), blue: 2, then 42, car, cat, dog, sky: 1 each (alphabetical)
    assert custom.fit_vocabulary(texts, 4, 1) == (['red', 'blue', '42', 'car'], [3, 2, 1, 1])
    assert custom.fit_vocabulary(texts, 10, 2) == (['red', 'blue'], [3, 2])
    assert custom.fit_vocabulary(texts, 10, 4) == ([], [])
    assert custom.fit_vocabulary(['the and of', 'a'], 10, 1) == ([], [])   # stop words only
    vectors = custom.text_vectors(texts, ['red', 'blue'])
    assert vectors.dtype == np.float32
    assert vectors.tolist() == [[1, 1], [1, 0], [1, 0], [0, 1], [0, 0]]
    assert custom.tokens('The Red dog, and blue-cat') == ['red', 'dog', 'blue', 'cat']


def test_vocabulary_matches_reference():
    rng = np.random.default_rng(0)
    words = ['w' + str(i) for i in range(40)] + ['the', 'and', 'Of', 'z']
    texts = [' '.join(rng.choice(words, size=rng.integers(0, 12))) for _ in range(300)]
    for size, count in ((10, 1), (25, 5), (100, 30)):
        expected = ref_vocabulary(texts, size, count)
        assert custom.fit_vocabulary(texts, size, count)[0] == expected
        vectors = custom.text_vectors(texts, expected)
        for text, row in zip(texts[:50], vectors):
            present = set(text.lower().split())
            assert row.tolist() == [float(w in present) for w in expected]


# ===== the manifest =====
def write_png(path, value=128):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


@pytest.fixture
def folder(tmp_path):
    for name in ('a.png', 'sub/b.png', 'sub/deeper/c.png'):
        write_png(tmp_path / name)
    return tmp_path


def test_csv_and_jsonl_manifests_read_the_same(folder):
    (folder / 'pairs.csv').write_text(
        'Image,text,labels\n'
        'a.png,"a red dog, on grass",dog;grass\n'
        '\n'
        'sub/b.png,"a caption\nover two lines",\n'
        'sub/deeper/c.png,tags only,dog\n', encoding='utf-8')
    rows = custom.read_manifest(custom.manifest_path(str(folder)))
    assert [(r.line, r.image, r.labels) for r in rows] == [
        (2, 'a.png', ['dog', 'grass']), (4, 'sub/b.png', []), (6, 'sub/deeper/c.png', ['dog'])]
    assert rows[0].text == 'a red dog, on grass'
    labels, names = custom.label_matrix(rows, 'pairs.csv')
    assert names == ['dog', 'grass'] and labels.tolist() == [[1, 1], [0, 0], [1, 0]]
    (folder / 'pairs.csv').unlink()
    (folder / 'pairs.jsonl').write_text('\n'.join(json.dumps(dict(image=r.image, text=r.text,
                                                                  labels=r.labels))
                                                  for r in rows) + '\n', encoding='utf-8')
    again = custom.read_manifest(custom.manifest_path(str(folder)))
    assert [(r.image, r.text, r.labels) for r in again] == [(r.image, r.text, r.labels)
                                                            for r in rows]
    assert custom.label_matrix([custom.Row(1, 'a', 't', [])], 'pairs.csv')[0].shape == (1, 0)


def test_a_label_per_pair_too_many_for_memory_is_one_line(monkeypatch):
    """Captions put in the labels column: as many names as pairs, an N x N matrix. Refused
    when it would take more than LABEL_SHARE of the memory (here made 1 MB), before it is made."""
    monkeypatch.setattr(custom.pairs, 'physical_memory', lambda: 10**6)
    rows = [custom.Row(i + 2, f'{i}.png', 'text', [f'caption {i}']) for i in range(400)]
    with pytest.raises(UserError) as err:
        custom.label_matrix(rows, 'pairs.csv')
    assert str(err.value).startswith('pairs.csv: 400 label names over 400 pairs; ')
    assert 'expected labels that pairs share' in str(err.value)
    shared = [custom.Row(i + 2, f'{i}.png', 'text', ['dog', 'cat'][i % 2:]) for i in range(400)]
    assert custom.label_matrix(shared, 'pairs.csv')[0].shape == (400, 2)   # 800 bytes: fine


BAD_CSV = [
    ('image,caption\na.png,x\n', 'line 1', 'no column text'),
    ('image,text\na.png,red dog\nsub/b.png, \n', 'line 3', 'empty text'),
    ('image,text\na.png,red dog\n./a.png,blue\n', 'line 3', 'already the image of line 2'),
    ('image,text\na.png,red dog\nmissing.png,blue\n', 'line 3', 'missing image file'),
    ('image,text\n../a.png,red dog\n', 'line 2', 'inside the'),
    ('image,text,labels\na.png\n', 'line 2', 'fields'),
    ('image,text\n', 'pairs.csv', 'no pairs'),
    # which column is meant cannot be told
    ('image,text,TEXT\na.png,red,blue\n', 'line 1', 'names the column text more than once'),
    ('image;text\na.png;red\n', 'line 1', "separated by ';'"),
    # an unquoted comma: 'on grass' would become a label
    ('image,text,labels\na.png,a dog, on grass,dog\n', 'line 2', 'quote a field'),
    # an unclosed quote would swallow the rows after it into one text
    ('image,text\na.png,"red dog\nsub/b.png,blue\n', 'line 2', 'never closed'),
    ('image,text\na.png,"red" dog\n', 'line 2', 'not CSV'),
    ('image,text\na.png,' + 'w' * 200000 + '\n', 'line 2', 'longer than'),
    ('image,text\nsub,red dog\n', 'line 2', 'is a folder, not a file'),
    ('image,text\nsub/..,red dog\n', 'line 2', 'inside the'),
    ('image,text\na.png\x00,red dog\n', 'line 2', 'control or invalid character'),
    ('image,text\nsub\\b.png,red dog\n', 'line 2', "separated by '/'"),
]


@pytest.mark.parametrize('content, line, words', BAD_CSV)
def test_bad_csv_gets_one_line(folder, content, line, words):
    (folder / 'pairs.csv').write_text(content, encoding='utf-8')
    with pytest.raises(UserError) as err:
        custom.read_manifest(custom.manifest_path(str(folder)))
    message = str(err.value)
    assert '\n' not in message and 'pairs.csv' in message and line in message
    assert words in message


def test_not_utf8_names_the_line(folder):
    (folder / 'pairs.csv').write_bytes(b'image,text\na.png,red\nsub/b.png,caf\xe9 noir\n')
    with pytest.raises(UserError, match=r'pairs.csv, line 3: byte 0xe9 is not UTF-8'):
        custom.read_manifest(str(folder / 'pairs.csv'))
    (folder / 'pairs.csv').write_bytes('image,text\na.png,red\n'.encode('utf-16'))
    with pytest.raises(UserError, match=r'line 1: byte 0xff is not UTF-8 \(it starts as UTF-16'):
        custom.read_manifest(str(folder / 'pairs.csv'))


def test_csv_fields_beyond_the_header_only_when_empty(folder):
    (folder / 'pairs.csv').write_text('image,text\na.png,red dog,,\nsub/b.png,"x, y"\n')
    rows = custom.read_manifest(str(folder / 'pairs.csv'))   # a spreadsheet's trailing commas
    assert [(r.image, r.text) for r in rows] == [('a.png', 'red dog'), ('sub/b.png', 'x, y')]


@pytest.mark.parametrize('line, words', [('[1, 2]', 'an array'),
                                         ('null', 'null; expected an object'),
                                         ('{"image": "a.png"}', "no string 'text'"),
                                         ('{"image": "a.png", "text": "x", "labels": "dog"}',
                                          'list of names'),
                                         ('{"image": "a.png", "text": "x", "text": "y"}',
                                          'the key text is given more than once'),
                                         ('{"image": "a.png", "text": "x", "y": ' + '[' * 10**5
                                          + ']' * 10**5 + '}', 'nested too deeply'),
                                         ('{"image": "a.png", "text": ', 'not JSON')])
def test_bad_jsonl_gets_one_line(folder, line, words):
    (folder / 'pairs.jsonl').write_text('{"image": "sub/b.png", "text": "ok"}\n' + line + '\n')
    with pytest.raises(UserError, match='line 2') as err:
        custom.read_manifest(str(folder / 'pairs.jsonl'))
    assert words in str(err.value)


def test_jsonl_lines_end_at_line_feeds_only(folder):
    # U+2028 and U+0085 may stand in a JSON string as they are; str.splitlines cuts there
    (folder / 'pairs.jsonl').write_text(
        json.dumps({'image': 'a.png', 'text': 'red\u2028dog\x85cat'}, ensure_ascii=False)
        + '\r\n' + json.dumps({'image': 'sub/b.png', 'text': 'blue'}) + '\n', encoding='utf-8')
    rows = custom.read_manifest(str(folder / 'pairs.jsonl'))
    assert [(r.line, r.text) for r in rows] == [(1, 'red\u2028dog\x85cat'), (2, 'blue')]


def test_one_manifest_expected(folder):
    with pytest.raises(UserError, match='neither'):
        custom.manifest_path(str(folder))
    (folder / 'pairs.csv').write_text('image,text\na.png,x\n')
    (folder / 'pairs.jsonl').write_text('{"image": "a.png", "text": "x"}\n')
    with pytest.raises(UserError, match='both'):
        custom.manifest_path(str(folder))
    (folder / 'pairs.jsonl').unlink()
    (folder / 'pairs.csv').rename(folder / 'Pairs.CSV')
    with pytest.raises(UserError, match='neither.*it holds Pairs.CSV: the names are lower-case'):
        custom.manifest_path(str(folder))
    (folder / 'pairs.csv').mkdir()
    with pytest.raises(UserError, match='pairs.csv: a folder, not a file'):
        custom.manifest_path(str(folder))
    (folder / 'pairs.csv').rmdir()
    (folder / 'pairs.csv').symlink_to(folder / 'gone.csv')
    with pytest.raises(UserError, match='pairs.csv: a broken symbolic link'):
        custom.manifest_path(str(folder))


def small_cfg(folder, **overrides):
    """The 3-pair `folder`: 1 query, 2 training pairs."""
    return cfg_for(folder, QUERY_SIZE=1, BATCH_SIZE=2, MIN_WORD_COUNT=1, **overrides)


def write_pairs(folder, texts, labels=('', '', '')):
    with open(folder / 'pairs.csv', 'w', newline='', encoding='utf-8') as f:
        csv.writer(f).writerows([('image', 'text', 'labels'), *zip(
            ('a.png', 'sub/b.png', 'sub/deeper/c.png'), texts, labels)])


def test_texts_of_stop_words_only(folder):
    write_pairs(folder, ('the and of', 'a b c', 'x, y!'))
    with pytest.raises(UserError) as err:   # 'a lower MIN_WORD_COUNT' cannot help at 1
        custom.load(small_cfg(folder))
    assert 'pairs.csv: the texts of its 2 training pairs hold no word but stop words' in str(
        err.value)


def test_labels_that_cannot_measure_map(folder):
    query = custom.split(3, 1, 2, 0)[0][0]   # the query pair of small_cfg
    write_pairs(folder, ('red dog', 'blue cat', 'green cow'),
                ['dog' if i == query else '' for i in range(3)])
    with pytest.raises(UserError, match='none of the 1 labelled pairs is in the database set'):
        datasets.load(small_cfg(folder), verbose=False)
    write_pairs(folder, ('red dog', 'blue cat', 'green cow'),
                ['' if i == query else 'dog' for i in range(3)])
    with pytest.raises(UserError, match='in the query set, so mAP, taken over the labelled '
                                        'queries, cannot be measured'):
        datasets.load(small_cfg(folder), verbose=False)
    write_pairs(folder, ('red dog', 'blue cat', 'green cow'), ('dog;pet', 'pet;dog', 'dog;pet'))
    data = datasets.load(small_cfg(folder), verbose=False)
    assert any('every labelled pair has the same labels (dog;pet)' in w for w in data.warnings)
    write_pairs(folder, ('red dog', 'blue cat', 'green cow'), ('dog', 'cat', 'dog'))
    assert not any('same labels' in w for w in datasets.load(small_cfg(folder),
                                                             verbose=False).warnings)


def save_image(path, array_or_image, **options):
    image = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(
        array_or_image)
    image.save(path, **options)
    return str(path)


def test_odd_images_decode_to_rgb_bytes(tmp_path):
    """Grey, 16-bit, RGBA, CMYK, 1 x 1, animated GIF, upper-case suffix: (H, W, 3) uint8."""
    frames = [Image.new('P', (9, 7), i) for i in range(3)]
    paths = [save_image(tmp_path / 'grey.png', np.full((7, 9), 200, np.uint8)),
             save_image(tmp_path / 'deep.png', np.full((7, 9), 51400, np.uint16)),
             save_image(tmp_path / 'alpha.png', np.full((7, 9, 4), 200, np.uint8)),
             save_image(tmp_path / 'cmyk.JPG', Image.new('CMYK', (9, 7), (0, 0, 0, 0))),
             save_image(tmp_path / 'one.png', np.full((1, 1, 3), 200, np.uint8)),
             save_image(tmp_path / 'moving.gif', frames[0], save_all=True,
                        append_images=frames[1:])]
    images = pairs.FileImages(paths)
    for i in range(len(paths)):
        image = images[i]
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert images[1].max() == 200   # 16 bits scaled to 8, not clipped
    assert images[3].min() > 240    # CMYK (0, 0, 0, 0) is white


def test_a_strip_of_pixels_is_refused_before_resizing(tmp_path):
    # Resize(256) of a 1 x 300 strip would make it 76,800 pixels wide
    images = custom.ManifestImages([save_image(tmp_path / 'strip.png',
                                               np.zeros((1, 300, 3), np.uint8))], ['m, line 2'])
    for read in (images.__getitem__, images.pil):
        with pytest.raises(UserError, match=r'm, line 2: .*strip.png: 300 x 1 pixels, one side '
                                            r'more than 100 times the other'):
            read(0)


# ===== the split =====
def test_split_sizes_and_draw():
    assert custom.split_sizes(30000, 0, 5000, 'x') == (2000, 5000)
    assert custom.split_sizes(1000, 0, 5000, 'x') == (100, 900)
    assert custom.split_sizes(1000, 300, 200, 'x') == (300, 200)
    with pytest.raises(UserError, match='QUERY_SIZE=50'):
        custom.split_sizes(50, 50, 10, 'x')
    query, train, database = custom.split(100, 10, 40, seed=3)
    assert len(query) == 10 and len(train) == 40
    assert not set(query) & set(database) and set(train) <= set(database)
    assert sorted([*query, *database]) == list(range(100))
    assert all(np.array_equal(a, b) for a, b in zip(custom.split(100, 10, 40, seed=3),
                                                     (query, train, database)))
    assert not np.array_equal(custom.split(100, 10, 40, seed=4)[0], query)


# ===== a folder built from the DEMO generator's content =====
FILLERS = ('a', 'the', 'with', 'and', 'of', 'on')   # stop words: the vocabulary drops them


def make_folder(path, n, seed=0, manifest='csv'):
    """n pairs: DEMO images as PNG files in subfolders, the DEMO tags as sentences padded with
    stop words, the DEMO labels by colour name on every other pair."""
    rng = np.random.default_rng(seed)
    labels = demo.demo_labels(rng, n)
    tags = demo.demo_texts(rng, labels)
    images = demo.demo_images(rng, labels)
    words = search.demo_vocabulary()
    rows = []
    for i in range(n):
        name = f"photos/{i % 5}/{i:04d}.png"
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(path / name)
        sentence = []
        for j in rng.permutation(np.flatnonzero(tags[i])):
            sentence += [str(rng.choice(FILLERS)), words[j]]
        names = [search.DEMO_LABEL_NAMES[k] for k in np.flatnonzero(labels[i])] if i % 2 else []
        rows.append(dict(image=name, text=' '.join(sentence).capitalize() + '.', labels=names))
    if manifest == 'csv':
        with open(path / 'pairs.csv', 'w', newline='', encoding='utf-8') as f:
            writer = csv.writer(f)
            writer.writerow(['image', 'text', 'labels'])
            writer.writerows([r['image'], r['text'], ';'.join(r['labels'])] for r in rows)
    else:
        (path / 'pairs.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    return tags, labels


def cfg_for(path, **overrides):
    return settings.resolve(DATASET='Custom', DATA_DIR=str(path), **overrides)


def test_reader_vectors_split_and_labels(tmp_path):
    tags, labels = make_folder(tmp_path, 120)
    cfg = cfg_for(tmp_path, MIN_WORD_COUNT=2, VOCAB_SIZE=1000)
    data = datasets.load(cfg, verbose=False)
    assert (len(data.query), len(data.train), len(data.database)) == (12, 108, 108)
    words = data.vocabulary['words']
    # every DEMO tag in at least 2 training pairs, and nothing else, is in the vocabulary
    in_train = tags[data.train].sum(0)
    demo_words = search.demo_vocabulary()
    assert sorted(words) == sorted(demo_words[j] for j in np.flatnonzero(in_train >= 2))
    columns = [demo_words.index(w) for w in words]
    assert np.array_equal(data.texts, tags[:, columns].astype(np.float32))
    assert data.vocabulary['counts'] == [int(in_train[j]) for j in columns]
    # labels on every other pair, by colour name (sorted)
    names = data.vocabulary['label_names']
    order = [search.DEMO_LABEL_NAMES.index(name) for name in names]
    expected = labels[:, order].copy()
    expected[::2] = 0
    assert np.array_equal(data.labels, expected)
    # the image of pair i is the PNG of pair i, unchanged
    image = np.asarray(Image.open(tmp_path / 'photos' / '3' / '0008.png'))
    assert np.array_equal(data.images[8], image)


def test_check_command_and_bad_image(tmp_path, capsys):
    make_folder(tmp_path, 60, manifest='jsonl')
    args = ['DATASET=Custom', f'DATA_DIR={str(tmp_path)!r}', 'MIN_WORD_COUNT=2', 'FULL=True']
    assert datasets.main(args) == 0
    out = capsys.readouterr().out
    assert 'pairs 60' in out and 'vocabulary: ' in out and 'read all 60 images' in out
    (tmp_path / 'photos' / '2' / '0007.png').write_bytes(b'not a picture')
    with pytest.raises(UserError) as err:
        datasets.main(args)
    assert 'pairs.jsonl, line 8' in str(err.value) and '0007.png' in str(err.value)


# ===== training and search on a Custom folder =====
# The DEMO preset's small network (random AlexNet on 64 x 64 crops), on a Custom folder.
SMALL = dict(BACKBONE='alexnet', PRETRAINED=False, RESIZE=72, CROP=64, BETA=0.5, CODE_LEN=32,
             NUM_WORKERS=0, EVAL_BATCH_SIZE=128, DEVICE='cpu', EVAL_UNTRAINED=True,
             MIN_WORD_COUNT=2)


def stamps(folder):
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob('*')}


@pytest.fixture(scope='module')
def custom_run(tmp_path_factory):
    """A 120-pair folder (half labelled) trained 1 epoch on its images, then indexed."""
    import train
    base = tmp_path_factory.mktemp('custom')
    make_folder(base / 'pairs', 120)
    before = stamps(base / 'pairs')
    cfg = cfg_for(base / 'pairs', OUT_DIR=str(base / 'runs'), RUN_NAME='r', NUM_EPOCH=1,
                  BATCH_SIZE=16, **dict(SMALL, EVAL_UNTRAINED=False))
    run = train.Run(cfg)
    run.train_to_end()
    search.main(['index', f'RUN={run.dir}'])
    assert stamps(base / 'pairs') == before   # nothing in the folder was written
    return run.dir


def test_results_of_a_half_labelled_folder(custom_run):
    results = json.loads(open(os.path.join(custom_run, 'results.json')).read())
    with np.load(os.path.join(custom_run, results['codes'])) as z:
        codes = {k: z[k] for k in z.files}
    pairs = metric.pair_retrieval(codes['query_img'], codes['query_txt'])
    assert {k: results[k] for k in pairs} == pairs
    # half the pairs have labels: mAP over the labelled queries, against metric.py
    labelled = codes['query_labels'].any(1)
    assert 0 < labelled.sum() < len(labelled)
    assert results['map_i2t'] == metric.calculate_top_map(
        codes['query_img'][labelled], codes['db_txt'], codes['query_labels'][labelled],
        codes['db_labels'], 50)
    assert results['map_all_t2i'] == metric.calculate_map(
        codes['query_txt'][labelled], codes['db_img'], codes['query_labels'][labelled],
        codes['db_labels'])
    vocabulary = custom.read_vocabulary(custom_run)
    assert len(vocabulary['words']) > 100
    assert vocabulary['label_names'] == sorted(search.DEMO_LABEL_NAMES)


def run_query(run_dir, *args):
    return search.cmd_query(search.parse(['query', f'RUN={run_dir}', *args])[1])


def test_text_query_reads_a_sentence_with_the_run_vocabulary(custom_run, capsys):
    words = custom.read_vocabulary(custom_run)['words']
    hits = run_query(custom_run, f'TEXT=The {words[0]} and {words[5].upper()}, zzzz!', 'K=5')
    err = capsys.readouterr().err
    assert 'ignored: zzzz' in err            # stop words drop silently, unknown words not
    run = search.open_run(custom_run)
    vector = np.zeros((1, len(words)), np.float32)
    vector[0, [0, 5]] = 1
    code = search.encode_texts(run, vector)
    database = np.load(os.path.join(custom_run, 'split.npz'))['database']
    with np.load(os.path.join(custom_run, 'codes', 'epoch_001.npz')) as z:
        dist = (z['db_img'] != code).sum(1)
    ranked = sorted(range(len(database)), key=lambda j: (dist[j], j))[:5]
    assert [h.item for h in hits.rows] == list(database[ranked])


def test_image_and_pair_queries(custom_run, tmp_path, capsys):
    data = search.run_data(search.open_run(custom_run))
    pair = int(data.database[4])
    path = tmp_path / 'new.png'
    data.images.pil(pair).save(path)
    hits = run_query(custom_run, f'IMAGE={path}', f'K={len(data.database)}', 'TARGET=image')
    assert {h.item: h.distance for h in hits.rows}[pair] == 0   # its own image
    capsys.readouterr()
    grid = tmp_path / 'grid.png'
    hits = run_query(custom_run, f'TEXT_OF={pair}', 'K=5', '--grid', str(grid))
    out = capsys.readouterr().out
    assert grid.stat().st_size > 1000 and len(hits.rows) == 5
    assert ('query labels' in out) == bool(data.labels[pair].any())
    hits = run_query(custom_run, f'IMAGE_OF={pair}', 'K=3')
    assert all(h.words for h in hits.rows)   # texts shown by their vocabulary words


def test_stop_words_only_query(custom_run):
    with pytest.raises(UserError, match="TEXT='The, and a!': only stop words"):
        run_query(custom_run, 'TEXT=The, and a!')


@pytest.mark.parametrize('content, words', [
    ('{"words": ["red", 2]}', "a list of strings 'words'"),
    ('{"words": ["red"], "label_names": "dog"}', "'label_names'"),
    ('{"words": ["red", "blue"]}', '2 words; the run\'s texts have'),   # the run reads more
])
def test_vocabulary_file_spoiled(custom_run, tmp_path, content, words):
    run = search.open_run(custom_run)
    run.dir = str(tmp_path)   # the run's checkpoint, a spoiled vocabulary.json
    (tmp_path / custom.VOCABULARY_FILE).write_text(content)
    with pytest.raises(UserError, match='vocabulary.json') as err:
        search.custom_vocabulary(run)
    assert words in str(err.value)


def edited_copy(run_dir, tmp_path, edit):
    """A copy of the run's data folder whose manifest `edit(lines)` changed."""
    import shutil
    copy = tmp_path / 'pairs'
    shutil.copytree(json.loads(open(os.path.join(run_dir, 'settings.json')).read())['DATA_DIR'],
                    copy)
    lines = (copy / 'pairs.csv').read_bytes().splitlines(keepends=True)
    (copy / 'pairs.csv').write_bytes(b''.join(edit(lines)))
    return copy


EDITS = {   # a manifest changed after training, the number of pairs kept
    'rows swapped': lambda lines: [lines[0], lines[2], lines[1], *lines[3:]],
    'a text edited': lambda lines: [*lines[:5], lines[5].replace(b',', b',Zebra ', 1), *lines[6:]],
}


@pytest.mark.parametrize('edit', list(EDITS))
def test_a_run_refuses_its_manifest_changed(custom_run, tmp_path, edit):
    """EVAL=True, a resume and search.py would otherwise read other pairs under the same
    indices, silently. An unchanged copy elsewhere is the same data."""
    import train
    same = edited_copy(custom_run, tmp_path / 'same', lambda lines: lines)
    run = search.open_run(custom_run)
    assert len(search.run_data(run, str(same)).labels) == 120
    changed = edited_copy(custom_run, tmp_path / 'changed', EDITS[edit])
    run = search.open_run(custom_run)
    with pytest.raises(UserError, match='trained on another version of .*pairs.csv'):
        search.run_data(run, str(changed))
    def written():   # the lock file takes each holder's process id: not a result
        return {p: v for p, v in stamps(pathlib.Path(custom_run)).items() if p.name != '.lock'}
    before = written()
    cfg = search.run_settings(os.path.join(custom_run, 'settings.json'))
    cfg.DATA_DIR, cfg.EVAL, cfg.OUT_DIR = str(changed), True, os.path.dirname(custom_run)
    with pytest.raises(UserError, match='a pair added, removed, moved or edited since'):
        train.Run(cfg).eval_checkpoint()
    assert written() == before


def test_extracted_features_name_their_manifest(folder):
    """Rows reordered keep the manifest's size: extract.py told the files apart by size."""
    import extract
    write_pairs(folder, ('red dog', 'blue cat', 'green cow'))
    cfg = small_cfg(folder, BACKBONE='alexnet', PRETRAINED=False)
    first = extract.identity(cfg, datasets.load(cfg, verbose=False))
    lines = (folder / 'pairs.csv').read_bytes().splitlines(keepends=True)
    (folder / 'pairs.csv').write_bytes(b''.join([lines[0], lines[2], lines[1], lines[3]]))
    again = extract.identity(cfg, datasets.load(cfg, verbose=False))
    assert again['data_files'] == first['data_files'] and again != first


@pytest.fixture(scope='module')
def feature_runs(tmp_path_factory):
    """A 400-pair folder without labels: extract.py's random-AlexNet features, then a run on
    them, 8 epochs (on features: seconds)."""
    import extract
    import train
    base = tmp_path_factory.mktemp('custom_features')
    make_folder(base / 'pairs', 400, seed=1)
    csv_path = base / 'pairs' / 'pairs.csv'
    rows = csv_path.read_text().splitlines()
    csv_path.write_text('\n'.join(line.rpartition(',')[0] for line in rows) + '\n')   # no labels
    settings_ = dict(SMALL, QUERY_SIZE=100, NUM_EPOCH=8, EVAL_INTERVAL=8)
    path = extract.extract(cfg_for(base / 'pairs', **settings_))
    cfg = cfg_for(base / 'pairs', OUT_DIR=str(base / 'runs'), RUN_NAME='f',
                  IMAGE_FEATURES=path, **settings_)
    run = train.Run(cfg)
    run.train_to_end()
    return run.dir


def test_training_without_labels_raises_own_pair_recall(feature_runs):
    results = json.loads(open(os.path.join(feature_runs, 'results.json')).read())
    assert all(results[key] is None for key in ('map_i2t', 'map_t2i', 'map_all_i2t',
                                                'map_all_t2i'))
    for way in ('i2t', 't2i'):   # chance: 10 of 100 queries
        assert results[f'recall_{way}']['10'] > results[f'untrained_recall_{way}']['10'] + 0.1
        assert results[f'median_rank_{way}'] < results[f'untrained_median_rank_{way}']


def test_text_features_replace_the_words(tmp_path):
    make_folder(tmp_path / 'pairs', 50)
    vectors = np.random.default_rng(0).random((50, 7)).astype(np.float32)
    np.save(tmp_path / 'sentences.npy', vectors)
    cfg = cfg_for(tmp_path / 'pairs', TEXT_FEATURES=str(tmp_path / 'sentences.npy'),
                  BATCH_SIZE=16)
    data = datasets.load(cfg, verbose=False)
    assert np.array_equal(data.texts, vectors) and data.vocabulary['words']
    with pytest.raises(UserError, match='MIN_WORD_COUNT=99'):
        datasets.load(cfg_for(tmp_path / 'pairs', MIN_WORD_COUNT=99, BATCH_SIZE=16),
                      verbose=False)
