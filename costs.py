"""What a run costs on this device, measured rather than guessed: the seconds of a training
step and of encoding a pair on synthetic batches of a dataset's shapes, the peak memory, the
disk's write speed. `reproduce.py --plan` scales these by the runs of a grid; bench.py uses
the same clocks and memory counters for its figures.
"""
import ctypes
import os
import platform
import statistics
import time

import numpy as np
import torch

import settings


# ===== clocks and memory =====

def machine():
    """One line: CPU model, cores torch uses, GPU if any, and the load average."""
    model = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            model = next(l.split(':', 1)[1].strip() for l in f if l.startswith('model name'))
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ''
    return (f"{model}, {os.cpu_count()} CPUs, torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads{gpu}; load average "
            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def memory_start(device):
    """Resets the peak counter and returns the current use."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    try:  # glibc keeps freed memory resident: hand it back, or reuse would hide new use
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:  # Linux: writing 5 resets VmHWM (the peak RSS) to the current RSS
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    except OSError:
        pass  # then the peak below is the process's lifetime peak: an upper bound
    return proc_status('VmRSS')


def memory_peak(device):
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device)
    return proc_status('VmHWM')


def proc_status(field):
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


# ===== the cost of a run, before it runs (reproduce.py --plan) =====

def measure_cost(cfg, text_dim, feature_dim=4096, min_seconds=2.0, max_steps=5,
                 write_bytes=2 ** 26, out_dir=None):
    """What one run of cfg costs on this device, measured on synthetic batches of its real
    shapes (no data is read): seconds of one training step (`Session.train_step`, as
    bench_train's floor), seconds to encode one pair for evaluation (image and text net,
    as `Session.encode` does it per batch), the peak memory of the process (CUDA: allocated
    on the device), the parameter counts that size a checkpoint, and the disk's write speed
    (a file of write_bytes written and fsynced in out_dir, as checkpoints are).
    Random weights (PRETRAINED=False): the same arithmetic, no download. Steps are timed
    after one warm-up until min_seconds have passed or max_steps were timed."""
    import types
    import train
    cfg = types.SimpleNamespace(**{**vars(cfg), 'PRETRAINED': False})
    train.configure_torch(cfg)
    on_features = settings.uses_image_features(cfg)
    data = types.SimpleNamespace(texts=np.zeros((1, text_dim), np.float32),
                                 images=types.SimpleNamespace(dim=feature_dim))
    device = train.pick_device(cfg)
    memory_start(device)
    session = train.Session(cfg, data)
    images, texts = synthetic_batch(cfg, cfg.BATCH_SIZE, text_dim, feature_dim, on_features)
    session.img_net.train()
    session.txt_net.train()
    step = lambda: sync(device, session.train_step(images, texts))
    out = dict(device=str(device), step_s=timed_median(step, min_seconds, max_steps))
    out['encode_s'] = encode_seconds(session, cfg, text_dim, feature_dim, on_features,
                                     min_seconds, max_steps)
    out['peak_bytes'] = memory_peak(device)   # the whole process's (CPU) or device's peak
    out['img_params'] = sum(p.numel() for p in session.img_net.parameters())
    out['txt_params'] = sum(p.numel() for p in session.txt_net.parameters())
    out['trained_params'] = sum(p.numel() for group in (session.opt_img, session.opt_txt)
                                for g in group.param_groups for p in g['params'])
    out['write_bytes_per_s'] = write_speed(out_dir, write_bytes)
    return out


def encode_seconds(session, cfg, text_dim, feature_dim, on_features, min_seconds, max_steps,
                   full_batch_limit=10.0):
    """Seconds to encode one pair: timed on a batch of BATCH_SIZE pairs, then on a whole
    EVAL_BATCH_SIZE batch (as evaluation runs) when that takes under full_batch_limit
    seconds (not for VGG-19 at 224 x 224 on a CPU, where it would take minutes)."""
    def per_pair(n):
        images, texts = synthetic_batch(cfg, n, text_dim, feature_dim, on_features)
        encode = lambda: sync(session.device, encode_batch(session, images, texts))
        return timed_median(encode, min_seconds, max_steps) / n
    small = min(cfg.EVAL_BATCH_SIZE, cfg.BATCH_SIZE)
    seconds = per_pair(small)
    if small < cfg.EVAL_BATCH_SIZE and seconds * cfg.EVAL_BATCH_SIZE < full_batch_limit:
        seconds = per_pair(cfg.EVAL_BATCH_SIZE)
    return seconds


def synthetic_batch(cfg, n, text_dim, feature_dim, on_features):
    """A batch of cfg's shapes: uint8 images (or non-negative features), 0/1 texts."""
    gen = torch.Generator().manual_seed(0)
    texts = (torch.rand(n, text_dim, generator=gen) < 0.05).float()
    if on_features:
        return torch.rand(n, feature_dim, generator=gen), texts
    images = torch.randint(0, 256, (n, 3, cfg.CROP, cfg.CROP), dtype=torch.uint8,
                           generator=gen)
    return images, texts


@torch.inference_mode()
def encode_batch(session, images, texts):
    """One evaluation batch, as Session.encode runs it: both networks, binarised codes."""
    import models
    session.img_net.eval()
    session.txt_net.eval()
    with session.autocast():
        _, hid_I, _ = session.img_net(session.images_to_device(images))
    _, hid_T, _ = session.txt_net(texts.to(session.device))
    return models.binarize(hid_I), models.binarize(hid_T)


def sync(device, value=None):
    """value, once the device has finished its work (CUDA runs asynchronously: a clock must
    wait for it)."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    return value


def timed_median(fn, min_seconds, max_steps):
    """Median seconds of fn() after one warm-up call, over calls until min_seconds have
    passed or max_steps calls were timed (at least one). A warm-up call that itself takes
    min_seconds is the figure (VGG-19 on a CPU: a step takes a minute, its warm-up share
    is small, and the estimate errs on the long side)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    if first >= min_seconds:
        return first
    times = []
    while not times or (sum(times) < min_seconds and len(times) < max_steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def write_speed(folder, nbytes):
    """Bytes per second of writing and fsyncing a file of nbytes in folder (the nearest
    existing folder above it; checkpoints are written this way), the file removed after."""
    import tempfile
    folder = os.path.abspath(folder or '.')
    while not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    block, blocks = os.urandom(2 ** 20), max(1, nbytes // 2 ** 20)
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix='.bench-write-') as f:
            start = time.perf_counter()
            for _ in range(blocks):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
            return blocks * len(block) / (time.perf_counter() - start)
    except OSError:   # a folder we may not write to: the runs will say so themselves
        return None
