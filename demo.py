"""The DEMO dataset: generated, small, in the MIRFlickr file layout (dcmh.py reads it), so
that `python train.py DATASET=DEMO` runs end to end on a CPU with no download. Its images and
tags share a hidden label structure, so that the method has something to learn.
"""
import json
import os

import numpy as np

import matfile
from dcmh import DCMH_FILES
from settings import UserError, process_alive

DEMO_PAIRS = 2000            # pairs written by make_demo
DEMO_MARKER = 'demo-generated.json'   # written with the DEMO files: only those are overwritten
DERIVED_PREFIX = 'demo-'     # files made from the DEMO (extract.py's features): kept, not foreign
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


def ensure(data_dir):
    """Generate the DEMO files in data_dir on first use (never over anyone's data)."""
    if all(os.path.isfile(os.path.join(data_dir, name)) for name in DCMH_FILES['DEMO']):
        return
    check_demo_folder(data_dir)
    print(f"DEMO: generating {DEMO_PAIRS} pairs in {data_dir} (first use)")
    make_demo(data_dir, DEMO_PAIRS)


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
    # The names carry this process's id: a file of the user's named <file>.tmp is never
    # written over, and a killed generation's leftovers are known by their dead process.
    tmp = temporary_name
    iall_matlab = np.ascontiguousarray(images.transpose(1, 2, 3, 0))  # H x W x 3 x N
    try:
        os.makedirs(data_dir, exist_ok=True)
        remove_stale_temporaries(data_dir)
        matfile.write_mat73(tmp(iall), {'IAll': iall_matlab})
        matfile.write_mat5(tmp(yall), {'YAll': texts.astype(np.float64)})
        matfile.write_mat5(tmp(lall), {'LAll': labels.astype(np.float64)})
        # The marker first: a kill among the renames leaves a folder that is still ours.
        write_demo_marker(data_dir, n_pairs, seed)
        for path in (iall, yall, lall):
            os.replace(tmp(path), path)
    except OSError as err:
        raise UserError(f"setting DATA_DIR={data_dir!r}: cannot write the DEMO files there "
                        f"({matfile.one_line(err)})") from None
    finally:
        for path in (iall, yall, lall):
            if os.path.exists(tmp(path)):
                os.remove(tmp(path))


TMP_MARK = '.tmp'


def temporary_name(path, pid=None):
    """Where make_demo writes `path` before renaming it: <path>.tmp<process id>."""
    return f"{path}{TMP_MARK}{os.getpid() if pid is None else pid}"


def stale_temporaries(data_dir, names):
    """The temporaries of a generation killed mid-way: <one of our files>.tmp<pid> of a
    process that has ended."""
    out = []
    for name in names:
        stem, mark, pid = name.rpartition(TMP_MARK)
        if (mark and pid.isdigit() and stem in (*DCMH_FILES['DEMO'], DEMO_MARKER)
                and not process_alive(int(pid))):
            out.append(name)
    return out


def remove_stale_temporaries(data_dir):
    for name in stale_temporaries(data_dir, os.listdir(data_dir)):
        os.remove(os.path.join(data_dir, name))


def check_demo_folder(data_dir):
    """make_demo writes only into an absent or empty folder, or over a previous DEMO (its
    marker file lists the files it wrote, with their sizes): never over anyone's data."""
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise UserError(f"setting DATA_DIR={data_dir!r}: is a file; expected a folder for "
                        f"the generated DEMO files")
    if not os.path.isdir(data_dir):
        return
    try:
        found = set(os.listdir(data_dir))
        written = demo_marker_sizes(data_dir) or {}
    except OSError as err:
        raise UserError(f"setting DATA_DIR={data_dir!r}: cannot read the folder "
                        f"({matfile.one_line(err)})") from None
    found -= set(stale_temporaries(data_dir, found))
    foreign = sorted(name for name in found - {DEMO_MARKER}   # not written, or changed since
                     if os.path.getsize(os.path.join(data_dir, name)) != written.get(name)
                     and not name.startswith(DERIVED_PREFIX))
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
    sizes = {name: os.path.getsize(temporary_name(os.path.join(data_dir, name)))
             for name in DCMH_FILES['DEMO']}
    marker = {'written_by': 'demo.make_demo', 'n_pairs': n_pairs, 'seed': seed,
              'files': sizes}
    path = os.path.join(data_dir, DEMO_MARKER)
    with open(temporary_name(path), 'w') as f:
        json.dump(marker, f, indent=2)
    os.replace(temporary_name(path), path)


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
