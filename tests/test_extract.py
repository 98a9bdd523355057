"""extract.py: row i = pair i, resume after an interruption gives the same file, and a file
under the final name is always complete."""
import errno
import json
import os

import numpy as np
import pytest
import torch

import datasets
import extract
from conftest import MIR_NAMES, config, hold_lock, release, write_dcmh
from settings import UserError

N_PAIRS = 24


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp('extract') / 'mir'
    write_dcmh(folder, MIR_NAMES, n=N_PAIRS)
    return folder


def settings_for(folder, **overrides):
    base = dict(BACKBONE='alexnet', PRETRAINED=False, EVAL_BATCH_SIZE=5, SEED=1)
    base.update(overrides)
    return config('MIRFlickr', folder, **base)


def copy_dataset(src, dst):
    os.makedirs(dst)
    for name in MIR_NAMES:
        with open(os.path.join(src, name), 'rb') as f, open(os.path.join(dst, name), 'wb') as g:
            g.write(f.read())


@pytest.fixture(scope='module')
def uninterrupted(tiny):
    return np.load(extract.extract(settings_for(tiny)))


def test_name_says_backbone_weights_and_layer(tiny):
    path = extract.output_path(settings_for(tiny))
    assert os.path.basename(path) == 'mirflickr25k-alexnet-random-fc7-64px.npy'
    path = extract.output_path(settings_for(tiny, BACKBONE='vgg19', PRETRAINED=True,
                                            RESIZE=256, CROP=224))
    assert os.path.basename(path) == 'mirflickr25k-vgg19-fc7.npy'


def test_row_i_is_pair_i(tiny, uninterrupted):
    """Each row equals the feature network run on that pair's image alone, read by index
    from the IAll file (the test transform, ImageNet normalisation)."""
    cfg = settings_for(tiny)
    assert uninterrupted.shape == (N_PAIRS, 4096) and uninterrupted.dtype == np.float32
    net = extract.feature_network(cfg, torch.device('cpu'))
    transform = datasets.test_transform(cfg)
    from PIL import Image
    for i in (0, 7, N_PAIRS - 1):
        image = datasets.read_image(os.path.join(tiny, MIR_NAMES[0]), i)
        x = datasets.normalize(transform(Image.fromarray(image))[None])
        with torch.no_grad():
            expected = net.fc7(x)[0].numpy()
        np.testing.assert_allclose(uninterrupted[i], expected, rtol=1e-4, atol=1e-5)
    # the pairs' images differ, and so do their rows
    assert len({row.tobytes() for row in uninterrupted}) == N_PAIRS


def test_interrupted_then_resumed_gives_the_same_file(tiny, uninterrupted, tmp_path,
                                                       monkeypatch):
    folder = tmp_path / 'mir'
    copy_dataset(tiny, folder)
    cfg = settings_for(folder)
    final = extract.output_path(cfg)
    calls = []
    real = extract.encode_batch

    def interrupt_on_third(*args):
        calls.append(1)
        if len(calls) == 3:   # Ctrl-C while the third batch is being computed
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(extract, 'encode_batch', interrupt_on_third)
    with pytest.raises(SystemExit) as stop:
        extract.extract(cfg)
    assert stop.value.code == 130
    assert not os.path.exists(final)   # never a file under the final name that is not done
    with open(final + '.progress.json') as f:
        progress = json.load(f)
    assert progress['done'] == 10
    # a kill while writing: rows past the counted ones hold garbage
    with open(final + '.partial', 'r+b') as f:
        f.seek(progress['offset'] + progress['done'] * 4096 * 4)
        f.write(np.full((3, 4096), np.nan, np.float32).tobytes())
    monkeypatch.setattr(extract, 'encode_batch', real)
    resumed = np.load(extract.extract(cfg))
    np.testing.assert_array_equal(resumed, uninterrupted)
    assert not os.path.exists(final + '.partial') and not os.path.exists(final + '.progress.json')


def test_partial_file_of_other_settings_is_not_resumed(tiny, uninterrupted, tmp_path,
                                                       monkeypatch):
    folder = tmp_path / 'mir'
    copy_dataset(tiny, folder)
    cfg = settings_for(folder, SEED=7)   # other random weights, same file name
    monkeypatch.setattr(extract, 'encode_batch', lambda *a: (_ for _ in ()).throw(
        KeyboardInterrupt))
    with pytest.raises(SystemExit):
        extract.extract(cfg)
    monkeypatch.undo()
    out = np.load(extract.extract(settings_for(folder)))
    np.testing.assert_array_equal(out, uninterrupted)


def stamp(path):
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns, st.st_size


def test_a_file_made_otherwise_is_never_returned(tiny, uninterrupted, tmp_path):
    """The same file name for other settings (another seed of the random weights, another
    RESIZE before the same crop), for other data, or without its record: refused in one
    line, the file untouched."""
    path = extract.output_path(settings_for(tiny))
    before = stamp(path)
    for overrides, word in ((dict(SEED=7), 'seed'), (dict(RESIZE=72), 'resize')):
        with pytest.raises(UserError, match=f"other settings or data .*{word}") as err:
            extract.extract(settings_for(tiny, **overrides))
        assert '\n' not in str(err.value) and str(path) in str(err.value)
    assert stamp(path) == before
    # the same settings on a copy of the data with one pair fewer: other data
    folder = tmp_path / 'mir'
    write_dcmh(folder, MIR_NAMES, n=N_PAIRS - 1)
    os.link(path, extract.output_path(settings_for(folder)))
    os.link(path + '.json', extract.output_path(settings_for(folder)) + '.json')
    with pytest.raises(UserError, match='pairs: 24 there, 23 now'):
        extract.extract(settings_for(folder))
    os.remove(extract.output_path(settings_for(folder)) + '.json')
    with pytest.raises(UserError, match='record of what it was extracted from'):
        extract.extract(settings_for(folder))
    assert stamp(path) == before and not os.path.exists(path + '.lock')


def test_second_extract_on_the_same_output_is_refused(tiny, tmp_path):
    folder = tmp_path / 'mir'
    copy_dataset(tiny, folder)
    cfg = settings_for(folder)
    holder = hold_lock(extract.output_path(cfg) + '.lock')
    try:
        with pytest.raises(UserError, match=f"in use by another extract.py .*{holder.pid}"):
            extract.extract(cfg)
    finally:
        release(holder)
    assert not os.path.exists(extract.output_path(cfg) + '.partial')


class FullDisk:
    """The partial file, whose third write of rows finds the disk full."""

    def __init__(self, f):
        self.f, self.writes = f, 0

    def write(self, data):
        self.writes += 1
        if self.writes == 3:   # two batches of 5 rows, then this one
            raise OSError(errno.ENOSPC, 'No space left on device')
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_full_disk_is_one_line_and_resumes(tiny, uninterrupted, tmp_path, monkeypatch):
    folder = tmp_path / 'mir'
    copy_dataset(tiny, folder)
    cfg = settings_for(folder)
    final = extract.output_path(cfg)
    real_open = extract.PartialFile.open

    def open_on_a_full_disk(self, resume):
        real_open(self, resume)
        self.file = FullDisk(self.file)
    monkeypatch.setattr(extract.PartialFile, 'open', open_on_a_full_disk)
    with pytest.raises(UserError, match='no space left .* 10 rows done are kept') as err:
        extract.extract(cfg)
    assert '\n' not in str(err.value)
    assert not os.path.exists(final) and not os.path.exists(final + '.lock')
    monkeypatch.undo()
    np.testing.assert_array_equal(np.load(extract.extract(cfg)), uninterrupted)


def test_partial_file_of_another_device_is_not_resumed(tiny, uninterrupted, tmp_path,
                                                       monkeypatch, capsys):
    """Rows of a GPU and of the CPU round differently: never in one file. And the rows are
    computed under train.py's torch settings (TF32 off unless TF32=True)."""
    folder = tmp_path / 'mir'
    copy_dataset(tiny, folder)
    cfg = settings_for(folder)
    final = extract.output_path(cfg)
    monkeypatch.setattr(extract, 'encode_batch', lambda *a: (_ for _ in ()).throw(
        KeyboardInterrupt))
    with pytest.raises(SystemExit):
        extract.extract(cfg)
    monkeypatch.undo()
    with open(final + '.progress.json') as f:
        progress = json.load(f)
    assert progress['device'] == 'cpu'
    progress['device'] = 'cuda NVIDIA H200'   # as a GPU's partial file says
    with open(final + '.progress.json', 'w') as f:
        json.dump(progress, f)
    configured = []
    monkeypatch.setattr(extract.train, 'configure_torch', configured.append)
    capsys.readouterr()
    out = np.load(extract.extract(cfg))
    assert 'made with other settings' in capsys.readouterr().out
    np.testing.assert_array_equal(out, uninterrupted)
    assert configured == [cfg]


def test_refuses_to_extract_from_features(tiny):
    with pytest.raises(UserError, match='IMAGE_FEATURES'):
        extract.extract(settings_for(tiny, IMAGE_FEATURES='x.npy'))


@pytest.mark.slow
def test_demo_commands_extract_train_eval(tmp_path):
    """The three DEMO commands of docs/features.md, as a user runs them; the trained run
    beats its untrained evaluation in both directions."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    common = [f"DATA_DIR={str(tmp_path / 'demo')!r}", f"OUT_DIR={str(tmp_path / 'runs')!r}"]
    def run(script, *args):
        proc = subprocess.run([sys.executable, os.path.join(root, script), 'DATASET=DEMO',
                               *common, *args], capture_output=True, text=True, cwd=root,
                              timeout=900)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout
    out = run('extract.py')
    path = next(l.split(': ', 1)[1].split(' (')[0] for l in out.splitlines()
                if l.startswith('features: '))
    assert path.endswith('demo-alexnet-random-fc7-64px.npy')
    out = run('train.py', f'IMAGE_FEATURES={path!r}')
    run_dir = next(l.split(': ', 1)[1] for l in out.splitlines()
                   if l.startswith('run directory: '))
    with open(os.path.join(run_dir, 'results.json')) as f:
        results = json.load(f)
    for direction in ('i2t', 't2i'):
        assert results[f'map_{direction}'] > results[f'untrained_map_{direction}'] + 0.2
    run('train.py', f'IMAGE_FEATURES={path!r}', 'EVAL=True')
    with open(os.path.join(run_dir, 'eval.json')) as f:
        assert json.load(f)['map_i2t'] == results['map_i2t']


@pytest.mark.parametrize('where', ['', '.partial'])
def test_a_folder_under_the_output_name_is_refused_at_once(tiny, tmp_path, monkeypatch, where):
    """Found before any row is computed (the last rename failed with a traceback)."""
    folder = tmp_path / 'mir'
    copy_dataset(tiny, folder)
    cfg = settings_for(folder)
    os.makedirs(extract.output_path(cfg) + where)
    monkeypatch.setattr(extract, 'feature_network', boom)
    with pytest.raises(UserError, match='is a folder; extract.py writes a file'):
        extract.extract(cfg)
    assert sorted(os.listdir(folder)) == sorted(
        [*MIR_NAMES, os.path.basename(extract.output_path(cfg) + where)])


def boom(*args):
    raise UserError('could not get the ImageNet weights (offline)')


def test_weights_that_cannot_be_had_leave_nothing(tiny, tmp_path, monkeypatch):
    """PRETRAINED=True offline: the error comes before the partial file is made."""
    folder = tmp_path / 'mir'
    copy_dataset(tiny, folder)
    monkeypatch.setattr(extract, 'feature_network', boom)
    with pytest.raises(UserError, match='ImageNet weights'):
        extract.extract(settings_for(folder))
    assert sorted(os.listdir(folder)) == sorted(MIR_NAMES)
