"""DATASET='Custom': the vocabulary (against a plain reference written here)."""
import re
from collections import Counter

import numpy as np

import custom
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
    assert custom.fit_vocabulary(texts, 4, 1) == ['red', 'blue', '42', 'car']
    assert custom.fit_vocabulary(texts, 10, 2) == ['red', 'blue']
    assert custom.fit_vocabulary(texts, 10, 4) == []
    assert custom.fit_vocabulary(['the and of', 'a'], 10, 1) == []   # stop words only
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
        assert custom.fit_vocabulary(texts, size, count) == expected
        vectors = custom.text_vectors(texts, expected)
        for text, row in zip(texts[:50], vectors):
            present = set(text.lower().split())
            assert row.tolist() == [float(w in present) for w in expected]
