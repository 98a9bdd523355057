"""Your own image-text pairs (DATASET='Custom'): the vocabulary that turns their texts into
DJSRH's bag-of-words vectors.

Texts become binary bag-of-words vectors with scikit-learn's CountVectorizer (binary=True):
lower-cased word tokens of two or more letters or digits (its default token pattern), minus
its built-in English stop-word list (sklearn.feature_extraction.text.ENGLISH_STOP_WORDS,
318 words such as 'a', 'the', 'and', 'of'). The vocabulary comes from the TRAINING pairs only
(the query pairs stay unseen): the VOCAB_SIZE words found in the most training pairs, among
those in at least MIN_WORD_COUNT of them; a word repeated within one text counts once (the
vector is binary). Ties in count go alphabetically, so the vocabulary does not depend on a
sort algorithm. docs/custom.md has the details.
"""
import json
import os

import numpy as np

from settings import UserError

VOCABULARY_FILE = 'vocabulary.json'   # in the run directory: search.py reads TEXT= with it
STOP_WORDS = 'english'                # scikit-learn's built-in list (ENGLISH_STOP_WORDS)


# ===== the vocabulary =====
def vectorizer(vocabulary=None, min_count=1):
    """scikit-learn's CountVectorizer as every part of this project uses it."""
    from sklearn.feature_extraction.text import CountVectorizer   # 1 s to import: only here
    return CountVectorizer(binary=True, lowercase=True, stop_words=STOP_WORDS,
                           min_df=min_count, vocabulary=vocabulary, dtype=np.float32)


def fit_vocabulary(texts, vocab_size, min_count):
    """The words of the vocabulary, most frequent first (then alphabetical): the vocab_size
    words found in the most of `texts`, among those in at least min_count of them. [] when
    no word is frequent enough."""
    counter = vectorizer(min_count=min_count)
    try:
        counts = counter.fit_transform(texts)
    except ValueError:   # every word is a stop word, or below min_count
        return []
    words = counter.get_feature_names_out()          # alphabetical
    in_pairs = np.asarray(counts.sum(0)).ravel()     # binary: the number of texts
    order = np.argsort(-in_pairs, kind='stable')     # alphabetical within a tie
    return [str(words[j]) for j in order[:vocab_size]]


def text_vectors(texts, words):
    """(len(texts), len(words)) float32 0/1: column j says whether words[j] is in the text."""
    return vectorizer(vocabulary=words).transform(texts).toarray()


def tokens(text):
    """The words CountVectorizer sees in a text (lower-cased, no stop words): search.py
    reads a typed query with it."""
    return vectorizer().build_analyzer()(text)


# ===== the vocabulary file of a run =====
def save_vocabulary(run_dir, vocabulary, write_json):
    """Write RUN/vocabulary.json (`write_json(path, obj)` writes atomically)."""
    write_json(os.path.join(run_dir, VOCABULARY_FILE), vocabulary)


def read_vocabulary(run_dir):
    """The vocabulary dict saved with a Custom run: words (column order), label_names, ..."""
    path = os.path.join(run_dir, VOCABULARY_FILE)
    try:
        with open(path, encoding='utf-8') as f:
            vocabulary = json.load(f)
    except OSError as err:
        raise UserError(f"{path}: cannot be read ({err.strerror}); a Custom run writes it "
                        f"when it starts") from None
    except ValueError as err:
        raise UserError(f"{path}: not JSON ({err}); train.py writes it when a Custom run "
                        f"starts") from None
    if not (isinstance(vocabulary, dict) and isinstance(vocabulary.get('words'), list)):
        raise UserError(f"{path}: expected an object with a list 'words'")
    return vocabulary
