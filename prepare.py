"""Build the DCMH-style files (docs/data.md) from the raw public downloads.

    python prepare.py DATASET=MIRFlickr RAW_DIR=downloads/mirflickr DATA_DIR=data/mirflickr
    python prepare.py DATASET=NUSWIDE RAW_DIR=downloads/nuswide DATA_DIR=data/nuswide
    python prepare.py DATASET=DEMO DATA_DIR=data/demo     # the generated DEMO set
    python prepare.py DATASET=Wiki DATA_DIR=data/wiki     # already in its layout: a check
    python prepare.py DATASET=NUSWIDE DATA_DIR=data/nuswide REPACK=True   # one image a chunk

RAW_DIR may hold the downloads as zip files, unpacked, or both; files are found by their
paths inside the downloads, not by where RAW_DIR puts them.

MIRFlickr-25K (mirflickr25k.zip: mirflickr/im1.jpg .. im25000.jpg, mirflickr/meta/tags/
tags1.txt ..; mirflickr25k_annotations_v080.zip: <label>.txt and <label>_r1.txt listing
1-based image numbers, README.txt):
  1. labels: the 24 lists without the _r1 suffix, columns in alphabetical order;
  2. text: the tags (mirflickr/meta/tags, the lower-cased "clean" ones) used by at least
     MIN_TAG_IMAGES = 20 of the 25,000 images, most used first: 1,386 tags; a 0/1 vector;
  3. pairs with no label or none of those tags are dropped: 20,015 pairs remain;
  4. images resized to SIZE x SIZE (224, bicubic, antialiased; aspect not kept), written
     as MATLAB -v7.3 writes them; YAll and LAll as v5.

NUS-WIDE (ImageList/Imagelist.txt, Groundtruth/AllLabels/Labels_<concept>.txt,
NUS_WID_Tags/AllTags1k.txt, and the images under Flickr/<concept>/<name>.jpg):
  1. labels: the TOP_CONCEPTS = 10 concepts with the most images, in alphabetical order;
  2. text: the 1,000-d 0/1 tag vector of AllTags1k.txt;
  3. pairs with none of the 10 concepts or no readable image are dropped; pairs with
     none of the 1,000 tags are kept, as in DCMH's files (186,577 pairs, about 5,000 of
     them with an all-zero text; the counts are printed);
  4. IAll and YAll as MATLAB -v7.3 writes them, LAll as v5.
Every pair's original image number (or Imagelist line) goes to <prefix>-ids.txt, and the
tag vocabulary to <prefix>-tags.txt. The result is checked as `python datasets.py` does.
REPACK=True converts an existing IAll (v7.3) to one image per HDF5 chunk, the layout that
reads fastest one image at a time (docs/speed.md): same compression, attributes and header,
written under a temporary name, read back and compared byte for byte, then put in place;
the original is kept beside it as <name>.before-repack.

Settings: RAW_DIR, SIZE, MIN_TAG_IMAGES, TOP_CONCEPTS, WORKERS, REPACK (SETTINGS below) and any
of settings.py (DATASET, DATA_DIR, SPLIT_SEED for the check, ...).
"""
import contextlib
import io
import multiprocessing
import os
import re
import shutil
import sys
import zipfile
import zlib
from collections import Counter

import numpy as np
from PIL import Image

import datasets
import dcmh
import demo
import matfile
import pairs
import settings
from settings import UserError

# This script's own settings, beside those of settings.py (DATASET, DATA_DIR, ...):
# KEY=VALUE on the command line, resolved and type-checked by settings.resolve.
SETTINGS = dict(
    RAW_DIR='',              # the downloads (zip files or unpacked); not used by DEMO / Wiki
    SIZE=224,                # images are resized to SIZE x SIZE (the DCMH files: 224)
    MIN_TAG_IMAGES=20,       # MIRFlickr: a tag enters the vocabulary if this many images use it
    TOP_CONCEPTS=10,         # NUS-WIDE: how many of the most frequent concepts become labels
    WORKERS=0,               # processes decoding images; 0 = one per CPU
    REPACK=False,            # convert DATA_DIR's IAll to one image per HDF5 chunk (no download)
)
IMAGE_BLOCK = 2048                   # images decoded per round of the worker pool
# What a damaged download makes zipfile and zlib raise (a bad image: pairs.IMAGE_ERRORS).
ARCHIVE_ERRORS = (OSError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError,
                  RuntimeError)   # the last two: an unsupported compression, an encrypted zip


# ===== the downloads =====

class RawTree:
    """Every file under a folder, and every member of every zip file in it, by its path
    inside the download ('/'-separated)."""

    def __init__(self, root):
        if not root or not os.path.isdir(root):
            raise UserError(f"setting RAW_DIR={root!r}: no such folder; expected the folder "
                            f"holding the raw downloads (zip files or unpacked)")
        self.entries, self.zips = {}, {}
        for folder, _, names in sorted(os.walk(root)):
            for name in sorted(names):
                path = os.path.join(folder, name)
                if name.lower().endswith('.zip'):
                    self.add_zip(path)
                else:
                    rel = os.path.relpath(path, root).replace(os.sep, '/')
                    self.entries.setdefault(rel, (None, path))

    def add_zip(self, path):
        try:
            archive = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as err:
            raise UserError(f"{path}: not a readable zip file ({err})") from None
        self.zips[path] = archive
        for info in archive.infolist():
            if not info.is_dir():
                self.entries.setdefault(info.filename, (path, info.filename))

    def read(self, rel):
        archive, name = self.entries[rel]
        try:
            if archive is None:
                with open(name, 'rb') as f:
                    return f.read()
            return self.zips[archive].read(name)
        except ARCHIVE_ERRORS as err:
            raise UserError(f"{self.where(rel)}: cannot be read ({matfile.one_line(err)})") \
                from err

    def where(self, rel):
        archive, name = self.entries[rel]
        return name if archive is None else f"{archive}:{name}"

    def match(self, pattern):
        """{first group: path} for every path matching the regular expression."""
        regex = re.compile(pattern)
        found = {}
        for rel in self.entries:
            m = regex.search(rel)
            if m:
                found.setdefault(m.group(1), rel)
        return found

    def one(self, suffix, what):
        hits = [rel for rel in self.entries if rel == suffix or rel.endswith('/' + suffix)]
        if not hits:
            raise UserError(f"RAW_DIR: no {suffix} found; expected {what}")
        return sorted(hits, key=len)[0]


def lines_of(data):
    return [line.strip() for line in data.decode('utf-8', 'replace').splitlines()]


# ===== images =====

def decode(args):
    """Raw bytes -> (SIZE, SIZE, 3) uint8, or None when they are not a readable image.
    Resized without keeping the aspect ratio, bicubic with antialiasing (as MATLAB's
    imresize, which built the DCMH files); EXIF orientation is ignored, as MATLAB's imread
    does, so the pixels stay in the order the JPEG stores them."""
    raw, size = args
    try:
        with Image.open(io.BytesIO(raw)) as img:
            img = img.convert('RGB').resize((size, size), Image.BICUBIC)
            return np.asarray(img, np.uint8)
    except pairs.IMAGE_ERRORS:
        return None


def write_images(path, tree, rels, size, workers):
    """Decode and write the images of `rels` (None = missing) into a v7.3 IAll, in order.
    Returns a boolean array: which of them were written."""
    ok = np.zeros(len(rels), bool)
    todo = [j for j, rel in enumerate(rels) if rel is not None]
    tmp = path + '.tmp'
    n = 0
    with Workers(workers) as mapper, matfile.open_mat73(tmp) as f:  # fork before opening
        ds = matfile.add_mat73(f, 'IAll', (size, size, 3, len(rels)), np.uint8,
                                chunks=(1, 3, size, size), growable=True)
        # a block at a time, so that the raw bytes waiting for a worker stay few
        for start in range(0, len(todo), IMAGE_BLOCK):
            block = todo[start:start + IMAGE_BLOCK]
            images = mapper(decode, [(tree.read(rels[j]), size) for j in block])
            for j, image in zip(block, images):
                if image is not None:
                    ds[n] = image.transpose(2, 1, 0)   # (H, W, 3) -> MATLAB's (3, W, H)
                    ok[j], n = True, n + 1
            print(f"  {n} images written", flush=True)
        ds.resize(n, axis=0)
    matfile.finish_mat73(tmp)
    os.replace(tmp, path)
    return ok


class Workers:
    """A map over worker processes (or in this process for one worker)."""

    def __init__(self, workers):
        self.workers = workers or os.cpu_count() or 1
        self.pool = None

    def __enter__(self):
        if self.workers > 1:
            # fork where there is one: a spawned worker would re-import torch to decode JPEGs
            method = 'fork' if 'fork' in multiprocessing.get_all_start_methods() else 'spawn'
            self.pool = multiprocessing.get_context(method).Pool(self.workers)
            return lambda fn, jobs: self.pool.map(fn, jobs, chunksize=16)
        return lambda fn, jobs: [fn(job) for job in jobs]

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.terminate()


def report_dropped(rels, ok, tree):
    bad = [rel for rel, good in zip(rels, ok) if rel is not None and not good]
    missing = sum(rel is None for rel in rels)
    if missing:
        print(f"  dropped {missing} pairs whose image file is missing")
    if bad:
        shown = ', '.join(tree.where(rel) for rel in bad[:3])
        print(f"  dropped {len(bad)} pairs whose image is not readable: {shown}"
              + (' ...' if len(bad) > 3 else ''))


def write_text_file(path, rows):
    with open(path, 'w', encoding='utf-8') as f:
        f.writelines(f"{row}\n" for row in rows)


# ===== MIRFlickr-25K =====

def mirflickr_labels(tree, ids):
    """(label names, (len(ids), 24) 0/1) from the annotation lists without _r1."""
    anchor = tree.match(r'(?:^|/)(animals)\.txt$')
    if not anchor:
        raise UserError("RAW_DIR: no animals.txt found; expected the annotation files of "
                        "mirflickr25k_annotations_v080.zip (<label>.txt, <label>_r1.txt)")
    folder = os.path.dirname(anchor['animals'])
    prefix = folder + '/' if folder else ''
    # every lower-case <label>.txt beside it, but not the <label>_r1.txt ("relevant") lists
    files = tree.match('^' + re.escape(prefix) + r'([a-z_0-9]+)\.txt$')
    names = sorted(name for name in files if not name.endswith('_r1'))
    row = {image_id: j for j, image_id in enumerate(ids)}
    labels = np.zeros((len(ids), len(names)), np.uint8)
    for k, name in enumerate(names):
        for number, line in enumerate(lines_of(tree.read(files[name])), 1):
            if not line:
                continue
            if not line.isdigit() or int(line) not in row:
                raise UserError(f"{tree.where(files[name])} line {number}: expected an image "
                                f"number from 1 to {max(ids)}, found {line[:40]!r}")
            labels[row[int(line)], k] = 1
    return names, labels


def mirflickr_tags(tree, ids):
    """Each image's set of (clean) tags, as bytes: the files may hold any encoding."""
    files = tree.match(r'(?:^|/)meta/tags/tags(\d+)\.txt$')
    tags = []
    for image_id in ids:
        rel = files.get(str(image_id))
        raw = tree.read(rel) if rel else b''
        tags.append({t.strip() for t in raw.splitlines() if t.strip()})
    return tags, len(files)


def compare_common_tags(tree, vocab, threshold):
    """Cross-check with mirflickr/doc/common_tags.txt ('tag count' lines) when present."""
    found = tree.match(r'(?:^|/)(doc/common_tags\.txt)$')
    if not found:
        return
    listed = set()
    for line in tree.read(found['doc/common_tags.txt']).splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1].isdigit() and int(fields[1]) >= threshold:
            listed.add(fields[0])
    ours = set(vocab)
    if listed == ours:
        print(f"  doc/common_tags.txt lists the same {len(ours)} tags")
    else:
        print(f"  doc/common_tags.txt differs: {len(ours - listed)} tags only here, "
              f"{len(listed - ours)} only there")


def build_mirflickr(cfg):
    tree = RawTree(cfg.RAW_DIR)
    images = {int(k): rel for k, rel in tree.match(r'(?:^|/)im(\d+)\.jpg$').items()}
    if not images:
        raise UserError(f"RAW_DIR={cfg.RAW_DIR!r}: no mirflickr/im<N>.jpg found; expected "
                        f"the contents of mirflickr25k.zip")
    ids = sorted(images)
    print(f"MIRFlickr raw: {len(ids)} images (expected 25000)")
    names, labels = mirflickr_labels(tree, ids)
    print(f"  {len(names)} labels (expected 24): {', '.join(names)}")
    tags, n_tag_files = mirflickr_tags(tree, ids)
    print(f"  {n_tag_files} tag files (expected 25000)")
    counts = Counter(t for image_tags in tags for t in image_tags)   # images per tag
    vocab = sorted((t for t, c in counts.items() if c >= cfg.MIN_TAG_IMAGES),
                   key=lambda t: (-counts[t], t))
    compare_common_tags(tree, vocab, cfg.MIN_TAG_IMAGES)
    column = {t: j for j, t in enumerate(vocab)}
    texts = np.zeros((len(ids), len(vocab)), np.uint8)
    for i, image_tags in enumerate(tags):
        texts[i, [column[t] for t in image_tags if t in column]] = 1
    has_label, has_tag = labels.any(1), texts.any(1)
    keep = np.flatnonzero(has_label & has_tag)
    n_pairs, n_tags, _ = datasets.EXPECTED['MIRFlickr']
    print(f"  vocabulary: {len(vocab)} tags used by at least {cfg.MIN_TAG_IMAGES} images "
          f"(expected {n_tags})")
    print(f"  {int((~has_label).sum())} images have no label, {int((~has_tag).sum())} have "
          f"none of those tags; {len(keep)} pairs kept (expected {n_pairs})")
    prefix, ok = write_dcmh(cfg, 'MIRFlickr', tree, [images[ids[i]] for i in keep],
                            texts[keep], labels[keep], yall_v73=False)
    write_text_file(prefix + '-ids.txt', [ids[i] for i, good in zip(keep, ok) if good])
    write_text_file(prefix + '-tags.txt',
                    [f"{t.decode('utf-8', 'replace')}\t{counts[t]}" for t in vocab])
    write_text_file(prefix + '-labels.txt', names)


def write_dcmh(cfg, dataset, tree, rels, texts, labels, yall_v73):
    """IAll from the images (dropping unreadable ones), then YAll and LAll for the pairs
    kept. Returns (path prefix of the side files, which of `rels` were kept)."""
    out = cfg.DATA_DIR
    os.makedirs(out, exist_ok=True)
    iall, yall, lall = (os.path.join(out, name) for name in dcmh.DCMH_FILES[dataset])
    print(f"  writing {len(rels)} images of {cfg.SIZE} x {cfg.SIZE} to {iall}")
    ok = write_images(iall, tree, rels, cfg.SIZE, cfg.WORKERS)
    report_dropped(rels, ok, tree)
    texts, labels = texts[ok].astype(np.float64), labels[ok].astype(np.float64)
    if yall_v73:  # NUS-WIDE's YAll is v7.3 in the DCMH files (1.5 GB of doubles)
        tmp = yall + '.tmp'
        with matfile.open_mat73(tmp) as f:
            matfile.add_mat73(f, 'YAll', texts.shape, np.float64, chunks=True,
                               compression='gzip')[...] = texts.T
        matfile.finish_mat73(tmp)
        os.replace(tmp, yall)
    else:
        matfile.write_mat5(yall, {'YAll': texts})
    matfile.write_mat5(lall, {'LAll': labels})
    print(f"  wrote {yall} ({texts.shape[0]} x {texts.shape[1]}) and {lall} "
          f"({labels.shape[0]} x {labels.shape[1]})")
    return iall[:-len('-iall.mat')], ok


# ===== NUS-WIDE =====

def read_01_lines(tree, rel, width):
    """A text file of `width` 0/1 values a line -> (lines, width) uint8, parsed in bulk."""
    raw = np.frombuffer(tree.read(rel), np.uint8)
    digits = raw[(raw >= ord('0')) & (raw <= ord('9'))]
    if (digits > ord('1')).any():
        raise UserError(f"{tree.where(rel)}: expected only 0 and 1 values")
    if width == 0 or digits.size % width:
        raise UserError(f"{tree.where(rel)}: {digits.size} values, not a whole number of "
                        f"lines of {width}")
    return (digits - ord('0')).reshape(-1, width)


def nuswide_concepts(tree, n_lines, top):
    """(chosen concept names in alphabetical order, (n_lines, top) labels, all counts)."""
    files = tree.match(r'(?:^|/)AllLabels/Labels_(.+)\.txt$')
    if not files:
        raise UserError("RAW_DIR: no Groundtruth/AllLabels/Labels_<concept>.txt found; "
                        "expected the contents of NUS-WIDE's Groundtruth.zip")
    columns = {}
    for name, rel in sorted(files.items()):
        column = read_01_lines(tree, rel, 1)[:, 0]
        if len(column) != n_lines:
            raise UserError(f"{tree.where(rel)}: {len(column)} lines; expected {n_lines}, one "
                            f"per line of Imagelist.txt")
        columns[name] = column
    counts = {name: int(c.sum()) for name, c in columns.items()}
    chosen = sorted(sorted(counts, key=lambda name: (-counts[name], name))[:top])
    return chosen, np.stack([columns[name] for name in chosen], 1), counts


def build_nuswide(cfg):
    tree = RawTree(cfg.RAW_DIR)
    listing = [line for line in lines_of(tree.read(tree.one(
        'ImageList/Imagelist.txt', "NUS-WIDE's image list (ImageList.zip)"))) if line]
    print(f"NUS-WIDE raw: {len(listing)} images listed (expected 269648)")
    names, labels, counts = nuswide_concepts(tree, len(listing), cfg.TOP_CONCEPTS)
    print(f"  labels: the {len(names)} most frequent of {len(counts)} concepts: "
          + ', '.join(f"{n} ({counts[n]})" for n in names))
    texts = read_01_lines(tree, tree.one('AllTags1k.txt', "NUS_WID_Tags/AllTags1k.txt"), 1000)
    if len(texts) != len(listing):
        raise UserError(f"AllTags1k.txt has {len(texts)} lines; expected {len(listing)}, one "
                        f"per line of Imagelist.txt")
    # Images: Imagelist.txt names them 'concept\\name.jpg' (Windows separators, sometimes a
    # longer prefix); match on the last two parts of the path.
    jpgs = {'/'.join(rel.lower().split('/')[-2:]): rel for rel in tree.entries
            if rel.lower().endswith('.jpg')}
    rels = [jpgs.get('/'.join(line.replace('\\', '/').lower().split('/')[-2:]))
            for line in listing]
    # DCMH's files keep the images with no tag among the 1,000 (their 186,577 pairs count
    # them; without them about 181,365 remain): so do we.
    keep = np.flatnonzero(labels.any(1))
    print(f"  {len(keep)} images have one of the {len(names)} concepts (DCMH's files: "
          f"{datasets.EXPECTED['NUSWIDE'][0]}); {int((~texts[keep].any(1)).sum())} of them "
          f"have none of the 1000 tags and are kept, as in DCMH's files")
    prefix, ok = write_dcmh(cfg, 'NUSWIDE', tree, [rels[i] for i in keep], texts[keep],
                            labels[keep], yall_v73=True)
    write_text_file(prefix + '-ids.txt', [f"{i}\t{listing[i]}" for i, good in zip(keep, ok)
                                          if good])
    write_text_file(prefix + '-labels.txt', names)
    taglist = [rel for rel in tree.entries if rel.endswith('TagList1k.txt')]
    if taglist:
        write_text_file(prefix + '-tags.txt', lines_of(tree.read(taglist[0]))[:1000])


# ===== one image per chunk (REPACK=True) =====

def repack_images(cfg):
    """Rewrite the dataset's IAll with one image per chunk; the original is kept."""
    path = dcmh.dcmh_path(cfg.DATASET, cfg.DATA_DIR, 'IAll')
    with folder_lock(os.path.dirname(os.path.abspath(path)), path):
        repack_locked(path)


def repack_locked(path):
    var = matfile.describe(path, 'IAll')
    if var.version != 'v7.3':
        print(f"{path}: a v5 file, read whole; nothing to repack")
        return
    layout = matfile.ImageLayout(var)
    store = matfile.storage(var)
    if store.chunks and store.chunks[layout.n_axis] == 1 and \
            store.chunk_bytes == layout.height * layout.width * 3 * np.dtype(np.uint8).itemsize:
        print(f"{path}: already one image per chunk; nothing to do")
        return
    kept, tmp = path + '.before-repack', path + '.tmp'
    if os.path.lexists(kept):
        raise UserError(f"{kept} exists (an earlier REPACK?); move it away first: REPACK keeps "
                        f"the original there and never overwrites a file")
    size = os.path.getsize(path)
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
    if free < size * 1.05:
        raise UserError(f"REPACK of {path}: needs {size / 2**30:.1f} GiB free beside it for the "
                        f"new copy, {free / 2**30:.1f} GiB free")
    print(f"repacking {path} ({store.chunks} a chunk, {store.compression}) to one image per "
          f"chunk")
    linked = os.path.islink(path)
    try:
        matfile.repack(var, tmp, layout)
        if not matfile.same_images(var, tmp, layout):
            raise UserError(f"REPACK of {path}: the copy does not read back the same; "
                            f"original left as it was")
        swap(path, tmp, kept)
    except matfile.READ_ERRORS as err:
        raise UserError(f"REPACK of {path}: {matfile.one_line(err)}; original left as it "
                        f"was") from err
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    if linked:   # the link was replaced by the new file; what it pointed to is untouched
        print(f"  done, read back byte-identical; {path} was a link: it is now the repacked "
              f"file, and {kept} links to the original, {os.path.realpath(kept)}, untouched")
    else:
        print(f"  done, read back byte-identical; the original is kept as {kept} "
              f"({size / 2**30:.2f} GiB): delete it when you no longer need it")


def swap(path, tmp, kept):
    """Give the original a second name, `kept`, then put tmp in its place atomically."""
    try:
        os.link(path, kept, follow_symlinks=False)   # a symlinked IAll: kept is the link
    except FileExistsError:   # made since it was checked: never written over
        raise UserError(f"{kept} exists (made while REPACK ran?); the original is left as it "
                        f"was") from None
    except OSError:   # a file system without hard links
        os.rename(path, kept)
    try:
        os.replace(tmp, path)
    except OSError:
        if not os.path.lexists(path):
            os.rename(kept, path)   # the original back under its own name
        else:
            os.remove(kept)   # only the second name
        raise


@contextlib.contextmanager
def folder_lock(folder, path):
    """One REPACK at a time in a folder: an exclusive flock on the folder itself (a second
    REPACK would write the same temporary file), so that no lock file is left behind. Where
    folders cannot be locked (no fcntl, some network file systems) it runs unlocked."""
    try:
        import fcntl
        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):   # a missing folder is reported by what follows
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"REPACK of {path}: another REPACK is running in {folder}; wait "
                            f"for it to end") from None
        except OSError:
            pass
        yield
    finally:
        os.close(fd)


# ===== the command line =====

def resolve(argv):
    cfg = settings.resolve(argv, extra=SETTINGS)
    for key in ('SIZE', 'MIN_TAG_IMAGES', 'TOP_CONCEPTS'):
        if getattr(cfg, key) < 1:
            raise UserError(f"setting {key}={getattr(cfg, key)!r}: expected a positive integer")
    if cfg.WORKERS < 0:
        raise UserError(f"setting WORKERS={cfg.WORKERS!r}: expected 0 (one per CPU) or more")
    return cfg


# What prepare.py says of the datasets it builds nothing for, before checking them.
NOTHING_TO_BUILD = {
    'Wiki': "Wiki is distributed in the layout the loader reads (unpack wikipedia_dataset.zip "
            "into DATA_DIR); checking it",
    'Custom': "Custom is your own folder of pairs, read as it is (docs/custom.md); checking it",
}   # IAPR and MSCOCO exist only as published features (PUBLISHED=UCCH): nothing to build
IALL_DATASETS = ('MIRFlickr', 'NUSWIDE', 'DEMO')   # the ones with an IAll to REPACK


def main(argv):
    cfg = resolve(argv)
    dataset = cfg.DATASET
    if cfg.REPACK:
        if dataset not in IALL_DATASETS:
            raise UserError(f"setting REPACK=True: rewrites the IAll of DCMH's files "
                            f"({', '.join(IALL_DATASETS)}); DATASET={dataset!r} has none")
        if settings.uses_image_features(cfg):
            raise UserError("setting REPACK=True: rewrites the images' IAll; leave "
                            "IMAGE_FEATURES and PUBLISHED empty")
        datasets.data_files(cfg)   # the other files too: a folder the check fails is left alone
        repack_images(cfg)
    elif cfg.PUBLISHED:
        print(f"{cfg.PUBLISHED}'s feature files are read as they are downloaded; checking them")
    elif dataset == 'MIRFlickr':
        build_mirflickr(cfg)
    elif dataset == 'NUSWIDE':
        build_nuswide(cfg)
    elif dataset == 'DEMO':
        demo.make_demo(cfg.DATA_DIR)
        print(f"DEMO: wrote {demo.DEMO_PAIRS} generated pairs to {cfg.DATA_DIR}")
    else:
        print(NOTHING_TO_BUILD[dataset])
    datasets.check(cfg)
    return 0


if __name__ == '__main__':
    settings.run_cli(main, sys.argv[1:])
