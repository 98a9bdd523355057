"""Loading a dataset: the reader of each source, chosen by the settings; the batches for
training and evaluation; and the data check.

    datasets.load(cfg)    -> pairs.Data, from the reader of cfg.DATASET (and features.py /
                             published.py when features are stored): dcmh.py (MIRFlickr,
                             NUS-WIDE, DEMO), wiki.py, custom.py
    datasets.make_loader  -> batches of (images uint8, texts, labels, pair indices)

The readers know only their own files and the modules beneath them (pairs.py, matfile.py);
this module is the one place that knows them all. pairs.py's docstring lists which file
owns what.

Check a dataset on disk (exit status 2 and one line per problem):

    python datasets.py DATASET=MIRFlickr DATA_DIR=data/mirflickr
    python datasets.py DATASET=MIRFlickr DATA_DIR=data/mirflickr FULL=True   # every image
"""
import os
import sys

import numpy as np
from tqdm import tqdm

import dcmh
import demo
import features
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
READERS = {'MIRFlickr': dcmh, 'NUSWIDE': dcmh, 'DEMO': dcmh, 'Wiki': wiki}


# ===== loading a dataset =====

def load(cfg, generate=True, verbose=True, train=True):
    """The dataset of cfg.DATASET in cfg.DATA_DIR, split with cfg.SPLIT_SEED. train=True
    refuses data too small to train on with cfg (the check command only warns)."""
    if cfg.DATASET == 'DEMO' and generate:
        demo.ensure(cfg.DATA_DIR)
    if cfg.PUBLISHED:
        data = published.load(cfg)
    else:
        need_folder(cfg)
        data = READERS[cfg.DATASET].load(cfg, need_images=not cfg.IMAGE_FEATURES)
        if cfg.IMAGE_FEATURES:  # stored features (features.py): no image is read
            features.apply_image_features(cfg, data)
    if cfg.TEXT_FEATURES:
        features.apply_text_features(cfg, data)
    check_sizes(data, cfg, train)
    data.warnings += suspicious(data)
    data.notes = notes_on(data)
    if verbose:
        report(data, cfg)
    return data


def need_folder(cfg):
    if not os.path.isdir(cfg.DATA_DIR):
        what = 'is a file' if os.path.exists(cfg.DATA_DIR) else 'no such folder'
        raise UserError(f"setting DATA_DIR={cfg.DATA_DIR!r}: {what}; expected the folder "
                        f"holding the {cfg.DATASET} files ({', '.join(expected_files(cfg))})")


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


def expected_files(cfg):
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
    if no_label:
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
    full = full or isinstance(images, pairs.FileImages)
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
