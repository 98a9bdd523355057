"""Loading a dataset: the reader of each source, chosen by the settings; the batches for
training and evaluation; and the data check.

    datasets.load(cfg)    -> pairs.Data, from the reader of cfg.DATASET (and features.py /
                             published.py when features are stored): dcmh.py (MIRFlickr,
                             NUS-WIDE, DEMO), wiki.py, custom.py (your own pairs)
    datasets.make_loader  -> batches of (images uint8, texts, labels, pair indices)

The readers know only their own files and the modules beneath them (pairs.py, matfile.py);
this module is the one place that knows them all. pairs.py's docstring lists which file
owns what.

Check a dataset on disk (exit status 2 and one line per problem):

    python datasets.py DATASET=MIRFlickr DATA_DIR=data/mirflickr
    python datasets.py DATASET=MIRFlickr DATA_DIR=data/mirflickr FULL=True   # every image
"""
import functools
import os
import sys

import h5py
import numpy as np
from PIL import Image
from tqdm import tqdm

import custom
import dcmh
import demo
import features
import matfile
import pairs
import published
import settings
import wiki
from settings import UserError
from dcmh import split_indices  # noqa: F401  (public: datasets.split_indices)
from pairs import Data, read_image  # noqa: F401  (public: datasets.read_image)

# What the published files hold: pairs, text dimension, labels (a mismatch is only a warning).
EXPECTED = {'MIRFlickr': (20015, 1386, 24), 'NUSWIDE': (186577, 1000, 10), 'Wiki': (2866, 10, 10)}
# Share of pairs whose text is all zeros in the published files, at most: DCMH's NUS-WIDE
# keeps every image with one of the 10 concepts, tag-less ones included (about 5,000).
EXPECTED_TAGLESS = {'NUSWIDE': 0.05}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
READERS = {'MIRFlickr': dcmh, 'NUSWIDE': dcmh, 'DEMO': dcmh, 'Wiki': wiki, 'Custom': custom}


# ===== loading a dataset =====

def load(cfg, generate=True, verbose=True, train=True):
    """The dataset of cfg.DATASET in cfg.DATA_DIR, split with cfg.SPLIT_SEED. train=True
    refuses data too small to train on with cfg (the check command only warns)."""
    if cfg.DATASET == 'DEMO' and generate:
        demo.ensure(cfg.DATA_DIR)
    if cfg.PUBLISHED:
        check_not_mixed(cfg)
        data = published.load(cfg)
    else:
        need_folder(cfg)
        check_not_mixed(cfg)
        data = READERS[cfg.DATASET].load(cfg, need_images=not cfg.IMAGE_FEATURES)
        if cfg.IMAGE_FEATURES:  # stored features (features.py): no image is read
            features.apply_image_features(cfg, data)
    if cfg.TEXT_FEATURES:
        features.apply_text_features(cfg, data)
    check_sizes(data, cfg, train)
    data.warnings += suspicious(data)
    data.notes += notes_on(data)
    if verbose:
        report(data, cfg)
    return data


def need_folder(cfg):
    try:
        os.stat(cfg.DATA_DIR)
    except PermissionError:   # a folder on its path may not be entered
        raise UserError(f"setting DATA_DIR={cfg.DATA_DIR!r}: permission denied on a folder of "
                        f"its path; expected the folder holding the {cfg.DATASET} files") from None
    except OSError:
        pass
    if not os.path.isdir(cfg.DATA_DIR):
        what = 'is a file' if os.path.exists(cfg.DATA_DIR) else 'no such folder'
        where = f"; {pairs.where_to_get(cfg.DATASET)}" if cfg.DATASET in pairs.SOURCES else ''
        raise UserError(f"setting DATA_DIR={cfg.DATA_DIR!r}: {what}; expected the folder "
                        f"holding the {cfg.DATASET} files ({', '.join(expected_files(cfg))})"
                        f"{where}")


def data_files(cfg):
    """The files a run of cfg reads, found where load(cfg) looks, without reading them
    (reproduce.py checks a whole grid's data this way before its first run); a UserError
    naming what is missing and where to get it. DEMO's are generated on first use."""
    if cfg.DATASET == 'DEMO' and not cfg.PUBLISHED:
        names = [os.path.join(cfg.DATA_DIR, name) for name in dcmh.DCMH_FILES['DEMO']]
        files = [path for path in names if os.path.isfile(path)]
    elif cfg.PUBLISHED:
        check_not_mixed(cfg)
        files = published.find_files(cfg)
    else:
        need_folder(cfg)
        check_not_mixed(cfg)
        files = READERS[cfg.DATASET].find_files(cfg, need_images=not cfg.IMAGE_FEATURES)
    return files + feature_files(cfg)


def feature_files(cfg):
    """IMAGE_FEATURES and TEXT_FEATURES when given; a missing one is named (as
    features.read_features names it) before a grid starts, not in its first train.py."""
    out = []
    for key in ('IMAGE_FEATURES', 'TEXT_FEATURES'):
        path = getattr(cfg, key)
        if path:
            features.need_file(path, f"setting {key}={path!r}",
                               'extract.py writes the image features')
            out.append(path)
    return out


def check_not_mixed(cfg):
    """UCCH's MIRFlickr and NUS-WIDE files share DCMH's names for the texts and labels
    (mirflickr25k-yall.mat, ...) but not their row order: a folder holding UCCH's image
    features beside DCMH's images is refused, whichever of the two is asked for."""
    if cfg.DATASET not in published.UCCH_FILES or cfg.DATASET not in dcmh.DCMH_FILES \
            or cfg.PUBLISHED == 'DGCPN' or not os.path.isdir(cfg.DATA_DIR):
        return
    ucch = [names[0] for names in published.UCCH_FILES[cfg.DATASET]
            if os.path.isfile(os.path.join(cfg.DATA_DIR, names[0]))]
    try:
        iall = os.path.relpath(dcmh.dcmh_path(cfg.DATASET, cfg.DATA_DIR, 'IAll'), cfg.DATA_DIR)
    except UserError:
        iall = None
    if ucch and (iall or not cfg.PUBLISHED):
        texts, labels = dcmh.DCMH_FILES[cfg.DATASET][1:]
        dcmh_part = f"DCMH's {iall} and " if iall else ''
        raise UserError(f"setting DATA_DIR={cfg.DATA_DIR!r}: holds {dcmh_part}UCCH's "
                        f"{ucch[0]}; the two projects' {texts} and {labels} share names but "
                        f"not row order, so this folder cannot be read as either: keep each "
                        f"project's files in a folder of its own (PUBLISHED runs default to "
                        f"{settings.published_dir('UCCH', settings.PRESETS[cfg.DATASET]['DATA_DIR'])})")


def report(data, cfg):
    if cfg.DATASET in settings.BORROWED_PRESETS:
        print(f"{cfg.DATASET}: no DJSRH preset exists; using "
              f"{settings.BORROWED_PRESETS[cfg.DATASET]}'s: BETA={cfg.BETA}, "
              f"LAMBDA1={cfg.LAMBDA1}, LAMBDA2={cfg.LAMBDA2}, NUM_EPOCH={cfg.NUM_EPOCH}, "
              f"LR_IMG={cfg.LR_IMG}, LR_TXT={cfg.LR_TXT}")
    for line in data.notes:
        print(f"note: {line}")
    for line in data.warnings:
        print(f"warning: {line}")


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
    labelled = data.labels.any(1)
    if data.dataset == 'Custom' and not labelled.any():
        return   # labels are optional there: evaluated by own-pair recall alone
    for part in ('query', 'database'):
        if not labelled[getattr(data, part)].any():
            problem = (f"{where}: no {part} pair has a label, so no item can be relevant to "
                       f"any query and every mAP is 0")
            advice = 'check the labels'
            if data.dataset == 'Custom':   # mAP is over the labelled queries (train.label_maps)
                problem = unlabelled_part(where, part, int(labelled.sum()))
                advice = ("label more pairs, draw another split (SPLIT_SEED, QUERY_SIZE), or "
                          "drop the labels to be judged by own-pair recall alone")
            if train:
                raise UserError(f"{problem}; {advice}")
            data.warnings.append(problem)


def unlabelled_part(where, part, labelled):
    """Why a Custom split whose queries or database have no label cannot give an mAP."""
    why = ("mAP, taken over the labelled queries, cannot be measured" if part == 'query'
           else "no labelled query has a relevant item and every mAP is 0")
    return (f"{where}: none of the {labelled} labelled pairs is in the {part} set, so {why}")


def expected_files(cfg):
    if cfg.DATASET == 'Custom':
        return [' or '.join(custom.MANIFESTS), 'the images it names']
    if cfg.DATASET == 'Wiki':
        return [wiki.WIKI_FEATURES, *wiki.WIKI_LISTS,
                f"{wiki.WIKI_IMAGES}/<category>/<name>.jpg"]
    return list(dcmh.DCMH_FILES[cfg.DATASET])


def suspicious(data):
    """Legal but suspicious: pairs with no label, text rows of zeros, repeated pairs."""
    out = []
    n = len(data.labels)
    no_label = int((data.labels.sum(1) == 0).sum())
    no_text = int((~data.texts.any(1)).sum())
    if no_label and data.labels.shape[1]:   # none at all: a Custom folder without labels
        out.append(f"{no_label} of {n} pairs have no label (they are never relevant to any "
                   f"query)")
    if no_text and not tagless_expected(data):
        out.append(f"{no_text} of {n} pairs have an all-zero text vector (kept: its cosine "
                   f"with every text is 0)")
    if getattr(data.images, 'is_features', False) and features.negative(data):
        out.append("some image features are negative; the method assumes non-negative ones "
                   "(cosines in [0, 1])")
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


# ===== batches for training and evaluation =====
# torch and torchvision are imported in the functions that use them: the check command
# needs neither, and starts in a second instead of ten.

class Pairs:
    """Pairs `indices` of a Data, a map-style dataset: (image uint8 [3, CROP, CROP], text,
    labels, pair index); the DataLoader's collate makes tensors of the NumPy rows.
    `images` replaces data.images (the cached train split)."""

    def __init__(self, data, indices, transform, images=None):
        self.images = data.images if images is None else images
        self.texts, self.labels = data.texts, data.labels
        self.indices = np.asarray(indices, np.int64)
        self.transform = transform

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        i = int(self.indices[k])
        return self.transform(self.images.pil(i)), self.texts[i], self.labels[i], i

    def __getitems__(self, ks):
        """A batch (the DataLoader asks for a batch at once): read in runs of consecutive
        images where the source can (an HDF5 IAll), so that in file order each chunk is
        decompressed once per batch, then transformed one by one as __getitem__ does."""
        many = getattr(self.images, 'many', None)
        if many is None:
            return [self[k] for k in ks]
        indices = self.indices[np.asarray(ks, np.int64)]
        arrays = getattr(self.transform, 'takes_arrays', False)
        return [(self.transform(image if arrays else Image.fromarray(image)), self.texts[i],
                 self.labels[i], int(i)) for image, i in zip(many(indices), indices)]


class CachedImages:
    """Some images of a source held in memory as one uint8 array (the train split, read
    once per run by cache_train); `pil(i)` for pair number i as the source gives it."""

    def __init__(self, array, indices, n, path):
        self.array, self.path = array, path
        self.row = np.full(n, -1, np.int64)
        self.row[np.asarray(indices, np.int64)] = np.arange(len(indices))

    def __len__(self):
        return len(self.row)

    def __getitem__(self, i):
        row = self.row[int(i)]
        if row < 0:
            raise IndexError(f"pair {i} is not among the cached images")
        return self.array[row]

    def pil(self, i):
        return Image.fromarray(self[i])


class SplitRuns:
    """The DataLoader dataset that fills a cache: item k = (rows of the cache, their images
    through `prepare`), read as one group of runs of consecutive images (runs). With
    `shared` (the cache itself, in memory shared with the forked workers) each image is
    written into its row there and item k is the rows alone: no copy to stack, send and
    place in the main process."""

    def __init__(self, images, groups, prepare, shared=None):
        self.images, self.groups, self.prepare = images, groups, prepare
        self.shared = shared

    def __len__(self):
        return len(self.groups)

    def __getitem__(self, k):
        rows, out = [], []
        for a, b, wanted, where in self.groups[k]:
            block = self.images.run(a, b)
            for i, row in zip(wanted, where):
                if self.shared is None:
                    out.append(self.prepare(block[i - a]))
                else:
                    self.shared[row] = self.prepare(block[i - a])
            rows.append(where)
        return np.concatenate(rows), (np.stack(out) if out else None)


def as_is(item):
    """The fill's items stay NumPy arrays, sent through the workers' pipe as bytes: the main
    process only writes them into its NumPy cache, so making them tensors (shared by file
    descriptor, one handshake each) would gain nothing."""
    return item


def shared_array(shape, workers):
    """A zeroed uint8 array in memory that forked workers write into and the main process
    sees (an anonymous shared mapping); None where the workers are not forked."""
    import mmap
    if workers > 0 and worker_context(workers) is None:
        return None
    size = int(np.prod(shape))
    return np.frombuffer(mmap.mmap(-1, max(1, size)), np.uint8, size).reshape(shape)


# The train split is cached when it takes at most this share of the machine's memory.
CACHE_SHARE = 0.25


def cache_train(data, cfg):
    """(images, resized): the train split's images of an HDF5 IAll, read once per run in
    file order (each chunk that holds one decompressed once, by the NUM_WORKERS workers)
    and kept on data.images for the later epochs; None when the source is not HDF5 or the
    split would not fit. resized: the Resize of the train transform is already applied
    (done once, when it commutes with the flip the authors apply before it)."""
    import torch
    source = data.images
    if not isinstance(source, pairs.H5Images):
        return None, False
    key = (cfg.RESIZE, len(data.train), hash(data.train.tobytes()))
    if source.train_cache is not None and source.train_cache[0] == key:
        return source.train_cache[1:]
    indices = np.asarray(data.train, np.int64)
    first = source[int(indices[0])]
    resized = resize_commutes_with_flip(first, cfg.RESIZE)
    prepare = resize_array(cfg.RESIZE) if resized else (lambda image: image)
    shape = prepare(first).shape
    size = len(indices) * int(np.prod(shape))
    if size > CACHE_SHARE * pairs.physical_memory():
        print(f"note: the {len(indices)} training images would take {size / 2**30:.1f} GiB, "
              f"more than {CACHE_SHARE:.0%} of this machine's memory; read from the file "
              f"each epoch instead")
        source.train_cache = (key, None, False)
        return None, False
    groups = group_runs(pairs.runs(indices, source.per_chunk, source.image_bytes), source.image_bytes)
    workers = cfg.NUM_WORKERS
    shared = shared_array((len(indices),) + shape, workers)
    array = np.empty((len(indices),) + shape, np.uint8) if shared is None else shared
    loader = torch.utils.data.DataLoader(
        SplitRuns(source, groups, prepare, shared), batch_size=None, num_workers=workers,
        collate_fn=as_is, generator=torch.Generator().manual_seed(0),   # keeps the global RNG
        multiprocessing_context=worker_context(workers), worker_init_fn=ignore_sigint)
    for rows, block in batches(loader):
        if block is not None:
            array[rows] = block
    source.close()   # the training workers open their own handles
    cached = CachedImages(array, indices, len(source), source.path)
    source.train_cache = (key, cached, resized)
    return cached, resized


def group_runs(found, image_bytes, group_bytes=pairs.RUN_BYTES):
    """Consecutive runs put together into items of about group_bytes of images read."""
    groups, current, size = [], [], 0
    for run in found:
        current.append(run)
        size += (run[1] - run[0]) * image_bytes
        if size >= group_bytes:
            groups.append(current)
            current, size = [], 0
    return groups + ([current] if current else [])


def resize_array(resize):
    """(H, W, 3) uint8 -> the same through the train transform's Resize, as an array."""
    return lambda image: resized(image, resize)


def resized_size(height, width, resize):
    """(height, width) after torchvision's Resize(resize): the shorter side becomes resize."""
    if height <= width:
        return resize, int(resize * width / height)
    return int(resize * height / width), resize


# (input size, output size) -> whether torch's uint8 kernel gives PIL's pixels, per process
_EXACT_TORCH_RESIZE = {}


def resized(image, resize):
    """An (H, W, 3) uint8 array through v2.Resize(resize) on its PIL image (PIL's
    antialiased bilinear resize), as an array. Where torch's own uint8 antialiased kernel
    gives exactly PIL's pixels for these sizes it does the work (2.5 times faster here): it
    does when the resampling weights are exact binary fractions, as for 224 -> 256 (the
    DCMH files); see torch_resize_exact."""
    height, width = image.shape[:2]
    size = resized_size(height, width, resize)
    if torch_resize_exact((height, width), size):
        return torch_resize(image, size)
    return pil_resize(image, size)


def pil_resize(image, size):
    return np.asarray(Image.fromarray(image).resize(size[::-1], Image.BILINEAR))


def torch_resize(image, size):
    """The (H, W, 3) result is contiguous. The kernel works on channels-last images, and
    torch's own copy to that layout from a strided view (an IAll image is stored (3, W, H))
    is faster than NumPy's (resize included, 0.67 instead of 0.87 CPU-ms an image here)."""
    import torch
    if min(image.strides) < 0:   # torch takes no negative strides (a flipped view)
        image = np.ascontiguousarray(image)
    chw = torch.from_numpy(image).permute(2, 0, 1)[None].contiguous(
        memory_format=torch.channels_last)
    out = torch.nn.functional.interpolate(chw, size=size, mode='bilinear', antialias=True,
                                          align_corners=False)
    return out[0].permute(1, 2, 0).numpy()


def torch_resize_exact(shape, size):
    """Whether torch_resize gives pil_resize's pixels from `shape` to `size`. Both round
    their weights to fixed point (PIL to 22 bits, torch to about 14) and sum in integers
    in the same two passes, so they agree where every weight is exact in 14 bits: when
    enlarging by a ratio in/out that is a multiple of 2**-13 (224 -> 256 = 7/8), each weight
    is one (clipped taps are renormalised to 1). Checked on noise of that size too."""
    key = (tuple(shape), tuple(size))
    if key not in _EXACT_TORCH_RESIZE:
        exact = all(a <= b and (a << 13) % b == 0 for a, b in zip(shape, size))
        if exact:
            noise = np.random.default_rng(0).integers(0, 256, shape + (3,), dtype=np.uint8)
            exact = np.array_equal(torch_resize(noise, size), pil_resize(noise, size))
        _EXACT_TORCH_RESIZE[key] = exact
    return _EXACT_TORCH_RESIZE[key]


class FixedSizeTestTransform:
    """v2.Compose([Resize(resize), CenterCrop(crop), PILToTensor()]) for arrays of one
    size (an IAll's images), the same pixels with less work: resized(), then a view.
    Takes the (H, W, 3) array or its PIL image; gives a (3, crop, crop) uint8 tensor."""
    takes_arrays = True

    def __init__(self, resize, crop):
        self.resize, self.crop = resize, crop

    def __call__(self, image):
        import torch
        out = resized(np.asarray(image), self.resize)
        height, width = out.shape[:2]
        top, left = int(round((height - self.crop) / 2.0)), int(round((width - self.crop) / 2.0))
        out = out[top:top + self.crop, left:left + self.crop]
        return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))


def resize_commutes_with_flip(image, resize):
    """Whether Resize then a horizontal flip gives the pixels that the authors' order (flip,
    then Resize) gives, for images of this one's size. PIL's resampling weights depend
    only on the sizes and are mirror images for most; checked on the image and on noise
    of its size. Then Resize can be applied once, before caching, and the result is the
    same as resizing every epoch."""
    noise = np.random.default_rng(0).integers(0, 256, image.shape, dtype=np.uint8)
    resize_to = resize_array(resize)
    return all(np.array_equal(resize_to(np.ascontiguousarray(a[:, ::-1])),
                              resize_to(a)[:, ::-1]) for a in (image, noise))


def train_transform(cfg, resized=False):
    # The authors' order: flip, then resize the shorter side, then crop. On PIL images,
    # Resize is PIL's bilinear resize (antialiased), as in the authors' torchvision.
    # Flip and crop draw from torch's RNG, so a seeded generator fixes them. resized: the
    # images come resized already (cache_train), the same draws in the same order.
    from torchvision.transforms import v2
    resize = [] if resized else [v2.Resize(cfg.RESIZE)]
    return v2.Compose([v2.RandomHorizontalFlip(), *resize, v2.RandomCrop(cfg.CROP),
                       v2.PILToTensor()])


def test_transform(cfg, fixed_size=False):
    """fixed_size: every image has the same size (an IAll): FixedSizeTestTransform."""
    if fixed_size:
        return FixedSizeTestTransform(cfg.RESIZE, cfg.CROP)
    from torchvision.transforms import v2
    return v2.Compose([v2.Resize(cfg.RESIZE), v2.CenterCrop(cfg.CROP), v2.PILToTensor()])


def make_loader(data, part, cfg, generator=None):
    """A DataLoader over data.<part> ('train', 'query' or 'database'). Batches are
    (images uint8 [B, 3, CROP, CROP], texts float32, labels uint8, pair indices int64).
    'train': shuffled by `generator`, drop_last, the train transform (Wiki: the test one),
    from the train split held in memory (cache_train) when the IAll is HDF5;
    'query'/'database': in order, EVAL_BATCH_SIZE, the test transform."""
    import torch
    if part not in ('train', 'query', 'database'):
        raise ValueError(f"make_loader: part must be 'train', 'query' or 'database', not {part!r}")
    if getattr(data.images, 'is_features', False):  # stored features: batches by index
        return features.make_loader(data, part, cfg, generator)
    train = part == 'train'
    indices = getattr(data, part)
    augment = train and data.dataset != 'Wiki'   # Wiki trains with the test transform
    images, resized = cache_train(data, cfg) if augment else (None, False)
    fixed_size = isinstance(data.images, (pairs.H5Images, pairs.ArrayImages))
    transform = train_transform(cfg, resized) if augment else test_transform(cfg, fixed_size)
    if not train:  # evaluating must not move the global RNG that training draws from
        generator = torch.Generator().manual_seed(0)
    workers = cfg.NUM_WORKERS
    return torch.utils.data.DataLoader(
        Pairs(data, indices, transform, images), batch_size=cfg.BATCH_SIZE if train
        else cfg.EVAL_BATCH_SIZE, shuffle=train, drop_last=train, generator=generator,
        num_workers=workers, persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available() and cfg.DEVICE != 'cpu',
        multiprocessing_context=worker_context(workers), worker_init_fn=ignore_sigint)


def batches(loader):
    """The batches of a DataLoader. A UserError raised while reading an item in a worker
    process (a bad image: one line naming the file and the pair) reaches the user as that
    line; DataLoader would otherwise wrap it in the worker's traceback. Batches left
    unread (an error, Ctrl-C) stop the worker processes at once (stop_workers)."""
    items = iter(loader)
    finished = False
    try:
        yield from items
        finished = True
    except UserError as err:
        text = str(err)
        if not text.startswith('Caught UserError in DataLoader worker'):
            raise
        # The wrapped message ends with the worker's last traceback line: 'UserError: <line>'.
        last = text.rstrip().splitlines()[-1]
        raise UserError(last.partition('UserError: ')[2] or last) from None
    finally:
        if not finished:
            stop_workers(items)


def stop_workers(items):
    """End a DataLoader iterator's worker processes now. Left to the process's exit, they
    would be terminated (they are daemons) before removing their temporary folders
    (pymp-* in the temp directory), while the error's traceback keeps the iterator alive."""
    shutdown = getattr(items, '_shutdown_workers', None)   # absent without workers
    if shutdown is not None:
        shutdown()


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
    import multiprocessing.util
    if workers > 0 and 'fork' in multiprocessing.get_all_start_methods() and (
            sys.platform.startswith('linux')):
        # A worker sharing a tensor makes a pymp-* temp folder unless it inherits one; its
        # own is left behind when it exits mid-send (an error, Ctrl-C). The main process's
        # folder, made here before the fork, is removed when the main process exits.
        multiprocessing.util.get_temp_dir()
        return multiprocessing.get_context('fork')
    return None


def normalize(images):
    """uint8 images [..., 3, H, W] -> float32, normalised with ImageNet's mean and std on the
    images' own device: the same operations as ToTensor then Normalize, done in bulk."""
    mean, std = imagenet_stats(images.device)
    return images.float().div(255).sub(mean).div(std)


@functools.lru_cache(maxsize=None)
def imagenet_stats(device):
    """ImageNet's mean and std as 3 x 1 x 1 float32 tensors on `device`, made once per device
    (making them is a copy to the device, which waits for it). Ordinary tensors even when
    first asked for under inference_mode, so that training may use them too."""
    import torch
    with torch.inference_mode(False):
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=device)
        std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=device)
    return mean[:, None, None], std[:, None, None]


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
    if isinstance(data.images, pairs.H5Images):
        check_storage(data, cfg)
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
    full = full or data.dataset == 'Wiki'   # its 2,866 JPEGs: read in seconds
    which = range(n) if full else sorted({0, n // 2, n - 1})
    if full and n > 1000:
        print(f"  reading all {n} images (FULL=True)")
    for i in tqdm(which, desc='images', leave=False, disable=not (full and sys.stderr.isatty())):
        image = images[i]
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise UserError(f"{getattr(images, 'path', '')}: image {i} is {image.shape} "
                            f"{image.dtype}, expected (H, W, 3) uint8")
    if isinstance(images, pairs.H5Images):
        images.close()   # never leave a handle open for workers to inherit
    if full:
        print(f"  read all {n} images")


# Reading one image at a time at random below this rate, from chunks of several images,
# earns the advice to repack the file (training reads its split once per run anyway;
# the first epoch then decompresses every chunk holding a training image).
SLOW_RANDOM_READS = 500   # images per second


def check_storage(data, cfg, seconds=0.5):
    """Print how an HDF5 IAll is stored and how fast it reads, one image at a time at
    random (a fresh handle with h5py's default chunk cache, as a plain reader has) and in
    file order (as evaluation reads it); add a note advising REPACK when the chunks make
    single-image reads slow. A bad block met while measuring is a warning here (only
    FULL=True promises to read every image)."""
    images = data.images
    store = images.storage
    chunks = (f"chunks of {images.per_chunk} image{'s' * (images.per_chunk > 1)} "
              f"{store.chunks}" if store.chunks else "not chunked")
    level = f" level {store.level}" if store.level is not None else ''
    try:
        random_rate, order_rate = read_rates(images, seconds)
    except UserError as err:
        print(f"  IAll storage: {chunks}, {store.compression}{level}")
        data.warnings.append(f"measuring the read rate: {err}; FULL=True reads every image")
        return
    finally:
        images.close()
    print(f"  IAll storage: {chunks}, {store.compression}{level}; reads {random_rate:.0f} "
          f"images/s one at a time at random, {order_rate:.0f} in file order")
    if images.per_chunk > 1 and random_rate < SLOW_RANDOM_READS:
        data.notes.append(
            f"{images.path} holds {images.per_chunk} images a chunk: a single image costs "
            f"its whole chunk. Training reads its split once per run and evaluation reads "
            f"in file order, but the first epoch still decompresses every chunk that holds "
            f"a training image; `python prepare.py DATASET={cfg.DATASET} "
            f"DATA_DIR={cfg.DATA_DIR} REPACK=True` converts the file once to one image "
            f"per chunk (docs/speed.md)")


def read_rates(images, seconds):
    """(images/s one at a time at random, images/s in file order, 64 a read)."""
    n = len(images)
    rng = np.random.default_rng(0)
    def at_random(dataset):
        i = int(rng.integers(n))
        try:
            images.layout.image(dataset, i)
        except matfile.READ_ERRORS as err:
            raise UserError(f"{images.path}: cannot read image {i} of {images.key} "
                            f"({matfile.one_line(err)})") from err
        return 1
    def in_order(k):
        a = k * 64 % n
        return len(images.run(a, min(n, a + 64)))
    try:
        with h5py.File(images.path, 'r') as f:
            dataset = f[images.key]
            random_rate = read_rate(lambda k: at_random(dataset), seconds)
    except OSError as err:   # opening the file (it was opened once already: unlikely)
        raise UserError(f"{images.path}: cannot open ({matfile.one_line(err)})") from err
    return random_rate, read_rate(in_order, seconds)


def read_rate(read, seconds):
    """Images per second of read(k) (which returns how many it read), k = 0, 1, ...,
    for about `seconds` (at least one call)."""
    import time
    start, count, k = time.perf_counter(), 0, 0
    while k == 0 or time.perf_counter() - start < seconds:
        count += read(k)
        k += 1
    return count / (time.perf_counter() - start)


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
