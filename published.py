"""Feature files published by later work, read with their own splits (docs/features.md):

    PUBLISHED='UCCH'    penghu-cs/UCCH: MIRFlickr, NUSWIDE, IAPR, MSCOCO (.mat / .h5py)
    PUBLISHED='DGCPN'   Atmegal/DGCPN: MIRFlickr, NUSWIDE (.npy)

Each file is checked when loaded as a stored features file is (features.read_features).
"""
import os

import numpy as np

import matfile
from dcmh import read_texts_labels
from features import FeatureRows, read_features
from pairs import Data, check_labels, fmt_matrix as fmt
from settings import UserError

# ===== the published layouts =====
# UCCH (penghu-cs/UCCH, src/cmdataset.py): per dataset, the candidate file names (features,
# texts, labels; later and earlier names of the same files), keys, and the number of final
# rows taken as queries. The rest is both the retrieval set and the training set; the rows
# are used in file order (the files come shuffled).
UCCH_FILES = {
    'MIRFlickr': [('mirflickr25k-iall-vgg.mat', 'mirflickr25k-yall.mat', 'mirflickr25k-lall.mat'),
                  ('mirflickr25k-iall-vgg-rand.mat', 'mirflickr25k-yall-rand.mat',
                   'mirflickr25k-lall-rand.mat')],
    'NUSWIDE': [('nus-wide-tc10-xall-vgg.mat', 'nus-wide-tc10-yall.mat',
                 'nus-wide-tc10-lall.mat')],
    'MSCOCO': [('MSCOCO_deep_doc2vec_data_rand.h5py',) * 3,
               ('MSCOCO_deep_doc2vec_data.h5py',) * 3],
}
UCCH_KEYS = ('XAll', 'YAll', 'LAll')
UCCH_IAPR = 'iapr-tc12-rand.mat'   # one file: database rows, then test rows
UCCH_IAPR_KEYS = (('VDatabase', 'YDatabase', 'databaseL'), ('VTest', 'YTest', 'testL'))
UCCH_QUERIES = {'MIRFlickr': 2000, 'NUSWIDE': 2100, 'IAPR': 2000, 'MSCOCO': 5000}
# DGCPN (Atmegal/DGCPN, load_data.py): one folder per dataset, NumPy files, the split given
# as index arrays (its val_num.npy, a validation set for model selection, is not used).
DGCPN_NAMES = {'MIRFlickr': 'flickr', 'NUSWIDE': 'nus'}
DGCPN_SPLIT = (('query', 'test_num.npy'), ('train', 'train_num.npy'),
               ('database', 'database_num.npy'))


def load(cfg):
    """The Data of cfg.DATASET in cfg.DATA_DIR as the PUBLISHED project laid it out."""
    if cfg.PUBLISHED == 'UCCH':
        return load_ucch(cfg.DATASET, cfg.DATA_DIR)
    return load_dgcpn(cfg.DATASET, cfg.DATA_DIR)


def published_data(dataset, images, texts, labels, split, files):
    image_path = files[0][0]
    return Data(dataset, texts, labels, FeatureRows(images, image_path), *split,
                         files, [])


def load_ucch(dataset, data_dir):
    """UCCH's feature files: query = the last UCCH_QUERIES rows, the rest is the retrieval
    set and the training set."""
    if dataset == 'IAPR':
        images, texts, labels, files = read_ucch_iapr(os.path.join(data_dir, UCCH_IAPR))
    else:
        names = next((c for c in UCCH_FILES[dataset]
                      if os.path.isfile(os.path.join(data_dir, c[0]))), UCCH_FILES[dataset][0])
        paths = [os.path.join(data_dir, name) for name in names]
        texts, labels = read_texts_labels((paths[1], 'YAll'), (paths[2], 'LAll'))
        images = read_features(paths[0], len(labels), '', 'XAll')
        files = [(paths[0], f"XAll {fmt(images)}"), (paths[1], f"YAll {fmt(texts)}"),
                 (paths[2], f"LAll {fmt(labels)}")]
    n, n_query = len(labels), UCCH_QUERIES[dataset]
    if n <= n_query:
        raise UserError(f"{files[0][0]}: {n} pairs; UCCH's split takes the last {n_query} as "
                        f"queries and needs more")
    rest = np.arange(n - n_query, dtype=np.int64)
    split = (np.arange(n - n_query, n, dtype=np.int64), rest, rest.copy())
    return published_data(dataset, images, texts, labels, split, files)


def read_ucch_iapr(path):
    """IAPR TC-12 in one v5 file: the database part, then the test part, concatenated."""
    parts = []
    for keys in UCCH_IAPR_KEYS:
        texts, labels = read_texts_labels((path, keys[1]), (path, keys[2]))
        images = read_features(path, len(labels), '', keys[0])
        parts.append((images, texts, labels))
    images, texts, labels = (np.concatenate(arrays) for arrays in zip(*parts))
    what = f"{' + '.join(str(len(p[2])) for p in parts)} pairs"
    return images, texts, labels, [(path, f"{', '.join(sum(UCCH_IAPR_KEYS, ()))}: {what}")]


def load_dgcpn(dataset, data_dir):
    """DGCPN's NumPy files: <name>_vgg19.npy, tags.npy, label.npy and the split indices."""
    name = DGCPN_NAMES[dataset]
    paths = [os.path.join(data_dir, f) for f in (f'{name}_vgg19.npy', 'tags.npy', 'label.npy')]
    labels_raw = read_npy(paths[2], "label.npy: pairs x labels, 0/1")
    if labels_raw.ndim != 2:
        raise UserError(f"{paths[2]}: shape {labels_raw.shape}, expected pairs x labels")
    n = len(labels_raw)
    labels = check_labels(labels_raw, matfile.MatVar(paths[2], 'label', 'npy', (), ''))
    texts = np.ascontiguousarray(read_features(paths[1], n, '', ''), np.float32)
    images = read_features(paths[0], n, '', '')
    split = []
    for part, file in DGCPN_SPLIT:
        idx = read_npy(os.path.join(data_dir, file), f"{file}: pair indices").reshape(-1)
        if not np.issubdtype(idx.dtype, np.integer) or (idx.size and (
                idx.min() < 0 or idx.max() >= n)):
            raise UserError(f"{os.path.join(data_dir, file)}: expected integer pair indices "
                            f"from 0 to {n - 1}")
        split.append(idx.astype(np.int64))
    files = [(paths[0], f"image features {fmt(images)}"), (paths[1], f"tags {fmt(texts)}"),
             (paths[2], f"labels {fmt(labels)}"),
             (data_dir, "split: " + ', '.join(f"{p} {len(i)}"
                                               for (p, _), i in zip(DGCPN_SPLIT, split)))]
    return published_data(dataset, images, texts, labels, split, files)


def read_npy(path, what):
    matfile.need_file(path, what)
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise UserError(f"{path}: not a readable .npy file ({matfile.one_line(err)}); "
                        f"expected {what}") from None
