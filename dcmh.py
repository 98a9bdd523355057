"""MIRFlickr-25K, NUS-WIDE (top-10 concepts) and the DEMO set in DCMH's layout, and the
authors' per-class split of them:

    MIRFlickr  mirflickr25k-iall.mat, mirflickr25k-yall.mat, mirflickr25k-lall.mat
               (keys IAll, YAll, LAll)
    NUSWIDE    nus-wide-tc10-iall.mat, nus-wide-tc10-yall.mat, nus-wide-tc10-lall.mat
    DEMO       generated on first use (demo.py), in the MIRFlickr layout

Each file is found in DATA_DIR, DATA_DIR/<X>/ or DATA_DIR/<X>/<X>/ (X = IAll, YAll, LAll), as
the published downloads put them (docs/data.md). Every .mat file may be MATLAB v7.3 or v5
(matfile.py reads both); every matrix is oriented by its number of pairs, an image array by
where its colour axis is.
"""
import os

import numpy as np

import matfile
from pairs import Data, check_labels, check_texts, fmt_matrix, fmt_shape, image_source
from settings import UserError

# ===== file layouts (README, Data) =====
DCMH_FILES = {  # dataset -> (images, texts, labels) file names; keys IAll, YAll, LAll
    'MIRFlickr': ('mirflickr25k-iall.mat', 'mirflickr25k-yall.mat', 'mirflickr25k-lall.mat'),
    'NUSWIDE': ('nus-wide-tc10-iall.mat', 'nus-wide-tc10-yall.mat', 'nus-wide-tc10-lall.mat'),
}
DCMH_FILES['DEMO'] = DCMH_FILES['MIRFlickr']
DCMH_KEYS = ('IAll', 'YAll', 'LAll')
# dataset -> (first class: query, train; each later class: query, train; totals: query, train)
PROTOCOLS = {'MIRFlickr': (160, 400, 80, 200, 2000, 5000),
             'NUSWIDE': (200, 500, 200, 500, 2000, 5000)}
SCALED_QUERY, SCALED_TRAIN = 0.1, 0.5   # DEMO (and files too small for the protocol above)


def load(cfg, need_images=True):
    """The Data of cfg.DATASET in cfg.DATA_DIR, split with cfg.SPLIT_SEED. need_images=False
    (stored image features): only the text and label files are read."""
    if need_images:
        data = load_dcmh(cfg.DATASET, cfg.DATA_DIR, cfg.IN_MEMORY)
    else:
        data = load_texts_labels(cfg.DATASET, cfg.DATA_DIR)
    n = len(data.labels)
    protocol = PROTOCOLS.get(cfg.DATASET)
    if protocol and n < protocol[4] + protocol[5]:
        data.warnings.append(f"only {n} pairs, fewer than the {protocol[4] + protocol[5]} "
                             f"the {cfg.DATASET} split needs; using the scaled-down DEMO "
                             f"split (query {SCALED_QUERY:.0%}, train {SCALED_TRAIN:.0%})")
    data.query, data.train, data.database = split_indices(data.labels, cfg.DATASET,
                                                          cfg.SPLIT_SEED)
    return data


def load_texts_labels(dataset, data_dir):
    """YAll and LAll alone: the pairs' texts and labels, no image file opened."""
    yall, lall = (dcmh_path(dataset, data_dir, key) for key in ('YAll', 'LAll'))
    texts, labels = read_texts_labels((yall, 'YAll'), (lall, 'LAll'))
    empty = np.zeros(0, np.int64)
    return Data(dataset, texts, labels, None, empty, empty, empty,
                [(yall, f"YAll {fmt_matrix(texts)}"), (lall, f"LAll {fmt_matrix(labels)}")], [])


def dcmh_paths(dataset, data_dir):
    """The IAll, YAll and LAll files of a DCMH dataset, wherever the downloads put them."""
    return tuple(dcmh_path(dataset, data_dir, key) for key in DCMH_KEYS)


def dcmh_path(dataset, data_dir, key):
    """One DCMH file: in DATA_DIR, in a folder named after the variable (DCMH's MIRFlickr
    archive unpacks as Cleared-Set/IAll/mirflickr25k-iall.mat, ...), or two deep (NUS-WIDE's
    IAll/IAll/)."""
    name = DCMH_FILES[dataset][DCMH_KEYS.index(key)]
    tried = [os.path.join(data_dir, *sub, name) for sub in ((), (key,), (key, key))]
    for path in tried:
        if os.path.isfile(path):
            return path
    raise UserError(f"missing file {name} ({key}): tried {', '.join(tried)}; "
                    f"expected the {dataset} files in DATA_DIR (see docs/data.md)")


def load_dcmh(dataset, data_dir, in_memory=False):
    """MIRFlickr, NUS-WIDE or DEMO: IAll, YAll, LAll in three files, any version each."""
    iall_path, yall_path, lall_path = dcmh_paths(dataset, data_dir)
    ivar = matfile.describe(iall_path, 'IAll')
    yvar = matfile.describe(yall_path, 'YAll')
    lvar = matfile.describe(lall_path, 'LAll')
    for var, what in ((yvar, 'pairs x tags'), (lvar, 'pairs x labels')):
        if len(var.shape) != 2:
            raise UserError(f"{var.name()}: expected a 2-D {what} matrix, found shape "
                            f"{var.shape}")
    n = pair_count(ivar, yvar, lvar)
    labels = check_labels(matfile.orient(matfile.read_var(lvar), n, lvar), lvar)
    texts = check_texts(matfile.orient(matfile.read_var(yvar, np.float32), n, yvar), yvar)
    layout = matfile.ImageLayout(ivar, n)
    if n and not (layout.height and layout.width):
        raise UserError(f"{ivar.name()}: images of {layout.height} x {layout.width} pixels; "
                        f"expected pictures of at least 1 x 1")
    images = image_source(ivar, layout, in_memory)
    files = [(ivar.path, f"IAll {ivar.version:4}  {n} images of {layout.height} x "
                         f"{layout.width} x 3 {ivar.mclass}"),
             (yvar.path, f"YAll {yvar.version:4}  {texts.shape[0]} x {texts.shape[1]} "
                         f"{yvar.mclass}"),
             (lvar.path, f"LAll {lvar.version:4}  {labels.shape[0]} x {labels.shape[1]} "
                         f"{lvar.mclass}, 0/1")]
    empty = np.zeros(0, np.int64)
    return Data(dataset, texts, labels, images, empty, empty, empty, files, [])


def pair_count(ivar, yvar, lvar):
    """The number of pairs: the one axis length that the three files share."""
    common = set(ivar.shape) & set(yvar.shape) & set(lvar.shape)
    if not common:
        raise UserError(
            f"pair counts disagree: {lvar.name()} is {fmt_shape(lvar.shape)}, {yvar.name()} is "
            f"{fmt_shape(yvar.shape)}, {ivar.name()} is {fmt_shape(ivar.shape)}; expected one "
            f"number of pairs shared by all three files")
    if lvar.shape[0] in common:  # MATLAB convention: one pair a row
        return lvar.shape[0]
    return max(common)


def read_texts_labels(text_file, label_file, n=None):
    """(texts float32, labels uint8) from (path, key) pairs, oriented pairs first."""
    yvar, lvar = matfile.describe(*text_file), matfile.describe(*label_file)
    if n is None:
        common = set(yvar.shape) & set(lvar.shape)
        if len(yvar.shape) != 2 or len(lvar.shape) != 2 or not common:
            raise UserError(f"pair counts disagree: {yvar.name()} is {yvar.shape}, "
                            f"{lvar.name()} is {lvar.shape}; expected two 2-D matrices with "
                            f"one axis of pairs in common")
        n = lvar.shape[0] if lvar.shape[0] in common else max(common)
    texts = matfile.orient(matfile.read_var(yvar, np.float32), n, yvar)
    labels = matfile.orient(matfile.read_var(lvar), n, lvar)
    return check_texts(texts, yvar), check_labels(labels, lvar)



# ===== the split =====

def split_indices(labels, dataset, seed):
    """(query, train, database) int64 index arrays by the authors' per-class protocol.

    For each label column in order, that class's items are shuffled, those already taken
    are skipped, and the next ones go to the query set, then to the training set (the
    first class gives twice as many). The query set is topped up at random from untaken
    items if short (never on the real data); the training set likewise from the database.
    The database is every item not in the query set, in ascending order (the authors')."""
    if dataset not in ('MIRFlickr', 'NUSWIDE', 'DEMO'):
        raise ValueError(f"split_indices: dataset {dataset!r} has no drawn split "
                         f"(Wiki uses its list files)")
    labels = np.asarray(labels)
    n, c = labels.shape
    first_q, first_t, q, t, n_query, n_train = split_protocol(dataset, n, c)
    rng = np.random.default_rng(seed)
    taken = np.zeros(n, bool)
    query, train = [], []
    for k in range(c):
        items = rng.permutation(np.flatnonzero(labels[:, k] > 0))
        items = items[~taken[items]]
        kq, kt = (first_q, first_t) if k == 0 else (q, t)
        query.append(items[:kq])
        train.append(items[kq:kq + kt])
        taken[items[:kq + kt]] = True
    query = top_up(np.concatenate(query), n_query, ~taken, rng)
    in_query = np.zeros(n, bool)
    in_query[query] = True
    train = np.concatenate(train)
    in_train = np.zeros(n, bool)
    in_train[train] = True
    train = top_up(train, n_train, ~in_query & ~in_train, rng)
    database = np.flatnonzero(~in_query)
    return query.astype(np.int64), train.astype(np.int64), database.astype(np.int64)


def split_protocol(dataset, n, c):
    """The protocol's numbers; DEMO (and files smaller than the protocol needs) scale it down
    to query 10% and train 50% of the pairs, in the same per-class shape."""
    protocol = PROTOCOLS.get(dataset)
    if protocol and n >= protocol[4] + protocol[5]:
        return protocol
    n_query, n_train = max(1, int(n * SCALED_QUERY)), max(1, int(n * SCALED_TRAIN))
    q, t = n_query // (c + 1), n_train // (c + 1)
    return 2 * q, 2 * t, q, t, n_query, n_train


def top_up(chosen, total, free, rng):
    short = total - len(chosen)
    if short <= 0:
        return chosen
    pick = rng.permutation(np.flatnonzero(free))[:short]
    return np.concatenate([chosen, pick])
