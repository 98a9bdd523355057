"""Stored features instead of images: the fixed-feature protocol (docs/features.md).

    IMAGE_FEATURES=<file>   N x d image features, row i = pair i of the dataset (extract.py
                            writes them); the images themselves are never read
    TEXT_FEATURES=<file>    N x d vectors replacing the dataset's text vectors

(published.py reads UCCH's and DGCPN's feature files with this module's reader.)

A features file is a .npy (read through a memory map: NUS-WIDE's 3 GB never sit in RAM
twice), a MATLAB .mat (v5 or v7.3) or an HDF5 file holding one 2-D array. Every file is
checked when loaded: 2-D, one row per pair, finite.
"""
import os

import h5py
import numpy as np
import scipy.io

import matfile
from pairs import fmt_matrix as fmt
from settings import UserError

CHECK_ROWS = 8192     # rows per block when scanning a memory-mapped file for NaN and Inf

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

def need_file(path, where, hint):
    """A features file that is not there is one line naming `where` it was given."""
    if not os.path.isfile(path):
        raise UserError(f"{where}: no such file; expected an N x d array with one row per "
                        f"pair ({hint})")


def read_features(path, n, setting, preferred_key):
    """The N x d array of a features file (a memory map for .npy), checked. `setting`
    names it in errors: 'IMAGE_FEATURES', 'TEXT_FEATURES', or '' for a published file."""
    where = f"setting {setting}={path!r}" if setting else path
    need_file(path, where, f"{n} pairs")
    if path.endswith('.npy'):
        check_npy_magic(path, where)
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


def check_npy_magic(path, where):
    """A .npy file starts with NumPy's magic bytes; anything else (a pickle named .npy) is
    refused here, and never unpickled."""
    try:
        with open(path, 'rb') as f:
            head = f.read(len(NPY_MAGIC))
    except OSError as err:
        raise UserError(f"{where}: cannot be read ({matfile.one_line(err)})") from None
    if head != NPY_MAGIC:
        raise UserError(f"{where}: not a NumPy .npy file (it lacks the .npy header: a pickle, "
                        f"or another format renamed?); pickles are never loaded: save the "
                        f"array with numpy.save")


NPY_MAGIC = b'\x93NUMPY'


def check_features(array, n, where):
    if array.ndim != 2 or array.dtype.kind not in 'biuf' or array.shape[1] < 1:
        raise UserError(f"{where}: expected a 2-D real-valued numeric array (pairs x "
                        f"dimensions, at least one column), found shape {array.shape} "
                        f"{array.dtype}")
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
    except matfile.MAT5_ERRORS as err:
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


# ===== stored features in place of a dataset's own =====

def apply_image_features(cfg, data):
    """IMAGE_FEATURES: data.images become the rows of the stored file."""
    array = read_features(cfg.IMAGE_FEATURES, len(data.labels), 'IMAGE_FEATURES', 'XAll')
    data.images = FeatureRows(array, cfg.IMAGE_FEATURES)
    data.files.append((cfg.IMAGE_FEATURES, f"image features {fmt(array)}"))


def apply_text_features(cfg, data):
    """TEXT_FEATURES: replace the text vectors (in RAM: the loaders index them per batch)."""
    texts = read_features(cfg.TEXT_FEATURES, len(data.labels), 'TEXT_FEATURES', 'YAll')
    # a copy, always: a .npy comes as a read-only memory map, which torch.from_numpy
    # warns about in every batch
    data.texts = np.array(texts, dtype=np.float32, order='C')
    data.files.append((cfg.TEXT_FEATURES, f"text features {fmt(texts)}"))


def negative(data):
    """Whether the first rows of stored image features hold a negative value."""
    return np.asarray(data.images.array[:CHECK_ROWS]).min(initial=0) < 0


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
