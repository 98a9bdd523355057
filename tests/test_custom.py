"""DATASET='Custom': the vocabulary (against a plain reference written here)."""
import json
import re
from collections import Counter

import numpy as np
import pytest

import custom
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
    labels, names = custom.label_matrix(rows)
    assert names == ['dog', 'grass'] and labels.tolist() == [[1, 1], [0, 0], [1, 0]]
    (folder / 'pairs.csv').unlink()
    (folder / 'pairs.jsonl').write_text('\n'.join(json.dumps(dict(image=r.image, text=r.text,
                                                                  labels=r.labels))
                                                  for r in rows) + '\n', encoding='utf-8')
    again = custom.read_manifest(custom.manifest_path(str(folder)))
    assert [(r.image, r.text, r.labels) for r in again] == [(r.image, r.text, r.labels)
                                                            for r in rows]
    assert custom.label_matrix([custom.Row(1, 'a', 't', [])])[0].shape == (1, 0)


BAD_CSV = [
    ('image,caption\na.png,x\n', 'line 1', 'no column text'),
    ('image,text\na.png,red dog\nsub/b.png, \n', 'line 3', 'empty text'),
    ('image,text\na.png,red dog\n./a.png,blue\n', 'line 3', 'already the image of line 2'),
    ('image,text\na.png,red dog\nmissing.png,blue\n', 'line 3', 'missing image file'),
    ('image,text\n../a.png,red dog\n', 'line 2', 'inside the'),
    ('image,text,labels\na.png\n', 'line 2', 'fields'),
    ('image,text\n', 'pairs.csv', 'no pairs'),
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


@pytest.mark.parametrize('line, words', [('[1, 2]', 'a JSON list'),
                                         ('{"image": "a.png"}', "no string 'text'"),
                                         ('{"image": "a.png", "text": "x", "labels": "dog"}',
                                          'list of names'),
                                         ('{"image": "a.png", "text": ', 'not JSON')])
def test_bad_jsonl_gets_one_line(folder, line, words):
    (folder / 'pairs.jsonl').write_text('{"image": "sub/b.png", "text": "ok"}\n' + line + '\n')
    with pytest.raises(UserError, match='line 2') as err:
        custom.read_manifest(str(folder / 'pairs.jsonl'))
    assert words in str(err.value)


def test_one_manifest_expected(folder):
    with pytest.raises(UserError, match='neither'):
        custom.manifest_path(str(folder))
    (folder / 'pairs.csv').write_text('image,text\na.png,x\n')
    (folder / 'pairs.jsonl').write_text('{"image": "a.png", "text": "x"}\n')
    with pytest.raises(UserError, match='both'):
        custom.manifest_path(str(folder))


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
