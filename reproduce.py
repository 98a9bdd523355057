"""Reproduce the paper's tables: a grid of train.py runs, then a summary beside the paper.

    python reproduce.py                                  # Table 2, then Table 1, 3 seeds each
    python reproduce.py --table 2 --datasets MIRFlickr --bits 16 64 --seeds 3
    python reproduce.py --table 1 BACKBONE=alexnet       # KEY=VALUE goes on to every train.py
    python reproduce.py --table demo --seeds 2           # the small generated DEMO dataset
    python reproduce.py summary runs                     # runs/summary.md and runs/summary.csv

Each cell (dataset, variant, code length, seed) is one `python train.py ...` in its own run
directory, OUT_DIR/RUN_NAME, named as train.py names it by default. A cell whose directory
already holds results.json is skipped, so an interrupted grid resumes where it stopped (and
train.py itself resumes a half-finished cell from its checkpoint).

The summary reads every results.json under a folder and lists, per cell and direction, our
mean ± sample standard deviation (ddof=1) over seeds beside the paper's mAP@50 (its Tables 1
and 2).
"""
import csv
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import settings

# ===== the paper's numbers (mAP@50, Tables 1 and 2 of the paper) =====
BITS = (16, 32, 64, 128)
# Table 2: (dataset) -> {direction: values at BITS}
PAPER_TABLE2 = {
    'Wiki': {'i2t': (0.388, 0.403, 0.412, 0.421), 't2i': (0.611, 0.635, 0.646, 0.658)},
    'MIRFlickr': {'i2t': (0.810, 0.843, 0.862, 0.876), 't2i': (0.786, 0.822, 0.835, 0.847)},
    'NUSWIDE': {'i2t': (0.724, 0.773, 0.798, 0.817), 't2i': (0.712, 0.744, 0.771, 0.789)},
}
# Table 1 (NUS-WIDE): variant -> (64 I->T, 64 T->I, 128 I->T, 128 T->I)
PAPER_TABLE1 = {
    'DJSRH-1': (0.717, 0.712, 0.741, 0.735),
    'DJSRH-2': (0.702, 0.606, 0.734, 0.581),
    'DJSRH-3': (0.724, 0.720, 0.747, 0.738),
    'DJSRH-4': (0.790, 0.745, 0.803, 0.757),
    'DJSRH-5': (0.793, 0.747, 0.812, 0.768),
    'DJSRH': (0.798, 0.771, 0.817, 0.789),
    'DJSRH-6': (0.786, 0.770, 0.811, 0.782),
}
# DJSRH in the fixed-feature protocol, as UCCH's README and paper (Hu et al., TPAMI 2022)
# report it: VGG-19 fc7 features, full mAP (UCCH's evaluation: mAP over the whole retrieval
# set, Hamming ranking), UCCH's split (the files' last 2,000 / 2,100 / 2,000 / 5,000 rows
# as queries, the rest as retrieval and training set). (dataset) -> {direction: values}
UCCH_DJSRH = {
    'MIRFlickr': {'i2t': (0.652, 0.697, 0.700, 0.716), 't2i': (0.662, 0.691, 0.683, 0.695)},
    'NUSWIDE': {'i2t': (0.502, 0.538, 0.527, 0.556), 't2i': (0.465, 0.532, 0.538, 0.545)},
    'IAPR': {'i2t': (0.409, 0.412, 0.470, 0.480), 't2i': (0.418, 0.436, 0.467, 0.478)},
    'MSCOCO': {'i2t': (0.501, 0.563, 0.595, 0.615), 't2i': (0.494, 0.569, 0.604, 0.622)},
}
DIRECTIONS = ('i2t', 't2i')
DIRECTION_NAMES = {'i2t': 'I->T', 't2i': 'T->I'}


def paper_numbers():
    """Both tables as one dict: (dataset, variant, bits, direction) -> mAP@50."""
    table = {}
    for dataset, rows in PAPER_TABLE2.items():
        for direction, values in rows.items():
            for bits, value in zip(BITS, values):
                table[(dataset, 'DJSRH', bits, direction)] = value
    for variant, values in PAPER_TABLE1.items():
        keys = [(64, 'i2t'), (64, 't2i'), (128, 'i2t'), (128, 't2i')]
        for (bits, direction), value in zip(keys, values):
            table[('NUSWIDE', variant, bits, direction)] = value
    return table


PAPER = paper_numbers()

# ===== the grid =====
TABLES = {
    '2': dict(datasets=('Wiki', 'MIRFlickr', 'NUSWIDE'), variants=('DJSRH',), bits=BITS),
    '1': dict(datasets=('NUSWIDE',), variants=tuple(settings.VARIANTS), bits=(64, 128)),
    'demo': dict(datasets=('DEMO',), variants=('DJSRH',), bits=BITS),
    # the fixed-feature protocol on UCCH's files (docs/features.md)
    'features': dict(datasets=tuple(UCCH_DJSRH), variants=('DJSRH',), bits=BITS),
}
# The grid sets these itself, one value per cell; a KEY=VALUE for them would be ambiguous.
GRID_KEYS = ('DATASET', 'VARIANT', 'CODE_LEN', 'SEED', 'OUT_DIR', 'RUN_NAME')
TRAIN_PY = Path(__file__).resolve().parent / 'train.py'


def grid_cells(tables, datasets, variants, bits, seeds):
    """The cells to run, in order, without duplicates: (dataset, variant, bits, seed).

    Tables 1 and 2 share NUS-WIDE DJSRH at 64 and 128 bits; it runs once."""
    cells, seen = [], set()
    for seed in range(seeds):  # seed 0 of every cell first: a partial grid covers the table
        for name in tables:
            table = TABLES[name]
            for dataset in datasets or table['datasets']:
                for variant in variants or table['variants']:
                    for code_len in bits or table['bits']:
                        cell = (dataset, variant, code_len, seed)
                        if cell not in seen:
                            seen.add(cell)
                            cells.append(cell)
    return cells


def cell_config(cell, extra):
    """The resolved settings of one cell (checks the extra overrides as train.py would)."""
    dataset, variant, code_len, seed = cell
    return settings.resolve(extra, DATASET=dataset, VARIANT=variant, CODE_LEN=code_len,
                            SEED=seed)


def train_command(cell, out_dir, name, extra):
    """The train.py command line of one cell."""
    dataset, variant, code_len, seed = cell
    return [sys.executable, str(TRAIN_PY), f'DATASET={dataset}', f'VARIANT={variant}',
            f'CODE_LEN={code_len}', f'SEED={seed}', f'OUT_DIR={out_dir}', f'RUN_NAME={name}',
            *extra]


def changed_settings(run_dir, cfg):
    """Keys whose value in run_dir/settings.json differs from cfg (ignoring harmless ones)."""
    path = Path(run_dir) / 'settings.json'
    if not path.exists():
        return []
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        saved = err
    if not isinstance(saved, dict):
        what = (f"cannot be read as JSON ({type(saved).__name__}: {saved})"
                if isinstance(saved, Exception) else f"a JSON {type(saved).__name__}")
        raise settings.UserError(f"{path}: {what}, expected the settings train.py wrote; "
                                 f"restore it, or move {run_dir} away to run the cell again")
    return sorted(k for k, v in vars(cfg).items()
                  if k not in settings.RUN_CONTROL and k in saved and saved[k] != v)


# ===== time estimates =====
def format_duration(seconds):
    """12 s, 4.5 min, 3.2 h: short and readable in a progress line."""
    if seconds is None or not math.isfinite(seconds):
        return '?'
    if seconds < 90:
        return f'{seconds:.0f} s'
    if seconds < 5400:
        return f'{seconds / 60:.1f} min'
    return f'{seconds / 3600:.1f} h'


def time_left(todo, times):
    """Estimated seconds for the cells in todo, from the wall times seen so far.

    A cell is estimated by the mean time of finished cells of the same dataset and code
    length, else of the same dataset, else of any; None while nothing has finished."""
    if not times:
        return None
    def mean_of(match):
        seen = [t for cell, t in times if match(cell)]
        return statistics.fmean(seen) if seen else None
    total = 0.0
    for d, _, b, _ in todo:
        guess = mean_of(lambda c: c[0] == d and c[2] == b)
        guess = guess if guess is not None else mean_of(lambda c: c[0] == d)
        total += guess if guess is not None else mean_of(lambda c: True)
    return total


def finished_time(run_dir):
    """wall_time_s of a finished run (None if its timing.json is missing)."""
    return read_timing(run_dir).get('wall_time_s')


def read_timing(run_dir):
    """timing.json: kept apart from results.json, which two equal runs write identically.
    Only its numbers count; a missing or broken file gives {} (the times are a guide)."""
    path = Path(run_dir) / 'timing.json'
    try:
        timing = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in timing.items() if is_number(v)} if isinstance(timing, dict) else {}


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ===== the data each dataset needs =====
def missing_data(configs):
    """{dataset: one line saying what is missing and where to get it} for every dataset
    whose files are not where its cells will look; checked by name and place, nothing read."""
    missing = {}
    for dataset, cfg in first_per_dataset(configs).items():
        try:
            data_files(cfg)
        except settings.UserError as err:
            missing[dataset] = str(err)
    return missing


def first_per_dataset(configs):
    """{dataset: the resolved settings of its first cell}, in grid order."""
    out = {}
    for cfg in configs:
        out.setdefault(cfg.DATASET, cfg)
    return out


def data_files(cfg):
    """The files a run of cfg reads, as found where train.py looks; a UserError naming
    what is missing and where to get it otherwise. DEMO is generated on first use."""
    import datasets
    return datasets.data_files(cfg)


# ===== running the grid =====
class Terminated(Exception):
    """SIGTERM reached reproduce.py: its train.py is stopped, then the grid."""


def raise_terminated(signum, frame):
    raise Terminated


def run_cell(cmd, run_dir, quiet):
    """Run one train.py; quiet sends its output to run_dir/train.log. Returns the exit code."""
    if not quiet:
        return wait_for(subprocess.Popen(cmd))
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(run_dir) / 'train.log', 'a') as log:
        return wait_for(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))


def wait_for(proc):
    """Wait for train.py. On Ctrl-C it got the same SIGINT and stops after its batch, saving a
    checkpoint: let it finish that (subprocess.call would kill it), then stop the grid. On
    SIGTERM (sent to reproduce.py alone, as `kill` or a job scheduler does) pass it on and
    wait, so that no train.py outlives its grid; its last checkpoint stays."""
    try:
        return proc.wait()
    except KeyboardInterrupt:
        print('\ninterrupted: waiting for train.py to save its checkpoint '
              '(Ctrl-C again aborts it)', file=sys.stderr, flush=True)
        proc.wait()
        raise
    except Terminated:
        proc.terminate()
        proc.wait()
        raise


def cell_label(cell):
    dataset, variant, code_len, seed = cell
    return f'{dataset} {variant} {code_len} bits seed {seed}'


def prepare_grid(args):
    """The overrides, cells and resolved settings of the grid; every mistake in the
    settings is found here, before anything runs."""
    extra = list(args.overrides)
    given = settings.parse_overrides(extra)
    if 'features' in args.table:
        if len(args.table) > 1:
            raise settings.UserError("--table features: run it alone (its cells share names "
                                     "with Table 2's)")
        if not ({'PUBLISHED', 'IMAGE_FEATURES'} & set(given)):
            extra = ['PUBLISHED=UCCH', *extra]   # UCCH's files, as its numbers were made
    clash = sorted(set(given) & set(GRID_KEYS))
    if clash:
        raise settings.UserError(f"setting {', '.join(clash)} is set by the grid; use "
                                 "--table/--datasets/--variants/--bits/--seeds/--out-dir")
    cells = grid_cells(args.table, args.datasets, args.variants, args.bits, args.seeds)
    configs = [cell_config(cell, extra) for cell in cells]
    if configs and configs[0].DEVICE.startswith('cuda'):   # a CUDA device that is not here
        import train
        train.pick_device(configs[0])
    return extra, cells, configs


def run_grid(args):
    extra, cells, configs = prepare_grid(args)
    out_dir = Path(args.out_dir)
    if args.plan:
        return print_plan(args, cells, configs, out_dir)
    finished = {cell: out_dir / settings.default_run_name(cfg) / 'results.json'
                for cell, cfg in zip(cells, configs)}
    finished = {cell for cell, path in finished.items() if path.exists()}
    missing = missing_data([cfg for cell, cfg in zip(cells, configs) if cell not in finished])
    if missing and not args.dry_run:   # every dataset checked before the first run
        for dataset, problem in missing.items():
            print(f"error: {dataset}: {problem}", file=sys.stderr)
        return 2
    for dataset, problem in missing.items():
        print(f"note: {dataset}: {problem}")
    todo = [c for c in cells if c not in finished]
    print(f'{len(cells)} cells, {len(cells) - len(todo)} already finished, '
          f'runs in {out_dir}', flush=True)
    skips = {}   # finished cells: read now, so that a broken one stops the grid before a run
    for i, (cell, cfg) in enumerate(zip(cells, configs), 1):
        if cell in finished:
            skips[cell] = skip_lines(f'[{i}/{len(cells)}] {cell_label(cell)}',
                                     out_dir / settings.default_run_name(cfg), cfg)
    times, ran, busy = [], 0, []
    for i, (cell, cfg) in enumerate(zip(cells, configs), 1):
        run_dir = out_dir / settings.default_run_name(cfg)
        tag = f'[{i}/{len(cells)}] {cell_label(cell)}'
        if cell in skips:
            print('\n'.join(skips[cell]), flush=True)
            wall = finished_time(run_dir)
            if wall:
                times.append((cell, wall))  # finished cells inform the estimate as well
            continue
        if args.max_cells is not None and ran >= args.max_cells:
            print(f'stopping after {ran} cells (--max-cells); run again to go on', flush=True)
            return 0
        cmd = train_command(cell, out_dir, settings.default_run_name(cfg), extra)
        if args.dry_run:
            print(f'{tag}: would run: {" ".join(cmd)}', flush=True)
            continue
        holder = cell_holder(run_dir)
        if holder:   # another grid (or train.py) runs it: take the next free cell
            print(f'{tag}: in use by {holder}; going on with the next free cell', flush=True)
            busy.append(cell)
            continue
        print(f'{tag}: running in {run_dir}', flush=True)
        start = time.time()
        code = run_cell(cmd, run_dir, args.quiet)
        if code == 130:  # train.py stopped on SIGINT and saved its checkpoint
            raise KeyboardInterrupt
        if code == 2 and cell_holder(run_dir) and not (run_dir / 'results.json').exists():
            print(f'{tag}: taken by another process meanwhile; going on with the next free '
                  'cell', flush=True)
            busy.append(cell)
            continue
        if code != 0 or not (run_dir / 'results.json').exists():
            where = f'; see {run_dir / "train.log"}' if args.quiet else ''
            print(f'{tag}: train.py failed (exit {code}){where}', file=sys.stderr)
            return 1
        ran += 1
        todo.remove(cell)
        times.append((cell, time.time() - start))
        left = [c for c in todo if c not in busy]
        left = (f'{len(left)} cell{"s" if len(left) > 1 else ""} left, about '
                f'{format_duration(time_left(left, times))}' if left else 'no cells left')
        print(f'{tag}: done in {format_duration(times[-1][1])}, {result_line(run_dir)}; {left}',
              flush=True)
    if not args.dry_run:
        report_end(cells, configs, out_dir, busy)
    return 0


def report_end(cells, configs, out_dir, busy):
    """The last line: all finished, or which cells other processes still run."""
    running = [cell for cell, cfg in zip(cells, configs) if cell in busy and not
               (out_dir / settings.default_run_name(cfg) / 'results.json').exists()]
    if running:
        print(f'{len(cells) - len(running)} of {len(cells)} cells finished; still running in '
              f'another process: {"; ".join(cell_label(c) for c in running)}. Run the same '
              f'command again when they end (it skips finished cells), then: '
              f'python reproduce.py summary {out_dir}')
    else:
        print(f'all {len(cells)} cells finished; summary: '
              f'python reproduce.py summary {out_dir}')


# ===== another process on the same cell =====
LOCK_NAME = '.lock'   # train.py's lock file in each run directory


def cell_holder(run_dir):
    """Who holds the cell's run directory now ('process N on host', as train.py writes it
    into its lock file), or None. The lock is looked up, never taken: /proc/locks lists
    every lock of either kind (flock, POSIX record lock) on Linux; elsewhere both kinds are
    tried without waiting and released at once."""
    path = Path(run_dir) / LOCK_NAME
    try:
        held = locked_by_proc_locks(path)
        if held is None:
            held = locked_by_trying(path)
        text = path.read_text(errors='replace').strip() if held else ''
    except OSError:   # no lock file, or one we cannot open: nobody runs it (train.py says)
        return None
    return (text or 'another process') if held else None


def locked_by_proc_locks(path):
    """True or False from /proc/locks (Linux); None where it cannot be read."""
    st = os.stat(path)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open('/proc/locks') as f:
            return any(key in line.split() for line in f)
    except OSError:
        return None


def locked_by_trying(path):
    import fcntl
    fd = os.open(path, os.O_RDWR)
    try:
        for lock in (fcntl.flock, fcntl.lockf):
            try:
                lock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:   # BlockingIOError, or EACCES for a record lock
                return True
            lock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def skip_lines(tag, run_dir, cfg):
    """The progress lines of a finished cell (a warning if it was made with other
    settings). Reads its results.json and settings.json: a broken one is one line."""
    lines = [f'{tag}: finished already, skipped ({result_line(run_dir)})']
    changed = changed_settings(run_dir, cfg)
    if changed:
        lines.append(f'{tag}: warning: {run_dir} was made with other values of '
                     f'{", ".join(changed)} than asked for now (use another --out-dir, or '
                     'delete its results.json to run it again)')
    return lines


def result_line(run_dir):
    results = read_results(Path(run_dir) / 'results.json')
    return f"mAP@{results.get('topk', 50)} I->T {results['map_i2t']:.3f} " \
           f"T->I {results['map_t2i']:.3f}"


# ===== the plan: time, disk and memory before a single epoch =====
# Each dataset's sizes (docs/data.md): pairs in the query, training and retrieval sets,
# text width, labels. On a published layout (docs/features.md) the sizes are assumed from
# DCMH's files and UCCH's split (its files were never opened here); IAPR TC-12 and MS-COCO
# as DCMH and UCCH describe those sets.
SHAPES = {
    'MIRFlickr': dict(query=2000, train=5000, database=18015, text=1386, labels=24),
    'NUSWIDE': dict(query=2000, train=5000, database=184577, text=1000, labels=10),
    'Wiki': dict(query=693, train=2173, database=2173, text=10, labels=10),
    'DEMO': dict(query=200, train=1000, database=1800, text=300, labels=8),
}
UCCH_SHAPES = {   # the last rows are the queries, the rest both training and retrieval set
    'MIRFlickr': dict(query=2000, train=18015, database=18015, text=1386, labels=24),
    'NUSWIDE': dict(query=2100, train=184477, database=184477, text=1000, labels=10),
    'IAPR': dict(query=2000, train=18000, database=18000, text=2912, labels=255),
    'MSCOCO': dict(query=5000, train=117218, database=117218, text=300, labels=80),
}
IMAGE_BYTES = 224 * 224 * 3   # one image of a DCMH IAll (uint8)
FEATURE_DIM = 4096            # fc7


def dataset_shape(cfg):
    """(sizes, assumed): the dataset's sizes for cfg, and whether they are assumed."""
    if cfg.PUBLISHED == 'UCCH':
        return UCCH_SHAPES[cfg.DATASET], True
    return SHAPES[cfg.DATASET], bool(cfg.PUBLISHED)


def n_evaluations(cfg):
    """Evaluations a run makes: every EVAL_INTERVAL epochs, after the last one, and before
    the first with EVAL_UNTRAINED."""
    epochs = set(range(cfg.EVAL_INTERVAL, cfg.NUM_EPOCH + 1, cfg.EVAL_INTERVAL))
    return len(epochs | {cfg.NUM_EPOCH}) + bool(cfg.EVAL_UNTRAINED)


def run_cost(cfg, cost, shape):
    """Seconds and bytes of one run of cfg from the measured figures: its training steps,
    its evaluations (encoding the query and retrieval sets), its checkpoint writes; the
    disk it keeps (final checkpoint, codes) and what it needs on top while it trains (the
    checkpoint with the optimiser state, and its temporary copy while it is rewritten)."""
    steps = cfg.NUM_EPOCH * (shape['train'] // cfg.BATCH_SIZE)
    evals = n_evaluations(cfg)
    pairs = shape['query'] + shape['database']
    networks = 4 * (cost['img_params'] + cost['txt_params'])
    training = networks + 4 * cost['trained_params']           # + momentum buffers
    final = training if cfg.KEEP_OPTIMIZER else networks
    speed = cost.get('write_bytes_per_s') or float('inf')
    seconds = (steps * cost['step_s'] + evals * pairs * cost['encode_s']
               + (cfg.NUM_EPOCH * training + final) / speed)
    codes = evals * pairs * (2 * cfg.CODE_LEN + shape['labels'] + 8)  # int8 x 2, labels, index
    return dict(seconds=seconds, keep=final + codes, extra=2 * training, steps=steps,
                evals=evals)


def nominal_data_bytes(cfg, shape):
    """About how much disk the dataset's files take, from its sizes (None: not known)."""
    n = shape['query'] + (shape['database'] if shape['database'] != shape['train'] or
                          cfg.PUBLISHED else shape['train'])
    side = 8 * (shape['text'] + shape['labels'])            # YAll, LAll as doubles
    if settings.uses_image_features(cfg):
        return n * (4 * FEATURE_DIM + side)
    if cfg.DATASET == 'Wiki':
        return None   # JPEG files: their size is not stated by the source
    if cfg.DATASET == 'DEMO':
        return n * (64 * 64 * 3 + side)
    return n * (IMAGE_BYTES + side)


def data_bytes(cfg, shape):
    """(bytes, found): the files' size on disk when they are there, else nominal."""
    try:
        files = data_files(cfg)
    except settings.UserError:
        return nominal_data_bytes(cfg, shape), False
    total = 0
    for path in files:
        for root, _, names in os.walk(path) if os.path.isdir(path) else [('', [], [path])]:
            total += sum(os.path.getsize(os.path.join(root, n)) for n in names)
    return (total or nominal_data_bytes(cfg, shape)), bool(files)


def measure_all(configs, out_dir):
    """costs.measure_cost for the first cell of each dataset (its shapes), with progress.
    Datasets whose runs differ only in text width share one measurement when a CNN runs
    on images: the text network is a negligible part of its step (VGG-19: 0.02%)."""
    from costs import measure_cost
    costs, seen = {}, {}
    for dataset, cfg in first_per_dataset(configs).items():
        shape, _ = dataset_shape(cfg)
        on_features = settings.uses_image_features(cfg)
        key = None if on_features else tuple(getattr(cfg, k) for k in COST_KEYS)
        if key in seen:
            costs[dataset] = costs[seen[key]]
            print(f"  {dataset}: the networks and batches of {seen[key]} (text width aside): "
                  f"its figures", flush=True)
            continue
        what = (f"{'features' if on_features else cfg.BACKBONE}, batch {cfg.BATCH_SIZE}"
                + ('' if on_features else f" of {cfg.CROP} x {cfg.CROP}")
                + f", {shape['text']}-d text"
                + ('' if cfg.TRAIN_ALL_IMG else ', fc6/fc7/hash layer trained'))
        print(f"  measuring {dataset} ({what}) ...", end='', flush=True)
        start = time.perf_counter()
        costs[dataset] = c = measure_cost(cfg, shape['text'], out_dir=out_dir)
        seen.setdefault(key, dataset)
        encode = (f"{c['encode_s']:.3g} s" if c['encode_s'] >= 1 else
                  f"{c['encode_s'] * 1e3:.3g} ms")
        print(f" {c['step_s']:.3g} s a training step, {encode} a pair to encode, peak memory "
              f"{gb(c['peak_bytes'])} ({time.perf_counter() - start:.0f} s to measure)",
              flush=True)
    return costs


# What a step's cost depends on, text width aside (measure_all).
COST_KEYS = ('BACKBONE', 'CROP', 'BATCH_SIZE', 'EVAL_BATCH_SIZE', 'TRAIN_ALL_IMG', 'CODE_LEN',
             'DEVICE', 'BF16', 'TF32', 'CHANNELS_LAST', 'DETERMINISTIC')


def gb(nbytes):
    return '?' if nbytes is None else f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e8 else \
        f"{nbytes / 1e6:.0f} MB"


def hours(seconds):
    """Like format_duration, but hours stay hours (no days): 1234.5 h."""
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else format_duration(seconds)


def print_plan(args, cells, configs, out_dir):
    """--plan: per dataset and for the whole grid, the runs, the data, the time on this
    device, the disk and the peak memory. Runs nothing, writes nothing; exits 0."""
    done = {cell for cell, cfg in zip(cells, configs)
            if (out_dir / settings.default_run_name(cfg) / 'results.json').exists()}
    missing = missing_data(configs)
    from costs import machine
    print(f"plan: {len(cells)} runs ({', '.join(args.table)}; seeds 0..{args.seeds - 1}) in "
          f"{out_dir}, {len(done)} finished already", flush=True)
    print(f"timing each dataset on {machine()}: synthetic batches of its shapes, "
          f"random weights, no data read", flush=True)
    costs = measure_all(configs, out_dir)
    rows, total = [], dict(runs=0, seconds=0.0, disk=0, extra=0, peak=0, assumed=False)
    for dataset, cfg in first_per_dataset(configs).items():
        shape, assumed = dataset_shape(cfg)
        mine = [(c, f) for c, f in zip(cells, configs) if f.DATASET == dataset]
        cost = run_cost(cfg, costs[dataset], shape)
        left = sum(run_cost(f, costs[dataset], shape)['seconds'] for c, f in mine
                   if c not in done)
        data, found = data_bytes(cfg, shape)
        disk = (data or 0) + sum(run_cost(f, costs[dataset], shape)['keep'] for _, f in mine)
        rows.append([dataset, f"{len(mine)} ({sum(c in done for c, _ in mine)} done)",
                     'MISSING' if dataset in missing else 'found' if found else
                     'generated on first use',
                     ('~' if assumed else '') + hours(cost['seconds']),
                     ('~' if assumed else '') + hours(left),
                     f"{gb(data)} + runs {gb(disk - (data or 0))}",
                     gb(costs[dataset]['peak_bytes'])])
        total['runs'] += len(mine)
        total['seconds'] += left
        total['disk'] += disk
        total['extra'] = max(total['extra'], cost['extra'])
        total['peak'] = max(total['peak'], costs[dataset]['peak_bytes'])
        total['assumed'] |= assumed or data is None
    rows.append(['grid', str(total['runs']), f"{len(missing)} missing" if missing else
                 'none missing',
                 '', hours(total['seconds']),
                 f"{gb(total['disk'] + total['extra'])}" + (' + Wiki images' if any(
                     r[5].startswith('?') for r in rows) else ''), gb(total['peak'])])
    header = ['dataset', 'runs', 'data', 'time / run', 'time left', 'disk: data + runs',
              'peak memory']
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for row in [header] + rows:
        print('  '.join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())
    for line in plan_notes(configs, missing, costs, total):
        print(line)
    return 0


def plan_notes(configs, missing, costs, total):
    """What the table means and what to do about it, one paragraph a line."""
    yield ("time: training steps x the measured step, evaluations x the pairs they encode, "
           "checkpoint writes at the measured disk speed; data loading is assumed to keep up "
           "(bench.py: the loop runs at 80-93% of the step's floor on a 2-core CPU). "
           "disk: the data, each run's final checkpoint and codes, and one checkpoint with "
           "its optimiser state (twice, while it is rewritten). "
           "peak memory: the measuring process's (on CUDA: allocated on the device). "
           "~: sizes assumed, the files never opened here.")
    for dataset, problem in missing.items():
        yield f"missing: {dataset}: {problem}"
    devices = {c['device'] for c in costs.values()}
    if devices == {'cpu'} and total['seconds'] > 24 * 3600:
        yield (f"On this CPU the grid would take about {total['seconds'] / 3600:,.0f} hours "
               f"({total['seconds'] / 86400:,.0f} days). Run it on a GPU: "
               f"`python reproduce.py ... --plan` there gives that device's figure; several "
               f"GPUs: one grid per GPU on the same --out-dir (docs/reproduce.md).")
    if any(cfg.BACKBONE == 'vgg19' and not settings.uses_image_features(cfg)
           for cfg in configs):
        cfg = next(c for c in configs if c.BACKBONE == 'vgg19')
        yield (f"note: BACKBONE='vgg19' (the default, the paper's network) trains here with "
               f"the learning rates of the authors' AlexNet code (LR_IMG={cfg.LR_IMG}, "
               f"LR_TXT={cfg.LR_TXT} for {cfg.DATASET}): a combination nobody has run; "
               f"BACKBONE=alexnet is the authors' own.")


# ===== the summary =====
def load_results(runs_dir):
    """Every results.json under runs_dir, as dicts (with 'run_dir' added), sorted by path."""
    out = []
    for path in sorted(Path(runs_dir).rglob('results.json')):
        results = read_results(path)
        results['run_dir'] = str(path.parent)
        results.update(read_timing(path.parent))
        out.append(results)
    return out


# The keys of results.json that the summary reads: key -> (check, what it must be).
RESULT_TYPES = {
    'dataset': (lambda v: isinstance(v, str), 'a string'),
    'code_len': (lambda v: isinstance(v, int) and not isinstance(v, bool), 'an integer'),
    'map_i2t': (lambda v: is_number(v), 'a number'),
    'map_t2i': (lambda v: is_number(v), 'a number'),
}
OPTIONAL_TYPES = {
    'variant': (lambda v: isinstance(v, str), 'a string'),
    'backbone': (lambda v: isinstance(v, str), 'a string'),
    'topk': (lambda v: isinstance(v, int) and not isinstance(v, bool), 'an integer'),
    'seed': (lambda v: isinstance(v, int) and not isinstance(v, bool), 'an integer'),
}


def read_results(path):
    """One results.json, its keys checked: a broken file is one line naming it."""
    try:
        results = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise settings.UserError(f"{path}: cannot be read as JSON ({type(err).__name__}: "
                                 f"{err})") from None
    if not isinstance(results, dict):
        raise settings.UserError(f"{path}: a JSON {type(results).__name__}, expected the "
                                 f"object train.py writes")
    missing = [k for k in RESULT_TYPES if k not in results]
    if missing:
        raise settings.UserError(f"{path}: missing {', '.join(missing)}")
    checks = {**RESULT_TYPES, **OPTIONAL_TYPES}
    if without_labels(results):   # a Custom folder without labels: own-pair figures, no mAP
        checks = {**checks, **PAIR_TYPES}
        del checks['map_i2t'], checks['map_t2i']
    for key, (ok, what) in checks.items():
        if key in results and not ok(results[key]):
            raise settings.UserError(f"{path}: {key} is {results[key]!r}, expected {what}")
    return results


def without_labels(results):
    """A run on data without labels: mAP null both ways, the own-pair recall recorded."""
    return results['map_i2t'] is None and results['map_t2i'] is None and (
        'recall_i2t' in results)


def is_recall(value):
    return isinstance(value, dict) and all(is_number(value.get(k)) for k in RECALL_AT)


RECALL_AT = ('1', '5', '10')
PAIR_TYPES = {
    'recall_i2t': (is_recall, 'recall@1, 5, 10 as {"1": r1, "5": r5, "10": r10}'),
    'recall_t2i': (is_recall, 'recall@1, 5, 10 as {"1": r1, "5": r5, "10": r10}'),
    'median_rank_i2t': (is_number, 'a number'),
    'median_rank_t2i': (is_number, 'a number'),
}


def mean_std(values):
    """Mean and sample standard deviation (ddof=1; None for a single value)."""
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else None
    return mean, std


def sort_key(key):
    """Datasets in the paper's order, variants in Table 1's order, then bits and direction."""
    dataset, variant, backbone, topk, bits, direction = key
    datasets = ['Wiki', 'MIRFlickr', 'NUSWIDE', 'IAPR', 'MSCOCO', 'DEMO']
    variants = list(settings.VARIANTS)
    return (datasets.index(dataset) if dataset in datasets else len(datasets), dataset,
            variants.index(variant) if variant in variants else len(variants), variant,
            backbone, topk, bits, direction)


# The columns of summary.csv: the keys of a summary row.
ROW_FIELDS = ['dataset', 'variant', 'bits', 'task', 'metric', 'n', 'mean', 'std', 'paper',
              'diff', 'ucch', 'backbone', 'commit', 'wall_time_s', 'seeds']


def summary_rows(results):
    """One row per (dataset, variant, image side, metric, bits, direction) over the seeds.
    Runs that recorded full mAP get mAP@all rows beside their mAP@TOPK rows."""
    groups = {}
    for r in results:
        metrics = [f"mAP@{r.get('topk', 50)}"]
        if r.get('map_all_i2t') is not None:
            metrics.append('mAP@all')
        for name in metrics:
            for direction in DIRECTIONS:
                key = (r['dataset'], r.get('variant', 'DJSRH'), image_side(r), name,
                       r['code_len'], direction)
                groups.setdefault(key, []).append(r)
    rows = []
    for key in sorted(groups, key=sort_key):
        dataset, variant, side, name, bits, direction = key
        runs = groups[key]
        value = f"map_all_{direction}" if name == 'mAP@all' else f"map_{direction}"
        mean, std = mean_std([r[value] for r in runs])
        on_features = bool(runs[0].get('image_features'))
        # The paper's numbers are mAP@50 on images; UCCH's are full mAP on features.
        paper = PAPER.get((dataset, variant, bits, direction)) \
            if name == 'mAP@50' and not on_features else None
        ucch = UCCH_DJSRH.get(dataset, {}).get(direction) \
            if name == 'mAP@all' and on_features and variant == 'DJSRH' and bits in BITS \
            else None
        walls = [r['wall_time_s'] for r in runs if r.get('wall_time_s') is not None]
        rows.append(dict(
            dataset=dataset, variant=variant, bits=bits, task=DIRECTION_NAMES[direction],
            metric=name, n=len(runs), mean=mean, std=std, paper=paper,
            diff=None if paper is None else mean - paper,
            ucch=None if ucch is None else ucch[BITS.index(bits)], backbone=side,
            commit=commits(runs), wall_time_s=statistics.fmean(walls) if walls else None,
            seeds=' '.join(str(s) for s in sorted(r.get('seed', '?') for r in runs))))
    return rows


def image_side(results):
    """The backbone on images; on stored features, where the features came from."""
    source = results.get('image_features')
    if not source:
        return results.get('backbone', '?')
    return f"{source} features" if source in settings.PUBLISHED_LAYOUTS else \
        f"features {Path(source).name}"


def commits(runs):
    """The short commit(s) the runs were made at ('dirty' marks survive)."""
    found = sorted({str(r.get('commit') or '?')[:12] for r in runs})
    return ', '.join(found)


def markdown_table(rows):
    header = ['dataset', 'variant', 'bits', 'task', 'ours: mean ± std (n)', 'paper', 'diff',
              'UCCH: DJSRH on features', 'metric', 'backbone', 'commit', 'wall time / run']
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for row in rows:
        std = '-' if row['std'] is None else f"{row['std']:.3f}"
        cells = [row['dataset'], row['variant'], str(row['bits']), row['task'],
                 f"{row['mean']:.3f} ± {std} (n={row['n']})",
                 '-' if row['paper'] is None else f"{row['paper']:.3f}",
                 '-' if row['diff'] is None else f"{row['diff']:+.3f}",
                 '-' if row['ucch'] is None else f"{row['ucch']:.3f}",
                 row['metric'], row['backbone'], row['commit'],
                 format_duration(row['wall_time_s'])]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'


def learning_table(results):
    """Per run that evaluated its untrained networks (the demo): untrained -> trained mAP
    and the distinct database codes, which show a collapse the mean alone can hide."""
    runs = [r for r in results if 'untrained_map_i2t' in r]
    if not runs:
        return ''
    runs.sort(key=lambda r: (sort_key((r['dataset'], r.get('variant', 'DJSRH'),
                                       image_side(r), r.get('topk', 50),
                                       r['code_len'], 'i2t')), r.get('seed', 0)))
    lines = ['| dataset | variant | images | bits | seed | I->T untrained -> trained | '
             'T->I untrained -> trained | distinct image / text codes |', '|' + '---|' * 8]
    for r in runs:   # 'images': the backbone, or where the features came from
        cells = [r['dataset'], r.get('variant', 'DJSRH'), image_side(r), str(r['code_len']),
                 str(r.get('seed', '?'))]
        for d in DIRECTIONS:
            before, after = r[f'untrained_map_{d}'], r[f'map_{d}']
            cells.append(f"{before:.3f} -> {after:.3f} ({after - before:+.3f})")
        cells.append(f"{r.get('distinct_img_codes', '?')} / {r.get('distinct_txt_codes', '?')}")
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'


def recall_table(results, runs_dir):
    """Per run without labels (no mAP): the own-pair recall@1/5/10 and median rank."""
    lines = ['| run | dataset | bits | seed | I->T R@1 / 5 / 10 | I->T median rank | '
             'T->I R@1 / 5 / 10 | T->I median rank |', '|' + '---|' * 8]
    for r in results:
        cells = [str(Path(r['run_dir']).relative_to(runs_dir)), r['dataset'],
                 str(r['code_len']), str(r.get('seed', '?'))]
        for d in DIRECTIONS:
            cells += [' / '.join(f"{r[f'recall_{d}'][k]:.3f}" for k in RECALL_AT),
                      f"{r[f'median_rank_{d}']:g}"]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'


def write_csv(rows, path):
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=ROW_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: '' if v is None else v for k, v in row.items()})


def summarize(args):
    runs_dir = Path(args.runs_dir)
    if not runs_dir.is_dir():
        what = 'is a file' if runs_dir.exists() else 'no such folder'
        raise settings.UserError(f"{runs_dir}: {what}; expected the folder of the runs "
                                 f"(--out-dir of the grid)")
    found = load_results(runs_dir)
    if not found:
        raise settings.UserError(f"{runs_dir}: no results.json found under it")
    unlabelled = [r for r in found if without_labels(r)]
    results = [r for r in found if not without_labels(r)]
    rows = summary_rows(results)
    prefix = out_prefix(args.out) if args.out else runs_dir / 'summary'
    note = ('ours: mAP over seeds, mean ± sample standard deviation (ddof=1; "-" for one '
            "run); paper: the paper's Tables 1 and 2 (mAP@50, images); UCCH: DJSRH on VGG-19 "
            "fc7 features as UCCH's README and paper report it (full mAP, UCCH's split); "
            "diff = ours - paper; "
            'wall time: mean per run.\n')
    text = markdown_table(rows)
    learning = learning_table(results)
    if learning:
        note += ('\nEach run that evaluated its untrained networks (mAP@TOPK, and the '
                 'distinct codes among the database items after training):\n\n' + learning)
    if unlabelled:
        note += ('\nRuns on data without labels, so without mAP (the own-pair recall@K and '
                 'median rank among the query pairs, docs/custom.md):\n\n'
                 + recall_table(unlabelled, runs_dir))
    md, csv_path = Path(f'{prefix}.md'), Path(f'{prefix}.csv')
    try:
        prefix.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(text + '\n' + note)
        write_csv(rows, csv_path)
    except OSError as err:
        raise settings.UserError(f"--out {prefix}: cannot write {md} and {csv_path} "
                                 f"({type(err).__name__}: {err})") from None
    print(text + '\n' + note + f'written: {md}, {csv_path}')
    return 0


def out_prefix(out):
    """--out PREFIX writes PREFIX.md and PREFIX.csv; 'x.md' or 'x.csv' is taken as 'x'."""
    prefix = Path(out)
    if prefix.suffix in ('.md', '.csv'):
        prefix = prefix.with_suffix('')
    if prefix.is_dir() or out.endswith(('/', '\\')):
        raise settings.UserError(f"--out {out}: is a folder; expected a file prefix such as "
                                 f"{prefix / 'summary'} (writes summary.md and summary.csv)")
    return prefix


# ===== command line =====
OVERRIDE = re.compile(r'^[A-Za-z_][A-Za-z0-9_]*=')


def run_parser():
    p = settings.ArgumentParser(
        prog='reproduce.py', description='Run a grid of train.py cells (resumable). '
        'See also: reproduce.py summary RUNS_DIR.')
    # extend: '--table demo --table 2' is both, as '--table demo 2' (it kept the last alone)
    p.add_argument('--table', nargs='+', action='extend',
                   choices=['2', '1', 'demo', 'features'],
                   help="which grid: '2' (datasets x bits), '1' (NUS-WIDE ablation), "
                        "'demo' (DEMO x 16, 32, 64, 128 bits), 'features' (UCCH's feature files of "
                        "MIRFlickr, NUS-WIDE, IAPR TC-12, MS-COCO x bits; PUBLISHED=UCCH "
                        "unless given); default: 2 then 1, or 2 alone when --datasets, "
                        "--variants or --bits is given")
    p.add_argument('--datasets', nargs='+', action='extend', choices=list(settings.PRESETS),
                   help="these datasets instead of the table's")
    p.add_argument('--variants', nargs='+', action='extend', choices=list(settings.VARIANTS),
                   help="these variants instead of the table's")
    p.add_argument('--bits', nargs='+', action='extend', type=int,
                   help="these code lengths instead of the table's")
    p.add_argument('--seeds', type=int, default=3, help="seeds 0..N-1 per cell (default 3)")
    p.add_argument('--out-dir', default=settings.OUT_DIR,
                   help=f"runs go to OUT_DIR/RUN_NAME (default {settings.OUT_DIR})")
    p.add_argument('--max-cells', type=int, help="stop after running this many cells")
    p.add_argument('--quiet', action='store_true',
                   help="send train.py's output to <run dir>/train.log")
    p.add_argument('--dry-run', action='store_true', help="print the commands, run nothing")
    p.add_argument('--plan', action='store_true',
                   help="print the runs, whether the data is there, and the time (measured "
                        "on this device), disk and memory they will take; run nothing")
    p.epilog = ("Any KEY=VALUE argument is passed on to every train.py "
                "(e.g. BACKBONE=alexnet NUM_WORKERS=4).")
    return p


def summary_parser():
    p = settings.ArgumentParser(
        prog='reproduce.py summary',
        description='Tabulate every results.json under RUNS_DIR beside the paper.')
    p.add_argument('runs_dir', metavar='RUNS_DIR')
    p.add_argument('--out', help="output prefix: writes PREFIX.md and PREFIX.csv "
                                 "(default RUNS_DIR/summary)")
    return p


def main(argv):
    """The command line; output cut short by the reader (`| head`) ends it quietly."""
    try:
        return command(argv)
    except BrokenPipeError:
        # Python would complain again when it flushes stdout at exit: point it at nothing.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


# More seeds than this is a typo: the paper's means are over a few, and a grid of millions
# of cells would take minutes to list before anything is checked.
MAX_SEEDS = 1000


def check_run_args(args):
    """The options' ranges, and --out-dir a folder (or none yet), before anything runs."""
    if not 1 <= args.seeds <= MAX_SEEDS:
        raise settings.UserError(f"--seeds {args.seeds}: expected 1 to {MAX_SEEDS}")
    if args.max_cells is not None and args.max_cells < 1:
        raise settings.UserError(f"--max-cells {args.max_cells}: expected at least 1 "
                                 f"(--dry-run runs none)")
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise settings.UserError(f"--out-dir {args.out_dir}: is a file; expected the folder "
                                 f"the runs go to")


def command(argv):
    if argv and argv[0] == 'summary':
        return summarize(summary_parser().parse_args(argv[1:]))
    if argv and argv[0] == 'run':
        argv = argv[1:]
    # KEY=VALUE arguments are taken out first, so that '--bits 16 64 NUM_EPOCH=1' works.
    overrides = [a for a in argv if OVERRIDE.match(a)]
    args = run_parser().parse_args([a for a in argv if not OVERRIDE.match(a)])
    args.overrides = overrides
    if args.table is None:
        given = args.datasets or args.variants or args.bits
        args.table = ['2'] if given else ['2', '1']
    args.table = list(dict.fromkeys(args.table))   # '--table 2 2' is Table 2 once
    check_run_args(args)
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        return run_grid(args)
    except KeyboardInterrupt:
        print('\ninterrupted; run the same command again to resume', file=sys.stderr)
        return 130
    except Terminated:
        print('terminated: the grid stopped, and its train.py with it (the last checkpoint '
              'stays); run the same command again to resume', file=sys.stderr)
        return 143
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == '__main__':
    sys.exit(settings.run_cli(main, sys.argv[1:]))
