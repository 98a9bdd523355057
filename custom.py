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
import hashlib
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
NAMED = (*COLUMNS, 'labels')         # the columns (pairs.csv) or keys (pairs.jsonl) read
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
    raw = read_bytes(path)
    rows = parse_manifest(path, raw, need_images)
    n = len(rows)
    query, train, database = split(n, *split_sizes(n, cfg.QUERY_SIZE, cfg.TRAIN_SIZE, path),
                                   cfg.SPLIT_SEED)
    labels, names = label_matrix(rows, path)
    images = ManifestImages([os.path.join(data_dir, os.path.normpath(row.image)) for row in rows],
                            [f"{path}, line {row.line}" for row in rows])
    labelled = int(labels.any(1).sum())
    files = [(path, f"{n} pairs, {labelled} with labels ({len(names)} label names)"),
             (data_dir, f"{n} image files" if need_images else "image files not read")]
    data = pairs.Data('Custom', np.zeros((n, 0), np.float32), labels, images, query, train,
                      database, files, [], digest=(path, manifest_digest(raw)))
    # With TEXT_FEATURES the stored vectors replace these (datasets.load); the words still
    # name what a search hit's text says.
    vectorize(data, [row.text for row in rows], cfg, path)
    if data.vocabulary:
        data.vocabulary['label_names'] = names
    if not labels.any():
        data.notes.append("no labels: evaluated by own-pair recall@K and median rank only "
                          "(mAP needs labels)")
    data.warnings += label_warnings(labels, names)
    return data


def manifest_digest(raw):
    """What a run stores of its manifest (train.py): the same pairs, in the same order,
    with the same texts and labels, give the same digest."""
    return 'sha256:' + hashlib.sha256(raw).hexdigest()


def label_warnings(labels, names):
    """One label set on every labelled pair makes any two of them relevant to each other:
    mAP then says nothing about the codes."""
    labelled = labels[labels.any(1)]
    if len(labelled) < 2 or (labelled != labelled[0]).any():
        return []
    shared = ';'.join(name for name, on in zip(names, labelled[0]) if on)
    return [f"every labelled pair has the same labels ({shared}): each is relevant to every "
            f"other, so mAP is high whatever the codes; label with more than one class, or "
            f"judge by the own-pair recall"]


def vectorize(data, texts, cfg, path):
    """data.texts from the vocabulary of the training pairs' texts; data.vocabulary."""
    words, counts = fit_vocabulary([texts[i] for i in data.train], cfg.VOCAB_SIZE,
                                   cfg.MIN_WORD_COUNT)
    if not words and cfg.TEXT_FEATURES:
        return
    if not words and cfg.MIN_WORD_COUNT == 1:   # a lower MIN_WORD_COUNT cannot help
        raise UserError(f"{path}: the texts of its {len(data.train)} training pairs hold no "
                        f"word but stop words (such as a, the, of) and one-character ones; "
                        f"expected words that say what the images show")
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
    found = [name for name in MANIFESTS if os.path.lexists(os.path.join(data_dir, name))]
    for name in found:
        path = os.path.join(data_dir, name)
        if not os.path.isfile(path):
            raise UserError(f"{path}: {not_a_file(path)}; expected the manifest file of the "
                            f"pairs (docs/custom.md)")
    if len(found) != 1:
        what = 'both' if found else 'neither'
        raise UserError(f"setting DATA_DIR={data_dir!r}: holds {what} of {' and '.join(MANIFESTS)}"
                        f"{misnamed(data_dir) if not found else ''}; expected exactly one "
                        f"manifest of the pairs (docs/custom.md)")
    return os.path.join(data_dir, found[0])


def not_a_file(path):
    """Why a path that exists is not a file to read."""
    if os.path.isdir(path):
        return 'a folder, not a file'
    if os.path.islink(path) and not os.path.exists(path):
        return f"a broken symbolic link (to {os.readlink(path)})"
    return 'not a regular file'


def misnamed(data_dir):
    """' (it holds PAIRS.CSV: ...)' for a manifest named in other letter case: on a
    case-sensitive file system that is another name."""
    try:
        near = sorted(name for name in os.listdir(data_dir) if name.lower() in MANIFESTS)
    except OSError:
        return ''
    return f" (it holds {', '.join(near)}: the names are lower-case)" if near else ''


def read_manifest(path, need_images=True):
    """The rows of a manifest, checked: every image named once and present as a file (unless
    need_images=False: training on stored features), every text non-empty. UserError
    naming the file and line otherwise."""
    return parse_manifest(path, read_bytes(path), need_images)


def parse_manifest(path, raw, need_images=True):
    """read_manifest of the manifest's bytes `raw`."""
    text = decode_utf8(path, raw)
    rows = read_csv(path, text) if path.endswith('.csv') else read_jsonl(path, text)
    if not rows:
        raise UserError(f"{path}: no pairs; expected a pair a line")
    data_dir, seen = os.path.dirname(path), {}
    for row in rows:
        where = f"{path}, line {row.line}"
        if not row.text.strip():
            raise UserError(f"{where}: empty text; expected words (tags or a caption)")
        if not row.image.isprintable():   # a NUL, a tab, a lone surrogate of a JSON escape
            raise UserError(f"{where}: image {row.image!r} holds a control or invalid "
                            f"character; expected a file name")
        name = os.path.normpath(row.image)
        if (not row.image.strip() or os.path.isabs(name) or name.split(os.sep)[0] == '..'
                or name == '.'):
            raise UserError(f"{where}: image {row.image!r}; expected a path inside the "
                            f"manifest's folder, relative to it")
        if name in seen:
            raise UserError(f"{where}: image {row.image} is already the image of line "
                            f"{seen[name]}; expected each image once")
        seen[name] = row.line
        if need_images:
            check_image_file(where, os.path.join(data_dir, name), row.image)
    return rows


def check_image_file(where, path, written):
    """The image of a row is a file (a symbolic link to one is followed)."""
    if os.path.isfile(path):
        return
    if os.path.lexists(path):
        raise UserError(f"{where}: image file {path} is {not_a_file(path)}; expected an "
                        f"image file")
    hint = ("; folders are separated by '/' in the manifest, not '\\'" if '\\' in written
            and os.sep == '/' else '')
    raise UserError(f"{where}: missing image file {path}{hint}")


def read_bytes(path):
    try:
        with open(path, 'rb') as f:
            return f.read()
    except OSError as err:
        raise UserError(f"{path}: cannot be read ({err.strerror})") from None


def decode_utf8(path, raw):
    try:
        return raw.decode('utf-8-sig')   # a byte-order mark, as spreadsheets write, is fine
    except UnicodeDecodeError as err:
        line = raw.count(b'\n', 0, err.start) + 1
        utf16 = ' (it starts as UTF-16 does)' if raw[:2] in (b'\xff\xfe', b'\xfe\xff') else ''
        raise UserError(f"{path}, line {line}: byte 0x{raw[err.start]:02x} is not UTF-8"
                        f"{utf16}; expected the manifest in UTF-8") from None


def read_csv(path, text):
    # strict: a quote never closed, or text after a closing quote, is an error, not a field
    # that swallows the rows after it
    reader = csv.reader(io.StringIO(text, newline=''), strict=True)
    rows, line = [], 0   # line: the last line of the last row read
    try:
        header = [name.strip().lower() for name in next(reader, [])]
        at = header_columns(path, header)
        line = reader.line_num
        for fields in reader:
            start, line = line + 1, reader.line_num
            if not any(field.strip() for field in fields):
                continue   # a blank line
            check_width(f"{path}, line {start}", fields, header, at)
            labels = fields[at['labels']] if 'labels' in at and at['labels'] < len(fields) else ''
            rows.append(Row(start, fields[at['image']].strip(), fields[at['text']],
                            [name.strip() for name in labels.split(LABEL_SEPARATOR)
                             if name.strip()]))
    except csv.Error as err:
        raise UserError(csv_error(path, err, line + 1)) from None
    return rows


def header_columns(path, header):
    """{column name: index} of the header's image, text and labels columns."""
    missing = [name for name in COLUMNS if name not in header]
    if missing:
        other = [sep for sep in (';', '\t', '|') if len(header) == 1 and sep in header[0]]
        hint = f" (fields separated by {other[0]!r}? they are by commas)" if other else ''
        raise UserError(f"{path}, line 1: the header {','.join(header) or '(empty)'} has "
                        f"no column {', '.join(missing)}{hint}; expected image,text[,labels]")
    twice = [name for name in NAMED if header.count(name) > 1]
    if twice:   # which of them is meant cannot be told
        raise UserError(f"{path}, line 1: the header {','.join(header)} names the column "
                        f"{', '.join(twice)} more than once; expected each once")
    return {name: header.index(name) for name in NAMED if name in header}


def check_width(where, fields, header, at):
    """Too few fields for image and text, or a field beyond the header's (an unquoted comma
    in a text: its words would be cut and land in another column)."""
    if len(fields) <= max(at['image'], at['text']) or any(
            field.strip() for field in fields[len(header):]):
        raise UserError(f"{where}: {len(fields)} fields; expected {len(header)} "
                        f"({','.join(header)}): quote a field that holds a comma")


def csv_error(path, err, start):
    """The message of a csv.Error met in the row that starts on line `start`."""
    if 'field larger than field limit' in str(err):
        return (f"{path}, line {start}: a field longer than {csv.field_size_limit():,} "
                f"characters; expected a shorter text (or a quote left open before it?)")
    if 'unexpected end of data' in str(err):
        return (f"{path}, line {start}: a quoted field opened in this row is never closed; "
                f"expected a closing \" (a \" inside a quoted field is written \"\")")
    return (f"{path}, line {start}: not CSV ({err}); expected a field that holds a \" "
            f"quoted whole, its quotes doubled: \"a \"\"big\"\" dog\"")


JSON_TYPES = {dict: 'an object', list: 'an array', str: 'a string', int: 'a number',
              float: 'a number', bool: 'true or false', type(None): 'null'}


def read_jsonl(path, text):
    rows = []
    # split at line feeds only: str.splitlines also splits at U+2028 and other characters
    # that JSON strings may hold as they are
    for number, line in enumerate(text.split('\n'), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        item = json_line(where, line)
        if not isinstance(item, dict):
            raise UserError(f"{where}: {JSON_TYPES.get(type(item), 'a value')}; expected an "
                            f"object with the keys image, text and optionally labels")
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


def json_line(where, line):
    """The JSON value of one line; a key of ours given twice is refused (json.loads would
    keep the last one silently)."""
    def unique_keys(pairs):
        keys = [key for key, _ in pairs]
        twice = [key for key in NAMED if keys.count(key) > 1]
        if twice:
            raise UserError(f"{where}: the key {', '.join(twice)} is given more than once; "
                            f"expected each once")
        return dict(pairs)
    try:
        return json.loads(line, object_pairs_hook=unique_keys)
    except RecursionError:   # arrays nested thousands deep
        raise UserError(f"{where}: not JSON this reader can take (nested too deeply); "
                        f"expected one object a line") from None
    except ValueError as err:
        raise UserError(f"{where}: not JSON ({err}); expected one object a line") from None


def label_matrix(rows, where):
    """(uint8 (N, C) 0/1, the C label names sorted); C = 0 when no pair has a label."""
    names = sorted({name for row in rows for name in row.labels})
    size = len(rows) * len(names)
    if size > LABEL_SHARE * pairs.physical_memory():
        # labels are categories shared by pairs; one name a pair (a caption put in labels)
        # makes the matrix, and the label products of every evaluation, N x N
        raise UserError(f"{where}: {len(names)} label names over {len(rows)} pairs; as a "
                        f"pairs x names matrix that is {size / 2**30:.1f} GiB, more than "
                        f"{LABEL_SHARE:.0%} of this machine's memory; expected labels that "
                        f"pairs share (categories), or none")
    column = {name: c for c, name in enumerate(names)}
    labels = np.zeros((len(rows), len(names)), np.uint8)
    for i, row in enumerate(rows):
        labels[i, [column[name] for name in row.labels]] = 1
    return labels, names


LABEL_SHARE = 0.1   # of the machine's memory, at most, for the label matrix


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
    if not (isinstance(vocabulary, dict) and names_list(vocabulary.get('words'))
            and names_list(vocabulary.get('label_names', []))):
        raise UserError(f"{path}: expected an object with a list of strings 'words' (and "
                        f"'label_names'), as train.py writes it")
    return vocabulary


def names_list(value):
    return isinstance(value, list) and all(isinstance(x, str) for x in value)
