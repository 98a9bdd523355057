"""Extract the fc7 features of every pair's image, for the fixed-feature protocol.

    python extract.py DATASET=MIRFlickr BACKBONE=vgg19   # data/mirflickr/mirflickr25k-vgg19-fc7.npy
    python extract.py DATASET=DEMO                         # random AlexNet, offline
    python train.py DATASET=MIRFlickr IMAGE_FEATURES=<the printed path>

The network is ImgNet's frozen feature network (FeatNet_I): fc7 after its ReLU, eval mode,
the test transform (Resize(RESIZE), CenterCrop(CROP); 256 and 224 by default), ImageNet
normalisation; on the GPU when there is one. Row i of the output is pair i of the dataset
(for Wiki: the train list, then the test list), float32, N x 4096, in a .npy file named
<dataset>-<backbone>[-random]-fc7[-<CROP>px].npy in DATA_DIR ('-random' for PRETRAINED=False,
'-<CROP>px' when not the standard 256/224).

The rows go to <name>.partial as they are computed, in place, and a small <name>.progress.json
says how many are on disk (written after the rows are flushed). Ctrl-C or a kill stops it;
the same command resumes at that row. Only the finished file is renamed to <name>.npy, so a
file under that name is always complete. RESUME=False starts over.

<name>.npy.json records what the rows were made from (identity): a file under that name made
otherwise is refused, never returned. <name>.npy.lock keeps a second extract.py off the
same output while one runs.
"""
import contextlib
import errno
import hashlib
import json
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

import datasets
import models
import settings
import train
from matfile import one_line
from settings import UserError

PREFIXES = {'MIRFlickr': 'mirflickr25k', 'NUSWIDE': 'nus-wide-tc10', 'Wiki': 'wiki',
            'DEMO': 'demo', 'Custom': 'custom'}
LAYER = 'fc7'
DIM = 4096


def output_path(cfg):
    """Where the features of cfg go: the name says dataset, backbone, weights and layer."""
    name = f"{PREFIXES[cfg.DATASET]}-{cfg.BACKBONE}{'' if cfg.PRETRAINED else '-random'}-{LAYER}"
    if (cfg.RESIZE, cfg.CROP) != (256, 224):
        name += f"-{cfg.CROP}px"
    return os.path.join(cfg.DATA_DIR, name + '.npy')


def identity(cfg, data):
    """Everything the rows depend on, as JSON values: the data (dataset, pairs, the sizes of
    the files read, a Custom manifest's digest), the network and its weights, the
    transform. Stored beside the output (<name>.npy.json) and in the partial file's progress
    record: a file made with anything else is never returned, nor resumed, for these
    settings."""
    ident = {'dataset': cfg.DATASET, 'pairs': len(data.labels),
             'data_files': {os.path.basename(path): file_size(path) for path, _ in data.files},
             'backbone': cfg.BACKBONE, 'layer': LAYER, 'dim': DIM, 'weights': weights(cfg),
             'resize': cfg.RESIZE, 'crop': cfg.CROP}
    if data.digest:   # Custom: rows reordered in a manifest of the same size change no size
        ident['data_digest'] = data.digest[1]
    return json.loads(json.dumps(ident))   # as read back from the file: lists, not tuples


def weights(cfg):
    """Which weights the network has: random ones depend on SEED, a local file on its
    bytes, torchvision's on its version."""
    if not cfg.PRETRAINED:
        return {'random': True, 'seed': cfg.SEED}
    if cfg.PRETRAINED_PATH:
        return {'file_sha256': file_sha256(cfg.PRETRAINED_PATH)}
    import torchvision
    return {'torchvision': torchvision.__version__, 'weights': 'IMAGENET1K_V1'}


def file_size(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def file_sha256(path):
    digest = hashlib.sha256()
    try:
        with open(path, 'rb') as f:
            for block in iter(lambda: f.read(1 << 24), b''):
                digest.update(block)
    except OSError as err:
        raise UserError(f"setting PRETRAINED_PATH={path!r}: cannot be read "
                        f"({err.strerror})") from None
    return digest.hexdigest()


def record_path(path):
    return path + '.json'


def check_finished(path, ident):
    """A finished output may be returned only if its record says it was made with these
    settings from this data; anything else there is refused, never returned."""
    try:
        with open(record_path(path)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict) or not isinstance(record.get('identity'), dict):
        raise UserError(f"{path} exists but {record_path(path)}, the record of what it was "
                        f"extracted from, is missing or unreadable; move the file away, or pass "
                        f"RESUME=False to extract again over it")
    saved = record['identity']
    diffs = [f"{key}: {saved.get(key)!r} there, {ident.get(key)!r} now"
             for key in sorted(set(saved) | set(ident)) if saved.get(key) != ident.get(key)]
    if diffs:
        raise UserError(f"{path} was extracted with other settings or data ({'; '.join(diffs)}); "
                        f"move it away, or pass RESUME=False to extract again over it")


def device_name(device):
    """'cpu', or 'cuda' and the GPU's model."""
    if device.type == 'cuda':
        return f"cuda {torch.cuda.get_device_name(device)}"
    return device.type


# ===== the partial file =====

class PartialFile:
    """<path>.partial: a .npy header and N x DIM float32 rows written in place;
    <path>.progress.json: the rows done so far, what they were made with and on which device
    (another device rounds otherwise: its rows and ours must not share a file)."""

    def __init__(self, path, ident, device):
        self.path, self.ident, self.device = path, ident, device
        self.partial, self.progress = path + '.partial', path + '.progress.json'
        self.done, self.offset = 0, None

    def open(self, resume):
        """Reopen a matching partial file at its last row, else create a new one."""
        state = self.read_progress() if resume else None
        if state and state.get('identity') == self.ident and (
                state.get('device') == self.device and os.path.isfile(self.partial)):
            self.done, self.offset = state['done'], state['offset']
            self.file = open(self.partial, 'r+b')
            return
        if state:
            print(f"{self.partial} was made with other settings or data; starting over")
        n = self.ident['pairs']
        self.file = open(self.partial, 'wb')
        np.lib.format.write_array_header_1_0(
            self.file, {'descr': '<f4', 'fortran_order': False, 'shape': (n, DIM)})
        self.offset = self.file.tell()
        self.file.truncate(self.offset + n * DIM * 4)   # sparse: no memory, little disk yet
        self.done = 0
        self.save_progress()

    def read_progress(self):
        try:
            with open(self.progress) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def save_progress(self):
        state = {'done': self.done, 'offset': self.offset, 'identity': self.ident,
                 'device': self.device}
        train.write_json(self.progress, state)

    def write(self, rows):
        """Rows done..done+len(rows): on disk first, then counted. A full disk stops here
        in one line; the rows counted so far stay for the resume."""
        try:
            self.file.seek(self.offset + self.done * DIM * 4)
            self.file.write(np.ascontiguousarray(rows, dtype='<f4').tobytes())
            self.file.flush()
            os.fsync(self.file.fileno())
        except OSError as err:
            self.close()
            full = err.errno in (errno.ENOSPC, errno.EDQUOT)
            raise UserError(f"{'no space left on the device' if full else 'cannot write'} "
                            f"while writing {self.partial} ({one_line(err)}); the "
                            f"{self.done} rows done are kept: "
                            f"{'free some space and ' if full else ''}run the same command to "
                            f"resume") from None
        self.done += len(rows)
        self.save_progress()

    def finish(self):
        """The rows under the final name, then the record of what they were made from. An
        earlier record goes first: a kill in between leaves a file without a record (refused
        until extracted again), never a record that describes other rows."""
        self.file.close()
        if os.path.exists(record_path(self.path)):
            os.remove(record_path(self.path))
        os.replace(self.partial, self.path)
        train.write_json(record_path(self.path), {'written_by': 'extract.py',
                                                  'shape': [self.ident['pairs'], DIM],
                                                  'dtype': 'float32', 'identity': self.ident,
                                                  'device': self.device})
        os.remove(self.progress)

    def close(self):
        self.file.close()


# ===== extraction =====

def feature_network(cfg, device):
    """FeatNet_I of train.py: the backbone up to fc7 (after ReLU), eval mode, frozen."""
    torch.manual_seed(cfg.SEED)   # PRETRAINED=False: the same random weights on resume
    net = models.ImgNet(cfg.BACKBONE, 1, cfg.PRETRAINED, cfg.PRETRAINED_PATH).frozen_copy()
    return net.to(device)


@torch.inference_mode()
def encode_batch(net, images, device):
    images = datasets.normalize(images.to(device, non_blocking=True))
    return net.fc7(images).float().cpu().numpy()


def extract(cfg):
    """Write the features of every pair of cfg's dataset; returns the file's path."""
    if settings.uses_image_features(cfg):
        raise UserError("extract.py reads the images: leave IMAGE_FEATURES and PUBLISHED empty")
    path = output_path(cfg)
    for name in (path, path + '.partial', path + '.progress.json', record_path(path)):
        if os.path.isdir(name):   # found at the end, after every row was computed
            raise UserError(f"{name} is a folder; extract.py writes a file under that name: "
                            f"move the folder away")
    data = datasets.load(cfg)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(train.lock_file(path + '.lock', f"output {path}", 'extract.py',
                                                "wait for it to end", keep=False))
        except OSError as err:
            raise UserError(f"setting DATA_DIR={cfg.DATA_DIR!r}: cannot write {path}.lock "
                            f"({err.strerror})") from None
        return extract_locked(cfg, data, path)


def extract_locked(cfg, data, path):
    """extract(), holding the lock on the output: one extract.py writes it at a time."""
    ident = identity(cfg, data)
    if os.path.isfile(path) and cfg.RESUME:
        check_finished(path, ident)
        print(f"already extracted: {path} (RESUME=False extracts again)")
        return path
    n = len(data.labels)
    device = train.pick_device(cfg)
    train.configure_torch(cfg)   # TF32 and cudnn as train.py has them
    # the network first: weights that cannot be had (offline) must leave no partial file
    net = feature_network(cfg, device)
    out = PartialFile(path, ident, device_name(device))
    try:
        out.open(cfg.RESUME)
    except OSError as err:
        raise UserError(f"setting DATA_DIR={cfg.DATA_DIR!r}: cannot write {out.partial} "
                        f"({err.strerror})") from None
    print(f"extracting {cfg.BACKBONE} {LAYER} of {n} pairs on {device} into {path}"
          + (f" (resuming at row {out.done})" if out.done else ''))
    loader = pair_loader(data, out.done, cfg)
    try:
        with tqdm(total=n, initial=out.done, unit='img', disable=not sys.stderr.isatty()) as bar:
            for images, _, _, _ in datasets.batches(loader):  # a bad image: one line
                out.write(encode_batch(net, images, device))
                bar.update(len(images))
    except KeyboardInterrupt:
        out.close()
        print(f"\ninterrupted: {out.done} of {n} rows saved in {out.partial}; run the same "
              f"command to resume")
        sys.exit(130)
    out.finish()
    print(f"features: {path} ({n} x {DIM} float32)")
    data_dir = '' if cfg.DATA_DIR == settings.PRESETS[cfg.DATASET]['DATA_DIR'] else \
        f" DATA_DIR={cfg.DATA_DIR}"
    print(f"train on them: python train.py DATASET={cfg.DATASET}{data_dir} IMAGE_FEATURES={path}")
    return path


def pair_loader(data, start, cfg):
    """Pairs start..N-1 in order, test transform, EVAL_BATCH_SIZE a batch."""
    pairs = datasets.Pairs(data, np.arange(start, len(data.labels)), datasets.test_transform(cfg))
    workers = cfg.NUM_WORKERS
    return torch.utils.data.DataLoader(
        pairs, batch_size=cfg.EVAL_BATCH_SIZE, shuffle=False, num_workers=workers,
        pin_memory=torch.cuda.is_available() and cfg.DEVICE != 'cpu',
        multiprocessing_context=datasets.worker_context(workers),
        worker_init_fn=datasets.ignore_sigint)


def main(argv):
    return extract(settings.resolve(argv))


if __name__ == '__main__':
    settings.run_cli(main, sys.argv[1:])
