"""train.py end to end on a tiny generated dataset: the run directory's files, EVAL, resume
after SIGKILL, Ctrl-C, a full disk, the lock, and the bad-input table. Runs go in-process
(train.main) except where only a second process shows the point (SIGKILL, the command line).
Interruptions are driven by events (a printed line, a step counter), never by a clock."""
import errno
import gc
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
from contextlib import redirect_stdout
from io import StringIO

import numpy as np
import pytest
import torch

import datasets
import dcmh
import demo
import metric
import models
import settings
import train
from conftest import config, hold_lock, release

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = 2
STEPS = 3   # batches an epoch: 96 pairs give 48 training pairs, in batches of 16


@pytest.fixture(scope='module', autouse=True)
def restore_torch_flags():
    """DETERMINISTIC=True switches torch's deterministic mode on in this process: switch it
    back for the other test modules."""
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """A 96-pair demo dataset (9 query, 48 train, 87 database) and the settings of a run that
    takes seconds, on the CPU: the exact comparisons below are the CPU's (a GPU machine
    running the suite would train on its GPU otherwise)."""
    base = tmp_path_factory.mktemp('tiny')
    demo.make_demo(str(base / 'demo'), n_pairs=96)
    args = ['DATASET=DEMO', f"DATA_DIR={str(base / 'demo')!r}", 'BATCH_SIZE=16', 'CODE_LEN=16',
            f'NUM_EPOCH={EPOCHS}', 'EVAL_INTERVAL=1', 'NUM_WORKERS=0', 'EVAL_BATCH_SIZE=64',
            'DETERMINISTIC=True', 'SEED=3', "DEVICE='cpu'"]
    return base, args


def where(base, name):
    return [f"OUT_DIR={str(base / 'runs')!r}", f"RUN_NAME={name!r}"]


def train_here(args, base, name):
    """train.main in this process; returns what it printed."""
    out = StringIO()
    with redirect_stdout(out):
        train.main(args + where(base, name))
    return out.getvalue()


def cli(argv, capsys):
    """`python train.py argv` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        settings.run_cli(train.main, argv)
        code = 0
    except SystemExit as stop:   # `stop` is dropped at the block's end, and with it the
        code = stop.code         # traceback's frames: their session is freed at once
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(autouse=True)
def python_sigint_handler():
    """Each test starts from Python's own Ctrl-C handler, whatever pytest inherited (a shell
    starts background jobs with SIGINT ignored), and a run must leave it in place however
    it ended."""
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    signal.signal(signal.SIGINT, inherited)


@pytest.fixture(autouse=True)
def free_sessions():
    """A session holds about 1 GB (AlexNet, its frozen copy, gradients, momentum); one
    kept alive by a reference cycle (a traceback's frames) waits for the garbage collector.
    Collect after each test, so that the suite holds one session at a time."""
    yield
    gc.collect()


def one_line_error(err, *words):
    line = err.strip()
    assert '\n' not in line and line.startswith('error: '), err
    for word in words:
        assert word in line, line


def codes(run_dir):
    results = json.loads((run_dir / 'results.json').read_text())
    with np.load(run_dir / results['codes']) as z:
        return results, {k: z[k] for k in z.files}


def metrics(run_dir):
    lines = [json.loads(l) for l in (run_dir / 'metrics.jsonl').read_text().splitlines()]
    return ([l['epoch'] for l in lines if 'loss' in l],
            [l['epoch'] for l in lines if l.get('eval')])


def same_codes_as_reference(reference, run_dir):
    _, want = codes(reference)
    _, got = codes(run_dir)
    assert set(want) == set(got)
    for key in want:
        assert np.array_equal(want[key], got[key]), key


def temporaries(run_dir):
    return [p.name for p in run_dir.rglob('*') if train.TMP_MARK in p.name]


def stamp(path):
    """Identity of a file version: atomic writes replace the inode."""
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns, st.st_size


@pytest.fixture(scope='module')
def reference(tiny):
    """One uninterrupted run that the other tests compare against."""
    base, args = tiny
    stdout = train_here(args, base, 'ref')
    return base / 'runs' / 'ref', stdout


# ===== what a run writes =====

def test_run_directory_contents(tiny, reference):
    base, _ = tiny
    run_dir, stdout = reference
    assert f"run directory: {run_dir}" in stdout
    for name in ('settings.json', 'metrics.jsonl', 'results.json', 'timing.json', 'split.npz',
                 'checkpoint.pt'):
        assert (run_dir / name).exists(), name
    results, got = codes(run_dir)
    assert results['dataset'] == 'DEMO' and results['code_len'] == 16 and results['seed'] == 3
    assert results['epoch'] == EPOCHS and results['codes'] == f'codes/epoch_{EPOCHS:03d}.npz'
    # the reported mAP is metric.py's value on the saved codes, both ways
    assert results['map_i2t'] == metric.calculate_top_map(
        got['query_img'], got['db_txt'], got['query_labels'], got['db_labels'], 50)
    assert results['map_t2i'] == metric.calculate_top_map(
        got['query_txt'], got['db_img'], got['query_labels'], got['db_labels'], 50)
    assert 'untrained_map_i2t' in results and 'untrained_map_t2i' in results
    # the own-pair figures: metric.py's on the saved query codes, untrained ones too
    pairs = metric.pair_retrieval(got['query_img'], got['query_txt'])
    assert {k: results[k] for k in pairs} == pairs
    assert set(results['recall_i2t']) == {'1', '5', '10'}
    assert set(results['untrained_recall_t2i']) == {'1', '5', '10'}
    assert 'untrained_median_rank_i2t' in results
    # row i of the codes is pair query_index[i]: its labels are that pair's labels
    split = np.load(run_dir / 'split.npz')
    assert np.array_equal(got['query_index'], split['query'])
    assert np.array_equal(got['db_index'], split['database'])
    data = datasets.load(config('DEMO', base / 'demo'), verbose=False)
    assert np.array_equal(got['query_labels'], data.labels[got['query_index']])
    assert np.array_equal(got['db_labels'], data.labels[got['db_index']])
    assert got['query_img'].shape == (9, 16) and got['db_txt'].shape == (87, 16)
    assert set(np.unique(got['db_img'])) <= {-1, 1}
    assert not set(split['query']) & set(split['database'])
    saved = json.loads((run_dir / 'settings.json').read_text())
    assert saved['CODE_LEN'] == 16 and 'commit' in saved


def test_metrics_once_per_epoch_and_timing_adds_up(reference):
    run_dir, _ = reference
    lines = [json.loads(l) for l in (run_dir / 'metrics.jsonl').read_text().splitlines()]
    epochs = [l for l in lines if 'loss' in l]
    evals = [l for l in lines if l.get('eval')]
    assert [l['epoch'] for l in epochs] == list(range(1, EPOCHS + 1))
    assert [l['epoch'] for l in evals] == [0, 1, 2]   # untrained, then every epoch
    assert evals[0]['untrained'] and not any(l.get('untrained') for l in evals[1:])
    timing = json.loads((run_dir / 'timing.json').read_text())
    # Every second is counted once: epochs (pairs / speed) and every evaluation, the
    # untrained one included.
    train_s = sum(STEPS * 16 / l['images_per_s'] for l in epochs)
    eval_s = sum(l['eval_time_s'] for l in evals)
    assert timing['train_time_s'] == pytest.approx(train_s, abs=0.051)
    assert timing['eval_time_s'] == pytest.approx(eval_s, abs=0.051)
    assert timing['wall_time_s'] == pytest.approx(train_s + eval_s, abs=0.11)


def test_final_checkpoint_keeps_only_the_networks(reference):
    run_dir, _ = reference
    state = torch.load(run_dir / 'checkpoint.pt', weights_only=True)
    assert set(state) >= {'img_net', 'txt_net', 'settings', 'split', 'epoch', 'evals'}
    assert not set(state) & {'opt_img', 'opt_txt', 'rng'}   # KEEP_OPTIMIZER=False
    assert state['epoch'] == EPOCHS


# How far EVAL=True's mAP@50 may be from the run's own final one, and the share of code
# bits that must agree. The CPU repeats its arithmetic exactly. On CUDA, cudnn.benchmark
# chooses its convolution algorithms anew in each process, and another algorithm rounds
# otherwise (~1e-6 relative): an H within that of 0 changes sign, and with 16 bits and 87
# database items one flipped bit moves items in the ranking. A bound we chose, not measured.
EVAL_TOLERANCE = {'cpu': (0.0, 1.0), 'cuda': (0.05, 0.99)}


def same_evaluation(run_dir, device):
    """eval.json and its codes against the run's results.json and final codes."""
    results, final_codes = codes(run_dir)
    evaluated = json.loads((run_dir / 'eval.json').read_text())
    tolerance, agree = EVAL_TOLERANCE[device]
    for key in ('map_i2t', 'map_t2i'):
        assert abs(evaluated[key] - results[key]) <= tolerance, key
    with np.load(run_dir / evaluated['codes']) as z:
        for key in final_codes:
            assert np.mean(z[key] == final_codes[key]) >= agree, key


def test_eval_reproduces_final_map(tiny, reference, capsys):
    base, args = tiny
    run_dir, _ = reference
    before = stamp(run_dir / 'results.json')
    code, out, _ = cli(args + ['EVAL=True'] + where(base, 'ref'), capsys)
    assert code == 0 and 'I->T' in out
    same_evaluation(run_dir, 'cpu')
    assert stamp(run_dir / 'results.json') == before   # EVAL does not touch results.json


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_eval_reproduces_final_map_on_cuda(tiny):
    """As above on the GPU, cudnn.benchmark on: training and EVAL=True in two processes."""
    base, args = tiny
    argv = [a for a in args if not a.startswith(('DETERMINISTIC', 'DEVICE'))]
    argv += ["DEVICE='cuda'", 'DETERMINISTIC=False', *where(base, 'cuda')]
    for extra in ([], ['EVAL=True']):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), *argv, *extra],
                              cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
    same_evaluation(base / 'runs' / 'cuda', 'cuda')


def test_finished_run_is_reported_not_redone(tiny, reference, capsys):
    base, args = tiny
    run_dir, _ = reference
    results = json.loads((run_dir / 'results.json').read_text())
    before = {name: stamp(run_dir / name) for name in ('results.json', 'metrics.jsonl',
                                                       'checkpoint.pt', 'timing.json')}
    # a kill mid-write left temporaries (their names carry the dead process's id)
    (run_dir / 'checkpoint.pt.tmp999999').write_bytes(b'half a checkpoint')
    (run_dir / 'codes' / 'epoch_001.npz.tmp999999').write_bytes(b'half the codes')
    code, out, _ = cli(args + where(base, 'ref'), capsys)
    assert code == 0
    assert 'finished already at epoch 2' in out and f"{results['map_i2t']:.4f}" in out
    assert 'resumed' not in out
    assert {name: stamp(run_dir / name) for name in before} == before
    assert temporaries(run_dir) == []
    # training on needs the optimiser state, which the finished run did not keep
    code, _, err = cli(args + where(base, 'ref') + ['NUM_EPOCH=3'], capsys)
    assert code == 2
    one_line_error(err, 'no optimiser state', 'KEEP_OPTIMIZER')


def test_outputs_without_a_checkpoint_are_refused(tiny, reference, tmp_path, capsys):
    """A finished run whose checkpoint was deleted, run again for more epochs, and a folder
    of the user's given as RUN_NAME: one line, nothing written. What a start killed before
    its first checkpoint leaves is started over."""
    base, args = tiny
    runs = tmp_path / 'runs'
    deleted = runs / 'deleted'
    shutil.copytree(reference[0], deleted)
    (deleted / 'checkpoint.pt').unlink()
    mine = runs / 'mine'
    (mine / 'codes').mkdir(parents=True)
    (mine / 'codes' / 'epoch_001.npz').write_bytes(b'my codes')
    (mine / 'metrics.jsonl').write_text('{"epoch": 1, "loss": 0.5}\n')
    (mine / 'eval.json').write_text('{}')
    def files(folder):   # the lock file apart: taking the lock writes the taker's id
        return {p: stamp(p) for p in folder.rglob('*') if p.name != train.LOCK_NAME}
    for folder, extra in ((deleted, ['NUM_EPOCH=3']), (mine, [])):
        before = files(folder)
        code, _, err = cli(args + extra + [f"OUT_DIR={str(runs)!r}", f"RUN_NAME={folder.name!r}"],
                           capsys)
        assert code == 2
        one_line_error(err, str(folder), 'no checkpoint', 'RESUME=False')
        assert files(folder) == before
    assert not (mine / train.LOCK_NAME).exists()
    killed = runs / 'killed_at_start'
    (killed / 'codes').mkdir(parents=True)
    for name in ('settings.json', 'split.npz', 'codes/epoch_000.npz'):
        shutil.copy(reference[0] / name, killed / name)
    untrained = (reference[0] / 'metrics.jsonl').read_text().splitlines()[0]
    assert json.loads(untrained)['untrained']
    (killed / 'metrics.jsonl').write_text(untrained + '\n')
    run = train.Run(settings.resolve(args + [f"OUT_DIR={str(runs)!r}", "RUN_NAME='killed_at_start'"]))
    run.refuse_outputs_without_checkpoint()   # ours, from before the first checkpoint
    (killed / 'timing.json').write_text('{}')
    with pytest.raises(settings.UserError, match='timing.json'):
        run.refuse_outputs_without_checkpoint()


def test_run_directory_lock(tiny, reference, capsys):
    base, args = tiny
    run_dir, _ = reference
    holder = hold_lock(run_dir / train.LOCK_NAME)
    try:
        code, _, err = cli(args + where(base, 'ref'), capsys)
        assert code == 2
        one_line_error(err, 'in use by another train.py', str(run_dir), f'process {holder.pid}')
    finally:
        release(holder)   # the OS releases the lock with the process
    # a lock file that names a process which has ended (the holder has not yet written
    # its own id): said so, not "in use by process N"
    ended = subprocess.Popen([sys.executable, '-c', 'pass'])
    ended.wait()
    holder = hold_lock(run_dir / train.LOCK_NAME, names_pid=ended.pid)
    try:
        code, _, err = cli(args + where(base, 'ref'), capsys)
        assert code == 2
        one_line_error(err, str(run_dir), f'process {ended.pid}, which has ended')
    finally:
        release(holder)
    code, out, _ = cli(args + where(base, 'ref'), capsys)
    assert code == 0 and 'finished already' in out


# ===== learning =====

def test_a_few_steps_on_one_batch_lower_the_loss(tiny):
    base, _ = tiny
    # Plain gradient descent (no momentum) with small steps, dropout off: the loss of the
    # same batch must fall at every step, and clearly over five.
    cfg = config('DEMO', base / 'demo', BATCH_SIZE=8, CODE_LEN=16, RESIZE=72, SEED=3,
                 LR_IMG=1e-4, LR_TXT=1e-3, MOMENTUM=0.0)
    session = train.Session(cfg, datasets.load(cfg, verbose=False))
    loader = datasets.make_loader(session.data, 'train', cfg,
                                  generator=torch.Generator().manual_seed(0))
    images, texts, _, _ = next(iter(loader))
    session.img_net.eval()
    session.txt_net.eval()
    losses = [session.train_step(images, texts).item() for _ in range(6)]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.85 * losses[0], losses


# ===== interruptions: SIGKILL, Ctrl-C, a full disk =====

def test_sigkill_then_resume_gives_identical_results(tiny, reference):
    """A true second process, killed as soon as it prints its first epoch (during the
    evaluation or the save that follow): the resume ends with the same files."""
    base, args = tiny
    cmd = [sys.executable, os.path.join(ROOT, 'train.py'), *args, *where(base, 'killed')]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, 'PYTHONUNBUFFERED': '1'})
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith('epoch 1/'):
            proc.kill()
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, ''.join(seen)
    run_dir = base / 'runs' / 'killed'
    assert not (run_dir / 'results.json').exists()
    # the killed process held the lock: the OS released it, the resume takes it
    stdout = train_here(args + ['KEEP_OPTIMIZER=True'], base, 'killed')
    assert 'resumed from' in stdout
    same_codes_as_reference(reference[0], run_dir)
    assert (run_dir / 'results.json').read_bytes() == (reference[0] / 'results.json').read_bytes()
    assert metrics(run_dir) == ([1, 2], [0, 1, 2])
    assert temporaries(run_dir) == []
    state = torch.load(run_dir / 'checkpoint.pt', weights_only=True)
    assert {'opt_img', 'opt_txt', 'rng'} <= set(state)   # KEEP_OPTIMIZER=True


# train.py with a line printed after each batch: the event a kill in mid-epoch waits for.
PRINTS_BATCHES = """
import sys
import settings, train
real = train.Session.train_step
def train_step(self, images, texts):
    loss = real(self, images, texts)
    print('trained a batch', flush=True)
    return loss
train.Session.train_step = train_step
settings.run_cli(train.main, sys.argv[1:])
"""


@pytest.mark.slow   # three DEMO runs, one with a worker: 19 s
def test_sigkill_mid_epoch_with_workers_then_immediate_resume(tiny):
    """Killed in the middle of an epoch while its loader worker lives: started again at
    once, the run takes the lock (the orphaned worker never held it), resumes, and ends
    with the results of an uninterrupted run with the same worker count (one epoch: the
    worker's random crops differ from those drawn in the main process)."""
    base, args = tiny
    args = args + ['NUM_WORKERS=1', 'EVAL_UNTRAINED=False', 'NUM_EPOCH=1']
    train_here(args, base, 'workers_ref')
    cmd = [sys.executable, '-c', PRINTS_BATCHES, *args, *where(base, 'workers_killed')]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, 'PYTHONPATH': ROOT})
    seen, batches = [], 0
    for line in proc.stdout:
        seen.append(line)
        batches += line.startswith('trained a batch')
        if batches == 2:   # two of the epoch's three batches
            proc.kill()
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, ''.join(seen)
    stdout = train_here(args, base, 'workers_killed')
    assert 'resumed from' in stdout and 'at epoch 0, step 0' in stdout
    run_dir = base / 'runs' / 'workers_killed'
    same_codes_as_reference(base / 'runs' / 'workers_ref', run_dir)
    assert ((run_dir / 'results.json').read_bytes()
            == (base / 'runs' / 'workers_ref' / 'results.json').read_bytes())
    assert metrics(run_dir) == ([1], [1])


def interrupt_at_step(monkeypatch, step):
    """Ctrl-C (a real SIGINT to this process) right after the step-th batch trained here."""
    real = train.Session.train_step
    count = itertools.count(1)

    def train_step(self, images, texts):
        loss = real(self, images, texts)
        if next(count) == step:
            signal.raise_signal(signal.SIGINT)
        return loss
    monkeypatch.setattr(train.Session, 'train_step', train_step)


class FailingWriter:
    """A file whose third write does `action` first: torch.save, writing through it, then
    fails with a RuntimeError of its own ("unexpected pos")."""

    def __init__(self, f, action):
        self.f, self.action, self.writes = f, action, 0

    def write(self, data):
        self.writes += 1
        if self.writes == 3:
            self.action()
        return self.f.write(data)

    def flush(self):
        return self.f.flush()


def fail_save(monkeypatch, call, action):
    """Make the call-th torch.save of this run do `action` in the middle of writing."""
    real, count = torch.save, itertools.count(1)

    def save(obj, f):
        return real(obj, FailingWriter(f, action) if next(count) == call else f)
    monkeypatch.setattr(torch, 'save', save)


def disk_full():
    raise OSError(errno.ENOSPC, 'No space left on device')


@pytest.mark.slow   # a run stopped twice and resumed: 16 s
def test_full_disk_then_ctrl_c_twice_then_resume_is_exact(tiny, reference, capsys):
    base, args = tiny
    argv = args + where(base, 'faults')
    run_dir = base / 'runs' / 'faults'
    ckpt = run_dir / 'checkpoint.pt'

    # 1. The disk fills up while the checkpoint after epoch 1 is written (the first save is
    #    the one before training): one line, the epoch-0 checkpoint intact.
    with pytest.MonkeyPatch.context() as mp:
        fail_save(mp, 2, disk_full)
        code, _, err = cli(argv, capsys)
    assert code == 2
    one_line_error(err, 'no space left', str(ckpt), 'previous checkpoint')
    assert torch.load(ckpt, weights_only=True)['epoch'] == 0
    assert temporaries(run_dir) == []
    assert metrics(run_dir) == ([1], [0, 1])   # written before the save that failed

    # 2. Resumed, Ctrl-C after the second batch of epoch 1: saved there, exit 130.
    with pytest.MonkeyPatch.context() as mp:
        interrupt_at_step(mp, 2)
        code, out, err = cli(argv, capsys)
    assert code == 130 and 'interrupted: saved' in out and err == ''
    state = torch.load(ckpt, weights_only=True)
    assert (state['epoch'], state['step']) == (0, 2)
    assert metrics(run_dir) == ([], [0])   # the lines of the failed attempt are gone
    saved = stamp(ckpt)

    # 3. Resumed, Ctrl-C after one more batch, and again while that checkpoint is written:
    #    stopped at once, one line, the previous checkpoint intact.
    with pytest.MonkeyPatch.context() as mp:
        interrupt_at_step(mp, 1)
        fail_save(mp, 1, lambda: signal.raise_signal(signal.SIGINT))
        code, _, err = cli(argv, capsys)
    assert code == 130 and err.count('\n') == 1 and err.startswith('interrupted')
    assert stamp(ckpt) == saved and temporaries(run_dir) == []

    # 4. Resumed to the end: the same codes as the uninterrupted run, each epoch once.
    code, out, _ = cli(argv, capsys)
    assert code == 0 and 'resumed from' in out and 'epoch 0, step 2' in out
    same_codes_as_reference(reference[0], run_dir)
    assert metrics(run_dir) == ([1, 2], [0, 1, 2])


def test_full_disk_at_the_first_checkpoint_leaves_no_run_folder(tiny, tmp_path, capsys):
    base, args = tiny
    argv = args + [f"OUT_DIR={str(tmp_path / 'runs')!r}", "RUN_NAME='full'"]
    with pytest.MonkeyPatch.context() as mp:
        fail_save(mp, 1, disk_full)
        code, _, err = cli(argv, capsys)
    assert code == 2
    one_line_error(err, 'no space left', 'checkpoint.pt')
    assert not (tmp_path / 'runs').exists()   # settings, split, untrained codes: all gone
    (tmp_path / 'runs' / 'full').mkdir(parents=True)   # a folder that was there before stays
    with pytest.MonkeyPatch.context() as mp:
        fail_save(mp, 1, disk_full)
        code, _, err = cli(argv, capsys)
    assert code == 2 and list((tmp_path / 'runs' / 'full').iterdir()) == []


def test_ctrl_c_while_loading_or_in_the_untrained_evaluation(tiny, monkeypatch, capsys):
    base, args = tiny
    run_dir = base / 'runs' / 'ctrl_c'

    def ctrl_c(*a, **k):   # Ctrl-C outside the loop: Python's own handler raises this
        raise KeyboardInterrupt
    monkeypatch.setattr(datasets, 'load', ctrl_c)
    code, _, err = cli(args + where(base, 'ctrl_c'), capsys)
    assert code == 130 and err.count('\n') == 1 and 'interrupted' in err
    assert not run_dir.exists()   # a failed start leaves no empty run folder
    monkeypatch.undo()
    monkeypatch.setattr(train.Session, 'encode', ctrl_c)
    code, _, err = cli(args + where(base, 'ctrl_c'), capsys)
    assert code == 130 and err.count('\n') == 1 and 'interrupted' in err
    assert not (run_dir / 'checkpoint.pt').exists() and temporaries(run_dir) == []


# ===== errors: a user's mistake is one line, a bug keeps its traceback =====

def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    def bug(*args, **kwargs):
        return 1 / 0
    path = tmp_path / 'checkpoint.pt'
    path.write_bytes(b'anything')
    monkeypatch.setattr(torch, 'load', bug)
    with pytest.raises(ZeroDivisionError):
        train.read_checkpoint(str(path))
    with pytest.raises(ZeroDivisionError):
        models.build_backbone('alexnet', True, str(path))


def test_non_finite_loss_stops_and_keeps_checkpoint(tiny, tmp_path, capsys):
    base, args = tiny
    argv = args + ['LR_IMG=1e30', 'LR_TXT=1e30', 'EVAL_UNTRAINED=False',
                   f"OUT_DIR={str(tmp_path)!r}", "RUN_NAME='diverged'"]
    code, _, err = cli(argv, capsys)
    assert code == 2
    one_line_error(err, 'loss is', 'epoch 1', 'LR_IMG')
    state = torch.load(tmp_path / 'diverged' / 'checkpoint.pt', weights_only=True)
    assert state['epoch'] == 0 and state['step'] == 0   # the good starting checkpoint
    assert all(torch.isfinite(v).all() for v in state['img_net'].values())


def copy_data(tiny, tmp_path, how):
    """The tiny dataset with one thing spoiled."""
    import scipy.io
    base, _ = tiny
    folder = tmp_path / 'data'
    shutil.copytree(base / 'demo', folder)
    yall, lall = folder / 'mirflickr25k-yall.mat', folder / 'mirflickr25k-lall.mat'
    texts = scipy.io.loadmat(yall)['YAll']
    labels = scipy.io.loadmat(lall)['LAll']
    if how == 'labels':
        labels[0, 0] = 2
        scipy.io.savemat(lall, {'LAll': labels})
    elif how == 'no_labels':
        scipy.io.savemat(lall, {'LAll': np.zeros_like(labels)})
    elif how == 'key':
        scipy.io.savemat(yall, {'XAll': texts})
    elif how == 'count':
        scipy.io.savemat(yall, {'YAll': texts[:-5]})
    elif how == 'zero_pairs':
        scipy.io.savemat(yall, {'YAll': texts[:0]})
        scipy.io.savemat(lall, {'LAll': labels[:0]})
        scipy.io.savemat(folder / 'mirflickr25k-iall.mat',
                         {'IAll': np.zeros((64, 64, 3, 0), np.uint8)})
    elif how == 'no_pixels':
        scipy.io.savemat(folder / 'mirflickr25k-iall.mat',
                         {'IAll': np.zeros((0, 0, 3, len(texts)), np.uint8)})
    elif how == 'corrupt_middle':
        import h5py
        from conftest import save_v73
        iall = folder / 'mirflickr25k-iall.mat'
        with h5py.File(iall, 'r') as f:   # MATLAB's order back: H x W x 3 x N
            images = np.transpose(f['IAll'][()])
        save_v73(iall, {'IAll': images})   # compressed, one image a chunk, as DCMH's are
        with h5py.File(iall, 'r') as f:   # spoil the stored bytes of image 47 of 96, next
            ds = f['IAll']                # to the middle one that the quick check reads
            middle = ds.id.get_chunk_info(ds.id.get_num_chunks() // 2 - 1)
        raw = bytearray(iall.read_bytes())
        raw[middle.byte_offset:middle.byte_offset + middle.size] = b'\xff' * middle.size
        iall.write_bytes(bytes(raw))
    return folder


def checkpoint_copy(reference, tmp_path, how):
    """A run directory holding the reference's settings and a spoiled checkpoint."""
    run_dir = tmp_path / 'runs' / 'copy'
    run_dir.mkdir(parents=True)
    shutil.copy(reference[0] / 'settings.json', run_dir)
    ckpt = run_dir / 'checkpoint.pt'
    if how == 'tensor':
        torch.save(torch.zeros(3), ckpt)
    elif how == 'foreign_dict':
        torch.save({'model': torch.zeros(3), 'epoch': 1}, ckpt)
    elif how == 'truncated':
        with open(reference[0] / 'checkpoint.pt', 'rb') as f:
            ckpt.write_bytes(f.read(100_000))
    elif how == 'text_width':   # written so, with its digest: another run's checkpoint
        state = torch.load(reference[0] / 'checkpoint.pt', weights_only=True)
        state['txt_net']['fc1.weight'] = state['txt_net']['fc1.weight'][:, :299].clone()
        state[train.DIGEST_KEY] = train.checkpoint_digest(state)
        torch.save(state, ckpt)
    elif how == 'changed_bytes':   # two bytes changed on disk inside a weight tensor
        raw = bytearray((reference[0] / 'checkpoint.pt').read_bytes())
        raw[len(raw) // 2] ^= 0x40
        raw[len(raw) // 2 + 4096] ^= 0x01
        ckpt.write_bytes(bytes(raw))
    return ckpt


def unreadable(path, monkeypatch):
    """As if this user had no read permission on path (tests may run as root, for whom
    chmod changes nothing)."""
    real = os.access
    monkeypatch.setattr(os, 'access', lambda p, mode, *a, **k:
                        False if str(p) == str(path) else real(p, mode, *a, **k))


# case -> (extra settings, words the one-line error must hold, setup). A setup gets
# (tiny, reference, tmp_path, monkeypatch) and returns more settings. Cases with their
# own RUN_NAME ('own') must not leave a run folder behind; the others run against the
# finished reference run, which must come out untouched.
OWN = ["OUT_DIR='{tmp}/runs'", "RUN_NAME='own'"]
BAD_INPUTS = {
    # settings outside their range
    'code_len_range': (['CODE_LEN=0'], ['CODE_LEN=0', 'from 1'], None),
    'batch_range': (['BATCH_SIZE=1'], ['BATCH_SIZE=1', 'at least 2'], None),
    'negative_lr': (['LR_IMG=-0.01'], ['LR_IMG=-0.01', 'at least 0'], None),
    'negative_momentum': (['MOMENTUM=-0.9'], ['MOMENTUM=-0.9'], None),
    'negative_weight_decay': (['WEIGHT_DECAY=-5e-4'], ['WEIGHT_DECAY'], None),
    'negative_split_seed': (['SPLIT_SEED=-1'], ['SPLIT_SEED=-1', 'from 0'], None),
    'huge_seed': (['SEED=1180591620717411303424'], ['SEED', '4294967295'], None),
    'infinite_lr': (['LR_TXT=1e999'], ['LR_TXT=inf'], None),
    'backbone_unknown': (["BACKBONE='resnet50'"], ['BACKBONE', 'vgg19'], None),
    'dataset_unknown': (["DATASET='CIFAR'"], ['DATASET', 'MIRFlickr'], None),
    'run_name_escapes': (["RUN_NAME='../ref2'"], ['RUN_NAME', "'..'"], None),
    'run_name_absolute': (["RUN_NAME='/tmp/elsewhere'"], ['RUN_NAME', 'relative'], None),
    # another experiment in the run directory
    'ckpt_code_len': (['CODE_LEN=32'], ['different experiment', 'CODE_LEN: 16'], None),
    'ckpt_backbone': (["BACKBONE='vgg19'"], ['different experiment', 'BACKBONE'], None),
    # files
    'pretrained_wrong_net': (OWN + ['PRETRAINED=True'], ['PRETRAINED_PATH', 'alexnet'],
                             lambda t, r, tmp, mp: [
                                 f"PRETRAINED_PATH={str(wrong_weights(tmp))!r}"]),
    'missing_files': (OWN + ["DATASET='MIRFlickr'"], ['mirflickr25k-', 'missing file'],
                      lambda t, r, tmp, mp: [f"DATA_DIR={str(tmp)!r}"]),
    'unreadable_file': (OWN, ['cannot read', 'mirflickr25k-lall.mat'],
                        lambda t, r, tmp, mp: (
                            unreadable(t[0] / 'demo' / 'mirflickr25k-lall.mat', mp)
                            or [f"DATA_DIR={str(t[0] / 'demo')!r}"])),
    'labels_not_binary': (OWN, ['LAll'], 'labels'),
    'labels_all_zero': (OWN, ['no query pair has a label', 'every mAP is 0'], 'no_labels'),
    'wrong_key': (OWN, ['YAll'], 'key'),
    'counts_disagree': (OWN, ['mirflickr25k-'], 'count'),
    'zero_pairs': (OWN, ['0 pairs'], 'zero_pairs'),
    'no_pixels': (OWN, ['0 x 0'], 'no_pixels'),
    'fewer_pairs_than_a_batch': (OWN + ['BATCH_SIZE=64'], ['BATCH_SIZE=64', '48 training'],
                                 lambda t, r, tmp, mp: [f"DATA_DIR={str(t[0] / 'demo')!r}"]),
    # DEMO never writes over anyone's files
    'demo_data_dir_is_a_file': (OWN, ['DATA_DIR', 'is a file'],
                                lambda t, r, tmp, mp: [f"DATA_DIR={str(a_file(tmp))!r}"]),
    'demo_data_dir_unwritable': (OWN, ['DATA_DIR', 'cannot write'],
                                 lambda t, r, tmp, mp: [
                                     f"DATA_DIR={str(a_file(tmp) / 'demo')!r}"]),
    # checkpoints that are not ours
    'ckpt_bare_tensor': (OWN[:1] + ["RUN_NAME='copy'"], ['not a checkpoint', 'Tensor'],
                         'ckpt:tensor'),
    'ckpt_foreign_dict': (OWN[:1] + ["RUN_NAME='copy'"], ['not a checkpoint', 'img_net'],
                          'ckpt:foreign_dict'),
    'ckpt_truncated': (OWN[:1] + ["RUN_NAME='copy'"], ['cannot be read', 'RESUME=False'],
                       'ckpt:truncated'),
    'ckpt_text_width': (OWN[:1] + ["RUN_NAME='copy'"], ['299-d', '300-d'], 'ckpt:text_width'),
    'ckpt_changed_bytes': (OWN[:1] + ["RUN_NAME='copy'"], ['checkpoint.pt', 'digest'],
                           'ckpt:changed_bytes'),
    'eval_ckpt_truncated': (OWN[:1] + ["RUN_NAME='copy'", 'EVAL=True'], ['cannot be read'],
                            'ckpt:truncated'),
    'eval_ckpt_changed_bytes': (OWN[:1] + ["RUN_NAME='copy'", 'EVAL=True'], ['digest'],
                                'ckpt:changed_bytes'),
}


def wrong_weights(tmp_path):
    path = tmp_path / 'txtnet.pth'
    torch.save(models.TxtNet(4, 8).state_dict(), path)
    return path


def a_file(tmp_path):
    path = tmp_path / 'a_file'
    path.write_text('not a folder')
    return path


@pytest.mark.parametrize('case', list(BAD_INPUTS))
def test_bad_input_one_line_and_nothing_damaged(tiny, reference, tmp_path, monkeypatch, capsys,
                                                case):
    base, args = tiny
    run_dir = reference[0]
    extra, words, setup = BAD_INPUTS[case]
    extra = [a.replace('{tmp}', str(tmp_path)) for a in extra]
    copy = tmp_path / 'runs' / 'copy'
    if isinstance(setup, str) and setup.startswith('ckpt:'):
        checkpoint_copy(reference, tmp_path, setup[5:])
    elif isinstance(setup, str):
        extra = extra + [f"DATA_DIR={str(copy_data(tiny, tmp_path, setup))!r}"]
    elif setup:
        extra = extra + setup(tiny, reference, tmp_path, monkeypatch)
    before = {name: stamp(run_dir / name) for name in ('checkpoint.pt', 'results.json')}
    demo_before = {p.name: stamp(p) for p in (base / 'demo').iterdir()}
    copy_before = {p.name: stamp(p) for p in copy.iterdir()} if copy.exists() else None
    code, _, err = cli(args + where(base, 'ref') + extra, capsys)
    assert code == 2
    one_line_error(err, *words)
    assert {name: stamp(run_dir / name) for name in before} == before
    assert {p.name: stamp(p) for p in (base / 'demo').iterdir()} == demo_before
    assert not (tmp_path / 'runs' / 'own').exists()   # a failed start leaves no folder
    if copy_before is not None:   # nor a lock file in the folder it refused
        assert {p.name: stamp(p) for p in copy.iterdir()} == copy_before


def test_loader_worker_error_is_one_line(tiny, tmp_path):
    """A corrupt block in the middle of IAll passes the load (no image is read there) and
    fails in a loader worker: the user sees the worker's one line, naming file and image.
    The run folder of this failed start is gone, and once the process has ended no pymp-*
    folder (multiprocessing's, made when a worker shares a tensor) is left in the temp
    directory, whatever the worker was doing when it was stopped."""
    base, args = tiny
    folder = copy_data(tiny, tmp_path, 'corrupt_middle')
    (tmp_path / 'tmp').mkdir()
    argv = args + [f"DATA_DIR={str(folder)!r}", 'NUM_WORKERS=2',
                   f"OUT_DIR={str(tmp_path / 'runs')!r}", "RUN_NAME='worker'"]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), *argv], cwd=ROOT,
                          capture_output=True, text=True,
                          env={**os.environ, 'TMPDIR': str(tmp_path / 'tmp')})
    assert proc.returncode == 2, proc.stderr[-2000:]
    one_line_error(proc.stderr, 'mirflickr25k-iall.mat', 'cannot read image')
    assert 'DataLoader worker' not in proc.stderr
    assert not (tmp_path / 'runs').exists()
    assert [p.name for p in (tmp_path / 'tmp').iterdir() if p.name.startswith('pymp-')] == []


WORKER_TEMP_DIRS = """
import json, multiprocessing.util, torch, datasets
class TempDir(torch.utils.data.Dataset):
    def __len__(self):
        return 4
    def __getitem__(self, i):
        return multiprocessing.util.get_temp_dir()
loader = torch.utils.data.DataLoader(TempDir(), batch_size=None, num_workers=2,
                                     multiprocessing_context=datasets.worker_context(2))
print(json.dumps({'workers': sorted(set(loader)), 'main': multiprocessing.util.get_temp_dir()}))
"""


def test_loader_workers_use_the_main_process_temp_folder(tmp_path):
    """The mechanism behind the test above, which a race hides: a worker that makes its own
    pymp-* folder leaves it behind when stopped mid-send, so every worker uses the main
    process's (in a fresh process, where nothing has made that folder yet)."""
    proc = subprocess.run([sys.executable, '-c', WORKER_TEMP_DIRS], cwd=ROOT,
                          capture_output=True, text=True,
                          env={**os.environ, 'PYTHONPATH': ROOT, 'TMPDIR': str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = json.loads(proc.stdout)
    assert found['workers'] == [found['main']] and found['main'].startswith(str(tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == []   # and it went with the process


def test_full_check_reads_every_image(tiny, tmp_path, capsys):
    folder = copy_data(tiny, tmp_path, 'corrupt_middle')
    argv = ['DATASET=DEMO', f"DATA_DIR={str(folder)!r}"]
    assert settings.run_cli(datasets.main, argv) == 0   # first, middle and last image: fine
    assert 'passes the check' in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        settings.run_cli(datasets.main, argv + ['FULL=True'])
    assert stop.value.code == 2
    one_line_error(capsys.readouterr().err, 'mirflickr25k-iall.mat', 'cannot read image 47')


def test_demo_never_overwrites_other_files(tmp_path, capsys):
    """A half-copied real MIRFlickr folder (two of the three files) used with DATASET=DEMO:
    refused, the files untouched. A previous DEMO (its marker) is regenerated."""
    real = tmp_path / 'mirflickr'
    real.mkdir()
    for name in dcmh.DCMH_FILES['MIRFlickr'][:2]:
        (real / name).write_bytes(b'3 GB of somebody\'s images')
    before = {p.name: p.read_bytes() for p in real.iterdir()}
    with pytest.raises(settings.UserError, match='not a generated DEMO'):
        datasets.load(config('DEMO', real), verbose=False)
    with pytest.raises(settings.UserError, match='not a generated DEMO'):
        demo.make_demo(str(real), n_pairs=40)   # prepare.py DATASET=DEMO's way in
    assert {p.name: p.read_bytes() for p in real.iterdir()} == before

    # files of the user's named like the generator's temporaries: refused, untouched
    tmps = tmp_path / 'tmps'
    tmps.mkdir()
    (tmps / 'mirflickr25k-iall.mat.tmp').write_bytes(b'mine')
    with pytest.raises(settings.UserError, match='mirflickr25k-iall.mat.tmp'):
        demo.make_demo(str(tmps), n_pairs=40)
    assert [p.name for p in tmps.iterdir()] == ['mirflickr25k-iall.mat.tmp']
    assert (tmps / 'mirflickr25k-iall.mat.tmp').read_bytes() == b'mine'

    folder = tmp_path / 'demo'
    demo.make_demo(str(folder), n_pairs=40)
    assert (folder / demo.DEMO_MARKER).exists()
    (folder / 'mirflickr25k-lall.mat').unlink()   # a previous DEMO, partly deleted
    ended = subprocess.Popen([sys.executable, '-c', 'pass'])
    ended.wait()   # what a generation killed mid-way leaves, and extract.py's features
    (folder / f'mirflickr25k-yall.mat.tmp{ended.pid}').write_bytes(b'half a file')
    (folder / 'demo-alexnet-random-fc7-64px.npy').write_bytes(b'features')
    data = datasets.load(config('DEMO', folder, BATCH_SIZE=4), verbose=False)
    assert len(data.labels) == demo.DEMO_PAIRS   # generated again, in full
    assert not (folder / f'mirflickr25k-yall.mat.tmp{ended.pid}').exists()
    assert (folder / 'demo-alexnet-random-fc7-64px.npy').read_bytes() == b'features'
    (folder / 'mirflickr25k-yall.mat').write_bytes(b'edited by hand')   # no longer ours
    (folder / 'mirflickr25k-iall.mat').unlink()
    with pytest.raises(settings.UserError, match='mirflickr25k-yall.mat'):
        datasets.load(config('DEMO', folder), verbose=False)
    assert (folder / 'mirflickr25k-yall.mat').read_bytes() == b'edited by hand'


def test_command_line_error_is_one_line():
    """A true command-line run: a mistake is one line on stderr, exit status 2, no
    traceback."""
    proc = subprocess.run([sys.executable, 'train.py', 'LEARNING_RATE=0.1'], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ''
    one_line_error(proc.stderr, 'LEARNING_RATE', 'CODE_LEN', 'BETA')
