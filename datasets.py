"""The three benchmark datasets, the authors' split, a data check, and the DEMO set.

Reads MIRFlickr-25K, NUS-WIDE (top-10 concepts) and Wiki in the DCMH layouts:

    MIRFlickr  mirflickr25k-iall.mat, mirflickr25k-yall.mat, mirflickr25k-lall.mat
               (keys IAll, YAll, LAll)
    NUSWIDE    nus-wide-tc10-iall.mat, nus-wide-tc10-yall.mat, nus-wide-tc10-lall.mat
    Wiki       images/<category>/<name>.jpg, raw_features.mat (T_tr, T_te),
               trainset_txt_img_cat.list, testset_txt_img_cat.list
    DEMO       generated on first use (make_demo), in the MIRFlickr layout

Each DCMH file is found in DATA_DIR, DATA_DIR/<X>/ or DATA_DIR/<X>/<X>/ (X = IAll, YAll,
LAll), as the published downloads put them (docs/data.md). Every .mat file may be MATLAB
v7.3 or v5 (matfile.py reads both); every matrix is oriented by its number of pairs, an
image array by where its colour axis is. Images are read lazily, one HDF5 handle per
process; Wiki's JPEGs are decoded by OpenCV, as the authors do.

Check a dataset on disk (exit status 2 and one line per problem):

    python datasets.py DATASET=MIRFlickr DATA_DIR=data/mirflickr
    python datasets.py DATASET=MIRFlickr DATA_DIR=data/mirflickr FULL=True   # every image
"""
import dataclasses
import json
import os
import sys

import h5py
import numpy as np
from PIL import Image
from tqdm import tqdm

import matfile
import settings
from settings import UserError

# ===== file layouts (README, Data) =====
DCMH_FILES = {  # dataset -> (images, texts, labels) file names; keys IAll, YAll, LAll
    'MIRFlickr': ('mirflickr25k-iall.mat', 'mirflickr25k-yall.mat', 'mirflickr25k-lall.mat'),
    'NUSWIDE': ('nus-wide-tc10-iall.mat', 'nus-wide-tc10-yall.mat', 'nus-wide-tc10-lall.mat'),
}
DCMH_FILES['DEMO'] = DCMH_FILES['MIRFlickr']
DCMH_KEYS = ('IAll', 'YAll', 'LAll')
WIKI_FEATURES = 'raw_features.mat'
WIKI_LISTS = ('trainset_txt_img_cat.list', 'testset_txt_img_cat.list')
WIKI_IMAGES = 'images'
# The authors' folder names, in the order of the lists' 1-based category numbers.
WIKI_CATEGORIES = ('art', 'biology', 'geography', 'history', 'literature', 'media', 'music',
                   'royalty', 'sport', 'warfare')
# What the published files hold: pairs, text dimension, labels (a mismatch is only a warning).
EXPECTED = {'MIRFlickr': (20015, 1386, 24), 'NUSWIDE': (186577, 1000, 10), 'Wiki': (2866, 10, 10)}
# Share of pairs whose text is all zeros in the published files, at most: DCMH's NUS-WIDE
# keeps every image with one of the 10 concepts, tag-less ones included (about 5,000).
EXPECTED_TAGLESS = {'NUSWIDE': 0.05}

# ===== the split protocol (README, Data) =====
# dataset -> (first class: query, train; each later class: query, train; totals: query, train)
PROTOCOLS = {'MIRFlickr': (160, 400, 80, 200, 2000, 5000),
             'NUSWIDE': (200, 500, 200, 500, 2000, 5000)}
SCALED_QUERY, SCALED_TRAIN = 0.1, 0.5   # DEMO (and files too small for the protocol above)

# ===== DEMO: a generated dataset whose images and tags share a hidden label structure =====
DEMO_PAIRS = 2000            # pairs written by make_demo
DEMO_MARKER = 'demo-generated.json'   # written with the DEMO files: only those are overwritten
DEMO_SIZE = 64               # images are DEMO_SIZE x DEMO_SIZE (the DEMO preset crops 64 of 72)
DEMO_LABELS = 8              # labels; each has a colour, a stripe direction and a cell
DEMO_LABEL_COUNTS = (0.5, 0.35, 0.15)   # chance of 1, 2, 3 labels per pair
DEMO_TAGS = 300              # vocabulary; label k owns DEMO_TAGS_PER_LABEL tags, the rest are noise
DEMO_TAGS_PER_LABEL = 30
DEMO_TAG_PROB = 0.25         # chance that a present label's tag appears
DEMO_NOISE_TAGS = 3.0        # expected number of random tags per pair
DEMO_HIDE_PROB = 0.1         # a present label left out of the image (labels not trivial)
DEMO_DISTRACT_PROB = 0.08    # an absent label drawn faintly into the image
DEMO_COLOURS = ((230, 30, 30), (30, 200, 40), (40, 60, 235), (240, 220, 30),
                (220, 40, 220), (30, 220, 220), (250, 140, 20), (245, 245, 245))

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


class H5Images:
    """Images of a v7.3 IAll, read one at a time. The HDF5 handle is opened on first use in
    each process (so each DataLoader worker opens its own, once) and never pickled."""

    def __init__(self, var, layout):
        self.path, self.key, self.layout = var.path, var.key, layout
        self._file, self._pid = None, None

    def __len__(self):
        return self.layout.n

    def _dataset(self):
        if self._file is None or self._pid != os.getpid():  # a forked copy opens its own
            self._file, self._pid = h5py.File(self.path, 'r'), os.getpid()
        return self._file[self.key]

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
        state['_file'] = state['_pid'] = None
        return state

    def close(self):
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None


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
            raise UserError(f"{path}: not a readable image (OpenCV cannot decode it)")
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
        except IMAGE_ERRORS as err:
            raise UserError(f"{path}: not a readable image, truncated or corrupt? "
                            f"({matfile.one_line(err)})") from err
        return self.decode(i)


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


# ===== loading a dataset =====

def load(cfg, generate=True, verbose=True, train=True):
    """The dataset of cfg.DATASET in cfg.DATA_DIR, split with cfg.SPLIT_SEED. train=True
    refuses data too small to train on with cfg (the check command only warns)."""
    data_dir = cfg.DATA_DIR
    if cfg.DATASET == 'DEMO' and generate and not all(
            os.path.isfile(os.path.join(data_dir, name)) for name in DCMH_FILES['DEMO']):
        check_demo_folder(data_dir)
        print(f"DEMO: generating {DEMO_PAIRS} pairs in {data_dir} (first use)")
        make_demo(data_dir, DEMO_PAIRS)
    if settings.uses_image_features(cfg):  # stored features (features.py): no image is read
        import features
        data = features.load(cfg, verbose)
    elif not os.path.isdir(data_dir):
        what = 'is a file' if os.path.exists(data_dir) else 'no such folder'
        raise UserError(f"setting DATA_DIR={data_dir!r}: {what}; expected the folder "
                        f"holding the {cfg.DATASET} files ({', '.join(expected_files(cfg))})")
    elif cfg.DATASET == 'Wiki':
        data = load_wiki(data_dir)
    else:
        data = load_dcmh(cfg.DATASET, data_dir, cfg.IN_MEMORY)
        n = len(data.labels)
        protocol = PROTOCOLS.get(cfg.DATASET)
        if protocol and n < protocol[4] + protocol[5]:
            data.warnings.append(f"only {n} pairs, fewer than the {protocol[4] + protocol[5]} "
                                 f"the {cfg.DATASET} split needs; using the scaled-down DEMO "
                                 f"split (query {SCALED_QUERY:.0%}, train {SCALED_TRAIN:.0%})")
        data.query, data.train, data.database = split_indices(data.labels, cfg.DATASET,
                                                              cfg.SPLIT_SEED)
    if cfg.TEXT_FEATURES:
        import features
        features.apply_text_features(cfg, data)
    check_sizes(data, cfg, train)
    data.warnings += suspicious(data)
    data.notes = notes_on(data)
    if verbose:
        for line in data.notes:
            print(f"note: {line}")
        for line in data.warnings:
            print(f"warning: {line}")
    return data


def check_sizes(data, cfg, train):
    """Data that cannot train is refused here, before any evaluation or checkpoint."""
    where = f"{cfg.DATASET} in DATA_DIR={cfg.DATA_DIR!r}"
    if len(data.labels) == 0:
        raise UserError(f"{where}: the files hold 0 pairs; expected at least one batch")
    if len(data.train) < cfg.BATCH_SIZE:
        problem = (f"setting BATCH_SIZE={cfg.BATCH_SIZE}: {where} gives only "
                   f"{len(data.train)} training pairs, fewer than one batch (the last "
                   f"incomplete batch is dropped)")
        if train:
            raise UserError(f"{problem}; use a smaller BATCH_SIZE or more data")
        data.warnings.append(problem)


def expected_files(cfg):
    if cfg.DATASET == 'Wiki':
        return [WIKI_FEATURES, *WIKI_LISTS, f"{WIKI_IMAGES}/<category>/<name>.jpg"]
    return list(DCMH_FILES[cfg.DATASET])


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


def fmt_shape(shape):
    return ' x '.join(str(s) for s in shape)


def check_labels(labels, var):
    bad = ~((labels == 0) | (labels == 1))
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise UserError(f"{var.name()}: labels must be 0 or 1, found {labels[r, c]!r} at pair "
                        f"{r}, label {c}")
    return np.ascontiguousarray(labels, dtype=np.uint8)


def check_texts(texts, var):
    finite = np.isfinite(texts)
    if not finite.all():
        r, c = np.argwhere(~finite)[0]
        raise UserError(f"{var.name()}: text features must be finite, found {texts[r, c]} at "
                        f"pair {r}, column {c}")
    return np.ascontiguousarray(texts, dtype=np.float32)


def read_wiki_list(path, n_categories=len(WIKI_CATEGORIES)):
    """(image names, 0-based categories) from a list file: text id, image name, category."""
    matfile.need_file(path, "one pair a line: text id, image name, category number (1-based)")
    names, cats = [], []
    with open(path, 'rb') as f:
        for number, raw in enumerate(f, 1):
            fields = raw.decode('utf-8', 'replace').split()
            if not fields:
                continue
            if len(fields) < 3 or not fields[-1].isdigit() or not (
                    1 <= int(fields[-1]) <= n_categories):
                raise UserError(f"{path} line {number}: expected 'text_id image_name category' "
                                f"with a category from 1 to {n_categories}, found "
                                f"{raw.decode('utf-8', 'replace').strip()[:80]!r}")
            names.append(fields[1])
            cats.append(int(fields[-1]) - 1)
    return names, np.array(cats, np.int64)


def load_wiki(data_dir, need_images=True):
    """Wiki: the given lists (query = test, database = train = train), one image a file
    (need_images=False: on stored features, the image files need not exist)."""
    parts = []
    for list_name, key in zip(WIKI_LISTS, ('T_tr', 'T_te')):
        names, cats = read_wiki_list(os.path.join(data_dir, list_name))
        var = matfile.describe(os.path.join(data_dir, WIKI_FEATURES), key)
        if len(var.shape) != 2:
            raise UserError(f"{var.name()}: expected a 2-D pairs x topics matrix, found shape "
                            f"{var.shape}")
        if len(names) not in var.shape:
            raise UserError(f"pair counts disagree: {list_name} lists {len(names)} pairs, "
                            f"{var.name()} is {fmt_shape(var.shape)}")
        texts = matfile.orient(matfile.read_var(var, np.float32), len(names), var)
        texts = check_texts(texts, var)
        parts.append((names, cats, texts, var))
    names = parts[0][0] + parts[1][0]
    cats = np.concatenate([parts[0][1], parts[1][1]])
    if parts[0][2].shape[1] != parts[1][2].shape[1]:
        raise UserError(f"{os.path.join(data_dir, WIKI_FEATURES)}: T_tr has "
                        f"{parts[0][2].shape[1]} topics, T_te {parts[1][2].shape[1]}; expected "
                        f"the same")
    texts = np.concatenate([parts[0][2], parts[1][2]])
    labels = np.eye(len(WIKI_CATEGORIES), dtype=np.uint8)[cats]
    paths = [os.path.join(data_dir, WIKI_IMAGES, WIKI_CATEGORIES[c], name + '.jpg')
             for name, c in zip(names, cats)]
    for path in paths if need_images else ():  # named now, not in a worker mid-epoch
        if not os.path.isfile(path):
            raise UserError(f"missing file {path}: expected the image named in the list files")
    n_train = len(parts[0][0])
    train = np.arange(n_train, dtype=np.int64)
    query = np.arange(n_train, len(names), dtype=np.int64)
    files = [(os.path.join(data_dir, WIKI_FEATURES),
              f"T_tr {parts[0][3].version:4}  {fmt_shape(parts[0][2].shape)}, T_te "
              f"{fmt_shape(parts[1][2].shape)} {parts[0][3].mclass}"),
             (os.path.join(data_dir, WIKI_LISTS[0]), f"{n_train} pairs (train = database)"),
             (os.path.join(data_dir, WIKI_LISTS[1]), f"{len(query)} pairs (query)"),
             (os.path.join(data_dir, WIKI_IMAGES), f"{len(paths)} image files")]
    return Data('Wiki', texts, labels, FileImages(paths), query, train, train.copy(), files, [])


def suspicious(data):
    """Legal but suspicious: pairs with no label, text rows of zeros, repeated pairs."""
    out = []
    n = len(data.labels)
    no_label = int((data.labels.sum(1) == 0).sum())
    no_text = int((~data.texts.any(1)).sum())
    if no_label:
        out.append(f"{no_label} of {n} pairs have no label (they are never relevant to any "
                   f"query)")
    if no_text and not tagless_expected(data):
        out.append(f"{no_text} of {n} pairs have an all-zero text vector (kept: its cosine "
                   f"with every text is 0)")
    if (data.texts < 0).any():
        out.append("some text features are negative; the method assumes non-negative ones")
    keys = {hash(t.tobytes() + l.tobytes()) for t, l in zip(data.texts, data.labels)}
    if len(keys) < n:
        out.append(f"{n - len(keys)} pairs repeat the text and labels of an earlier pair")
    expected = EXPECTED.get(data.dataset)
    if expected and (n, data.texts.shape[1], data.labels.shape[1]) != expected:
        out.append(f"{n} pairs, {data.texts.shape[1]}-d text, {data.labels.shape[1]} labels; "
                   f"the published {data.dataset} files have {expected[0]} pairs, "
                   f"{expected[1]}-d text, {expected[2]} labels")
    return out


def tagless_expected(data):
    """Whether the all-zero texts are as many as the published files hold (NUS-WIDE)."""
    no_text = int((~data.texts.any(1)).sum())
    share = EXPECTED_TAGLESS.get(data.dataset, 0)
    return 0 < no_text <= share * len(data.texts)


def notes_on(data):
    """What the published files are known to hold that would otherwise look wrong."""
    if not tagless_expected(data):
        return []
    no_text = int((~data.texts.any(1)).sum())
    return [f"{no_text} of {len(data.texts)} pairs have an all-zero text vector, as expected: "
            f"the published {data.dataset} files keep the images that have one of the "
            f"concepts but none of the tags (about 5,000 of 186,577)"]


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


# ===== batches for training and evaluation =====
# torch and torchvision are imported in the functions that use them: the check command
# needs neither, and starts in a second instead of ten.

class Pairs:
    """Pairs `indices` of a Data, a map-style dataset: (image uint8 [3, CROP, CROP], text,
    labels, pair index); the DataLoader's collate makes tensors of the NumPy rows."""

    def __init__(self, data, indices, transform):
        self.images, self.texts, self.labels = data.images, data.texts, data.labels
        self.indices = np.asarray(indices, np.int64)
        self.transform = transform

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        i = int(self.indices[k])
        return self.transform(self.images.pil(i)), self.texts[i], self.labels[i], i


def train_transform(cfg):
    # The authors' order: flip, then resize the shorter side, then crop. On PIL images,
    # Resize is PIL's bilinear resize (antialiased), as in the authors' torchvision.
    # Flip and crop draw from torch's RNG, so a seeded generator fixes them.
    from torchvision.transforms import v2
    return v2.Compose([v2.RandomHorizontalFlip(), v2.Resize(cfg.RESIZE),
                       v2.RandomCrop(cfg.CROP), v2.PILToTensor()])


def test_transform(cfg):
    from torchvision.transforms import v2
    return v2.Compose([v2.Resize(cfg.RESIZE), v2.CenterCrop(cfg.CROP), v2.PILToTensor()])


def make_loader(data, part, cfg, generator=None):
    """A DataLoader over data.<part> ('train', 'query' or 'database'). Batches are
    (images uint8 [B, 3, CROP, CROP], texts float32, labels uint8, pair indices int64).
    'train': shuffled by `generator`, drop_last, the train transform (Wiki: the test one);
    'query'/'database': in order, EVAL_BATCH_SIZE, the test transform."""
    import torch
    if part not in ('train', 'query', 'database'):
        raise ValueError(f"make_loader: part must be 'train', 'query' or 'database', not {part!r}")
    if getattr(data.images, 'is_features', False):  # stored features: batches by index
        import features
        return features.make_loader(data, part, cfg, generator)
    train = part == 'train'
    indices = getattr(data, part)
    augment = train and data.dataset != 'Wiki'   # Wiki trains with the test transform
    transform = train_transform(cfg) if augment else test_transform(cfg)
    if not train:  # evaluating must not move the global RNG that training draws from
        generator = torch.Generator().manual_seed(0)
    workers = cfg.NUM_WORKERS
    return torch.utils.data.DataLoader(
        Pairs(data, indices, transform), batch_size=cfg.BATCH_SIZE if train
        else cfg.EVAL_BATCH_SIZE, shuffle=train, drop_last=train, generator=generator,
        num_workers=workers, persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available() and cfg.DEVICE != 'cpu',
        multiprocessing_context=worker_context(workers), worker_init_fn=ignore_sigint)


def batches(loader):
    """The batches of a DataLoader. A UserError raised while reading an item in a worker
    process (a bad image: one line naming the file and the pair) reaches the user as that
    line; DataLoader would otherwise wrap it in the worker's traceback."""
    try:
        yield from loader
    except UserError as err:
        text = str(err)
        if not text.startswith('Caught UserError in DataLoader worker'):
            raise
        # The wrapped message ends with the worker's last traceback line: 'UserError: <line>'.
        last = text.rstrip().splitlines()[-1]
        raise UserError(last.partition('UserError: ')[2] or last) from None


def ignore_sigint(worker_id):
    """Ctrl-C reaches the whole process group. The main process then finishes its batch,
    saves a checkpoint and stops the workers itself, so they must not die first."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def worker_context(workers):
    """fork where there is one: workers then share the texts, labels and in-memory images
    with the main process instead of each receiving a pickled copy (NUS-WIDE's texts are
    0.75 GB). The HDF5 file is still opened afresh in each worker (H5Images)."""
    import multiprocessing
    if workers > 0 and 'fork' in multiprocessing.get_all_start_methods() and (
            sys.platform.startswith('linux')):
        return multiprocessing.get_context('fork')
    return None


def normalize(images):
    """uint8 images [..., 3, H, W] -> float32, normalised with ImageNet's mean and std on the
    images' own device: the same operations as ToTensor then Normalize, done in bulk."""
    import torch
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=images.device)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=images.device)
    return images.float().div(255).sub(mean[:, None, None]).div(std[:, None, None])


# ===== DEMO =====

def make_demo(data_dir, n_pairs=DEMO_PAIRS, seed=0):
    """Write a generated dataset in the MIRFlickr layout and file names: IAll v7.3 (as
    MATLAB writes it), YAll and LAll v5. Deterministic for a given (n_pairs, seed).

    Each pair has 1 to 3 of DEMO_LABELS hidden labels. Label k paints a stripe pattern of
    its own colour and direction into its own cell of a 4 x 2 grid, large enough to survive
    the 72 -> 64 random crop and a flip; the text holds some of the tags label k owns plus
    random tags. Some labels are left out of the image and some absent ones drawn faintly,
    so that neither modality gives the labels away perfectly."""
    check_demo_folder(data_dir)
    rng = np.random.default_rng(seed)
    labels = demo_labels(rng, n_pairs)
    texts = demo_texts(rng, labels)
    images = demo_images(rng, labels)
    iall, yall, lall = (os.path.join(data_dir, name) for name in DCMH_FILES['DEMO'])
    # Write under temporary names and rename, so an interrupted run leaves no half file.
    iall_matlab = np.ascontiguousarray(images.transpose(1, 2, 3, 0))  # H x W x 3 x N
    try:
        os.makedirs(data_dir, exist_ok=True)
        matfile.write_mat73(iall + '.tmp', {'IAll': iall_matlab})
        matfile.write_mat5(yall + '.tmp', {'YAll': texts.astype(np.float64)})
        matfile.write_mat5(lall + '.tmp', {'LAll': labels.astype(np.float64)})
        # The marker first: a kill among the renames leaves a folder that is still ours.
        write_demo_marker(data_dir, n_pairs, seed)
        for path in (iall, yall, lall):
            os.replace(path + '.tmp', path)
    except OSError as err:
        raise UserError(f"setting DATA_DIR={data_dir!r}: cannot write the DEMO files there "
                        f"({matfile.one_line(err)})") from None
    finally:
        for path in (iall, yall, lall):
            if os.path.exists(path + '.tmp'):
                os.remove(path + '.tmp')


def check_demo_folder(data_dir):
    """make_demo writes only into an absent or empty folder, or over a previous DEMO (its
    marker file lists the files it wrote, with their sizes): never over anyone's data."""
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise UserError(f"setting DATA_DIR={data_dir!r}: is a file; expected a folder for "
                        f"the generated DEMO files")
    if not os.path.isdir(data_dir):
        return
    names = DCMH_FILES['DEMO']
    try:
        found = set(os.listdir(data_dir)) - {name + '.tmp' for name in (*names, DEMO_MARKER)}
        written = demo_marker_sizes(data_dir) or {}
    except OSError as err:
        raise UserError(f"setting DATA_DIR={data_dir!r}: cannot read the folder "
                        f"({matfile.one_line(err)})") from None
    foreign = sorted(name for name in found - {DEMO_MARKER}   # not written, or changed since
                     if os.path.getsize(os.path.join(data_dir, name)) != written.get(name))
    if foreign:
        shown = ', '.join(foreign[:4]) + (', ...' if len(foreign) > 4 else '')
        raise UserError(f"setting DATA_DIR={data_dir!r}: the folder holds files that are not a "
                        f"generated DEMO ({shown}); DEMO is generated only into an empty or "
                        f"absent folder or over a previous DEMO: use another DATA_DIR")


def demo_marker_sizes(data_dir):
    """{file name: size} from a previous DEMO's marker; None without one."""
    path = os.path.join(data_dir, DEMO_MARKER)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            sizes = json.load(f)['files']
    except (ValueError, KeyError, TypeError):
        return None
    return sizes if isinstance(sizes, dict) else None


def write_demo_marker(data_dir, n_pairs, seed):
    sizes = {name: os.path.getsize(os.path.join(data_dir, name + '.tmp'))
             for name in DCMH_FILES['DEMO']}
    marker = {'written_by': 'datasets.make_demo', 'n_pairs': n_pairs, 'seed': seed,
              'files': sizes}
    path = os.path.join(data_dir, DEMO_MARKER)
    with open(path + '.tmp', 'w') as f:
        json.dump(marker, f, indent=2)
    os.replace(path + '.tmp', path)


def demo_labels(rng, n):
    counts = rng.choice(len(DEMO_LABEL_COUNTS), size=n, p=DEMO_LABEL_COUNTS) + 1
    ranks = rng.random((n, DEMO_LABELS)).argsort(1).argsort(1)
    return (ranks < counts[:, None]).astype(np.uint8)


def demo_texts(rng, labels):
    n = len(labels)
    owned = rng.random((n, DEMO_LABELS, DEMO_TAGS_PER_LABEL)) < DEMO_TAG_PROB
    # every present label shows at least one of its tags
    forced = rng.integers(DEMO_TAGS_PER_LABEL, size=(n, DEMO_LABELS))
    owned[np.arange(n)[:, None], np.arange(DEMO_LABELS), forced] = True
    owned &= labels[:, :, None].astype(bool)
    texts = rng.random((n, DEMO_TAGS)) < DEMO_NOISE_TAGS / DEMO_TAGS
    texts[:, :DEMO_LABELS * DEMO_TAGS_PER_LABEL] |= owned.reshape(n, -1)
    return texts.astype(np.uint8)


def demo_masks(size=DEMO_SIZE):
    """One (size, size) float mask per label: stripes in the label's cell of a 4 x 2 grid
    that keeps an 8% margin, so that a random crop of 64 out of 72 cuts little of it."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    masks = []
    for k in range(DEMO_LABELS):
        row, col = k // 2, k % 2
        cy, cx = 0.08 + 0.84 * (row + 0.5) / 4, 0.08 + 0.84 * (col + 0.5) / 2
        cell = (np.abs(y - cy) < 0.1) & (np.abs(x - cx) < 0.19)
        angle = np.pi * (k % 4) / 4   # four stripe directions
        phase = (x * np.cos(angle) + y * np.sin(angle)) * size / 5
        masks.append(cell * (0.55 + 0.45 * (np.floor(phase) % 2)))
    return np.stack(masks).astype(np.float32)


def demo_images(rng, labels):
    n, size = len(labels), DEMO_SIZE
    present = labels.astype(bool)
    shown = present & (rng.random(present.shape) >= DEMO_HIDE_PROB)
    faint = ~present & (rng.random(present.shape) < DEMO_DISTRACT_PROB)
    strength = np.where(shown, rng.uniform(0.7, 1.0, present.shape),
                        np.where(faint, rng.uniform(0.25, 0.45, present.shape), 0.0))
    # a grey background with pixel noise: a random colour cast per image would dominate
    # the features of a randomly initialised CNN and hide the labels
    images = rng.standard_normal((n, size, size, 3), dtype=np.float32) * 12
    images += rng.uniform(85, 115, (n, 1, 1, 3)).astype(np.float32)
    colours = np.array(DEMO_COLOURS, np.float32)
    for k, mask in enumerate(demo_masks(size)):
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        box = (slice(None), slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        alpha = strength[:, k, None, None, None].astype(np.float32) * mask[box[1:]][..., None]
        images[box] = images[box] * (1 - alpha) + alpha * colours[k]  # paint over
    return np.clip(images + 0.5, 0, 255).astype(np.uint8)


# ===== the check command =====

def check(cfg):
    """Check the dataset of cfg on disk; print a summary. Raises UserError on a problem."""
    print(f"checking {cfg.DATASET} in {cfg.DATA_DIR}")
    if cfg.DATASET == 'DEMO' and not os.path.isdir(cfg.DATA_DIR):
        raise UserError(f"setting DATA_DIR={cfg.DATA_DIR!r}: no such folder (DEMO files are "
                        f"generated there by train.py DATASET=DEMO or prepare.py DATASET=DEMO)")
    data = load(cfg, generate=False, verbose=False, train=False)
    check_images(data, cfg.FULL)
    for path, what in data.files:
        print(f"  {os.path.relpath(path, cfg.DATA_DIR):34} {what}")   # where it was found
    n = len(data.labels)
    print(f"  pairs {n}; text {data.texts.shape[1]}-d; {data.labels.shape[1]} labels")
    print(f"  pairs with no label: {int((data.labels.sum(1) == 0).sum())}; "
          f"with no text: {int((~data.texts.any(1)).sum())}")
    check_split(data, cfg)
    seed = '' if cfg.DATASET == 'Wiki' else f" (SPLIT_SEED={cfg.SPLIT_SEED})"
    print(f"  split{seed}: query {len(data.query)}, train {len(data.train)}, "
          f"database {len(data.database)}")
    for line in data.notes:
        print(f"note: {line}")
    for line in data.warnings:
        print(f"warning: {line}")
    print(f"ok: {cfg.DATASET} in {cfg.DATA_DIR} passes the check"
          + (f" ({len(data.warnings)} warnings)" if data.warnings else ''))
    return data


def check_images(data, full=False):
    """Read some images (all of Wiki's; all of any with FULL=True): a truncated IAll fails
    here, not mid-epoch. Only FULL=True finds a corrupt block in the middle of an IAll."""
    images = data.images
    if getattr(images, 'is_features', False):   # stored features: checked when loaded
        return
    n = len(images)
    full = full or isinstance(images, FileImages)
    which = range(n) if full else sorted({0, n // 2, n - 1})
    if full and n > 1000:
        print(f"  reading all {n} images (FULL=True)")
    for i in tqdm(which, desc='images', leave=False, disable=not (full and sys.stderr.isatty())):
        image = images[i]
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise UserError(f"{getattr(images, 'path', '')}: image {i} is {image.shape} "
                            f"{image.dtype}, expected (H, W, 3) uint8")
    if isinstance(images, H5Images):
        images.close()   # never leave a handle open for workers to inherit
    if full:
        print(f"  read all {n} images")


def check_split(data, cfg):
    q, t, d = (set(a.tolist()) for a in (data.query, data.train, data.database))
    n = len(data.labels)
    problems = []
    if q & d:
        problems.append("query and database overlap")
    if not t <= d:
        problems.append("train is not inside the database")
    if len(q) != len(data.query) or len(t) != len(data.train):
        problems.append("repeated indices")
    if any(a.size and (a.min() < 0 or a.max() >= n) for a in (data.query, data.train)):
        problems.append("indices out of range")
    if problems:
        raise UserError(f"split of {cfg.DATASET}: {', '.join(problems)}")


def main(argv):
    cfg = settings.resolve(argv)
    check(cfg)
    return 0


if __name__ == '__main__':
    settings.run_cli(main, sys.argv[1:])
