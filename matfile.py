"""MATLAB .mat files, v5 or v7.3, as the DCMH data files come: read, write, orient.

A v7.3 file is HDF5 behind a 512-byte header. MATLAB stores its column-major arrays with
the axes reversed, so h5py sees an H x W x 3 x N image array as (N, 3, W, H); v5 files are
read by scipy in MATLAB's own order. `describe` looks at a variable without reading it,
`read_var` reads it, `ImageLayout` finds the pairs, height, width and colour axes of an
image array from its shape (not from MATLAB's attribute, which re-saved copies lose), and
the writers produce files that MATLAB (and the readers here) accept.
"""
import dataclasses
import os
import time
import zlib

import h5py
import numpy as np
import scipy.io
import scipy.io.matlab
import scipy.sparse

from settings import UserError

MATLAB_CLASSES = {np.dtype(np.uint8): 'uint8', np.dtype(np.float64): 'double',
                  np.dtype(np.float32): 'single', np.dtype(np.bool_): 'logical'}

# What a truncated, corrupt or foreign file makes h5py and scipy raise. Anything else is a
# bug of ours and keeps its traceback.
READ_ERRORS = (OSError, ValueError, KeyError, EOFError, zlib.error,
               scipy.io.matlab.MatReadError)
# scipy's v5 reader also raises TypeError on garbage after a valid header ("Expecting
# miMATRIX type here") and IndexError on a file shorter than its header.
MAT5_ERRORS = READ_ERRORS + (TypeError, IndexError)


# ===== reading =====

@dataclasses.dataclass
class MatVar:
    """One variable of a .mat file. shape is in MATLAB's order; for a v7.3 file written by
    MATLAB, h5py sees the axes reversed (axes_reversed=True)."""
    path: str
    key: str
    version: str
    shape: tuple
    mclass: str
    axes_reversed: bool = False

    def name(self):
        return f"{self.path} ({self.key})"


def one_line(err):
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def need_file(path, what):
    """A missing file and one this user may not read are different mistakes: say which."""
    try:
        os.stat(path)
    except PermissionError:   # a folder on its path may not be entered
        raise UserError(f"cannot read {path}: permission denied on a folder of its path; "
                        f"expected {what}") from None
    except OSError:
        pass
    if not os.path.isfile(path):
        raise UserError(f"missing file {path}: expected {what}")
    if not os.access(path, os.R_OK):
        raise UserError(f"cannot read {path}: permission denied; expected {what}")


def describe(path, key):
    """The variable `key` of the .mat file at `path`, without reading its data."""
    need_file(path, f"a MATLAB file holding {key}")
    if h5py.is_hdf5(path):  # v7.3; h5py finds the HDF5 data after MATLAB's 512-byte header
        try:
            with h5py.File(path, 'r') as f:
                if key not in f:
                    raise UserError(f"{path}: no variable {key!r} (found {sorted(f.keys())}); "
                                    f"expected {key}")
                obj = f[key]
                mclass = obj.attrs.get('MATLAB_class', b'')
                mclass = mclass.decode() if isinstance(mclass, bytes) else str(mclass)
                if isinstance(obj, h5py.Group):  # a MATLAB sparse matrix: data, ir, jc
                    if 'MATLAB_sparse' not in obj.attrs or 'jc' not in obj:
                        raise UserError(f"{path}: {key} is an HDF5 group, expected an array")
                    shape = (int(obj.attrs['MATLAB_sparse']), obj['jc'].shape[0] - 1)
                    return MatVar(path, key, 'v7.3', shape, 'sparse')
                check_filters(obj, path, key)
                reverse = bool(mclass)  # MATLAB wrote it: column-major, axes reversed
                shape = tuple(obj.shape[::-1] if reverse else obj.shape)
                return MatVar(path, key, 'v7.3', shape, mclass or obj.dtype.name, reverse)
        except UserError:
            raise
        except READ_ERRORS as err:
            raise UserError(f"{path}: cannot read this HDF5 (MATLAB v7.3) file, truncated or "
                            f"corrupt? ({one_line(err)})") from err
    try:
        found = scipy.io.whosmat(path)
    except MAT5_ERRORS as err:
        raise UserError(f"{path}: not a readable MATLAB file, truncated or corrupt? "
                        f"({one_line(err)})") from err
    for name, shape, mclass in found:
        if name == key:
            return MatVar(path, key, 'v5', tuple(shape), mclass)
    raise UserError(f"{path}: no variable {key!r} (found {[v[0] for v in found]}); "
                    f"expected {key}")


def check_filters(ds, path, key):
    """Every HDF5 filter of the dataset decodes here. One that needs a plugin h5py lacks
    (blosc, zstd, bitshuffle, ...) would fail at the first read with HDF5's words about a
    plugin folder, which do not say that the file is sound and the decoder missing."""
    plist = ds.id.get_create_plist()
    missing = []
    for i in range(plist.get_nfilters()):
        code, _, _, name = plist.get_filter(i)
        if not (h5py.h5z.filter_avail(code) and
                h5py.h5z.get_filter_info(code) & h5py.h5z.FILTER_CONFIG_DECODE_ENABLED):
            missing.append(f"{code}" + (f" ({name.decode(errors='replace')})" if name else ""))
    if missing:
        raise UserError(f"{path}: {key} is compressed with HDF5 filter {', '.join(missing)}, "
                        f"which this h5py cannot decode (its plugin is not installed); "
                        f"expected gzip, lzf, szip or no compression: re-save {key} with one "
                        f"of those where the plugin is installed (e.g. h5repack -f GZIP=4)")


@dataclasses.dataclass
class Storage:
    """How a v7.3 variable is stored: HDF5 chunk shape (h5py's order; None: contiguous),
    compression filter and its level, and the chunk's size in bytes."""
    chunks: tuple
    compression: str
    level: object
    chunk_bytes: int


def storage(var):
    """The Storage of a v7.3 array variable (None for a v5 file: scipy reads it whole)."""
    if var.version != 'v7.3':
        return None
    try:
        with h5py.File(var.path, 'r') as f:
            ds = f[var.key]
            chunks = ds.chunks
            size = int(np.prod(chunks or ds.shape)) * ds.dtype.itemsize
            return Storage(chunks, ds.compression or 'none', ds.compression_opts, size)
    except READ_ERRORS as err:
        raise UserError(f"{var.name()}: cannot read how the data is stored ({one_line(err)})") \
            from err


def read_var(var, dtype=None):
    """The whole variable as a NumPy array in MATLAB's axis order, cast to dtype."""
    try:
        if var.version == 'v5':
            a = scipy.io.loadmat(var.path, variable_names=[var.key])[var.key]
            a = a.toarray() if scipy.sparse.issparse(a) else a
            check_real(a.dtype, var)
            return np.asarray(a, dtype=dtype)
        with h5py.File(var.path, 'r') as f:
            obj = f[var.key]
            if isinstance(obj, h5py.Group):
                a = scipy.sparse.csc_matrix((obj['data'][()], obj['ir'][()], obj['jc'][()]),
                                            shape=var.shape).toarray()
                return np.asarray(a, dtype=dtype)
            check_real(obj.dtype, var)
            return read_h5(obj, var.axes_reversed, dtype)
    except (MAT5_ERRORS if var.version == 'v5' else READ_ERRORS) as err:
        raise UserError(f"{var.name()}: cannot read the data, truncated or corrupt? "
                        f"({one_line(err)})") from err


def check_real(dtype, var):
    """Numbers only: a cast to float would drop a complex array's imaginary part with no
    more than a warning, and fail on text, cells or structs with a traceback."""
    if dtype.kind not in 'biuf':   # bool, signed, unsigned, float
        what = 'complex' if dtype.kind == 'c' else f"non-numeric ({dtype})"
        raise UserError(f"{var.name()}: holds {what} values; expected a real-valued numeric "
                        f"array")


def read_h5(ds, reverse, dtype):
    """Read an HDF5 dataset in blocks of ~64 MB, casting as it goes, so that a float64
    matrix (NUS-WIDE's 1.5 GB YAll) never sits in memory twice."""
    dtype = np.dtype(dtype or ds.dtype)
    shape = ds.shape[::-1] if reverse else ds.shape
    out = np.empty(shape, dtype)
    if ds.size == 0:
        return out
    row = max(1, ds.size // ds.shape[0]) * ds.dtype.itemsize
    step = max(1, (64 << 20) // row)
    for a in range(0, ds.shape[0], step):
        block = ds[a:a + step]
        if reverse:  # h5 axis 0 is MATLAB's last axis
            out[..., a:a + step] = np.transpose(block)
        else:
            out[a:a + step] = block
    return out


def orient(a, n, var):
    """A 2-D matrix with its pairs axis first (files come either way round)."""
    if a.ndim != 2:
        raise UserError(f"{var.name()}: expected a 2-D matrix, found shape {a.shape}")
    if a.shape[0] == n:
        return a
    if a.shape[1] == n:
        return a.T
    raise UserError(f"{var.name()}: shape {a.shape} has no axis of {n} pairs")


# ===== writing (make_demo, prepare.py) =====

def mat73_header():
    """The 512-byte header MATLAB puts before the HDF5 data of a v7.3 file (the userblock):
    116 bytes of text, 8 of subsystem offset, version 0x0200 and the endian mark 'IM'."""
    text = (f"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: "
            f"{time.strftime('%a %b %d %H:%M:%S %Y')} HDF5 schema 1.00 .").encode()
    return text.ljust(116, b' ') + b' ' * 8 + b'\x00\x02IM' + b'\x00' * 384


def open_mat73(path):
    """A new v7.3 file: h5py with a 512-byte userblock; call finish_mat73 after closing."""
    return h5py.File(path, 'w', userblock_size=512)


def add_mat73(f, key, shape, dtype, chunks=None, compression=None, growable=False,
              level=None):
    """A dataset for a MATLAB array of `shape` (MATLAB order): stored with the axes reversed,
    as MATLAB stores its column-major arrays, and tagged with its MATLAB class. growable:
    the last MATLAB axis (the pairs) can be resized later; level: gzip's (h5py's default 4)."""
    dtype = np.dtype(dtype)
    shape = tuple(shape)[::-1]
    maxshape = (None,) + shape[1:] if growable else None
    ds = f.create_dataset(key, shape=shape, dtype=dtype, chunks=chunks,
                          compression=compression, compression_opts=level,
                          maxshape=maxshape)
    ds.attrs['MATLAB_class'] = np.bytes_(MATLAB_CLASSES[dtype])
    return ds


def finish_mat73(path):
    with open(path, 'r+b') as fh:
        fh.write(mat73_header())


def write_mat73(path, arrays):
    """Write {key: array} as MATLAB -v7.3 would (arrays given in MATLAB's axis order)."""
    with open_mat73(path) as f:
        for key, a in arrays.items():
            chunks = (1,) + a.shape[::-1][1:] if a.ndim == 4 else None  # one image a chunk
            add_mat73(f, key, a.shape, a.dtype, chunks)[...] = np.transpose(a)
    finish_mat73(path)


def repack(var, path, layout, per_chunk=1, block_bytes=256 << 20):
    """Copy the v7.3 image array `var` to a new v7.3 file at `path` with `per_chunk` images
    a chunk (each chunk one whole image or more), keeping its dtype, compression, attributes
    and the file's header; other variables are copied as they are. Reads whole source chunks
    at a time, so each is decompressed once."""
    with h5py.File(var.path, 'r') as src, open_mat73(path) as dst:
        ds = src[var.key]
        chunks = list(ds.shape)
        chunks[layout.n_axis] = per_chunk
        out = dst.create_dataset(var.key, shape=ds.shape, dtype=ds.dtype, chunks=tuple(chunks),
                                 compression=ds.compression, shuffle=ds.shuffle,
                                 compression_opts=ds.compression_opts,
                                 fletcher32=ds.fletcher32, scaleoffset=ds.scaleoffset)
        for name, value in ds.attrs.items():
            out.attrs[name] = value
        for name in src:
            if name != var.key:
                src.copy(src[name], dst, name=name)
        for a, b in image_blocks(ds, layout, block_bytes):
            index = [slice(None)] * ds.ndim
            index[layout.n_axis] = slice(a, b)
            out[tuple(index)] = ds[tuple(index)]
        header = userblock(var.path, src.userblock_size)
    with open(path, 'r+b') as fh:
        fh.write(header or mat73_header())


def image_blocks(ds, layout, block_bytes=256 << 20):
    """(a, b) ranges of the pairs axis covering it in blocks of whole chunks, each of about
    block_bytes at most (at least one chunk)."""
    n = ds.shape[layout.n_axis]
    per_chunk = ds.chunks[layout.n_axis] if ds.chunks else 1
    image_bytes = ds.size // max(1, n) * ds.dtype.itemsize
    step = per_chunk * max(1, block_bytes // max(1, image_bytes * per_chunk))
    return [(a, min(n, a + step)) for a in range(0, n, step)]


def userblock(path, size):
    """The first 512 bytes of a v7.3 file (MATLAB's header), or None if it has none."""
    if size < 512:
        return None
    with open(path, 'rb') as fh:
        return fh.read(512)


def same_images(var, path, layout, block_bytes=256 << 20):
    """Whether the array `var` and the same key in the file at `path` hold the same bytes,
    shape, dtype and attributes (read in blocks)."""
    with h5py.File(var.path, 'r') as fa, h5py.File(path, 'r') as fb:
        a, b = fa[var.key], fb[var.key]
        if a.shape != b.shape or a.dtype != b.dtype or set(a.attrs) != set(b.attrs) or not all(
                np.array_equal(a.attrs[k], b.attrs[k]) for k in a.attrs):
            return False
        for start, stop in image_blocks(a, layout, block_bytes):
            index = [slice(None)] * a.ndim
            index[layout.n_axis] = slice(start, stop)
            if not np.array_equal(a[tuple(index)], b[tuple(index)]):
                return False
    return True


def write_mat5(path, arrays):
    scipy.io.savemat(path, arrays, do_compression=True)


# ===== image arrays =====

class ImageLayout:
    """Where the pairs axis and the height, width and colour axes of an IAll array are.

    Decided by the array as stored, not by MATLAB's attribute (a copy re-saved by other
    tools loses it). The pairs axis is first or last; the colour axis (length 3) either
    sits next to it, which is MATLAB's H x W x 3 x N (scipy shows it so; h5py shows it
    reversed, (N, 3, W, H), so one image is transposed (2, 1, 0) to (H, W, 3)), or at the
    other end, which is NumPy's (N, H, W, 3) (or that reversed, (3, W, H, N))."""

    def __init__(self, var, n=None):
        shape = stored_shape(var)
        if len(shape) != 4:
            raise UserError(f"{var.name()}: expected a 4-D image array (H x W x 3 x pairs), "
                            f"found shape {var.shape}")
        # Reading away from the pairs axis, MATLAB's order gives colour, width, height and
        # NumPy's height, width, colour. The first that fits wins (several fit only when a
        # side is 3 pixels long).
        fits = []
        for n_axis in (0, 3):
            out = [1, 2, 3] if n_axis == 0 else [2, 1, 0]
            if n is not None and shape[n_axis] != n:
                continue
            if shape[out[0]] == 3:
                fits.append((n_axis, out[2], out[1], out[0]))   # MATLAB: (N, 3, W, H)
            if shape[out[2]] == 3:
                fits.append((n_axis, out[0], out[1], out[2]))   # NumPy: (N, H, W, 3)
        if not fits:
            raise UserError(f"{var.name()}: shape {var.shape} is neither H x W x 3 x pairs "
                            f"nor pairs x H x W x 3" + (f" with {n} pairs" if n else ""))
        self.n_axis, height, width, colour = fits[0]
        self.n, self.height, self.width = shape[self.n_axis], shape[height], shape[width]
        rest = [a for a in range(4) if a != self.n_axis]
        self.perm = [rest.index(height), rest.index(width), rest.index(colour)]

    def image(self, ds, i):
        index = [slice(None)] * 4
        index[self.n_axis] = i
        return np.transpose(ds[tuple(index)], self.perm)

    def block(self, ds, a, b):
        """Images a..b-1 as (b - a, H, W, 3)."""
        index = [slice(None)] * 4
        index[self.n_axis] = slice(a, b)
        x = np.moveaxis(ds[tuple(index)], self.n_axis, 0)
        return np.transpose(x, [0] + [p + 1 for p in self.perm])


def stored_shape(var):
    """The shape as the reader sees the data (h5py's order for a v7.3 file)."""
    return tuple(var.shape[::-1] if var.axes_reversed else var.shape)
