"""Settings resolution and the one-line errors of the command line."""
import os
import subprocess
import sys

import pytest
import torch

import models
import settings
from settings import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_train(*args, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def assert_one_line_error(proc, *words):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr          # no traceback
    assert lines[0].startswith('error: ')
    for word in words:
        assert word in lines[0], lines[0]


def test_preset_then_variant_then_overrides():
    cfg = settings.resolve(['DATASET=Wiki'])
    assert (cfg.BETA, cfg.LAMBDA1, cfg.NUM_EPOCH, cfg.LR_IMG) == (0.3, 0.3, 200, 0.01)
    assert cfg.TRAIN_ALL_IMG is False and cfg.EVAL_INTERVAL == 100
    cfg = settings.resolve(['dataset=NUSWIDE', 'variant="DJSRH-4"', 'beta=0.5'])
    assert (cfg.BETA, cfg.ETA, cfg.MU, cfg.LAMBDA1) == (0.5, 0.4, 1.0, 0.0)
    cfg = settings.resolve(['DATASET=NUSWIDE', 'VARIANT=DJSRH-3'])
    assert (cfg.BETA, cfg.ETA, cfg.MU) == (0.6, 0.0, 1.0)   # keeps the dataset's beta
    assert settings.resolve(['VARIANT=DJSRH-6']).ANNEAL is False
    assert settings.resolve(['VARIANT=DJSRH-1']).BETA == 1.0
    assert settings.resolve(['VARIANT=DJSRH-2']).BETA == 0.0


def test_override_types():
    assert settings.resolve(['LR_IMG=1']).LR_IMG == 1.0          # int accepted for a float
    assert settings.resolve(['CODE_LEN=16']).CODE_LEN == 16
    with pytest.raises(UserError, match='CODE_LEN'):
        settings.resolve(['CODE_LEN=16.5'])
    with pytest.raises(UserError, match='EVAL'):
        settings.resolve(['EVAL=1'])                             # bool wants True/False
    with pytest.raises(UserError, match='BATCH_SIZE'):
        settings.resolve(['BATCH_SIZE=1'])
    with pytest.raises(UserError, match='BACKBONE'):
        settings.resolve(['BACKBONE=resnet50'])
    with pytest.raises(UserError, match='DATASET'):
        settings.resolve(['DATASET=CIFAR'])


def test_importing_reads_no_command_line(monkeypatch):
    monkeypatch.setattr(sys, 'argv', ['x', 'CODE_LEN=999'])
    assert settings.resolve().CODE_LEN == 64


def test_unknown_setting_lists_valid_ones():
    proc = run_train('LEARNING_RATE=0.1')
    assert_one_line_error(proc, 'LEARNING_RATE', 'CODE_LEN', 'BETA')


def test_wrong_type_names_setting():
    assert_one_line_error(run_train('CODE_LEN="big"'), 'CODE_LEN', 'int')


def test_missing_dataset_file_is_named(tmp_path):
    proc = run_train('DATASET=MIRFlickr', f'DATA_DIR={str(tmp_path)!r}',
                     f'OUT_DIR={str(tmp_path / "runs")!r}')
    assert_one_line_error(proc, 'mirflickr25k-')


def test_unwritable_out_dir(tmp_path):
    blocker = tmp_path / 'file'
    blocker.write_text('not a folder')
    assert_one_line_error(run_train('DATASET=DEMO', f'OUT_DIR={str(blocker)!r}'), 'OUT_DIR')


def test_pretrained_path_errors(tmp_path):
    with pytest.raises(UserError, match='no such file'):
        models.build_backbone('alexnet', True, str(tmp_path / 'missing.pth'))
    wrong = tmp_path / 'txtnet.pth'
    torch.save(models.TxtNet(4, 8).state_dict(), wrong)
    with pytest.raises(UserError, match="alexnet"):
        models.build_backbone('alexnet', True, str(wrong))
    garbage = tmp_path / 'garbage.pth'
    garbage.write_bytes(b'not a checkpoint')
    with pytest.raises(UserError, match='not a PyTorch weights file'):
        models.build_backbone('alexnet', True, str(garbage))


def test_pretrained_path_loads_the_given_weights(tmp_path):
    torch.manual_seed(1)
    source = models.build_backbone('alexnet', pretrained=False)
    path = tmp_path / 'alexnet.pth'
    torch.save(source.state_dict(), path)
    loaded = models.build_backbone('alexnet', True, str(path))
    assert torch.equal(loaded.features[0].weight, source.features[0].weight)


def test_offline_download_failure_says_what_to_do(monkeypatch):
    import urllib.error
    import torchvision.models._api as api

    def offline(*args, **kwargs):
        raise urllib.error.URLError('no network')
    monkeypatch.setattr(api, 'load_state_dict_from_url', offline)
    with pytest.raises(UserError) as err:
        models.build_backbone('vgg19', pretrained=True)
    message = str(err.value)
    assert 'PRETRAINED_PATH' in message and 'https://' in message and '\n' not in message
