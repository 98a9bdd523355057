"""A dataset in memory, beneath every reader: the Data record, the image sources, and the
checks that every source's texts and labels pass.

Who owns what in the data layer (each module imports only those below it):

    datasets.py   load(cfg) picks a reader; the loaders (Pairs, transforms, make_loader,
                  batches, normalize); the check command (python datasets.py ...)
    dcmh.py       MIRFlickr-25K, NUS-WIDE and DEMO in DCMH's .mat files; their split
    wiki.py       Wiki: list files, raw_features.mat, one JPEG a pair
    custom.py     a user's folder of image-text pairs (pairs.csv / pairs.jsonl)
    published.py  UCCH's and DGCPN's published feature files, with their splits
    demo.py       writes the generated DEMO dataset (in the MIRFlickr layout)
    features.py   stored feature files (IMAGE_FEATURES, TEXT_FEATURES) and their batches
    pairs.py      this file: Data, the image sources, check_labels, check_texts,
                  where_to_get (the download of each benchmark's files)
    matfile.py    MATLAB v5 / v7.3 files: reading, writing, orientation
"""
import dataclasses
import os

import h5py
import numpy as np
from PIL import Image

import matfile
from settings import UserError


# ===== where to get the files (docs/data.md#where-to-get-the-data) =====
# The end of every "no such folder" / "missing file" error of a benchmark dataset.
DATA_DOC = 'docs/data.md#where-to-get-the-data'
SOURCES = {
    'MIRFlickr': "download DCMH's MIRFlickr-25K .mat files (or build them with prepare.py)",
    'NUSWIDE': "download DCMH's NUS-WIDE top-10 .mat files (or build them with prepare.py)",
    'Wiki': "download the Wikipedia dataset of Rasiwasia et al.",
    'UCCH': "download UCCH's feature files (penghu-cs/UCCH)",
    'DGCPN': "DGCPN publishes no download of its files (make such files with extract.py)",
}


def where_to_get(dataset, published=''):
    """'download X: see docs/data.md#where-to-get-the-data', for a benchmark's files (a
    dataset of SOURCES; a user's own folder has no download)."""
    what = SOURCES.get(published or dataset)
    return f"{what}: see {DATA_DOC}" if what else f"see {DATA_DOC}"


@dataclasses.dataclass
class Data:
    """A dataset in memory: texts and labels row-aligned with the images, and the split."""
    dataset: str
    texts: np.ndarray        # float32 (N, d_T)
    labels: np.ndarray       # uint8 (N, c), 0/1
    images: object           # H5Images, ArrayImages or FileImages: images[i] -> (H, W, 3) uint8
    query: np.ndarray        # int64 indices into the N pairs
    train: np.ndarray
    database: np.ndarray
    files: list              # (path, description) of every file read
    warnings: list           # legal but suspicious things about the data
    notes: list = dataclasses.field(default_factory=list)   # expected oddities, for information
    vocabulary: dict = None  # Custom: the words of the text vectors (custom.py), saved with a run
    digest: tuple = None     # Custom: (manifest, its sha256), saved with a run: a run resumes,
                             # evaluates and searches only the pairs it was trained on


class H5Images:
    """Images of a v7.3 IAll, read one at a time or in runs of consecutive images (many).
    The HDF5 handle is opened on first use in each process (so each DataLoader worker opens
    its own, once), with a chunk cache that holds several chunks, and is never pickled."""

    def __init__(self, var, layout):
        self.path, self.key, self.layout = var.path, var.key, layout
        self.storage = matfile.storage(var)
        chunks = self.storage.chunks
        self.per_chunk = chunks[layout.n_axis] if chunks else 1   # images a chunk holds
        self.image_bytes = layout.height * layout.width * 3
        self._file, self._pid, self._ds = None, None, None
        self.train_cache = None   # (key, CachedImages, resized): see cache_train

    def __len__(self):
        return self.layout.n

    def _dataset(self):
        if self._file is None or self._pid != os.getpid():  # a forked copy opens its own
            self._file, self._pid = h5py.File(self.path, 'r', **chunk_cache(self.storage)), \
                os.getpid()
            self._ds = self._file[self.key]   # looked up once: a lookup costs a read's tenth
        return self._ds

    def run(self, a, b):
        """Images a..b-1 as (b - a, H, W, 3), in one read: each chunk decompressed once."""
        try:
            return self.layout.block(self._dataset(), int(a), int(b))
        except matfile.READ_ERRORS as err:
            raise UserError(f"{self.path}: cannot read images {a} to {b - 1} of {self.key} "
                            f"({matfile.one_line(err)})") from err

    def many(self, indices):
        """The images at `indices` (any order) as a list of (H, W, 3) arrays, read in runs
        of neighbouring chunks (see runs)."""
        out = [None] * len(indices)
        for a, b, wanted, rows in runs(indices, self.per_chunk, self.image_bytes):
            block = self.run(a, b)
            for i, row in zip(wanted, rows):
                out[row] = block[i - a]
        return out

    def __getitem__(self, i):
        try:
            return self.layout.image(self._dataset(), int(i))
        except matfile.READ_ERRORS as err:
            raise UserError(f"{self.path}: cannot read image {i} of {self.key} "
                            f"({matfile.one_line(err)})") from err

    def pil(self, i):
        return Image.fromarray(self[i])

    def __getstate__(self):
        state = dict(self.__dict__)
        state['_file'] = state['_pid'] = state['_ds'] = None
        return state

    def close(self):
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = self._ds = None


class ArrayImages:
    """Images held in memory as one (N, H, W, 3) uint8 array."""

    def __init__(self, array, path):
        self.array, self.path = array, path

    def __len__(self):
        return len(self.array)

    def __getitem__(self, i):
        return self.array[int(i)]

    def pil(self, i):
        return Image.fromarray(self.array[int(i)])


# What an unreadable or foreign image file makes PIL raise (UnidentifiedImageError and a
# truncated file's error are OSErrors); anything else is a bug of ours.
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class FileImages:
    """One image file per pair (Wiki), decoded as the authors do: cv2.imread (which
    applies the EXIF orientation and makes grey and CMYK pictures BGR), then BGR -> RGB.
    PIL's transforms then work on Image.fromarray of that."""

    def __init__(self, paths):
        self.paths = list(paths)

    def __len__(self):
        return len(self.paths)

    def pil(self, i):
        return Image.fromarray(self.decode(i))

    def decode(self, i):
        import cv2   # here, not at import: the check command and training on .mat need none
        path = self.paths[int(i)]
        try:
            bgr = cv2.imread(path)   # None, not an exception, for a file it cannot decode
        except cv2.error as err:
            raise UserError(f"{path}: not a readable image ({matfile.one_line(err)})") from err
        if bgr is None:
            size = oversized(path)
            if size:
                raise UserError(f"{path}: a valid image too large to decode ({size}); shrink it")
            raise UserError(f"{path}: not a readable image (OpenCV cannot decode it)")
        height, width = bgr.shape[:2]
        problem = elongated(width, height)
        if problem:
            raise UserError(f"{path}: {problem} (crop or drop it)")
        # reversing the channels is cv2.cvtColor(BGR2RGB) without its thread pool, which
        # must not be started before the DataLoader forks its workers
        return np.ascontiguousarray(bgr[..., ::-1])

    def __getitem__(self, i):
        """The image as (H, W, 3) uint8, after checking that the file is whole: OpenCV
        decodes a truncated JPEG with a grey bottom and only a warning on stderr, so the
        check command (which reads every image this way) asks PIL to decode it in full."""
        path = self.paths[int(i)]
        try:
            with Image.open(path) as img:
                img.load()
        except Image.DecompressionBombError as err:   # PIL's guard against decompression bombs
            raise UserError(f"{path}: a valid image too large to decode "
                            f"({matfile.one_line(err)}); shrink it") from err
        except IMAGE_ERRORS as err:
            raise UserError(f"{path}: not a readable image, truncated or corrupt? "
                            f"({matfile.one_line(err)})") from err
        return self.decode(i)


MAX_ASPECT = 100          # longer side / shorter side of an image file (FileImages)
CV_MAX_PIXELS = 1 << 30   # OpenCV's default limit (CV_IO_MAX_IMAGE_PIXELS): imread gives None


def elongated(width, height):
    """Why an image of these sides is refused, or None. Resize(RESIZE) scales the shorter
    side up to RESIZE: a 1 x 100,000 strip would become 25 million pixels wide at 256 and
    exhaust the memory."""
    if max(width, height) > MAX_ASPECT * min(width, height):
        return (f"{width} x {height} pixels, one side more than {MAX_ASPECT} times the "
                f"other; expected a picture")
    return None


def oversized(path):
    """Why cv2.imread gave no image if the file is a valid but huge picture (not a corrupt
    one), else None."""
    try:
        with Image.open(path) as img:   # reads the header only
            width, height = img.size
    except Image.DecompressionBombError as err:   # PIL's guard against decompression bombs
        return matfile.one_line(err)
    except IMAGE_ERRORS:
        return None
    if width * height > CV_MAX_PIXELS:
        return f"{width} x {height} pixels, more than the {CV_MAX_PIXELS} OpenCV decodes"
    return None


def read_image(iall_path, index, key='IAll'):
    """The index-th image of a DCMH IAll file (v5 or v7.3) as (H, W, 3) uint8, upright."""
    var = matfile.describe(iall_path, key)
    layout = matfile.ImageLayout(var)
    if var.version == 'v5':
        return layout.image(matfile.read_var(var), index)
    with h5py.File(iall_path, 'r') as f:
        return layout.image(f[key], index)


def image_source(var, layout, in_memory):
    """Lazy images for a v7.3 IAll; the whole array for a v5 one (scipy cannot read part of
    a file) or when IN_MEMORY asks for it."""
    n = layout.n
    if var.mclass != 'uint8':
        raise UserError(f"{var.name()}: images are {var.mclass}, expected uint8")
    if var.version == 'v5':
        array = layout.block(matfile.read_var(var), 0, n)
        return ArrayImages(np.ascontiguousarray(array), var.path)
    if not in_memory:
        return H5Images(var, layout)
    size = n * layout.height * layout.width * 3
    if size > 0.5 * physical_memory():
        raise UserError(f"setting IN_MEMORY=True: {var.name()} needs {size / 2**30:.1f} GiB, "
                        f"more than half of this machine's memory; use IN_MEMORY=False")
    out = np.empty((n, layout.height, layout.width, 3), np.uint8)
    try:
        with h5py.File(var.path, 'r') as f:
            step = max(1, (256 << 20) // (size // n))
            for a in range(0, n, step):
                out[a:a + step] = layout.block(f[var.key], a, min(n, a + step))
    except matfile.READ_ERRORS as err:
        raise UserError(f"{var.name()}: cannot read the images ({matfile.one_line(err)})") from err
    return ArrayImages(out, var.path)


def physical_memory():
    try:
        return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    except (ValueError, OSError, AttributeError):
        return float('inf')


# HDF5's chunk cache per handle (h5py's default is 1 MiB, less than one chunk of 64 images
# of 224 px: each image read would then decompress its whole chunk again).
CHUNK_CACHE_CHUNKS = 4          # chunks each handle keeps decompressed
CHUNK_CACHE_MAX = 1 << 30       # bytes, at most
RUN_BYTES = 64 << 20            # one read of consecutive images covers at most about this


def chunk_cache(storage):
    """h5py.File options: a chunk cache holding CHUNK_CACHE_CHUNKS chunks of the image
    array, so that reads in file order decompress each chunk once."""
    size = min(CHUNK_CACHE_MAX, max(1 << 20, CHUNK_CACHE_CHUNKS * storage.chunk_bytes))
    return dict(rdcc_nbytes=size, rdcc_nslots=10007, rdcc_w0=1.0)   # slots: a prime


def runs(indices, per_chunk, image_bytes, run_bytes=RUN_BYTES):
    """[(a, b, wanted, rows)]: reads a..b-1 that cover the pair numbers `indices` (any
    order); wanted are the pair numbers each read serves, rows their places in `indices`.
    Indices in the same or the next chunk join one read (HDF5 decompresses whole chunks
    anyway); a read spans at most about run_bytes."""
    indices = np.asarray(indices, np.int64)
    order = np.argsort(indices, kind='stable')
    ordered = indices[order]
    chunk = ordered // per_chunk
    longest = max(1, run_bytes // max(1, image_bytes))
    out, start = [], 0
    for j in range(1, len(ordered) + 1):
        if j == len(ordered) or chunk[j] > chunk[j - 1] + 1 or (
                ordered[j] - ordered[start] >= longest):
            out.append((ordered[start], ordered[j - 1] + 1, ordered[start:j], order[start:j]))
            start = j
    return out


def fmt_shape(shape):
    return ' x '.join(str(s) for s in shape)


def fmt_matrix(array):
    return f"{array.shape[0]} x {array.shape[1]} {array.dtype}"


def check_labels(labels, var):
    bad = ~((labels == 0) | (labels == 1))
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise UserError(f"{var.name()}: labels must be 0 or 1, found {labels[r, c].item()} at pair "
                        f"{r}, label {c}")
    return np.ascontiguousarray(labels, dtype=np.uint8)


def check_texts(texts, var):
    finite = np.isfinite(texts)
    if not finite.all():
        r, c = np.argwhere(~finite)[0]
        raise UserError(f"{var.name()}: text features must be finite, found {texts[r, c]} at "
                        f"pair {r}, column {c}")
    return np.ascontiguousarray(texts, dtype=np.float32)


