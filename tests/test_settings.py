"""Settings resolution, the range of every setting, --help, and the one-line errors of the
command line (run in this process: train.main under settings.run_cli)."""
import sys

import pytest
import torch

import models
import settings
import train
from settings import UserError


def run_train(argv, capsys):
    """`python train.py argv` in this process: (exit status, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        settings.run_cli(train.main, list(argv))
    return stop.value.code, capsys.readouterr().err


def assert_one_line_error(code, err, *words):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err          # no traceback
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


@pytest.mark.parametrize('argv, words', [
    (['BETA=' + '-' * 100000 + '1'], ['BETA=']),           # the parser: MemoryError
    (['CODE_LEN=1' + '+1' * 3000], ['CODE_LEN=']),         # RecursionError
    (['CODE_LEN={{}}'], ['CODE_LEN=']),                    # TypeError: a set of a dict
    (['CODE_LEN={[1]}'], ['CODE_LEN=']),
    (['NUM_EPOCH=__import__("os").system("exit 3")'], ['NUM_EPOCH=', 'an integer']),
    (['CODE_LEN=' + '9' * 100000], ['CODE_LEN=', '100002 characters']),
    (['X' * 10000 + '=1'], ['unknown setting XXX']),
])
def test_odd_values_are_one_short_line(argv, words):
    """Values are literals or strings, never code; whatever the text, a short UserError."""
    with pytest.raises(UserError) as info:
        settings.resolve(argv)
    message = str(info.value)
    assert all(word in message for word in words) and len(message) < 1000, message[:300]


def test_a_repeated_setting_warns_once_and_the_last_wins(capsys, monkeypatch):
    """Not silent; and a script's `$COMMON CODE_LEN=32` still overrides its common value."""
    monkeypatch.setattr(settings, 'WARNED', set())
    for _ in range(2):   # a grid resolves the same arguments once per cell: one warning
        assert settings.resolve(['CODE_LEN=16', 'code_len=32']).CODE_LEN == 32
    assert capsys.readouterr().out == ("warning: setting CODE_LEN given twice (16, then 32): "
                                       "the last, 32, is used\n")
    assert settings.resolve(['CODE_LEN=16', 'CODE_LEN=16', 'LR_IMG=1', 'LR_IMG=1.0']).CODE_LEN == 16
    assert capsys.readouterr().out == ''
    assert settings.with_defaults(['DATASET=DEMO', 'NUM_WORKERS=1'], ['num_workers=0']) == \
        ['DATASET=DEMO', 'num_workers=0']


def test_importing_reads_no_command_line(monkeypatch):
    monkeypatch.setattr(sys, 'argv', ['x', 'CODE_LEN=999'])
    assert settings.resolve().CODE_LEN == 64


def test_wrong_type_names_setting(capsys):
    assert_one_line_error(*run_train(['CODE_LEN="big"'], capsys), 'CODE_LEN', 'int')


def test_missing_dataset_file_is_named(tmp_path, capsys):
    code, err = run_train(['DATASET=MIRFlickr', f'DATA_DIR={str(tmp_path)!r}',
                           f'OUT_DIR={str(tmp_path / "runs")!r}'], capsys)
    assert_one_line_error(code, err, 'mirflickr25k-', 'missing file')
    assert not (tmp_path / 'runs').exists()   # a failed start leaves no empty folder


def test_unwritable_out_dir(tmp_path, capsys):
    blocker = tmp_path / 'file'
    blocker.write_text('not a folder')
    assert_one_line_error(*run_train(['DATASET=DEMO', f'OUT_DIR={str(blocker)!r}'], capsys),
                          'OUT_DIR')


def test_every_numeric_setting_has_a_range():
    numeric = {k for k, v in settings.defaults().items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert numeric == set(settings.RANGES)
    for key in numeric:
        low, high, _ = settings.RANGES[key]
        below = low - 1 if isinstance(low, int) else low - 1e-9
        with pytest.raises(UserError, match=f'setting {key}='):
            settings.resolve(**{key: below})
        if high is not None:
            with pytest.raises(UserError, match=f'setting {key}='):
                settings.resolve(**{key: high + 1})


@pytest.mark.parametrize('value', [-1e-3, -0.5, float('inf'), float('nan')])
def test_out_of_range_numbers_are_refused(value):
    for key in ('LR_IMG', 'LR_TXT', 'MOMENTUM', 'WEIGHT_DECAY', 'MU'):
        with pytest.raises(UserError, match=key):
            settings.resolve(**{key: value})


def test_seeds_stay_within_what_the_generators_take():
    cfg = settings.resolve(SEED=settings.SEED_MAX, SPLIT_SEED=settings.SEED_MAX, NUM_EPOCH=200)
    torch.manual_seed(train.epoch_seed(cfg.SEED, cfg.NUM_EPOCH))   # accepted
    for key in ('SEED', 'SPLIT_SEED'):
        with pytest.raises(UserError, match=f'{key}=-1'):
            settings.resolve(**{key: -1})
        with pytest.raises(UserError, match=str(settings.SEED_MAX)):
            settings.resolve(**{key: 2**64})


@pytest.mark.parametrize('name,ok', [('', True), ('exp1', True), ('grid/seed0', True),
                                     ('..', False), ('../x', False), ('a/../../x', False),
                                     ('/tmp/x', False), ('.', False), ('a//b', False)])
def test_run_name_stays_inside_out_dir(name, ok):
    if ok:
        assert settings.resolve(RUN_NAME=name).RUN_NAME == name
    else:
        with pytest.raises(UserError, match='RUN_NAME'):
            settings.resolve(RUN_NAME=name)


@pytest.mark.parametrize('module', ['train', 'datasets', 'prepare'])
def test_help_prints_the_usage_of_each_command(module, capsys):
    """--help lists each setting with its default and its one-line meaning (the trailing
    comment of its constant), not 'expected KEY=VALUE'."""
    import importlib
    main = importlib.import_module(module).main
    assert settings.run_cli(main, ['DATASET=DEMO', '--help']) == 0
    out = capsys.readouterr().out
    assert f'python {module}.py' in out and 'expected KEY=VALUE' not in out
    table = out.split('Settings (KEY=VALUE')[1]
    listed = {}   # setting -> its entry, continuation lines (deeper indented) joined
    for line in table.splitlines():
        if line.startswith('  ') and line[2] != ' ':
            key = line.split()[0]
            listed[key] = line
        elif line.startswith('   ') and listed:
            listed[key] += ' ' + line.strip()
    if module == 'prepare':
        assert "RAW_DIR" in listed and 'the downloads' in listed['RAW_DIR']
    else:
        assert set(listed) == set(settings.defaults())
        assert 'bits per code' in listed['CODE_LEN'] and ' 64 ' in listed['CODE_LEN']
        assert all(len(line.split()) > 2 for line in listed.values())   # every one explained
        # descriptions longer than one comment line come whole, not cut after the first
        assert "'IAPR' | 'MSCOCO' on UCCH's feature files only" in listed['DATASET']
        assert 'used as given' in listed['PUBLISHED']
        assert '0 = the hash layer alone on the features' in listed['FEATURE_HIDDEN']
        assert "'' = the CNN on the images" in listed['IMAGE_FEATURES']
        assert all(len(line) <= settings.USAGE_WIDTH for line in table.splitlines())


def test_ctrl_c_is_one_line_and_exit_130(capsys):
    def interrupted(argv):
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as stop:
        settings.run_cli(interrupted, [])
    assert stop.value.code == 130
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('interrupted') and 'intact' in err


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
