"""End-to-end runs of train.py on a tiny generated dataset: files, EVAL, resume, bad input."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import datasets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = 2


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """A 160-pair demo dataset (16 query, 80 train, 144 database) and the settings of a run
    that takes seconds: 5 batches an epoch."""
    base = tmp_path_factory.mktemp('tiny')
    datasets.make_demo(str(base / 'demo'), n_pairs=160)
    args = ['DATASET=DEMO', f"DATA_DIR={str(base / 'demo')!r}", 'BATCH_SIZE=16', 'CODE_LEN=16',
            f'NUM_EPOCH={EPOCHS}', 'EVAL_INTERVAL=1', 'NUM_WORKERS=0', 'EVAL_BATCH_SIZE=64',
            'DETERMINISTIC=True', 'SEED=3']
    return base, args


def train_cmd(args, out, name):
    return [sys.executable, os.path.join(ROOT, 'train.py'), *args, f'OUT_DIR={str(out)!r}',
            f'RUN_NAME={name!r}']


def run(args, out, name, check=True):
    proc = subprocess.run(train_cmd(args, out, name), capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def codes(run_dir):
    with open(os.path.join(run_dir, 'results.json')) as f:
        results = json.load(f)
    with np.load(os.path.join(run_dir, results['codes'])) as z:
        return results, {k: z[k] for k in z.files}


@pytest.fixture(scope='module')
def reference(tiny):
    """One uninterrupted run that the other tests compare against."""
    base, args = tiny
    proc = run(args, base / 'runs', 'ref')
    return base / 'runs' / 'ref', proc.stdout


def test_run_directory_contents(reference):
    run_dir, stdout = reference
    assert f"run directory: {run_dir}" in stdout
    for name in ('settings.json', 'metrics.jsonl', 'results.json', 'split.npz', 'checkpoint.pt'):
        assert (run_dir / name).exists(), name
    results, got = codes(run_dir)
    assert results['dataset'] == 'DEMO' and results['code_len'] == 16 and results['seed'] == 3
    assert 0 <= results['map_i2t'] <= 1 and 0 <= results['map_t2i'] <= 1
    assert 'untrained_map_i2t' in results and 'untrained_map_t2i' in results
    assert got['query_img'].shape == (16, 16) and got['db_txt'].shape[1] == 16
    assert set(np.unique(got['db_img'])) <= {-1, 1}
    lines = [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]
    epochs = [line for line in lines if 'loss' in line]
    evals = [line for line in lines if line.get('eval')]
    assert [line['epoch'] for line in epochs] == list(range(1, EPOCHS + 1))
    assert all(line['images_per_s'] > 0 and np.isfinite(line['loss']) for line in epochs)
    assert [line['epoch'] for line in evals] == [0, 1, 2]   # untrained, then every epoch
    split = np.load(run_dir / 'split.npz')
    assert not set(split['query']) & set(split['database'])
    settings_saved = json.loads((run_dir / 'settings.json').read_text())
    assert settings_saved['CODE_LEN'] == 16 and 'commit' in settings_saved


def test_eval_reproduces_final_map(tiny, reference):
    base, args = tiny
    run_dir, _ = reference
    results, final_codes = codes(run_dir)
    proc = run(args + ['EVAL=True'], base / 'runs', 'ref')
    evaluated = json.loads((run_dir / 'eval.json').read_text())
    assert evaluated['map_i2t'] == results['map_i2t']
    assert evaluated['map_t2i'] == results['map_t2i']
    with np.load(run_dir / evaluated['codes']) as z:
        assert np.array_equal(z['query_img'], final_codes['query_img'])
        assert np.array_equal(z['db_txt'], final_codes['db_txt'])
    assert codes(run_dir)[0] == results   # EVAL does not touch results.json
    assert 'I->T' in proc.stdout


def test_same_seed_gives_identical_results(tiny, reference):
    base, args = tiny
    run(args, base / 'runs', 'again')
    first, first_codes = codes(reference[0])
    second, second_codes = codes(base / 'runs' / 'again')
    assert (reference[0] / 'results.json').read_bytes() == \
        (base / 'runs' / 'again' / 'results.json').read_bytes()
    assert (reference[0] / 'timing.json').exists()
    for key in first_codes:
        assert np.array_equal(first_codes[key], second_codes[key]), key


def wait_until(condition, proc, timeout=200):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError('training did not get there in time')


def wait_for_epoch_checkpoint(run_dir, proc):
    """Returns once the checkpoint written after epoch 1 is in place."""
    metrics, ckpt = run_dir / 'metrics.jsonl', run_dir / 'checkpoint.pt'
    wait_until(lambda: metrics.exists() and '"loss"' in metrics.read_text(), proc)
    logged = time.time()
    # the checkpoint is renamed into place after the epoch's metrics line is written
    wait_until(lambda: ckpt.stat().st_mtime >= logged - 0.01, proc)


def interrupted_run(tiny, name, sig):
    base, args = tiny
    out = base / 'runs'
    proc = subprocess.Popen(train_cmd(args, out, name), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_epoch_checkpoint(out / name, proc)
    time.sleep(1.0)   # part-way through epoch 2 (an epoch takes several seconds)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    return out / name, proc.returncode, stdout


def test_sigkill_mid_epoch_then_resume_gives_identical_codes(tiny, reference):
    run_dir, code, _ = interrupted_run(tiny, 'killed', signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert not (run_dir / 'results.json').exists()
    state = torch.load(run_dir / 'checkpoint.pt', weights_only=True)
    assert state['epoch'] == 1 and state['step'] == 0
    base, args = tiny
    proc = run(args, base / 'runs', 'killed')
    assert 'resumed from' in proc.stdout
    _, want = codes(reference[0])
    _, got = codes(run_dir)
    for key in want:
        assert np.array_equal(want[key], got[key]), key


def test_sigint_saves_mid_epoch_and_resume_is_exact(tiny, reference):
    run_dir, code, stdout = interrupted_run(tiny, 'interrupted', signal.SIGINT)
    assert code == 130, stdout
    state = torch.load(run_dir / 'checkpoint.pt', weights_only=True)
    assert state['epoch'] == 1 and state['step'] > 0       # saved part-way through epoch 2
    base, args = tiny
    run(args, base / 'runs', 'interrupted')
    _, want = codes(reference[0])
    _, got = codes(run_dir)
    for key in want:
        assert np.array_equal(want[key], got[key]), key


def test_resume_with_other_experiment_is_refused(tiny, reference):
    base, args = tiny
    run_dir = reference[0]
    before = (run_dir / 'checkpoint.pt').read_bytes()
    results = (run_dir / 'results.json').read_bytes()
    proc = run(args + ['CODE_LEN=32', 'BETA=0.7'], base / 'runs', 'ref', check=False)
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert '\n' not in line and 'CODE_LEN: 16' in line and 'BETA' in line
    assert (run_dir / 'checkpoint.pt').read_bytes() == before
    assert (run_dir / 'results.json').read_bytes() == results


def test_non_finite_loss_stops_and_keeps_checkpoint(tiny):
    base, args = tiny
    proc = run(args + ['LR_IMG=1e30', 'LR_TXT=1e30', 'EVAL_UNTRAINED=False'],
               base / 'runs', 'diverged', check=False)
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert '\n' not in line and 'loss is' in line and 'epoch 1' in line and 'LR_IMG' in line
    state = torch.load(base / 'runs' / 'diverged' / 'checkpoint.pt', weights_only=True)
    assert state['epoch'] == 0   # the good starting checkpoint, not a broken one
    assert all(torch.isfinite(v).all() for v in state['img_net'].values())


def broken_copy(tiny, tmp_path, name, how):
    """The tiny dataset with one file spoiled: labels not 0/1, a wrong key, or texts whose
    count of pairs disagrees with the images and labels."""
    import shutil
    import scipy.io
    base, _ = tiny
    folder = tmp_path / name
    shutil.copytree(base / 'demo', folder)
    yall, lall = folder / 'mirflickr25k-yall.mat', folder / 'mirflickr25k-lall.mat'
    texts = scipy.io.loadmat(yall)['YAll']
    labels = scipy.io.loadmat(lall)['LAll']
    if how == 'labels':
        labels[0, 0] = 2
        scipy.io.savemat(lall, {'LAll': labels})
    elif how == 'key':
        scipy.io.savemat(yall, {'XAll': texts})
    elif how == 'count':
        scipy.io.savemat(yall, {'YAll': texts[:-5]})
    return folder


BAD_INPUTS = {  # case -> (extra settings, words the one-line error must hold)
    'code_len_range': (['CODE_LEN=0'], ['CODE_LEN=0', 'from 1']),
    'batch_range': (['BATCH_SIZE=1'], ['BATCH_SIZE=1', 'at least 2']),
    'backbone_unknown': (["BACKBONE='resnet50'"], ['BACKBONE', 'vgg19']),
    'dataset_unknown': (["DATASET='CIFAR'"], ['DATASET', 'MIRFlickr']),
    'ckpt_code_len': (['CODE_LEN=32'], ['different experiment', 'CODE_LEN: 16']),
    'ckpt_backbone': (["BACKBONE='vgg19'"], ['different experiment', 'BACKBONE']),
    'pretrained_wrong_net': (['PRETRAINED=True'], ['PRETRAINED_PATH', 'alexnet']),
    'missing_files': (["DATASET='MIRFlickr'"], ['mirflickr25k-', 'missing file']),
    'labels_not_binary': ([], ['LAll']),
    'wrong_key': ([], ['YAll']),
    'counts_disagree': ([], ['mirflickr25k-']),
}
BROKEN_FILES = {'labels_not_binary': 'labels', 'wrong_key': 'key', 'counts_disagree': 'count'}


@pytest.mark.parametrize('case', list(BAD_INPUTS))
def test_bad_input_one_line_and_nothing_damaged(tiny, reference, tmp_path, capsys, case):
    import models
    import settings
    import train
    base, args = tiny
    run_dir = reference[0]
    extra, words = BAD_INPUTS[case]
    if case == 'pretrained_wrong_net':
        wrong_weights = tmp_path / 'txtnet.pth'
        torch.save(models.TxtNet(4, 8).state_dict(), wrong_weights)
        extra = extra + [f"PRETRAINED_PATH={str(wrong_weights)!r}"]
    elif case == 'missing_files':
        extra = extra + [f"DATA_DIR={str(tmp_path)!r}"]
    elif case in BROKEN_FILES:
        folder = broken_copy(tiny, tmp_path, case, BROKEN_FILES[case])
        extra = extra + [f"DATA_DIR={str(folder)!r}"]
    before = {name: (run_dir / name).read_bytes() for name in ('checkpoint.pt', 'results.json')}
    argv = args + extra + [f"OUT_DIR={str(base / 'runs')!r}", "RUN_NAME='ref'"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        settings.run_cli(train.main, argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert '\n' not in err and err.startswith('error: '), err
    for word in words:
        assert word in err, err
    for name, data in before.items():
        assert (run_dir / name).read_bytes() == data, name
