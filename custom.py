"""Your own image-text pairs (DATASET='Custom'): the manifest, the split, and the vocabulary
that turns the texts into DJSRH's bag-of-words vectors.

DATA_DIR holds the images (any subfolders) and one manifest:

    pairs.csv     a header row naming the columns image, text and optionally labels
                  (label names ';'-separated), then one pair a row
    pairs.jsonl   one object a line: {"image": ..., "text": ..., "labels": [...]} (labels
                  optional)

`image` is a path relative to DATA_DIR; `text` is free text (tags or a caption); labels are
for evaluation only (mAP); without any, only the own-pair recall is reported. The manifest
and the images are only ever read. The split is seeded (SPLIT_SEED): QUERY_SIZE pairs drawn
at random are the queries, TRAIN_SIZE of the others the training set, and the database is
every pair but the queries, as for the benchmarks.

Texts become binary bag-of-words vectors with scikit-learn's CountVectorizer (binary=True):
lower-cased word tokens of two or more letters or digits (its default token pattern), minus
its built-in English stop-word list (sklearn.feature_extraction.text.ENGLISH_STOP_WORDS,
318 words such as 'a', 'the', 'and', 'of'). The vocabulary comes from the TRAINING pairs only
(the query pairs stay unseen): the VOCAB_SIZE words found in the most training pairs, among
those in at least MIN_WORD_COUNT of them; a word repeated within one text counts once (the
vector is binary). Ties in count go alphabetically, so the vocabulary does not depend on a
sort algorithm. docs/custom.md has the details.
"""
import csv
import dataclasses
import io
import json
import os

import numpy as np

import pairs
from settings import UserError

VOCABULARY_FILE = 'vocabulary.json'   # in the run directory: search.py reads TEXT= with it
STOP_WORDS = 'english'                # scikit-learn's built-in list (ENGLISH_STOP_WORDS)
MANIFESTS = ('pairs.csv', 'pairs.jsonl')
COLUMNS = ('image', 'text')           # required; 'labels' is optional
LABEL_SEPARATOR = ';'                 # between label names in pairs.csv
QUERY_DEFAULT, QUERY_SHARE, QUERY_SHARE_BELOW = 2000, 0.1, 20000   # QUERY_SIZE=0


# ===== the reader =====
def load(cfg, need_images=True):
    """The Data of the Custom folder cfg.DATA_DIR, split with cfg.SPLIT_SEED, its texts turned
    into vectors with a vocabulary of its training pairs (data.vocabulary, saved with the run).
    need_images=False (stored features): the image files need not exist."""
    data_dir = cfg.DATA_DIR
    if not os.path.isdir(data_dir):
        what = 'is a file' if os.path.exists(data_dir) else 'no such folder'
        raise UserError(f"setting DATA_DIR={data_dir!r}: {what}; expected a folder holding "
                        f"the images and {' or '.join(MANIFESTS)} (docs/custom.md)")
    path = manifest_path(data_dir)
    rows = read_manifest(path, need_images)
    n = len(rows)
    query, train, database = split(n, *split_sizes(n, cfg.QUERY_SIZE, cfg.TRAIN_SIZE, path),
                                   cfg.SPLIT_SEED)
    labels, names = label_matrix(rows)
    images = ManifestImages([os.path.join(data_dir, os.path.normpath(row.image)) for row in rows],
                            [f"{path}, line {row.line}" for row in rows])
    labelled = int(labels.any(1).sum())
    files = [(path, f"{n} pairs, {labelled} with labels ({len(names)} label names)"),
             (data_dir, f"{n} image files" if need_images else "image files not read")]
    data = pairs.Data('Custom', np.zeros((n, 0), np.float32), labels, images, query, train,
                      database, files, [])
    # With TEXT_FEATURES the stored vectors replace these (datasets.load); the words still
    # name what a search hit's text says.
    vectorize(data, [row.text for row in rows], cfg, path)
    if data.vocabulary:
        data.vocabulary['label_names'] = names
    if not labels.any():
        data.notes.append("no labels: evaluated by own-pair recall@K and median rank only "
                          "(mAP needs labels)")
    return data


def vectorize(data, texts, cfg, path):
    """data.texts from the vocabulary of the training pairs' texts; data.vocabulary."""
    words, counts = fit_vocabulary([texts[i] for i in data.train], cfg.VOCAB_SIZE,
                                   cfg.MIN_WORD_COUNT)
    if not words and cfg.TEXT_FEATURES:
        return
    if not words:
        raise UserError(f"setting MIN_WORD_COUNT={cfg.MIN_WORD_COUNT}: no word (stop words "
                        f"aside) is in that many of the {len(data.train)} training pairs of "
                        f"{path}; expected a lower MIN_WORD_COUNT or more pairs")
    data.texts = text_vectors(texts, words)
    data.vocabulary = dict(words=words, counts=counts, training_pairs=len(data.train),
                           VOCAB_SIZE=cfg.VOCAB_SIZE, MIN_WORD_COUNT=cfg.MIN_WORD_COUNT,
                           stop_words='scikit-learn ENGLISH_STOP_WORDS',
                           tokens='lower-cased runs of 2+ letters or digits')
    wordless = int((~data.texts.any(1)).sum())
    data.notes.append(f"vocabulary: {len(words)} words from the {len(data.train)} training "
                      f"pairs; {wordless} of {len(texts)} pairs have none of them")


class ManifestImages(pairs.FileImages):
    """FileImages whose errors also name the manifest line of the image."""

    def __init__(self, paths, lines):
        super().__init__(paths)
        self.lines = list(lines)

    def pil(self, i):
        try:
            return super().pil(i)
        except UserError as err:
            raise UserError(f"{self.lines[int(i)]}: {err}") from None

    def __getitem__(self, i):
        try:
            return super().__getitem__(i)
        except UserError as err:
            raise UserError(f"{self.lines[int(i)]}: {err}") from None


# ===== the manifest =====
@dataclasses.dataclass
class Row:
    """One pair of the manifest."""
    line: int                # 1-based line of the manifest (the header is line 1 in CSV)
    image: str               # as written, relative to DATA_DIR
    text: str
    labels: list             # label names; [] when the pair has none


def find_files(cfg, need_images=True):
    """The manifest of DATA_DIR, found without reading it (reproduce.py's check)."""
    return [manifest_path(cfg.DATA_DIR)]


def manifest_path(data_dir):
    """The one manifest of DATA_DIR."""
    found = [name for name in MANIFESTS if os.path.isfile(os.path.join(data_dir, name))]
    if len(found) != 1:
        what = 'both' if found else 'neither'
        raise UserError(f"setting DATA_DIR={data_dir!r}: holds {what} of {' and '.join(MANIFESTS)}"
                        f"; expected exactly one manifest of the pairs (docs/custom.md)")
    return os.path.join(data_dir, found[0])


def read_manifest(path, need_images=True):
    """The rows of a manifest, checked: every image named once and present as a file (unless
    need_images=False: training on stored features), every text non-empty. UserError
    naming the file and line otherwise."""
    text = read_utf8(path)
    rows = read_csv(path, text) if path.endswith('.csv') else read_jsonl(path, text)
    if not rows:
        raise UserError(f"{path}: no pairs; expected a pair a line")
    data_dir, seen = os.path.dirname(path), {}
    for row in rows:
        where = f"{path}, line {row.line}"
        if not row.text.strip():
            raise UserError(f"{where}: empty text; expected words (tags or a caption)")
        name = os.path.normpath(row.image)
        if not row.image.strip() or os.path.isabs(name) or name.split(os.sep)[0] == '..':
            raise UserError(f"{where}: image {row.image!r}; expected a path inside the "
                            f"manifest's folder, relative to it")
        if name in seen:
            raise UserError(f"{where}: image {row.image} is already the image of line "
                            f"{seen[name]}; expected each image once")
        seen[name] = row.line
        if need_images and not os.path.isfile(os.path.join(data_dir, name)):
            raise UserError(f"{where}: missing image file {os.path.join(data_dir, name)}")
    return rows


def read_utf8(path):
    try:
        with open(path, 'rb') as f:
            raw = f.read()
    except OSError as err:
        raise UserError(f"{path}: cannot be read ({err.strerror})") from None
    try:
        return raw.decode('utf-8-sig')   # a byte-order mark, as spreadsheets write, is fine
    except UnicodeDecodeError as err:
        line = raw.count(b'\n', 0, err.start) + 1
        raise UserError(f"{path}, line {line}: byte 0x{raw[err.start]:02x} is not UTF-8; "
                        f"expected the manifest in UTF-8") from None


def read_csv(path, text):
    reader = csv.reader(io.StringIO(text, newline=''))
    try:
        header = [name.strip().lower() for name in next(reader, [])]
        missing = [name for name in COLUMNS if name not in header]
        if missing:
            raise UserError(f"{path}, line 1: the header {','.join(header) or '(empty)'} has "
                            f"no column {', '.join(missing)}; expected image,text[,labels]")
        at = {name: header.index(name) for name in (*COLUMNS, 'labels') if name in header}
        rows, line = [], reader.line_num
        for fields in reader:
            start, line = line + 1, reader.line_num
            if not any(field.strip() for field in fields):
                continue   # a blank line
            if len(fields) <= max(at['image'], at['text']):
                raise UserError(f"{path}, line {start}: {len(fields)} fields; expected "
                                f"{len(header)} ({','.join(header)})")
            labels = fields[at['labels']] if 'labels' in at and at['labels'] < len(fields) else ''
            rows.append(Row(start, fields[at['image']].strip(), fields[at['text']],
                            [name.strip() for name in labels.split(LABEL_SEPARATOR)
                             if name.strip()]))
    except csv.Error as err:
        raise UserError(f"{path}, line {reader.line_num}: not CSV ({err})") from None
    return rows


def read_jsonl(path, text):
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            item = json.loads(line)
        except ValueError as err:
            raise UserError(f"{where}: not JSON ({err}); expected one object a line") from None
        if not isinstance(item, dict):
            raise UserError(f"{where}: a JSON {type(item).__name__}; expected an object with "
                            f"the keys image, text and optionally labels")
        for key in COLUMNS:
            if not isinstance(item.get(key), str):
                raise UserError(f"{where}: no string '{key}'; expected the keys image, text "
                                f"(strings) and optionally labels (a list of names)")
        labels = item.get('labels', [])
        if not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
            raise UserError(f"{where}: 'labels' is {labels!r}; expected a list of names")
        rows.append(Row(number, item['image'], item['text'],
                        [x.strip() for x in labels if x.strip()]))
    return rows


def label_matrix(rows):
    """(uint8 (N, C) 0/1, the C label names sorted); C = 0 when no pair has a label."""
    names = sorted({name for row in rows for name in row.labels})
    column = {name: c for c, name in enumerate(names)}
    labels = np.zeros((len(rows), len(names)), np.uint8)
    for i, row in enumerate(rows):
        labels[i, [column[name] for name in row.labels]] = 1
    return labels, names


# ===== the split =====
def split_sizes(n, query_size, train_size, where):
    """(query, train) sizes for n pairs. QUERY_SIZE=0: 2,000, or 10% below 20,000 pairs;
    the training set is TRAIN_SIZE pairs, or every non-query pair when fewer."""
    n_query = query_size or (QUERY_DEFAULT if n >= QUERY_SHARE_BELOW
                             else max(1, int(n * QUERY_SHARE)))
    if n_query >= n:
        raise UserError(f"setting QUERY_SIZE={query_size}: {where} holds {n} pairs, too few "
                        f"for {n_query} queries and a training set; expected fewer queries "
                        f"or more pairs")
    return n_query, min(train_size, n - n_query)


def split(n, n_query, n_train, seed):
    """(query, train, database) int64 indices, each ascending: a seeded random draw."""
    order = np.random.default_rng(seed).permutation(n)
    query = np.sort(order[:n_query])
    train = np.sort(order[n_query:n_query + n_train])
    database = np.setdiff1d(np.arange(n), query)
    return query.astype(np.int64), train.astype(np.int64), database.astype(np.int64)


# ===== the vocabulary =====
def vectorizer(vocabulary=None, min_count=1):
    """scikit-learn's CountVectorizer as every part of this project uses it."""
    from sklearn.feature_extraction.text import CountVectorizer   # 1 s to import: only here
    return CountVectorizer(binary=True, lowercase=True, stop_words=STOP_WORDS,
                           min_df=min_count, vocabulary=vocabulary, dtype=np.float32)


def fit_vocabulary(texts, vocab_size, min_count):
    """(words, counts): the vocab_size words found in the most of `texts`, among those in at
    least min_count of them, most frequent first (then alphabetical), and the number of texts
    each is in. ([], []) when no word is frequent enough."""
    counter = vectorizer(min_count=min_count)
    try:
        vectors = counter.fit_transform(texts)
    except ValueError:   # every word is a stop word, or below min_count
        return [], []
    words = counter.get_feature_names_out()          # alphabetical
    in_texts = np.asarray(vectors.sum(0)).ravel()    # binary: the number of texts
    order = np.argsort(-in_texts, kind='stable')[:vocab_size]   # alphabetical within a tie
    return [str(words[j]) for j in order], [int(in_texts[j]) for j in order]


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
