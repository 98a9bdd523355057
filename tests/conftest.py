"""Shared test helpers: small datasets written in each real layout, independently of the
code under test (the MATLAB v7.3 writer here is our own, not matfile.write_mat73)."""
import os
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import scipy.io
from PIL import Image

import settings

MATLAB_CLASS = {np.dtype(np.uint8): b'uint8', np.dtype(np.float64): b'double',
                np.dtype(np.float32): b'single'}


def save_v73(path, arrays, compress=True):
    """Write {key: array} the way MATLAB's `save -v7.3` does: a 512-byte text header
    (the HDF5 userblock), each column-major array stored with its axes reversed, and a
    MATLAB_class attribute on each dataset. Arrays are given in MATLAB's axis order."""
    with h5py.File(path, 'w', userblock_size=512) as f:
        for key, a in arrays.items():
            stored = np.ascontiguousarray(np.transpose(a))   # H x W x 3 x N -> (N, 3, W, H)
            chunks = (1,) + stored.shape[1:] if a.ndim == 4 else True
            ds = f.create_dataset(key, data=stored, chunks=chunks,
                                  compression='gzip' if compress else None)
            ds.attrs['MATLAB_class'] = np.bytes_(MATLAB_CLASS[a.dtype])
    text = ('MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: ' + time.ctime()
            + ' HDF5 schema 1.00 .').encode().ljust(116) + b' ' * 8 + b'\x00\x02IM'
    with open(path, 'r+b') as fh:
        fh.write(text.ljust(512, b'\x00'))


def save_v5(path, arrays):
    scipy.io.savemat(path, arrays)


def pattern_image(i, height, width):
    """An asymmetric picture that names its pair: red grows down the rows, green across
    the columns, blue is constant and encodes the pair index."""
    img = np.zeros((height, width, 3), np.uint8)
    img[..., 0] = (np.arange(height) * 250 // max(1, height - 1))[:, None]
    img[..., 1] = (np.arange(width) * 250 // max(1, width - 1))[None, :]
    img[..., 2] = blue_of(i)
    return img


def blue_of(i):
    return (i * 7 + 3) % 256


def tiny_texts_labels(n, d, c, seed=0):
    """Distinct binary texts and multi-labels, every pair with a label and a tag."""
    rng = np.random.default_rng(seed)
    texts = (rng.random((n, d)) < 0.3).astype(np.float64)
    texts[np.arange(n), np.arange(n) % d] = 1
    labels = np.zeros((n, c))
    labels[np.arange(n), np.arange(n) % c] = 1
    labels[np.arange(n), (np.arange(n) * 3 + 1) % c] = 1
    return texts, labels


def write_dcmh(folder, names, n=60, height=20, width=12, d=16, c=6,
               versions=('v7.3', 'v5', 'v5'), seed=0):
    """IAll, YAll, LAll as DCMH's files hold them (MATLAB orders: H x W x 3 x N,
    N x d, N x c) in the given versions. Returns (texts, labels) as written."""
    os.makedirs(folder, exist_ok=True)
    texts, labels = tiny_texts_labels(n, d, c, seed)
    images = np.stack([pattern_image(i, height, width) for i in range(n)], axis=3)
    for name, key, a, version in zip(names, ('IAll', 'YAll', 'LAll'),
                                     (images, texts, labels), versions):
        save = save_v73 if version == 'v7.3' else save_v5
        save(os.path.join(folder, name), {key: a})
    return texts, labels


MIR_NAMES = ('mirflickr25k-iall.mat', 'mirflickr25k-yall.mat', 'mirflickr25k-lall.mat')
NUS_NAMES = ('nus-wide-tc10-iall.mat', 'nus-wide-tc10-yall.mat', 'nus-wide-tc10-lall.mat')
WIKI_CATS = ('art', 'biology', 'geography', 'history', 'literature', 'media', 'music',
             'royalty', 'sport', 'warfare')


def write_wiki(folder, n_train=30, n_test=10, seed=0):
    """The Wiki folder: images/<category>/<name>.jpg, raw_features.mat, the two lists.
    Each image is top-half white, bottom-half black (upright check), size varying.
    Returns (names, categories, texts) in list order, train then test."""
    rng = np.random.default_rng(seed)
    names, cats, texts = [], [], []
    for split, count in (('train', n_train), ('test', n_test)):
        lines = []
        topics = rng.random((count, 10))
        topics /= topics.sum(1, keepdims=True)
        for j in range(count):
            name = f"{split}{j:03d}img{rng.integers(1 << 30):x}"
            cat = (j * 3 + (split == 'test')) % 10
            img = np.zeros((24 + j % 5, 20 + j % 7, 3), np.uint8)
            img[:img.shape[0] // 2] = 255
            img[..., 2] = min(255, 40 + 5 * len(names))  # differs per pair
            mode = 'L' if j == 1 else 'RGB'   # one grey-scale picture
            path = os.path.join(folder, 'images', WIKI_CATS[cat], name + '.jpg')
            os.makedirs(os.path.dirname(path), exist_ok=True)
            Image.fromarray(img).convert(mode).save(path, quality=95)
            lines.append(f"text{split}{j}\t{name}\t{cat + 1}\n")
            names.append(name)
            cats.append(cat)
        with open(os.path.join(folder, f"{split}set_txt_img_cat.list"), 'w') as f:
            f.writelines(lines)
        texts.append(topics)
    save_v5(os.path.join(folder, 'raw_features.mat'),
            {'I_tr': rng.random((n_train, 128)), 'T_tr': texts[0],
             'I_te': rng.random((n_test, 128)), 'T_te': texts[1]})
    return names, np.array(cats), np.concatenate(texts)


def config(dataset, data_dir, **overrides):
    """Settings for fast tests: small crops, no worker processes."""
    base = dict(DATASET=dataset, DATA_DIR=str(data_dir), RESIZE=64, CROP=64, NUM_WORKERS=0,
                BATCH_SIZE=4, EVAL_BATCH_SIZE=16, DEVICE='cpu')
    base.update(overrides)
    return settings.resolve(**base)


@pytest.fixture(scope='session')
def layouts(tmp_path_factory):
    """One small dataset in each real layout: {name: (folder, expected arrays)}."""
    root = tmp_path_factory.mktemp('layouts')
    out = {}
    out['MIRFlickr'] = (root / 'mir', write_dcmh(root / 'mir', MIR_NAMES))
    out['NUSWIDE'] = (root / 'nus', write_dcmh(root / 'nus', NUS_NAMES, n=50, d=20, c=10,
                                                versions=('v7.3', 'v7.3', 'v5'), seed=1))
    out['Wiki'] = (root / 'wiki', write_wiki(root / 'wiki'))
    return out


# Where the published downloads put the three files, relative to DATA_DIR: DCMH's MIRFlickr
# archive unpacks as Cleared-Set/{IAll,YAll,LAll}/ (DATA_DIR=Cleared-Set); NUS-WIDE copies
# come flat, with IAll under IAll/, or under IAll/IAll/.
PUBLISHED_LAYOUTS = {
    'MIRFlickr Cleared-Set': ('MIRFlickr', MIR_NAMES, ('IAll', 'YAll', 'LAll')),
    'NUSWIDE flat': ('NUSWIDE', NUS_NAMES, ('', '', '')),
    'NUSWIDE IAll/': ('NUSWIDE', NUS_NAMES, ('IAll', '', '')),
    'NUSWIDE IAll/IAll/': ('NUSWIDE', NUS_NAMES, ('IAll/IAll', '', '')),
}


def write_published(root, layout, n=40, height=14, width=10):
    """A replica of a published download's folder tree (tiny arrays in the published
    versions: IAll v7.3; YAll v5 for MIRFlickr, v7.3 for NUS-WIDE; LAll v5). Returns
    (DATA_DIR, dataset, texts, labels, {name: path written})."""
    dataset, names, subs = PUBLISHED_LAYOUTS[layout]
    data_dir = os.path.join(root, 'Cleared-Set' if dataset == 'MIRFlickr' else 'nus-wide')
    versions = ('v7.3', 'v5', 'v5') if dataset == 'MIRFlickr' else ('v7.3', 'v7.3', 'v5')
    flat = os.path.join(root, 'unplaced')
    texts, labels = write_dcmh(flat, names, n=n, height=height, width=width, d=12, c=5,
                               versions=versions, seed=2)
    paths = {}
    for name, sub in zip(names, subs):
        paths[name] = os.path.join(data_dir, sub, name)
        os.makedirs(os.path.dirname(paths[name]), exist_ok=True)
        os.replace(os.path.join(flat, name), paths[name])
    return data_dir, dataset, texts, labels, paths


def hold_lock(path, names_pid=None):
    """A second process holding the lock file `path` as another train.py or extract.py does
    (a POSIX lock is per process: this one could always take its own again) until its stdin
    closes. Its lock file names process `names_pid` (default: itself)."""
    code = ("import fcntl, os, platform, sys\n"
            "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
            "fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
            "pid = sys.argv[2] if len(sys.argv) > 2 else os.getpid()\n"
            "os.ftruncate(fd, 0)\n"
            "os.pwrite(fd, f'process {pid} on {platform.node()}'.encode(), 0)\n"
            "print('locked', flush=True)\n"
            "sys.stdin.read()\n")
    argv = [sys.executable, '-c', code, str(path)] + ([str(names_pid)] if names_pid else [])
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == 'locked\n'
    return proc


def release(proc):
    proc.stdin.close()
    proc.wait()
