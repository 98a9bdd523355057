"""Stored features instead of images: the fixed-feature protocol (docs/features.md).

    IMAGE_FEATURES=<file>   N x d image features, row i = pair i of the dataset (extract.py
                            writes them); the images themselves are never read
    TEXT_FEATURES=<file>    N x d vectors replacing the dataset's text vectors
    PUBLISHED='UCCH'        DATA_DIR holds UCCH's feature files (MIRFlickr, NUSWIDE, IAPR,
    PUBLISHED='DGCPN'       MSCOCO) or DGCPN's (MIRFlickr, NUSWIDE), read with their split

A features file is a .npy (read through a memory map: NUS-WIDE's 3 GB never sit in RAM
twice), a MATLAB .mat (v5 or v7.3) or an HDF5 file holding one 2-D array. Every file is
checked when loaded: 2-D, one row per pair, finite.
"""
import os

import h5py
import numpy as np
import scipy.io

import datasets
import matfile
import settings
from settings import UserError

CHECK_ROWS = 8192     # rows per block when scanning a memory-mapped file for NaN and Inf

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


class FeatureRows:
    """Stored features as the data's `images`: rows[i] is pair i's float32 vector."""
    is_features = True

    def __init__(self, array, path):
        self.array, self.path = array, path
        self.dim = array.shape[1]

    def __len__(self):
        return len(self.array)

    def __getitem__(self, i):
        return np.asarray(self.array[int(i)], np.float32)

    def rows(self, indices):
        """Rows `indices` as one float32 (len, d) array; a memory map reads only those."""
        return np.asarray(self.array[np.asarray(indices)], np.float32)


# ===== reading one features file =====

def read_features(path, n, setting, preferred_key):
    """The N x d array of a features file (a memory map for .npy), checked. `setting`
    names it in errors: 'IMAGE_FEATURES', 'TEXT_FEATURES', or '' for a published file."""
    where = f"setting {setting}={path!r}" if setting else path
    if not os.path.isfile(path):
        raise UserError(f"{where}: no such file; expected an N x d array with one row per "
                        f"pair ({n} pairs)")
    if path.endswith('.npy'):
        try:
            array = np.load(path, mmap_mode='r', allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            raise UserError(f"{where}: not a readable .npy file "
                            f"({matfile.one_line(err)})") from None
    else:
        var = matfile.describe(path, pick_key(path, preferred_key, where))
        array, where = matfile.read_var(var, np.float32), f"{where} ({var.key})"
        if array.ndim == 2 and array.shape[0] != n and array.shape[1] == n:
            array = array.T   # MATLAB files come either way round
    return check_features(array, n, where)


def check_features(array, n, where):
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.number):
        raise UserError(f"{where}: expected a 2-D numeric array (pairs x dimensions), "
                        f"found shape {array.shape} {array.dtype}")
    if len(array) != n:
        raise UserError(f"{where}: {len(array)} rows, expected one per pair of the "
                        f"dataset ({n})")
    for a in range(0, n, CHECK_ROWS):
        block = np.asarray(array[a:a + CHECK_ROWS])
        bad = ~np.isfinite(block)
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise UserError(f"{where}: row {a + r}, column {c} is {block[r, c]}; "
                            f"expected finite numbers")
    return array


def pick_key(path, preferred, where):
    """The variable of a .mat / HDF5 file to read: `preferred` if present, else its only 2-D
    array."""
    try:
        if h5py.is_hdf5(path):
            with h5py.File(path, 'r') as f:
                found = [(k, f[k].shape) for k in f if isinstance(f[k], h5py.Dataset)]
        else:
            found = [(k, shape) for k, shape, _ in scipy.io.whosmat(path)]
    except matfile.READ_ERRORS as err:
        raise UserError(f"{where}: not a readable .npy, .mat or HDF5 file "
                        f"({matfile.one_line(err)})") from None
    names = [k for k, _ in found]
    if preferred in names:
        return preferred
    two_d = [k for k, shape in found if len(shape) == 2]
    if len(two_d) == 1:
        return two_d[0]
    raise UserError(f"{where}: holds {names or 'no arrays'}; expected one "
                    f"2-D array, or one named {preferred}")


# ===== loading a dataset on features =====

def load(cfg, verbose=True):
    """The Data of cfg on stored features: IMAGE_FEATURES with the dataset's own texts,
    labels and split, or a PUBLISHED layout as given. No image file is opened."""
    if cfg.PUBLISHED == 'UCCH':
        data = load_ucch(cfg.DATASET, cfg.DATA_DIR)
    elif cfg.PUBLISHED == 'DGCPN':
        data = load_dgcpn(cfg.DATASET, cfg.DATA_DIR)
    else:
        data = load_own(cfg)
        array = read_features(cfg.IMAGE_FEATURES, len(data.labels), 'IMAGE_FEATURES', 'XAll')
        data.images = FeatureRows(array, cfg.IMAGE_FEATURES)
        data.files.append((cfg.IMAGE_FEATURES, f"image features {fmt(array)}"))
    if cfg.DATASET in settings.BORROWED_PRESETS and verbose:
        print(f"{cfg.DATASET}: no DJSRH preset exists; using "
              f"{settings.BORROWED_PRESETS[cfg.DATASET]}'s: BETA={cfg.BETA}, "
              f"LAMBDA1={cfg.LAMBDA1}, LAMBDA2={cfg.LAMBDA2}, NUM_EPOCH={cfg.NUM_EPOCH}, "
              f"LR_IMG={cfg.LR_IMG}, LR_TXT={cfg.LR_TXT}")
    if np.asarray(data.images.array[:CHECK_ROWS]).min(initial=0) < 0:
        data.warnings.append("some image features are negative; the method assumes "
                             "non-negative ones (cosines in [0, 1])")
    return data


def apply_text_features(cfg, data):
    """TEXT_FEATURES: replace the text vectors (in RAM: the loaders index them per batch)."""
    texts = read_features(cfg.TEXT_FEATURES, len(data.labels), 'TEXT_FEATURES', 'YAll')
    data.texts = np.ascontiguousarray(texts, dtype=np.float32)
    data.files.append((cfg.TEXT_FEATURES, f"text features {fmt(texts)}"))


def fmt(array):
    return f"{array.shape[0]} x {array.shape[1]} {array.dtype}"


def load_own(cfg):
    """Texts, labels and split of a dataset in its usual layout, without its images."""
    if not os.path.isdir(cfg.DATA_DIR):
        raise UserError(f"setting DATA_DIR={cfg.DATA_DIR!r}: no such folder; expected the "
                        f"folder holding the {cfg.DATASET} text and label files")
    if cfg.DATASET == 'Wiki':
        return datasets.load_wiki(cfg.DATA_DIR, need_images=False)
    yall, lall = (datasets.dcmh_path(cfg.DATASET, cfg.DATA_DIR, key) for key in ('YAll', 'LAll'))
    texts, labels = read_texts_labels((yall, 'YAll'), (lall, 'LAll'))
    query, train, database = datasets.split_indices(labels, cfg.DATASET, cfg.SPLIT_SEED)
    return datasets.Data(cfg.DATASET, texts, labels, None, query, train, database,
                         [(yall, f"YAll {fmt(texts)}"), (lall, f"LAll {fmt(labels)}")], [])


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
    return datasets.check_texts(texts, yvar), datasets.check_labels(labels, lvar)


def published_data(dataset, images, texts, labels, split, files):
    image_path = files[0][0]
    return datasets.Data(dataset, texts, labels, FeatureRows(images, image_path), *split,
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
    labels = datasets.check_labels(labels_raw, matfile.MatVar(paths[2], 'label', 'npy', (), ''))
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


# ===== batches =====

class FeatureLoader:
    """Batches (features float32, texts float32, labels uint8, pair indices int64) of
    data.<part>, as datasets.make_loader gives for images: 'train' shuffled by the
    generator (torch.randperm, as the DataLoader's sampler draws) with drop_last; 'query'
    and 'database' in order. One fancy index per batch: no worker processes needed."""

    def __init__(self, data, indices, batch_size, shuffle, generator):
        self.data, self.indices = data, np.asarray(indices, np.int64)
        self.batch_size, self.shuffle, self.generator = batch_size, shuffle, generator

    def __len__(self):
        n = len(self.indices)
        return n // self.batch_size if self.shuffle else -(-n // self.batch_size)

    def __iter__(self):
        import torch
        order = self.indices
        if self.shuffle:
            order = order[torch.randperm(len(order), generator=self.generator).numpy()]
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield (torch.from_numpy(self.data.images.rows(idx)),
                   torch.from_numpy(self.data.texts[idx]),
                   torch.from_numpy(self.data.labels[idx]), torch.from_numpy(idx))


def make_loader(data, part, cfg, generator=None):
    import torch
    train = part == 'train'
    indices = getattr(data, part)
    if train and len(indices) < cfg.BATCH_SIZE:
        raise UserError(f"setting BATCH_SIZE={cfg.BATCH_SIZE}: the training set has only "
                        f"{len(indices)} pairs (drop_last would leave no batch)")
    if train and generator is None:
        generator = torch.Generator().manual_seed(int(torch.randint(2 ** 62, ())))
    return FeatureLoader(data, indices, cfg.BATCH_SIZE if train else cfg.EVAL_BATCH_SIZE,
                         train, generator)
