"""Benchmarks. `python bench.py` runs each part and prints what it measured.

- bench_train: train.py's epoch loop in pairs/s beside the floor of the same arithmetic
  (`train.Session.train_step` on a batch already on the device), for the settings given as
  KEY=VALUE (default: the DEMO preset), with the peak memory of each.
- bench_full_map, bench_feature_train, bench_extract: the fixed-feature protocol
  (docs/features.md): full mAP at NUS-WIDE size against mAP@50 in the same run and against
  the per-query loop; seconds per epoch of training on MIRFlickr-sized features beside its
  floor; extract.py's images per second and peak memory as N grows.
- bench_eval: metric.calculate_top_map (mAP@50) at NUS-WIDE size (2,000 queries x 184,577
  database items, 128 bits, 10 labels; random codes and labels from a fixed seed) against a
  plain per-query loop with a stable sort, the way evaluation code in this field is usually
  written. Reports median times, the speed-up, the difference between the two values on the
  same queries, and the peak memory of each.
- bench_loader (`python bench.py --part loader [DATASET=... DATA_DIR=...] [CHUNK=64]`, not
  part of the default run): images per second per worker of datasets.make_loader with the
  real transforms, training (first epoch, which reads the train split, and a later one)
  and the database in file order, on DATA_DIR or on a MIRFlickr-sized replica it writes
  once into data/bench-loader/ with CHUNK images an HDF5 chunk (docs/speed.md).
- bench_search (`python bench.py search`, not part of the default run): FAISS binary
  indexes over 1 M and 10 M random 64-bit codes and 10 M 128-bit ones, uniform and
  clustered (clustered_codes): build time, bytes per item, single-query latency (median,
  99th percentile) and 1,000-query batch throughput of the exact IndexBinaryFlat and of
  IndexBinaryMultiHash (recall@K against the exact one, over its nflip), beside the time to
  stream the codes once from memory and a NumPy popcount scan; then FAISS's ranking against
  metric.py for evaluation (search.faiss_top_map) at NUS-WIDE size. `--help` after `search`
  lists the knobs that make it shorter.
- bench_gpu (`python bench.py gpu [--device cpu|cuda] [--out DIR]`, not part of the default
  run): the acceptance run of a GPU, at most 8 minutes on one. The same training steps on the
  device and on the CPU (loss and weights to an fp32 tolerance: LOSS_RTOL, UPDATE_RTOL);
  BF16, TF32 and CHANNELS_LAST each on against all off (the loss after some steps, the DEMO's
  mAP@50 after a short run); pairs/s of the training loop against the floor of train_step for
  AlexNet and VGG-19 at 224 px, batch 32; evaluation images/s; peak memory; the predicted time
  of Tables 2 and 1 (predict_grid_hours). Writes a JSON and a markdown file and prints both
  paths. On a CPU (`--device cpu`) it runs at small sizes (GPU_SIZES['small']), says so, and
  scales the grid prediction to 224 px.

The machine may be shared: the load average is printed with the timings.
"""
import contextlib
import dataclasses
import gc
import os
import statistics
import sys
import time
import types

import numpy as np
import torch

import costs
import metric
import settings


# ===== evaluation =====
def random_task(n_query, n_db, nbits, n_labels, seed=0, density=0.2):
    """Codes as train.py saves them (int8 +-1) and 0/1 labels (uint8), from a fixed seed.
    Each label is on with probability `density` (NUS-WIDE items carry about two)."""
    rng = np.random.default_rng(seed)
    def codes(n):
        return rng.choice(np.array([-1, 1], dtype=np.int8), size=(n, nbits))
    def labels(n):
        return (rng.random((n, n_labels)) < density).astype(np.uint8)
    return codes(n_query), codes(n_db), labels(n_query), labels(n_db)


def map_loop(qu_B, re_B, qu_L, re_L, topk):
    """mAP@topk the straightforward way: for each query, Hamming distances, a stable argsort,
    AP over the top k. The reference the fast version is timed and checked against."""
    qu_B, re_B = np.asarray(qu_B, np.float32), np.asarray(re_B, np.float32)
    qu_L, re_L = np.asarray(qu_L, np.float32), np.asarray(re_L, np.float32)
    nbits = qu_B.shape[1]
    aps = []
    for i in range(len(qu_B)):
        hamming = 0.5 * (nbits - re_B @ qu_B[i])
        top = np.argsort(hamming, kind='stable')[:topk]
        ranks = np.flatnonzero(re_L[top] @ qu_L[i] > 0) + 1  # positions of relevant items
        aps.append(np.mean(np.arange(1, len(ranks) + 1) / ranks) if len(ranks) else 0.0)
    return float(np.mean(aps))


def measure(fn, repeats, device):
    """fn()'s value, wall seconds of each run, median CPU seconds (all threads; less
    sensitive than wall time to other jobs on a shared machine), peak memory increase."""
    times, cpu_times, peak = [], [], 0
    for _ in range(repeats):
        start_mem = costs.memory_start(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        value = fn()
        costs.sync(device)   # CUDA runs asynchronously: the clock must wait for the work
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - start_cpu)
        peak = max(peak, costs.memory_peak(device) - start_mem)
    return value, times, statistics.median(cpu_times), peak


def bench_eval(n_query=2000, n_db=184577, nbits=128, n_labels=10, topk=50, repeats=3,
               loop_queries=200, device='cpu', seed=0):
    """Times metric.calculate_top_map against map_loop; returns a dict of the figures."""
    device = torch.device(device)
    q_codes, db_codes, q_labels, db_labels = random_task(n_query, n_db, nbits, n_labels, seed)
    on_device = [torch.from_numpy(x).to(device) if device.type != 'cpu' else x
                 for x in (q_codes, db_codes, q_labels, db_labels)]
    def fast(n):  # mAP of the first n queries
        q, db, q_lab, db_lab = on_device
        return metric.calculate_top_map(q[:n], db, q_lab[:n], db_lab, topk)
    fast(8)  # warm-up (CUDA context, first allocations)
    out = dict(n_query=n_query, n_db=n_db, nbits=nbits, n_labels=n_labels, topk=topk,
               repeats=repeats, loop_queries=min(loop_queries, n_query), device=str(device))
    out['fast_map'], out['fast_all_s'], out['fast_cpu_s'], out['fast_peak_bytes'] = \
        measure(lambda: fast(n_query), repeats, device)
    out['fast_s'] = statistics.median(out['fast_all_s'])
    n = out['loop_queries']
    out['loop_map'], loop_s, loop_cpu_s, out['loop_peak_bytes'] = measure(
        lambda: map_loop(q_codes[:n], db_codes, q_labels[:n], db_labels, topk), 1,
        torch.device('cpu'))
    out['loop_s'] = loop_s[0] * n_query / n  # scaled to all queries
    out['loop_cpu_s'] = loop_cpu_s * n_query / n
    out['fast_subset_map'] = fast(n)
    out['difference'] = abs(out['fast_subset_map'] - out['loop_map'])
    out['speedup'] = out['loop_s'] / out['fast_s']
    return out


def print_eval(r):
    mib = 2 ** 20
    print(f"== evaluation: mAP@{r['topk']}, {r['n_query']} queries x {r['n_db']} database, "
          f"{r['nbits']} bits, {r['n_labels']} labels, on {r['device']} ==")
    print(f"fast  metric.calculate_top_map: median {r['fast_s']:.3f} s over {r['repeats']} "
          f"repeats ({', '.join(f'{t:.3f}' for t in r['fast_all_s'])}), CPU time "
          f"{r['fast_cpu_s']:.2f} s; mAP {r['fast_map']:.6f}; "
          f"peak memory +{r['fast_peak_bytes'] / mib:.0f} MiB")
    print(f"loop  per query, np.argsort(kind='stable'): {r['loop_s']:.1f} s, CPU time "
          f"{r['loop_cpu_s']:.1f} s (timed on the first {r['loop_queries']} queries, scaled "
          f"x{r['n_query'] / r['loop_queries']:g}); "
          f"peak memory +{r['loop_peak_bytes'] / mib:.0f} MiB")
    print(f"speed-up {r['speedup']:.1f}x (CPU time: "
          f"{r['loop_cpu_s'] / r['fast_cpu_s']:.1f}x); on those {r['loop_queries']} queries: fast "
          f"{r['fast_subset_map']:.12f}, loop {r['loop_map']:.12f}, "
          f"difference {r['difference']:.1e}")


# ===== training =====
def bench_train(cfg, steps=8, epochs=1):
    """Pairs per second of train.py's own epoch loop (data loading included) beside the
    floor of its arithmetic: the same train_step (frozen feature net forward, image and
    text nets forward and backward, both SGD updates) on one batch already on the device."""
    import datasets
    import train
    train.configure_torch(cfg)   # as train.py: the same kernels, TF32 and cudnn settings
    data = datasets.load(cfg)
    session = train.Session(cfg, data)
    device = session.device
    images = torch.randint(0, 256, (cfg.BATCH_SIZE, 3, cfg.CROP, cfg.CROP), dtype=torch.uint8,
                           device=device)
    texts = torch.from_numpy(data.texts[data.train[:cfg.BATCH_SIZE]]).to(device)
    session.img_net.train()
    session.txt_net.train()
    out = dict(batch=cfg.BATCH_SIZE, crop=cfg.CROP, backbone=cfg.BACKBONE, device=str(device),
               dataset=cfg.DATASET, workers=cfg.NUM_WORKERS)
    def one_step():
        session.train_step(images, texts)
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
    one_step()  # warm-up (allocations, cudnn autotuning)
    _, step_s, _, out['floor_peak_bytes'] = measure(one_step, steps, device)
    out['floor_s'] = statistics.median(step_s)
    out['floor_pairs_per_s'] = cfg.BATCH_SIZE / out['floor_s']
    speeds = []
    start_mem = costs.memory_start(device)
    for epoch in range(epochs):
        seconds, steps_done = timed_epoch(session, epoch)
        speeds.append(steps_done * cfg.BATCH_SIZE / seconds)
    out['loop_peak_bytes'] = costs.memory_peak(device) - start_mem
    out['loop_pairs_per_s'] = statistics.median(speeds)
    out['epochs'], out['steps'] = epochs, steps
    out['ratio'] = out['loop_pairs_per_s'] / out['floor_pairs_per_s']
    return out


def timed_epoch(session, epoch):
    """(seconds, steps) of one epoch of Session.train_epoch, as train.py's loop runs it."""
    start = time.perf_counter()
    steps = sum(1 for _ in session.train_epoch(epoch))
    costs.sync(session.device)
    return time.perf_counter() - start, steps


def print_train(r):
    mib = 2 ** 20
    print(f"== training: {r['dataset']}, {r['backbone']}, batch {r['batch']} of "
          f"{r['crop']} x {r['crop']}, on {r['device']}, {r['workers']} loader workers ==")
    print(f"floor  train_step on a batch already on the device: median "
          f"{r['floor_s']:.3f} s per step over {r['steps']} steps = "
          f"{r['floor_pairs_per_s']:.1f} pairs/s; peak memory +"
          f"{r['floor_peak_bytes'] / mib:.0f} MiB")
    print(f"train  Session.train_epoch (as metrics.jsonl reports it): median "
          f"{r['loop_pairs_per_s']:.1f} pairs/s over {r['epochs']} epoch(s); peak memory +"
          f"{r['loop_peak_bytes'] / mib:.0f} MiB")
    print(f"ratio  {r['ratio']:.1%} of the floor")


# ===== full mAP (the fixed-feature protocol's number) =====
def bench_full_map(n_query=2000, n_db=184577, nbits=128, n_labels=10, topk=50, repeats=3,
                   loop_queries=50, seed=0):
    """metric.calculate_map against mAP@topk in the same run, and against the per-query
    loop over the whole ranking (map_loop with topk = the database) on some queries."""
    q_codes, db_codes, q_labels, db_labels = random_task(n_query, n_db, nbits, n_labels, seed)
    cpu = torch.device('cpu')
    out = dict(n_query=n_query, n_db=n_db, nbits=nbits, topk=topk, repeats=repeats,
               loop_queries=min(loop_queries, n_query))
    _, top_s, _, _ = measure(lambda: metric.calculate_top_map(
        q_codes, db_codes, q_labels, db_labels, topk), repeats, cpu)
    out['full_map'], full_s, _, out['full_peak_bytes'] = measure(lambda: metric.calculate_map(
        q_codes, db_codes, q_labels, db_labels), repeats, cpu)
    out['top_s'], out['full_s'] = statistics.median(top_s), statistics.median(full_s)
    n = out['loop_queries']
    out['loop_map'], loop_s, _, _ = measure(lambda: map_loop(
        q_codes[:n], db_codes, q_labels[:n], db_labels, n_db), 1, cpu)
    out['loop_s'] = loop_s[0] * n_query / n
    out['difference'] = abs(metric.calculate_map(q_codes[:n], db_codes, q_labels[:n],
                                                 db_labels) - out['loop_map'])
    return out


def print_full_map(r):
    print(f"== full mAP: {r['n_query']} queries x {r['n_db']} database, {r['nbits']} bits ==")
    print(f"calculate_map (counting sort per query): median {r['full_s']:.2f} s, mAP "
          f"{r['full_map']:.6f}, peak memory +{r['full_peak_bytes'] / 2 ** 20:.0f} MiB; "
          f"mAP@{r['topk']} in the same run: {r['top_s']:.2f} s; ratio "
          f"{r['full_s'] / r['top_s']:.1f}x (target: at most 5x)")
    print(f"loop  per query, whole stable argsort: {r['loop_s']:.0f} s (timed on "
          f"{r['loop_queries']} queries, scaled); difference on those queries "
          f"{r['difference']:.1e}")


# ===== training on stored features =====
def feature_data(n_pairs=20015, n_train=5000, n_query=2000, img_dim=4096, txt_dim=1386,
                 n_labels=24, seed=0):
    """MIRFlickr-sized data on features, in memory: non-negative image features (like fc7
    after ReLU), sparse 0/1 tags, multi-labels; query 2000, train 5000, database the rest."""
    import features
    import pairs
    rng = np.random.default_rng(seed)
    images = np.maximum(rng.standard_normal((n_pairs, img_dim), np.float32), 0)
    texts = (rng.random((n_pairs, txt_dim)) < 0.005).astype(np.float32)
    labels = (rng.random((n_pairs, n_labels)) < 0.15).astype(np.uint8)
    order = rng.permutation(n_pairs)
    query, database = np.sort(order[:n_query]), np.sort(order[n_query:])
    return pairs.Data('MIRFlickr', texts, labels, features.FeatureRows(images, 'bench'),
                         query, database[:n_train], database, [], [])


def bench_feature_train(cfg, epochs=2, steps=20):
    """Seconds per epoch of Session.train_epoch on features beside the floor (train_step on one
    batch already in memory, times the batches of an epoch), and one evaluation."""
    import train
    train.configure_torch(cfg)
    data = feature_data()
    session = train.Session(cfg, data)
    batches = len(data.train) // cfg.BATCH_SIZE
    x = torch.from_numpy(data.images.rows(data.train[:cfg.BATCH_SIZE])).to(session.device)
    t = torch.from_numpy(data.texts[data.train[:cfg.BATCH_SIZE]]).to(session.device)
    session.img_net.train()
    session.txt_net.train()
    session.train_step(x, t)   # warm-up
    _, step_s, _, _ = measure(lambda: session.train_step(x, t), steps, session.device)
    out = dict(batches=batches, hidden=cfg.FEATURE_HIDDEN, code_len=cfg.CODE_LEN,
               floor_epoch_s=statistics.median(step_s) * batches, device=str(session.device))
    out['epoch_s'] = statistics.median(timed_epoch(session, epoch)[0] for epoch in range(epochs))
    start = time.perf_counter()
    result, _ = session.evaluate()
    costs.sync(session.device)
    out['eval_s'] = time.perf_counter() - start
    out['map_all'] = result['map_all_i2t']
    n_evals = len({*range(cfg.EVAL_INTERVAL, cfg.NUM_EPOCH + 1, cfg.EVAL_INTERVAL),
                   cfg.NUM_EPOCH})
    out['run_s'] = cfg.NUM_EPOCH * out['epoch_s'] + n_evals * out['eval_s']
    out['num_epoch'], out['n_evals'] = cfg.NUM_EPOCH, n_evals
    return out


def print_feature_train(r):
    print(f"== training on features: 5000 pairs x (4096-d image, 1386-d text), "
          f"{r['code_len']} bits, image MLP hidden {r['hidden']}, on {r['device']} ==")
    print(f"epoch  Session.train_epoch: median {r['epoch_s']:.2f} s ({r['batches']} batches); floor "
          f"(train_step x {r['batches']} on one batch in memory): {r['floor_epoch_s']:.2f} s; "
          f"target: at most 2 s")
    print(f"eval   2000 x 18015, mAP@50 and full mAP both ways: {r['eval_s']:.1f} s")
    print(f"run    {r['num_epoch']} epochs + {r['n_evals']} evaluations: "
          f"{r['run_s'] / 60:.1f} min (target: under 4 min); 36 such runs (Table 2's grid, "
          f"MIRFlickr-sized): {36 * r['run_s'] / 3600:.1f} h (target: under 3 h)")


# ===== extraction =====
def bench_extract(sizes=(128, 512), backbone='alexnet', crop=224):
    """Images per second of extract.py (random weights, one process) and its peak memory
    for growing N: the rows go to disk as they come, so the peak should not grow."""
    import tempfile
    import demo
    import extract
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            folder = os.path.join(tmp, f'n{n}')
            demo.make_demo(folder, n_pairs=n)
            cfg = settings.resolve(['DATASET=DEMO', f'DATA_DIR={folder!r}',
                                    f'BACKBONE={backbone!r}', 'PRETRAINED=False',
                                    f'CROP={crop}', f'RESIZE={max(crop, 256)}',
                                    'NUM_WORKERS=0', 'EVAL_BATCH_SIZE=64'])
            _, wall, _, peak = measure(lambda: extract.extract(cfg), 1, torch.device('cpu'))
            out.append(dict(n=n, images_per_s=n / wall[0], peak_bytes=peak))
    return dict(backbone=backbone, crop=crop, runs=out)


def print_extract(r):
    print(f"== extraction: {r['backbone']} fc7 at {r['crop']} px, random weights, CPU ==")
    for run in r['runs']:
        print(f"N={run['n']}: {run['images_per_s']:.1f} images/s, peak memory "
              f"+{run['peak_bytes'] / 2 ** 20:.0f} MiB")


# ===== the image loader at the real files' scale =====
LOADER_PAIRS, LOADER_SIZE = 20015, 224     # MIRFlickr's pairs and image side
LOADER_TAGS, LOADER_LABELS = 1386, 24
LOADER_LEVEL = 3                           # gzip level of the replica's IAll
LOADER_REPLICAS = os.path.join('data', 'bench-loader')   # replicas are kept here and reused
LOADER_POOL = 256                          # distinct pictures the replica's images derive from


def photo_pool(count, size, seed=0):
    """(count, size, size, 3) uint8 pictures that gzip shrinks about as little as it does
    photographs (to ~92%; the published IAll files are about as large as their raw pixels):
    a smooth colour field, mid-scale texture and pixel noise."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    def upscale(cells, kind):
        small = rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8)
        return np.asarray(Image.fromarray(small).resize((size, size), kind), np.float32)
    pool = np.empty((count, size, size, 3), np.uint8)
    for k in range(count):
        picture = 0.6 * upscale(8, Image.BICUBIC) + 0.3 * upscale(size // 8, Image.BILINEAR)
        picture += rng.normal(0, 6, picture.shape)
        pool[k] = np.clip(picture, 0, 255)
    return pool


def replica_images(pool, start, stop):
    """Images start..stop-1 of a replica as (n, H, W, 3): pool picture i % len(pool), its
    columns rolled by i // len(pool), so that no two images are equal."""
    out = np.empty((stop - start,) + pool.shape[1:], np.uint8)
    for i in range(start, stop):
        out[i - start] = np.roll(pool[i % len(pool)], i // len(pool), axis=1)
    return out


def write_loader_replica(folder, chunk, n=LOADER_PAIRS, size=LOADER_SIZE, seed=0):
    """MIRFlickr-sized DCMH files in `folder`: IAll written by matfile.add_mat73 as MATLAB lays
    it out (H x W x 3 x N, stored (N, 3, W, H)), gzip level LOADER_LEVEL, `chunk` images a
    chunk; YAll and LAll v5, random. Returns the seconds spent, or None when a complete
    replica was already there (each file is written under a temporary name, then renamed)."""
    import dcmh
    names = [os.path.join(folder, name) for name in dcmh.DCMH_FILES['MIRFlickr']]
    if all(os.path.isfile(path) for path in names):
        return None
    import train
    made = train.missing_folders(folder)   # deepest first
    os.makedirs(folder, exist_ok=True)
    start = time.perf_counter()
    try:
        write_replica_files(names, chunk, n, size, seed)
    except BaseException:   # Ctrl-C too: no half-written replica left behind
        for path in names:
            if os.path.exists(path + '.tmp'):
                os.remove(path + '.tmp')
        train.remove_empty(made)
        raise
    for path in names[1:] + names[:1]:   # IAll last: the three present means complete
        os.replace(path + '.tmp', path)
    return time.perf_counter() - start


def write_replica_files(names, chunk, n, size, seed):
    """The three files of write_loader_replica, each under its name + '.tmp'."""
    import matfile
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, LOADER_LABELS)) < 0.12).astype(np.float64)
    labels[np.arange(n), rng.integers(LOADER_LABELS, size=n)] = 1
    texts = (rng.random((n, LOADER_TAGS)) < 0.005).astype(np.float64)
    texts[np.arange(n), rng.integers(LOADER_TAGS, size=n)] = 1
    matfile.write_mat5(names[1] + '.tmp', {'YAll': texts})
    matfile.write_mat5(names[2] + '.tmp', {'LAll': labels})
    pool = photo_pool(LOADER_POOL, size, seed)
    tmp = names[0] + '.tmp'
    with matfile.open_mat73(tmp) as f:
        ds = matfile.add_mat73(f, 'IAll', (size, size, 3, n), np.uint8,
                               chunks=(chunk, 3, size, size), compression='gzip',
                               level=LOADER_LEVEL)
        step = chunk * max(1, 256 // chunk)   # whole chunks at a time
        for a in range(0, n, step):
            b = min(n, a + step)
            ds[a:b] = replica_images(pool, a, b).transpose(0, 3, 2, 1)  # -> (N, 3, W, H)
    matfile.finish_mat73(tmp)


def timed_pass(make_loader, seconds=0):
    """(images, wall seconds, CPU seconds) of one pass over a loader, make_loader() included
    (it starts the workers; for training it may fill a cache). The CPU seconds are this
    process's and its workers' (counted when they exit): what the pass costs on cores of its
    own, whatever else the machine runs. seconds > 0 stops after about that long."""
    import gc
    import resource
    import datasets
    def children():
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime
    start, start_cpu, start_children = time.perf_counter(), time.process_time(), children()
    loader = make_loader()
    count = 0
    for batch in datasets.batches(loader):
        count += len(batch[0])
        if seconds and time.perf_counter() - start > seconds:
            break
    wall = time.perf_counter() - start
    del loader, batch
    gc.collect()   # the loader's iterator shuts its workers down and waits for them
    cpu = time.process_time() - start_cpu + children() - start_children
    return count, wall, cpu


def bench_loader(cfg, epochs=2, seconds=0):
    """Images per second per worker of datasets.make_loader (the real transforms) on cfg's
    data: `epochs` training epochs (the first also reads the train split from the file),
    then one pass over the database in file order; the peak memory of the main process
    and of the largest worker."""
    import resource
    import datasets
    data = datasets.load(cfg, verbose=False)
    if getattr(data.images, 'is_features', False):
        raise settings.UserError("bench.py --part loader measures the image loader: leave "
                                 "IMAGE_FEATURES and PUBLISHED empty")
    out = dict(dataset=cfg.DATASET, data_dir=cfg.DATA_DIR, workers=max(1, cfg.NUM_WORKERS),
               storage=storage_words(data.images), n_train=len(data.train),
               n_database=len(data.database), epochs=[])
    for epoch in range(epochs):
        generator = torch.Generator().manual_seed(epoch)
        out['epochs'].append(timed_pass(
            lambda: datasets.make_loader(data, 'train', cfg, generator=generator), seconds))
    out['database'] = timed_pass(lambda: datasets.make_loader(data, 'database', cfg), seconds)
    out['main_peak_bytes'] = costs.proc_status('VmHWM')
    out['worker_peak_bytes'] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return out


def storage_words(images):
    """How the images are stored: an HDF5 IAll's chunks, a v5 IAll, or image files (Wiki,
    Custom)."""
    import pairs
    if isinstance(images, pairs.H5Images):
        s = images.storage
        return f"chunks of {s.chunks}, {s.compression} {s.level}"
    return "image files" if isinstance(images, pairs.FileImages) else "a v5 file"


def print_loader(r):
    """The two lines `loader train:` (the first epoch, which reads the file) and `loader
    database:`, in images per CPU-second of the loading processes per worker: the rate of a
    worker on a core of its own (the wall-clock rate, which depends on what else runs, is
    on the lines below)."""
    workers = r['workers']
    print(f"== image loader: {r['dataset']} in {r['data_dir']} ({r['storage']}); "
          f"{workers} worker{'s' * (workers > 1)} ==")
    def rate(n, cpu):
        return n / cpu if cpu else float("nan")
    n, wall, cpu = r['epochs'][0]
    print(f"loader train: {rate(n, cpu):.0f} images/s per worker")
    for k, (n, wall, cpu) in enumerate(r['epochs'], 1):
        print(f"  train epoch {k}{' (reads the file)' if k == 1 else ''}: {n} images, "
              f"{cpu:.1f} CPU-s ({rate(n, cpu):.0f} images/s per worker), {wall:.1f} s wall "
              f"({n / wall:.0f} images/s)")
    n, wall, cpu = r['database']
    print(f"loader database: {rate(n, cpu):.0f} images/s per worker")
    print(f"  database: {n} of {r['n_database']} images in file order, {cpu:.1f} CPU-s, "
          f"{wall:.1f} s wall ({n / wall:.0f} images/s); peak memory: main process "
          f"{r['main_peak_bytes'] / 2 ** 30:.2f} GiB, largest worker "
          f"{r['worker_peak_bytes'] / 2 ** 30:.2f} GiB")


def check_loader_settings(cfg, given):
    """CHUNK shapes the replica, which is MIRFlickr's: it needs no DATA_DIR, and DATASET
    MIRFlickr; with DATA_DIR the data's own chunks are measured. Checked before anything
    is written (a replica takes minutes)."""
    if 'DATA_DIR' in given:
        if 'CHUNK' in given:
            raise settings.UserError(f"setting CHUNK={cfg.CHUNK}: applies to the replica only; "
                                     f"with DATA_DIR the file's own chunks are measured "
                                     f"(prepare.py REPACK=True changes them)")
        return
    if cfg.DATASET != 'MIRFlickr':
        raise settings.UserError(f"setting DATASET={cfg.DATASET!r}: the replica is MIRFlickr's; "
                                 f"give DATA_DIR= to measure {cfg.DATASET}'s own files")
    if not 1 <= cfg.CHUNK <= LOADER_PAIRS:
        raise settings.UserError(f"setting CHUNK={cfg.CHUNK}: expected 1 to {LOADER_PAIRS} "
                                 f"images (the replica's pairs)")


def main_loader(overrides, seconds, replicas=LOADER_REPLICAS):
    """--part loader: on DATA_DIR if given, else on a replica written (once) with CHUNK."""
    given = settings.parse_overrides(overrides)
    cfg = settings.resolve(settings.with_defaults(
        ['DATASET=MIRFlickr', 'NUM_WORKERS=1', 'DEVICE="cpu"'], overrides),
                           extra=dict(CHUNK=64))
    check_loader_settings(cfg, given)
    if 'DATA_DIR' not in given:
        cfg.DATA_DIR = os.path.join(replicas, f"mirflickr-{LOADER_SIZE}px-chunk{cfg.CHUNK}")
        print(f"replica: {cfg.DATA_DIR} ({LOADER_PAIRS} images of {LOADER_SIZE} px, "
              f"{cfg.CHUNK} a chunk)")
        took = write_loader_replica(cfg.DATA_DIR, cfg.CHUNK)
        print("  reused" if took is None else f"  written in {took:.0f} s")
    print_loader(bench_loader(cfg, seconds=seconds))


# ===== search (FAISS binary indexes) =====
def uniform_codes(n, nbytes, seed):
    """Packed codes (n, nbytes) uint8, every bit a fair coin."""
    return np.frombuffer(np.random.default_rng(seed).bytes(n * nbytes), np.uint8).reshape(n, -1)


def clustered_codes(n, nbytes, n_clusters, seed, flip_log2=4):
    """(codes, centres), packed, like trained codes: items of one cluster share most bits.
    Each item is one of n_clusters uniform random centres, drawn at random, with each bit
    flipped with probability 2**-flip_log2 (1/16: 4 of 64 bits on average, so two items of
    a cluster differ in about 7.5 of 64 bits and two clusters in 32)."""
    centres = uniform_codes(n_clusters, nbytes, seed)
    pick = np.random.default_rng(seed + 1).integers(n_clusters, size=n)
    return noisy_copies(centres[pick], seed + 2, flip_log2), centres


def noisy_copies(codes, seed, flip_log2=4):
    """codes with each bit flipped with probability 2**-flip_log2: the XOR of the AND of
    flip_log2 random bytes."""
    noise = uniform_codes(len(codes), codes.shape[1], seed).copy()
    for j in range(1, flip_log2):
        noise &= uniform_codes(len(codes), codes.shape[1], seed + 1000 * j)
    return codes ^ noise


def read_bandwidth(nbytes=2 ** 29, repeats=3):
    """Bytes per second of one thread summing a buffer far larger than the caches."""
    a = np.ones(nbytes // 8, np.int64)
    best = float('inf')
    for _ in range(repeats):
        start = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - start)
    return nbytes / best


def numpy_scan(db_words, query_words, k):
    """The do-it-yourself peer: XOR, popcount, sum over words, argpartition, then the k
    sorted by (distance, id). db_words (n, words) uint64; one query (words,) uint64."""
    dist = np.bitwise_count(db_words ^ query_words).sum(1, dtype=np.uint16)
    top = np.argpartition(dist, k - 1)[:k]
    return top[np.lexsort((top, dist[top]))]


def latencies(index, queries, k):
    """Seconds of each single-query search, and the ids found. One FAISS thread: a single
    query gains nothing from more, and on a shared 2-core machine OpenMP's spinning
    threads wait for a core the other processes hold (100 ms a query measured here)."""
    import faiss
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    times, ids = [], []
    try:
        for q in queries:
            start = time.perf_counter()
            _, i = index.search(q[None], k)
            times.append(time.perf_counter() - start)
            ids.append(i[0])
    finally:
        faiss.omp_set_num_threads(threads)
    return np.array(times), np.array(ids)


def batch_rate(index, queries, k, threads):
    """Queries per second of one search call over all the queries, on `threads` threads."""
    import faiss
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        start = time.perf_counter()
        dist, ids = index.search(queries, k)
        return len(queries) / (time.perf_counter() - start), dist, ids
    finally:
        faiss.omp_set_num_threads(before)


def recall_at_k(db, queries, ids, exact_dist, k):
    """Share of the exact top k found, counting an item tied with the k-th exact distance
    as good as any other (ties make the exact set one choice among several)."""
    found = 0
    for q, row, d in zip(queries, ids, exact_dist):
        row = row[row >= 0]
        dist = np.unpackbits(db[row] ^ q, axis=1).sum(1)
        below, tied = (dist < d[-1]).sum(), (dist == d[-1]).sum()
        found += below + min(tied, (d == d[-1]).sum())
    return found / (k * len(queries))


def bench_exact(db, queries, k, numpy_queries, batch_threads):
    import faiss
    out = {}
    start_mem = costs.memory_start(torch.device('cpu'))
    start = time.perf_counter()
    index = faiss.IndexBinaryFlat(db.shape[1] * 8)
    index.add(db)
    out['build_s'] = time.perf_counter() - start
    out['rss_per_item'] = (costs.proc_status('VmRSS') - start_mem) / len(db)
    out['bytes_per_item'] = faiss.serialize_index_binary(index).size / len(db)
    times, _ = latencies(index, queries, k)
    out['median_ms'], out['p99_ms'] = np.median(times) * 1e3, np.percentile(times, 99) * 1e3
    out['batch_qps'] = {}
    for threads in batch_threads:
        out['batch_qps'][threads], out['exact_dist'], out['exact_ids'] = batch_rate(
            index, queries, k, threads)
    words = np.ascontiguousarray(np.pad(db, ((0, 0), (0, -db.shape[1] % 8)))).view(np.uint64)
    q_words = np.ascontiguousarray(np.pad(queries, ((0, 0), (0, -db.shape[1] % 8)))).view(
        np.uint64)
    start = time.perf_counter()
    for q in q_words[:numpy_queries]:
        numpy_scan(words, q, k)
    out['numpy_ms'] = (time.perf_counter() - start) / numpy_queries * 1e3
    return out


def bench_multihash(db, queries, exact, k, nflips, nhash, b):
    """IndexBinaryMultiHash: nhash tables, each keyed on its own b-bit slice of the code
    (2 x 24 of 64 bits: few items share a key, yet the items near a query almost always
    match one slice within nflip bits); each nflip (the Hamming radius probed in every
    table) is one point of the recall curve."""
    import faiss
    nbits = db.shape[1] * 8
    start_mem = costs.memory_start(torch.device('cpu'))
    start = time.perf_counter()
    index = faiss.IndexBinaryMultiHash(nbits, nhash, b)
    index.add(db)
    out = dict(build_s=time.perf_counter() - start, nhash=nhash, b=b, curve=[])
    out['rss_per_item'] = (costs.proc_status('VmRSS') - start_mem) / len(db)
    for nflip in nflips:
        index.nflip = nflip
        times, ids = latencies(index, queries, k)
        out['curve'].append(dict(nflip=nflip, median_ms=np.median(times) * 1e3,
                                 p99_ms=np.percentile(times, 99) * 1e3,
                                 recall=recall_at_k(db, queries, ids, exact['exact_dist'], k)))
    return out


def bench_search_one(n, nbits, kind, args, bandwidth):
    """Exact and multi-hash figures for n codes of nbits, 'uniform' or 'clustered'."""
    nbytes = nbits // 8
    if kind == 'uniform':
        db, queries = uniform_codes(n, nbytes, 1), uniform_codes(args.queries, nbytes, 2)
    else:
        n_clusters = max(1, n // args.cluster_size)
        db, centres = clustered_codes(n, nbytes, n_clusters, 1)
        # queries: fresh noisy copies of the database's centres
        pick = np.random.default_rng(5).integers(n_clusters, size=args.queries)
        queries = noisy_copies(centres[pick], 6)
    exact = bench_exact(db, queries, args.topk, args.numpy_queries, args.batch_threads)
    hashed = bench_multihash(db, queries, exact, args.topk, args.nflips,
                             max(1, nbits // 32), args.hash_bits)
    floor_ms = db.nbytes / bandwidth * 1e3
    return dict(n=n, nbits=nbits, kind=kind, exact=exact, hash=hashed, floor_ms=floor_ms)


def print_search_one(r):
    e, h = r['exact'], r['hash']
    print(f"-- {r['n']:,} x {r['nbits']} bits, {r['kind']} codes --")
    print(f"exact IndexBinaryFlat: build {e['build_s']:.2f} s; {e['bytes_per_item']:.2f} bytes "
          f"per item in the index file, {e['rss_per_item']:.2f} resident; single query top-"
          f"{len(e['exact_ids'][0])}: median {e['median_ms']:.2f} ms, p99 {e['p99_ms']:.2f} ms; "
          f"batch of {len(e['exact_ids'])}: " + ', '.join(
              f"{qps:.0f} queries/s on {t} thread{'s' * (t > 1)}"
              for t, qps in e['batch_qps'].items()))
    print(f"floor: streaming the codes once takes {r['floor_ms']:.2f} ms; NumPy popcount scan "
          f"{e['numpy_ms']:.1f} ms per query (exact is {e['numpy_ms'] / e['median_ms']:.1f}x "
          f"faster)")
    print(f"IndexBinaryMultiHash ({h['nhash']} tables of {h['b']} bits): build "
          f"{h['build_s']:.2f} s, {h['rss_per_item']:.1f} bytes resident per item")
    for p in h['curve']:
        print(f"  nflip {p['nflip']}: recall@{len(e['exact_ids'][0])} {p['recall']:.4f}, median "
              f"{p['median_ms']:.3f} ms, p99 {p['p99_ms']:.3f} ms "
              f"(speed-up over exact {e['median_ms'] / p['median_ms']:.1f}x)")


def bench_search_eval(n_query, n_db, nbits, topk, repeats, full_queries):
    """search.faiss_top_map against metric.calculate_top_map on the same random task, and
    full mAP (search.faiss_map, one FAISS thread, against metric.calculate_map) on the
    first full_queries queries."""
    import search
    task = random_task(n_query, n_db, nbits, 10)
    import faiss
    out = dict(n_query=n_query, n_db=n_db, nbits=nbits, topk=topk)
    threads = faiss.omp_get_max_threads()
    for name, fn, n_threads in (('metric', metric.calculate_top_map, threads),
                                ('faiss', search.faiss_top_map, threads),
                                ('faiss_1', search.faiss_top_map, 1)):
        faiss.omp_set_num_threads(n_threads)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            out[name + '_map'] = fn(*task, topk)
            times.append(time.perf_counter() - start)
        out[name + '_s'] = statistics.median(times)
    faiss.omp_set_num_threads(1)
    sub = (task[0][:full_queries], task[1], task[2][:full_queries], task[3])
    for name, fn in (('metric_full', metric.calculate_map), ('faiss_full', search.faiss_map)):
        start = time.perf_counter()
        out[name + '_map'] = fn(*sub)
        out[name + '_s'] = time.perf_counter() - start
    faiss.omp_set_num_threads(threads)
    out['threads'], out['full_queries'] = threads, full_queries
    return out


def print_search_eval(r):
    print(f"-- evaluation, mAP@{r['topk']} of {r['n_query']:,} queries x {r['n_db']:,} items, "
          f"{r['nbits']} bits --")
    print(f"metric.calculate_top_map {r['metric_s']:.2f} s; search.faiss_top_map "
          f"{r['faiss_s']:.2f} s on {r['threads']} FAISS threads, {r['faiss_1_s']:.2f} s on 1; "
          f"metric.py is {min(r['faiss_s'], r['faiss_1_s']) / r['metric_s']:.2f}x as fast as "
          f"the faster FAISS; mAP difference "
          f"{max(abs(r['metric_map'] - r[k]) for k in ('faiss_map', 'faiss_1_map')):.1e}")
    print(f"full mAP of the first {r['full_queries']} queries: metric.calculate_map "
          f"{r['metric_full_s']:.2f} s, search.faiss_map {r['faiss_full_s']:.2f} s on 1 FAISS "
          f"thread; difference {abs(r['metric_full_map'] - r['faiss_full_map']):.1e}")


def int_list(option, text, sep=',', low=1, length=None):
    """'1,2' -> [1, 2] (every one at least `low`; `length` of them when given), or one line
    naming the option."""
    try:
        values = [int(float(x)) if sep == ':' else int(x) for x in text.split(sep)]
    except ValueError:
        values = []
    if not values or min(values) < low or (length and len(values) != length):
        shape = 'items:bits' if sep == ':' else f"integers of at least {low}, comma-separated"
        raise settings.UserError(f"{option} {text}: expected {shape}")
    return values


def at_least(args, names, low):
    """Each of these integer options is at least `low`, or one line naming it."""
    for name in names:
        value = getattr(args, name)
        if value < low:
            raise settings.UserError(f"--{name.replace('_', '-')} {value}: expected at least "
                                     f"{low}")


def main_search(argv):
    parser = settings.ArgumentParser(prog='bench.py search',
                                     description="FAISS binary indexes at scale")
    parser.add_argument('--sizes', default='1000000:64,10000000:64,10000000:128',
                        help="items:bits of each collection, comma-separated")
    parser.add_argument('--kinds', default='uniform,clustered')
    parser.add_argument('--queries', type=int, default=1000)
    parser.add_argument('--numpy-queries', type=int, default=20,
                        help="queries the NumPy scan is timed on")
    parser.add_argument('--topk', type=int, default=50)
    parser.add_argument('--batch-threads', default='1',
                        help="FAISS threads of the batch searches, comma-separated (1,2: "
                             "also 2; slow when other processes hold the cores)")
    parser.add_argument('--nflips', default='0,1,2', help="multi-hash radii of the curve")
    parser.add_argument('--cluster-size', type=int, default=1000, help="items per cluster")
    parser.add_argument('--hash-bits', type=int, default=24,
                        help="bits each multi-hash table keys on (one table per 32 bits)")
    parser.add_argument('--eval-database', type=int, default=184577,
                        help="evaluation comparison at this database size (0: skip)")
    parser.add_argument('--eval-queries', type=int, default=2000)
    parser.add_argument('--eval-full-queries', type=int, default=200,
                        help="queries the full-mAP comparison runs on")
    args = parser.parse_args(argv)
    args.nflips = int_list('--nflips', args.nflips, low=0)
    args.batch_threads = int_list('--batch-threads', args.batch_threads)
    sizes = [int_list('--sizes', size, sep=':', length=2) for size in args.sizes.split(',')]
    kinds = args.kinds.split(',')
    if not set(kinds) <= {'uniform', 'clustered'}:
        raise settings.UserError(f"--kinds {args.kinds}: expected uniform, clustered or both, "
                                 f"comma-separated")
    at_least(args, ('queries', 'numpy_queries', 'topk', 'cluster_size', 'hash_bits',
                    'eval_queries', 'eval_full_queries'), 1)
    at_least(args, ('eval_database',), 0)
    print(costs.machine())
    bandwidth = read_bandwidth()
    print(f"memory read bandwidth (one thread): {bandwidth / 1e9:.1f} GB/s")
    for n, nbits in sizes:
        for kind in kinds:
            print_search_one(bench_search_one(n, nbits, kind, args, bandwidth))
    if args.eval_database:
        print_search_eval(bench_search_eval(args.eval_queries, args.eval_database, 128,
                                            args.topk, 3, args.eval_full_queries))
    print(costs.machine())


# ===== the GPU acceptance run (python bench.py gpu) =====
# What each part runs. 'full' (CUDA): the paper's 224 px and batch 32, sized for at most 8
# minutes on one GPU. 'small' (the CPU): 64 px crops, batch 8, fewer steps and images, a few
# minutes of CPU time on 2 cores (a VGG-19 step at 64 px and batch 32 took 17 s on our shared
# 2-core machine); its grid prediction is scaled to 224 px and batch 32 by the pixels and pairs
# per step. The DEMO runs keep the DEMO preset.
GPU_SIZES = {
    'full': dict(crop=224, batch=32, workers=settings.NUM_WORKERS,
                 agree_backbones=('alexnet', 'vgg19'), agree_steps=3,
                 precision_backbone='vgg19', precision_steps=20, demo_epochs=6, demo_share=1.0,
                 speed_backbones=('alexnet', 'vgg19'), floor_steps=10, loop_steps=30,
                 eval_images=2000),
    'small': dict(crop=64, batch=8, workers=1,
                  agree_backbones=('alexnet',), agree_steps=3,
                  precision_backbone='alexnet', precision_steps=5, demo_epochs=1,
                  demo_share=0.1,
                  speed_backbones=('alexnet', 'vgg19'), floor_steps=2, loop_steps=4,
                  eval_images=128),
}
GRID_CROP, GRID_BATCH = 224, 32   # what the paper's grids train on

# Two devices agree "to fp32" when:
# - each step's loss is within LOSS_RTOL of the reference's. fp32 keeps 24 bits (unit roundoff
#   u = 6e-8); the same sum in another order (cuDNN or cuBLAS kernels against oneDNN's, other
#   block sizes) differs by up to n u for n terms, typically sqrt(n) u, and the longest sums
#   here are fc6's (9,216 inputs for AlexNet, 25,088 for VGG-19): n u = 0.6e-3 to 1.5e-3. A
#   bf16 leak (u = 3.9e-3 on every operation) or a wrong layout exceeds it.
# - the weights' change over the steps (each network's, as one vector) is within UPDATE_RTOL of
#   the reference's, in norm: the weights are fp32 too, and a few steps at LR 0.001 move them
#   by about 1e-5 of their size, so the stored changes keep only 2 to 3 significant digits
#   (the CPU's own contiguous against channels_last kernels: 8e-4 on AlexNet).
LOSS_RTOL = 1e-3
UPDATE_RTOL = 1e-2
PRECISION_FLAGS = ('BF16', 'TF32', 'CHANNELS_LAST')



def bench_gpu(device, sizes, overrides=()):
    """Every figure of the acceptance run, as one dict (what the JSON file holds)."""
    import train
    start = time.perf_counter()
    if 'DATASET' in settings.parse_overrides(overrides):
        raise settings.UserError("bench.py gpu: setting DATASET: the run is built on the DEMO "
                                 "(generated, and replicated at 224 px); leave DATASET out")
    base = gpu_config(overrides, DEVICE=device)
    train.pick_device(base)      # no CUDA here: one line before anything is generated
    data = datasets_load(base)   # the DEMO, generated on first use; also the 224 px replica
    out = dict(machine=costs.machine(), device=device, torch=torch.__version__, sizes=dict(sizes))
    out['agreement'] = agreement_part(data, overrides, device, sizes)
    out['precision'] = precision_part(data, overrides, device, sizes)
    out['speed'] = {b: speed_part(data, overrides, device, sizes, b)
                    for b in sizes['speed_backbones']}
    figures = {b: dict(step_s=s['grid_step_s'], eval_images_per_s=s['grid_eval_images_per_s'])
               for b, s in out['speed'].items()}
    out['grid'] = {name: predict_grid_hours(figures, tables, extra=grid_extra(overrides))
                   for name, tables in (('table 2', ('2',)), ('table 1', ('1',)),
                                        ('both', ('2', '1')))}
    out['seconds'] = time.perf_counter() - start
    return out


def gpu_config(overrides, **forced):
    """The DEMO preset, then the user's KEY=VALUE, then what this part of the run sets."""
    return settings.resolve(settings.with_defaults(['DATASET=DEMO'], overrides), **forced)


def grid_extra(overrides):
    """The user's KEY=VALUE that a grid run would also get (BACKBONE=alexnet, ...); the DEMO's
    data and speed settings are the benchmark's own."""
    ours = {'DATA_DIR', 'NUM_WORKERS', 'DEVICE', 'EVAL_BATCH_SIZE'}
    return [o for o in overrides if o.partition('=')[0].upper() not in ours]


def datasets_load(cfg):
    import datasets
    return datasets.load(cfg, verbose=False)


def fixed_batches(data, cfg, n):
    """n training batches (uint8 images, texts) as the loader gives them, from a fixed seed;
    the epoch's batches again from the start if it has fewer."""
    import datasets
    in_process = types.SimpleNamespace(**{**vars(cfg), 'NUM_WORKERS': 0})
    loader = datasets.make_loader(data, 'train', in_process,
                                  generator=torch.Generator().manual_seed(0))
    found = []
    for images, texts, _, _ in loader:
        found.append((images, texts))
        if len(found) == n:
            break
    return [found[i % len(found)] for i in range(n)]


def dropout_off(session):
    """Train mode without dropout: the CPU and CUDA generators draw different masks from the
    same seed, and a comparison must see the arithmetic only."""
    session.img_net.train()
    session.txt_net.train()
    for module in session.img_net.modules():
        if isinstance(module, torch.nn.Dropout):
            module.eval()


def losses_on(session, batches):
    dropout_off(session)
    return [session.train_step(images, texts).item() for images, texts in batches]


def weights(session):
    """Each network's weights as one float32 vector on the CPU."""
    return {name: torch.cat([p.detach().float().cpu().flatten() for p in net.parameters()])
            for name, net in (('img_net', session.img_net), ('txt_net', session.txt_net))}


@contextlib.contextmanager
def cpu_threads(n):
    """torch's CPU threads set to n for the block (None: unchanged)."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ----- 1. the same steps on the device and on the CPU -----
def agreement_part(data, overrides, device, sizes):
    runs = []
    for backbone in sizes['agree_backbones']:
        runs.append(agreement(data, overrides, device, sizes, backbone))
        print(f"agreement, {backbone}: {'PASS' if runs[-1]['ok'] else 'FAIL'} (loss "
              f"{runs[-1]['loss_rel_diff']:.1e}, weight changes "
              f"{max(runs[-1]['update_rel_diff'].values()):.1e})", flush=True)
    if torch.device(device).type == 'cpu':
        how = ("the CPU with all its threads and the run's CHANNELS_LAST against the CPU with 1 "
               "thread and CHANNELS_LAST=False, BF16 and TF32 off (no GPU: the CPU's kernels "
               "against themselves, summing in other blocks where threads or layout differ)")
    else:
        how = (f"{device} with the run's CHANNELS_LAST against the CPU with CHANNELS_LAST="
               f"False, BF16 and TF32 off on both")
    return dict(runs=runs, ok=all(r['ok'] for r in runs), compared=how,
                loss_rtol=LOSS_RTOL, update_rtol=UPDATE_RTOL,
                why=(f"fp32 (unit roundoff 6e-8) summed in another order: up to n u for n "
                     f"terms, and fc6 sums 9,216 (AlexNet) to 25,088 (VGG-19) of them, so the "
                     f"loss may move by ~1e-3 (LOSS_RTOL {LOSS_RTOL:g}); a few steps at LR "
                     f"0.001 change the fp32 weights by ~1e-5 of their size, so their changes "
                     f"keep 2-3 digits (UPDATE_RTOL {UPDATE_RTOL:g}, in norm per network); "
                     f"dropout off in both (each device draws its own masks)"))


def agreement(data, overrides, device, sizes, backbone):
    """train_step on the same batches from the same weights, on the device (with the run's
    layout, fp32) and on the CPU reference (fp32, contiguous; 1 thread when the device is the
    CPU too): per-step losses and each network's change of weights."""
    import train
    common = dict(BACKBONE=backbone, CROP=sizes['crop'], RESIZE=resize_for(sizes['crop']),
                  BATCH_SIZE=sizes['batch'], BF16=False, TF32=False)
    cfg = gpu_config(overrides, DEVICE=device, **common)
    ref_cfg = gpu_config(overrides, DEVICE='cpu', CHANNELS_LAST=False, **common)
    train.configure_torch(cfg)
    batches = fixed_batches(data, cfg, sizes['agree_steps'])
    ref, dev = train.Session(ref_cfg, data), train.Session(cfg, data)
    for name in ('img_net', 'feat_net', 'txt_net'):   # the very same starting weights
        getattr(dev, name).load_state_dict(getattr(ref, name).state_dict())
    before = weights(ref)
    with cpu_threads(1 if dev.device.type == 'cpu' else None):
        ref_losses = losses_on(ref, batches)
    ref_after = weights(ref)
    del ref
    dev_losses = losses_on(dev, batches)
    dev_after = weights(dev)
    del dev
    gc.collect()
    loss_diff = max(abs(a - b) / abs(b) for a, b in zip(dev_losses, ref_losses))
    update_diff = {k: float((dev_after[k] - ref_after[k]).norm()
                            / (ref_after[k] - before[k]).norm()) for k in before}
    return dict(backbone=backbone, crop=sizes['crop'], batch=sizes['batch'],
                steps=len(batches), losses=dev_losses, reference_losses=ref_losses,
                loss_rel_diff=loss_diff, update_rel_diff=update_diff,
                max_weight_diff=max(float((dev_after[k] - ref_after[k]).abs().max())
                                    for k in before),
                ok=bool(loss_diff <= LOSS_RTOL and max(update_diff.values()) <= UPDATE_RTOL))


def resize_for(crop):
    """The authors' Resize(256) before a 224 crop; the DEMO's 72 before 64."""
    return 256 if crop == 224 else crop + crop // 8


# ----- 2. BF16, TF32, CHANNELS_LAST: what each costs -----
def precision_part(data, overrides, device, sizes):
    """Each flag on alone against all three off: the loss after N steps (same weights, same
    batches, dropout off) and the DEMO's mAP@50 after a short run. A flag the session does
    not apply on this device is reported as such and not run."""
    import train
    backbone, crop = sizes['precision_backbone'], sizes['crop']
    out = dict(backbone=backbone, crop=crop, batch=sizes['batch'],
               steps=sizes['precision_steps'], demo_epochs=sizes['demo_epochs'],
               demo_share=sizes['demo_share'], settings={})
    batches = fixed_batches(data, gpu_config(overrides, CROP=crop, RESIZE=resize_for(crop),
                                             BATCH_SIZE=sizes['batch']),
                            sizes['precision_steps'])
    for flag in ('off', *PRECISION_FLAGS):
        flags = {f: f == flag for f in PRECISION_FLAGS}
        cfg = gpu_config(overrides, DEVICE=device, BACKBONE=backbone, CROP=crop,
                         RESIZE=resize_for(crop), BATCH_SIZE=sizes['batch'], **flags)
        train.configure_torch(cfg)
        session = train.Session(cfg, data)
        applied = flag == 'off' or flag_applied(session, flag)
        entry = dict(applied=applied)
        if applied:
            entry['losses'] = losses_on(session, batches)
            del session
            entry.update(short_demo(gpu_config(overrides, DEVICE=device, **flags),
                                    demo_part(data, sizes['demo_share']),
                                    sizes['demo_epochs']))
        else:
            del session
            entry['note'] = f"{flag}=True changes nothing on {device}: not run"
        gc.collect()
        out['settings'][flag] = entry
        print(f"precision, {flag}: " + (f"loss {entry['losses'][-1]:.6f}, DEMO mAP@50 "
                                        f"{entry['map_i2t']:.4f} / {entry['map_t2i']:.4f}"
                                        if applied else entry['note']), flush=True)
    off = out['settings']['off']
    for entry in out['settings'].values():
        if entry['applied']:
            entry['loss_rel_diff'] = abs(entry['losses'][-1] - off['losses'][-1]) / abs(
                off['losses'][-1])
    return out


def flag_applied(session, flag):
    """Whether the session does anything with this flag on its device: bf16 out of the first
    convolution under its autocast, TF32 on CUDA only, the convolutions' weights in
    channels_last."""
    first_conv = next(m for m in session.img_net.modules() if isinstance(m, torch.nn.Conv2d))
    if flag == 'BF16':
        x = torch.zeros(1, first_conv.in_channels, 8, 8, device=session.device)
        with torch.no_grad(), session.autocast():
            return first_conv(x).dtype == torch.bfloat16
    if flag == 'TF32':
        return session.device.type == 'cuda' and torch.backends.cudnn.allow_tf32
    return (first_conv.weight.is_contiguous(memory_format=torch.channels_last)
            and not first_conv.weight.is_contiguous())


def demo_part(data, share):
    """The DEMO with the first `share` of its query, training and retrieval sets: on a CPU
    without bf16 arithmetic a BF16 run of the whole DEMO takes many minutes."""
    if share >= 1:
        return data
    cut = lambda part: part[:max(1, int(len(part) * share))]
    return dataclasses.replace(data, query=cut(data.query), train=cut(data.train),
                               database=cut(data.database))


def short_demo(cfg, data, epochs):
    """Train the DEMO for some epochs as train.py does (dropout on), then evaluate."""
    import train
    session = train.Session(cfg, data)
    start = time.perf_counter()
    for epoch in range(epochs):
        losses = [float(loss) for loss in session.train_epoch(epoch)]   # tensors: read once
    result, _ = session.evaluate()
    return dict(demo_loss=sum(losses) / len(losses), map_i2t=result['map_i2t'],
                map_t2i=result['map_t2i'], demo_seconds=time.perf_counter() - start)


# ----- 3. speed: pairs/s against the floor, evaluation, memory -----
def speed_part(data, overrides, device, sizes, backbone):
    """The training loop (loader included) against the floor of train_step on a batch
    already on the device; evaluation images/s; peak memory; and both scaled to what a grid
    run does (224 px, batch 32) for the prediction."""
    import train
    crop, batch = sizes['crop'], sizes['batch']
    cfg = gpu_config(settings.with_defaults([f"NUM_WORKERS={sizes['workers']}"], overrides),
                     DEVICE=device,
                     BACKBONE=backbone, CROP=crop, RESIZE=resize_for(crop), BATCH_SIZE=batch)
    train.configure_torch(cfg)
    session = train.Session(cfg, data)
    device = session.device
    out = dict(backbone=backbone, crop=crop, batch=batch, workers=cfg.NUM_WORKERS)
    costs.memory_start(device)
    out['floor_pairs_per_s'] = batch / floor_step_s(session, sizes['floor_steps'])
    out['loop_pairs_per_s'] = loop_pairs_per_s(session, sizes['loop_steps'])
    out['ratio'] = out['loop_pairs_per_s'] / out['floor_pairs_per_s']
    out['train_peak_bytes'] = costs.memory_peak(device)
    out['eval_images_per_s'], out['eval_peak_bytes'] = eval_rate(session, sizes['eval_images'])
    out['memory'] = ('torch.cuda.max_memory_allocated' if device.type == 'cuda'
                     else 'peak RSS of the process')
    del session
    gc.collect()
    scale = (GRID_CROP / crop) ** 2   # pixels: the convolutions' share of the work
    out['grid_step_s'] = GRID_BATCH / out['loop_pairs_per_s'] * scale
    out['grid_eval_images_per_s'] = out['eval_images_per_s'] / scale
    out['scaled'] = scale != 1 or batch != GRID_BATCH
    print(f"speed, {backbone}: loop {out['loop_pairs_per_s']:.1f} pairs/s, floor "
          f"{out['floor_pairs_per_s']:.1f}; evaluation {out['eval_images_per_s']:.1f} "
          f"images/s", flush=True)
    return out


def floor_step_s(session, steps):
    """Median seconds of train_step on one batch already on the device, after a warm-up."""
    cfg = session.cfg
    images = torch.randint(0, 256, (cfg.BATCH_SIZE, 3, cfg.CROP, cfg.CROP), dtype=torch.uint8,
                           device=session.device)
    texts = torch.from_numpy(session.data.texts[session.data.train[:cfg.BATCH_SIZE]]).to(
        session.device)
    session.img_net.train()
    session.txt_net.train()
    session.train_step(images, texts)
    _, seconds, _, _ = measure(lambda: session.train_step(images, texts), steps,
                               session.device)
    return statistics.median(seconds)


def loop_pairs_per_s(session, steps):
    """Pairs per second of Session.train_epoch (loader included, as train.py runs it) over
    `steps` steps after the first, which waits for the loader's workers to start."""
    epoch = session.train_epoch(0)
    done, start, end = 0, None, None
    try:
        for _ in epoch:
            if start is None:
                costs.sync(session.device)
                start = time.perf_counter()
                continue
            done += 1
            if done < steps:
                end = time.perf_counter()   # the epoch may end before `steps`
                continue
            costs.sync(session.device)
            end = time.perf_counter()
            break
    finally:
        epoch.close()   # stops the loader's workers: not part of the time
    if not done:
        raise settings.UserError(f"bench.py gpu: the DEMO in DATA_DIR={session.cfg.DATA_DIR!r}"
                                 f" gives fewer than 2 training batches of "
                                 f"{session.cfg.BATCH_SIZE}; use the full DEMO")
    return done * session.cfg.BATCH_SIZE / (end - start)


def eval_rate(session, n_images):
    """Images per second of Session.evaluate (both modalities encoded, mAP both ways) on
    the first n_images of the DEMO's query and database (a tenth from the query, as the
    DEMO's split), and the peak memory."""
    data = session.data
    n_query = max(1, min(len(data.query), n_images // 10))
    session.data = dataclasses.replace(data, query=data.query[:n_query],
                                       database=data.database[:max(1, n_images - n_query)])
    images = len(session.data.query) + len(session.data.database)
    costs.memory_start(session.device)
    start = time.perf_counter()
    session.evaluate()
    costs.sync(session.device)
    seconds = time.perf_counter() - start
    session.data = data
    return images / seconds, costs.memory_peak(session.device)


# ----- 4. the grids' time -----
def predict_grid_hours(figures, tables, seeds=3, extra=()):
    """Hours of `reproduce.py --table T` (the given tables, `seeds` seeds) on the measured
    device, by the scaling `reproduce.py --plan` uses (reproduce.run_cost: runs x (epochs x
    steps per epoch x step time + evaluations x images per evaluation / evaluation images per
    second); checkpoint writes left out). figures: {backbone: {'step_s': seconds of one
    training step (loader included) at 224 px, batch 32; 'eval_images_per_s': ...}}.
    Wiki's steps train only fc6, fc7 and the hash layer: timed as full steps, an upper bound."""
    import reproduce
    out = {}
    for cell in reproduce.grid_cells(tables, None, None, None, seeds):
        cfg = reproduce.cell_config(cell, list(extra))
        f = figures[cfg.BACKBONE]
        cost = dict(step_s=f['step_s'], encode_s=1 / f['eval_images_per_s'],
                    img_params=0, txt_params=0, trained_params=0)
        run_s = reproduce.run_cost(cfg, cost, reproduce.dataset_shape(cfg)[0])['seconds']
        entry = out.setdefault(cfg.DATASET, dict(runs=0, hours=0.0))
        entry['runs'] += 1
        entry['hours'] += run_s / 3600
    return dict(datasets=out, runs=sum(e['runs'] for e in out.values()),
                hours=sum(e['hours'] for e in out.values()))


# ----- the report -----
def gpu_report_lines(r):
    """The markdown table of the figures (also what is printed)."""
    mib = 2 ** 20
    a, p = r['agreement'], r['precision']
    lines = [f"# bench.py gpu on {r['device']}", '', r['machine'], '',
             f"Sizes: crops {r['sizes']['crop']} px, batch {r['sizes']['batch']}"
             + (" (small: the grid figures are scaled to 224 px, batch 32)"
                if r['sizes']['crop'] != GRID_CROP or r['sizes']['batch'] != GRID_BATCH
                else '') + f"; {r['seconds']:.0f} s in all.", '',
             f"**Agreement** ({a['compared']}): {'PASS' if a['ok'] else 'FAIL'}; "
             f"tolerance: loss {a['loss_rtol']:g} relative, weight changes "
             f"{a['update_rtol']:g} relative in norm.", '',
             '| backbone | steps | loss | loss difference | image net change difference '
             '| text net change difference |', '|---|---|---|---|---|---|']
    for run in a['runs']:
        d = run['update_rel_diff']
        lines.append(f"| {run['backbone']} | {run['steps']} | {run['losses'][-1]:.6f} | "
                     f"{run['loss_rel_diff']:.1e} | {d['img_net']:.1e} | {d['txt_net']:.1e} |")
    lines += ['', f"**Precision settings** ({p['backbone']}, {p['crop']} px: loss after "
              f"{p['steps']} steps; DEMO: mAP@50 after {p['demo_epochs']} epoch(s)"
              + (f" on {p['demo_share']:.0%} of its pairs" if p['demo_share'] < 1 else '')
              + "):", '',
              '| setting | loss after the steps | difference from all off | DEMO I->T | '
              'DEMO T->I |', '|---|---|---|---|---|']
    for flag, e in p['settings'].items():
        name = 'all off' if flag == 'off' else f"{flag}=True"
        if e['applied']:
            lines.append(f"| {name} | {e['losses'][-1]:.6f} | {e['loss_rel_diff']:.1e} | "
                         f"{e['map_i2t']:.4f} | {e['map_t2i']:.4f} |")
        else:
            lines.append(f"| {name} | no-op on {r['device']} | | | |")
    lines += ['', '**Speed** (training loop with its loader, against the floor of '
              '`Session.train_step` on a batch already on the device):', '',
              '| backbone | px | batch | floor pairs/s | loop pairs/s | of the floor | '
              'eval images/s | peak memory train / eval |', '|---|---|---|---|---|---|---|---|']
    for s in r['speed'].values():
        lines.append(f"| {s['backbone']} | {s['crop']} | {s['batch']} | "
                     f"{s['floor_pairs_per_s']:.1f} | {s['loop_pairs_per_s']:.1f} | "
                     f"{s['ratio']:.0%} | {s['eval_images_per_s']:.1f} | "
                     f"{s['train_peak_bytes'] / mib:.0f} / {s['eval_peak_bytes'] / mib:.0f} "
                     f"MiB |")
    lines += ['', '**Predicted grid time** on this device (3 seeds; Wiki an upper bound):', '',
              '| grid | runs | hours | per dataset |', '|---|---|---|---|']
    for name, g in r['grid'].items():
        per = ', '.join(f"{d} {e['runs']} runs {e['hours']:.1f} h"
                        for d, e in g['datasets'].items())
        lines.append(f"| {name} | {g['runs']} | {g['hours']:.1f} | {per} |")
    return lines


def write_gpu_report(r, out_dir):
    """The JSON and the markdown, under new names (a timestamp): nothing earlier is
    overwritten. Returns both paths."""
    import train
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as err:
        raise settings.UserError(f"--out {out_dir}: cannot make the folder ({err})") from None
    stamp = time.strftime('%Y%m%d-%H%M%S', time.gmtime())
    stem = base = os.path.join(out_dir, f"gpu-{r['device'].replace(':', '')}-{stamp}")
    n = 1
    while os.path.exists(stem + '.json') or os.path.exists(stem + '.md'):
        n += 1
        stem = f"{base}-{n}"
    train.write_json(stem + '.json', r)
    text = '\n'.join(gpu_report_lines(r)) + '\n'
    train.atomic_write(stem + '.md', lambda f: f.write(text.encode()))
    return stem + '.json', stem + '.md'


def check_gpu_args(args):
    """--device, --out and the KEY=VALUE settings, before minutes of work: --device names
    one device (not '' = 'whichever', which on a CPU would run the full sizes), --out a
    folder, and DEVICE is --device's."""
    if not settings.names_device(args.device):
        raise settings.UserError(f"bench.py gpu --device {args.device!r}: expected cpu, cuda or "
                                 f"cuda:N")
    if 'DEVICE' in settings.parse_overrides(args.overrides):
        raise settings.UserError("bench.py gpu: setting DEVICE: the device is --device's; "
                                 "leave DEVICE out")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise settings.UserError(f"bench.py gpu --out {args.out}: is a file; expected a folder "
                                 f"for the JSON and markdown files")


def main_gpu(argv):
    parser = settings.ArgumentParser(
        prog='bench.py gpu', description="The acceptance run of a GPU: the same steps on it "
        "and on the CPU, what BF16, TF32 and CHANNELS_LAST cost, pairs/s against the floor, "
        "evaluation images/s, memory, and the predicted time of the paper's grids.")
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                        help="cuda, cuda:N or cpu (default: cuda when there is one)")
    parser.add_argument('--out', default=os.path.join(settings.OUT_DIR, 'bench'),
                        help="folder for the JSON and markdown files (default runs/bench)")
    parser.add_argument('--sizes', choices=tuple(GPU_SIZES),
                        help="default: full on CUDA, small on the CPU")
    parser.add_argument('overrides', nargs='*', metavar='KEY=VALUE',
                        help="settings for every part (DATA_DIR of the DEMO, NUM_WORKERS, ...)")
    args = parser.parse_args(argv)
    check_gpu_args(args)
    sizes = GPU_SIZES[args.sizes or ('small' if args.device == 'cpu' else 'full')]
    print(costs.machine())
    figures = bench_gpu(args.device, sizes, args.overrides)
    print('\n'.join(gpu_report_lines(figures)))
    json_path, md_path = write_gpu_report(figures, args.out)
    print(f"figures: {json_path}")
    print(f"table: {md_path}")
    if not figures['agreement']['ok']:
        print("agreement: FAIL (see the table above)", file=sys.stderr)
        sys.exit(1)


# ===== machine and entry point =====
def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ['search']:
        return main_search(argv[1:])
    if argv[:1] == ['gpu']:
        return main_gpu(argv[1:])
    parser = settings.ArgumentParser(prog='bench.py', description=__doc__.split('\n\n')[0])
    parser.add_argument('--repeats', type=int, default=3, help="timed runs of the fast version")
    parser.add_argument('--queries', type=int, default=2000, help="number of queries")
    parser.add_argument('--database', type=int, default=184577, help="database size")
    parser.add_argument('--bits', type=int, default=128)
    parser.add_argument('--topk', type=int, default=50)
    parser.add_argument('--loop-queries', type=int, default=200,
                        help="queries the per-query loop is timed on (then scaled)")
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--part', choices=('all', 'eval', 'train', 'map_all', 'features',
                                           'extract', 'loader'), default='all')
    parser.add_argument('--steps', type=int, default=8, help="timed steps of the floor")
    parser.add_argument('--epochs', type=int, default=1, help="timed epochs of train.py's loop")
    parser.add_argument('overrides', nargs='*', metavar='KEY=VALUE',
                        help="settings for the training part (default: the DEMO preset)")
    parser.add_argument('--seconds', type=float, default=0,
                        help="loader: stop each pass after about this long (0: whole passes)")
    args = parser.parse_args(argv)
    at_least(args, ('repeats', 'queries', 'database', 'bits', 'topk', 'loop_queries', 'steps',
                    'epochs'), 1)
    if args.seconds < 0 or args.seconds != args.seconds:
        raise settings.UserError(f"--seconds {args.seconds}: expected 0 (whole passes) or more")
    if not settings.names_device(args.device):
        raise settings.UserError(f"--device {args.device!r}: expected cpu, cuda or cuda:N")
    print(costs.machine())
    if args.part == 'loader':   # not part of 'all': it writes a 3 GB replica on first use
        main_loader(args.overrides, args.seconds)
    if args.part in ('all', 'eval'):
        print_eval(bench_eval(args.queries, args.database, args.bits, topk=args.topk,
                              repeats=args.repeats, loop_queries=args.loop_queries,
                              device=args.device))
    if args.part in ('all', 'train'):
        cfg = settings.resolve(settings.with_defaults(['DATASET=DEMO'], args.overrides))
        print_train(bench_train(cfg, args.steps, args.epochs))
    if args.part in ('all', 'map_all'):
        print_full_map(bench_full_map(args.queries, args.database, args.bits, topk=args.topk,
                                      repeats=args.repeats))
    if args.part in ('all', 'features'):
        cfg = settings.resolve(settings.with_defaults(
            ['DATASET=MIRFlickr', 'IMAGE_FEATURES="(in memory)"', 'DEVICE="cpu"'],
            args.overrides))
        print_feature_train(bench_feature_train(cfg, args.epochs))
    if args.part in ('all', 'extract'):
        print_extract(bench_extract())
    print(costs.machine())  # the load average again: did it change during the run?


if __name__ == '__main__':
    settings.run_cli(main, None)
