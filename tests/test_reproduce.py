"""reproduce.py: the grid (order, resume, errors) with a stand-in train.py, the summary beside
the paper on made-up results, and (slow) a real 2 x 2 DEMO grid stopped by Ctrl-C and resumed."""
import csv
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import reproduce
import settings


def fake_results(run_dir, dataset, variant, bits, seed, i2t, t2i, wall=60.0, topk=50):
    """results.json and timing.json as train.py writes them, with made-up numbers."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / 'results.json').write_text(json.dumps(dict(
        dataset=dataset, variant=variant, backbone='vgg19', code_len=bits, seed=seed,
        split_seed=0, topk=topk, epoch=80, map_i2t=i2t, map_t2i=t2i,
        commit='0123456789abcdef', codes='codes/epoch_080.npz')))
    (run_dir / 'timing.json').write_text(json.dumps(dict(wall_time_s=wall)))


def read_table(md_path):
    """The summary's Markdown table as a list of dicts keyed by the header."""
    lines = [l for l in md_path.read_text().splitlines() if l.startswith('|')]
    header = [c.strip() for c in lines[0].strip('|').split('|')]
    return [dict(zip(header, (c.strip() for c in l.strip('|').split('|')))) for l in lines[2:]]


# ===== the paper's numbers and the grid =====
def test_paper_numbers_cover_both_tables():
    paper = reproduce.PAPER
    assert paper[('MIRFlickr', 'DJSRH', 16, 'i2t')] == 0.810
    assert paper[('Wiki', 'DJSRH', 128, 't2i')] == 0.658
    assert paper[('NUSWIDE', 'DJSRH-2', 128, 't2i')] == 0.581
    assert paper[('NUSWIDE', 'DJSRH-6', 64, 'i2t')] == 0.786
    # 3 datasets x 4 bits x 2 + 7 variants x 2 bits x 2, of which DJSRH NUS-WIDE 64/128 overlap
    assert len(paper) == 24 + 28 - 4
    assert ('DEMO', 'DJSRH', 32, 'i2t') not in paper
    assert set(reproduce.PAPER_TABLE1) == set(settings.VARIANTS)


def test_grid_cells_default_and_subsets():
    both = reproduce.grid_cells(['2', '1'], None, None, None, 3)
    assert len(both) == len(set(both)) == (12 + 14 - 2) * 3  # NUS-WIDE DJSRH 64/128 once
    assert [c[3] for c in both[:24]] == [0] * 24  # seed 0 of every cell comes first
    sub = reproduce.grid_cells(['2'], ['MIRFlickr'], None, [16, 64], 3)
    assert sorted(sub) == [('MIRFlickr', 'DJSRH', b, s) for b in (16, 64) for s in range(3)]
    demo = reproduce.grid_cells(['demo'], None, None, None, 2)
    assert sorted(demo) == [('DEMO', 'DJSRH', b, s) for b in (16, 32, 64, 128) for s in (0, 1)]


def test_time_left_uses_matching_cells():
    times = [(('Wiki', 'DJSRH', 16, 0), 10.0), (('NUSWIDE', 'DJSRH', 64, 0), 100.0)]
    todo = [('Wiki', 'DJSRH', 16, 1), ('NUSWIDE', 'DJSRH', 128, 1), ('MIRFlickr', 'DJSRH', 16, 0)]
    assert reproduce.time_left(todo, times) == 10 + 100 + 55
    assert reproduce.time_left(todo, []) is None
    assert reproduce.format_duration(None) == '?'
    assert reproduce.format_duration(7200) == '2.0 h'


@pytest.mark.parametrize('argv', [['SEED=1'], ['RUN_NAME=x'], ['NOT_A_SETTING=1'],
                                  ['CODE_LEN="a"'], ['--seeds', '0'],
                                  ['--seeds', '100000000'],   # listed cells for minutes
                                  ['--max-cells', '0'], ['--max-cells', '-1'],
                                  ['--out-dir', 'A_FILE'], ['--plan', '--out-dir', 'A_FILE'],
                                  ['--table', '9'], ['--tabel', '2'],   # argparse: usage too
                                  ['DEVICE="cuda:7"', '--plan']])  # after its first timing
def test_user_mistakes_exit_2(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'A_FILE').write_text('mine')
    with pytest.raises(SystemExit) as exit_:
        settings.run_cli(reproduce.main, ['--dry-run', '--table', 'demo', *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1
    assert os.listdir(tmp_path) == ['A_FILE']


def test_a_missing_feature_file_stops_the_grid_before_any_run(tmp_path, monkeypatch, capsys):
    """Named before the first run (was left to train.py, after the DEMO was generated)."""
    monkeypatch.chdir(tmp_path)
    assert reproduce.main(['--table', 'demo', '--seeds', '1', 'TEXT_FEATURES="none.npy"']) == 2
    err = capsys.readouterr().err
    assert err == ("error: DEMO: setting TEXT_FEATURES='none.npy': no such file; expected an "
                   "N x d array with one row per pair (extract.py writes the image features)\n")
    assert os.listdir(tmp_path) == []


def test_repeated_list_options_add_up(capsys):
    """'--table demo --table 1' is both tables (argparse kept the last alone, silently)."""
    args = reproduce.run_parser().parse_args(['--table', 'demo', '--table', '1', '--bits', '16',
                                              '--bits', '32', '64'])
    assert args.table == ['demo', '1'] and args.bits == [16, 32, 64]
    assert reproduce.main(['--dry-run', '--table', '2', '2', '--datasets', 'Wiki', '--bits',
                           '16', '--seeds', '1']) == 0
    assert '1 cells' in capsys.readouterr().out


def test_dry_run_passes_overrides_through(tmp_path, capsys):
    # KEY=VALUE may come anywhere, even after an option that takes several values.
    argv = ['--dry-run', '--table', '2', '--datasets', 'Wiki', '--bits', '16', '64',
            'NUM_EPOCH=3', '--seeds', '1', '--out-dir', str(tmp_path)]
    assert reproduce.main(argv) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if 'would run' in l]
    assert len(lines) == 2
    assert all('NUM_EPOCH=3' in l and f'OUT_DIR={tmp_path}' in l for l in lines)
    assert 'RUN_NAME=Wiki_DJSRH_vgg19_16bit_seed0' in lines[0]
    assert not list(tmp_path.iterdir())  # a dry run writes nothing


# ===== the grid with a stand-in train.py (fast) =====
FAKE_TRAIN = textwrap.dedent('''
    import json, os, pathlib, sys
    args = dict(a.split('=', 1) for a in sys.argv[1:])
    run = pathlib.Path(args['OUT_DIR']) / args['RUN_NAME']
    run.mkdir(parents=True, exist_ok=True)
    with open(run.parent / 'calls.txt', 'a') as f:
        f.write(args['RUN_NAME'] + '\\n')
    if os.environ.get('FAKE_FAIL') == args['RUN_NAME']:
        sys.exit(3)
    if os.environ.get('FAKE_BLOCK') == args['RUN_NAME']:   # runs until a signal ends it
        import signal
        print('fake-started', os.getpid(), flush=True)
        signal.pause()
    (run / 'results.json').write_text(json.dumps(dict(
        dataset=args['DATASET'], variant=args['VARIANT'], backbone='alexnet',
        code_len=int(args['CODE_LEN']), seed=int(args['SEED']), topk=50,
        map_i2t=0.5 + int(args['SEED']) / 10, map_t2i=0.4, commit='abc')))
    (run / 'timing.json').write_text(json.dumps(dict(wall_time_s=1.0)))
''')


@pytest.fixture
def fake_train(tmp_path, monkeypatch):
    script = tmp_path / 'fake_train.py'
    script.write_text(FAKE_TRAIN)
    monkeypatch.setattr(reproduce, 'TRAIN_PY', script)
    return tmp_path / 'runs'


def test_grid_resumes_and_skips_finished_cells(fake_train, capsys, monkeypatch):
    argv = ['--table', 'demo', '--bits', '8', '16', '--seeds', '2', '--out-dir', str(fake_train)]
    assert reproduce.main(argv + ['--max-cells', '3']) == 0
    calls = (fake_train / 'calls.txt').read_text().split()
    assert calls == ['DEMO_DJSRH_alexnet_8bit_seed0', 'DEMO_DJSRH_alexnet_16bit_seed0',
                     'DEMO_DJSRH_alexnet_8bit_seed1']
    out = capsys.readouterr().out
    assert 'about' in out and 'left' in out and '--max-cells' in out

    # A failing cell stops the grid with exit 1; the cell has no results and runs again.
    monkeypatch.setenv('FAKE_FAIL', 'DEMO_DJSRH_alexnet_16bit_seed1')
    assert reproduce.main(argv) == 1
    monkeypatch.delenv('FAKE_FAIL')
    assert reproduce.main(argv) == 0
    calls = (fake_train / 'calls.txt').read_text().split()
    assert calls[3:] == ['DEMO_DJSRH_alexnet_16bit_seed1'] * 2  # never a finished cell again
    out = capsys.readouterr().out
    assert out.count('skipped') == 3 + 3 and 'all 4 cells finished' in out


def test_finished_cell_with_other_settings_warns(fake_train, capsys):
    argv = ['--table', 'demo', '--bits', '8', '--seeds', '1', '--out-dir', str(fake_train)]
    run = fake_train / 'DEMO_DJSRH_alexnet_8bit_seed0'
    fake_results(run, 'DEMO', 'DJSRH', 8, 0, 0.5, 0.5)
    cfg = reproduce.cell_config(('DEMO', 'DJSRH', 8, 0), [])
    (run / 'settings.json').write_text(json.dumps({**vars(cfg), 'NUM_EPOCH': 1, 'NUM_WORKERS': 9}))
    assert reproduce.main(argv) == 0
    out = capsys.readouterr().out
    assert 'skipped' in out and 'other values of NUM_EPOCH than' in out
    assert not (fake_train / 'calls.txt').exists()


# ===== data checked before the first run; --plan =====
def test_missing_data_exits_2_before_any_run(fake_train, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)   # no data/ here
    assert settings.run_cli(reproduce.main, ['--table', '2', '--out-dir', str(fake_train)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert [line.split(':')[1].strip() for line in err] == ['Wiki', 'MIRFlickr', 'NUSWIDE']
    assert all(l.startswith('error: ') and 'docs/data.md#where-to-get-the-data' in l
               for l in err)
    assert not fake_train.exists()   # no run directory made, no train.py started


def test_datasets_option_leaves_the_missing_ones_out(fake_train, tmp_path, monkeypatch,
                                                    capsys):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / 'data' / 'mirflickr'
    folder.mkdir(parents=True)
    for name in ('mirflickr25k-iall.mat', 'mirflickr25k-yall.mat', 'mirflickr25k-lall.mat'):
        (folder / name).write_bytes(b'')   # found by name: the check reads nothing
    argv = ['--table', '2', '--bits', '16', '--seeds', '1', '--out-dir', str(fake_train)]
    assert reproduce.main(argv) == 2
    assert 'MIRFlickr' not in capsys.readouterr().err
    assert reproduce.main(argv + ['--datasets', 'MIRFlickr']) == 0
    assert (fake_train / 'calls.txt').read_text().split() == ['MIRFlickr_DJSRH_vgg19_16bit_seed0']


FAKE_COST = dict(device='cpu', step_s=2.0, encode_s=0.01, peak_bytes=6e9, img_params=140e6,
                 txt_params=5e6, trained_params=145e6, write_bytes_per_s=None)


def test_plan_without_data_prints_hours_and_gb(tmp_path, monkeypatch, capsys):
    import costs
    monkeypatch.chdir(tmp_path)
    measured = []
    monkeypatch.setattr(costs, 'measure_cost', lambda cfg, text_dim, **kw: measured.append(
        (cfg.DATASET, text_dim)) or FAKE_COST)
    assert reproduce.main(['--table', '2', '--plan']) == 0
    out = capsys.readouterr().out
    # NUS-WIDE's runs differ from MIRFlickr's in text width alone: one measurement
    assert measured == [('Wiki', 10), ('MIRFlickr', 1386)]
    assert 'NUSWIDE: the networks and batches of MIRFlickr' in out
    rows = {line.split()[0]: line for line in out.splitlines()
            if line.split()[:1] in (['Wiki'], ['MIRFlickr'], ['NUSWIDE'], ['grid'])}
    assert set(rows) == {'Wiki', 'MIRFlickr', 'NUSWIDE', 'grid'}
    # MIRFlickr by hand: 80 epochs x 156 steps x 2 s + 2 evaluations x 20,015 pairs x 10 ms
    per_run = (80 * (5000 // 32) * 2.0 + 2 * 20015 * 0.01) / 3600
    assert f'{per_run:.1f} h' in rows['MIRFlickr']
    assert f'{12 * per_run:.1f} h' in rows['MIRFlickr']     # 4 code lengths x 3 seeds
    assert all('MISSING' in rows[d] and 'GB' in rows[d] for d in ('Wiki', 'MIRFlickr', 'NUSWIDE'))
    assert '6.0 GB' in rows['grid'] and '3 missing' in rows['grid']
    assert 'On this CPU the grid would take about' in out and 'GPU' in out
    assert 'nobody has run' in out
    assert not (tmp_path / 'runs').exists()


def test_plan_measures_the_demo_on_this_device(tmp_path, capsys):
    """The real measurement (DEMO's AlexNet on 64 x 64): a figure per dataset, no run."""
    argv = ['--table', 'demo', '--bits', '16', '--seeds', '1', '--plan',
            '--out-dir', str(tmp_path / 'runs'), f'DATA_DIR={tmp_path / "demo"}']
    assert reproduce.main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r'measuring DEMO \(alexnet, batch 32 of 64 x 64, 300-d text\) \.\.\. '
                     r'[\d.e+-]+ s a training step', out), out
    demo = next(l for l in out.splitlines() if l.startswith('DEMO '))
    assert 'generated on first use' in demo
    assert 'nobody has run' not in out   # AlexNet: the authors' own learning rates
    assert not list(tmp_path.iterdir())


def test_measure_cost_counts_what_a_checkpoint_holds(tmp_path):
    """costs.measure_cost on Wiki's recipe (only fc6, fc7 and the hash layer trained),
    AlexNet at 64 x 64: figures against the models' own parameter counts."""
    import costs
    import models
    cfg = settings.resolve(['DATASET=Wiki', 'BACKBONE=alexnet', 'PRETRAINED=False', 'CROP=64',
                            'RESIZE=72', 'CODE_LEN=16', 'BATCH_SIZE=4', 'EVAL_BATCH_SIZE=8',
                            'DEVICE="cpu"'])
    cost = costs.measure_cost(cfg, 10, min_seconds=0.0, out_dir=tmp_path, write_bytes=2 ** 20)
    img = models.ImgNet('alexnet', 16, pretrained=False)
    txt = models.TxtNet(10, 16)
    count = lambda params: sum(p.numel() for p in params)
    assert cost['img_params'] == count(img.parameters())
    assert cost['txt_params'] == count(txt.parameters())
    assert cost['trained_params'] == count(img.head_parameters()) + count(txt.parameters())
    assert cost['step_s'] > 0 and cost['encode_s'] > 0 and cost['peak_bytes'] > 0
    assert cost['write_bytes_per_s'] > 0 and not list(tmp_path.iterdir())   # nothing left


def test_timed_median_skips_the_warm_up_unless_it_is_long():
    import costs
    calls = []
    def fast():
        calls.append(1)
    assert costs.timed_median(fast, min_seconds=1e9, max_steps=3) >= 0
    assert len(calls) == 1 + 3          # a warm-up, then max_steps timed calls
    calls.clear()
    assert costs.timed_median(fast, min_seconds=0.0, max_steps=3) >= 0
    assert len(calls) == 1              # the warm-up took min_seconds (0): it is the figure


# ===== finished cells, cells in use, signals, pipes =====
def test_corrupt_settings_of_a_finished_cell_is_one_line(fake_train, capsys):
    run = fake_train / 'DEMO_DJSRH_alexnet_8bit_seed0'
    fake_results(run, 'DEMO', 'DJSRH', 8, 0, 0.5, 0.5)
    (run / 'settings.json').write_text('{"DATASET": "DE')
    with pytest.raises(SystemExit) as exit_:
        settings.run_cli(reproduce.main, ['--table', 'demo', '--bits', '16', '8', '--seeds',
                                          '1', '--out-dir', str(fake_train)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'settings.json' in err and 'cannot be read' in err, err
    assert not (fake_train / 'calls.txt').exists()   # stopped before the first run


@pytest.mark.parametrize('kind', ['flock', 'lockf'])
def test_a_cell_in_use_is_left_to_its_process(kind, fake_train, capsys):
    """A second grid on the same folder: the cell another process holds (either kind of
    lock train.py may take) is passed over, the next free one runs."""
    import fcntl
    held = fake_train / 'DEMO_DJSRH_alexnet_8bit_seed0'
    held.mkdir(parents=True)
    fd = os.open(held / reproduce.LOCK_NAME, os.O_RDWR | os.O_CREAT)
    try:
        getattr(fcntl, kind)(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, b'process 4242 on gpu-node\n')
        argv = ['--table', 'demo', '--bits', '8', '16', '--seeds', '1', '--out-dir',
                str(fake_train)]
        assert reproduce.main(argv) == 0
    finally:
        os.close(fd)
    assert (fake_train / 'calls.txt').read_text().split() == ['DEMO_DJSRH_alexnet_16bit_seed0']
    out = capsys.readouterr().out
    assert 'in use by process 4242 on gpu-node; going on with the next free cell' in out
    assert '1 of 2 cells finished; still running in another process: DEMO DJSRH 8 bits' in out
    assert reproduce.cell_holder(held) is None   # released: free again


def test_a_cell_taken_between_check_and_start_is_passed_over(fake_train, monkeypatch, capsys):
    answers = iter([None, 'process 7 on x'])   # free when checked, held once train.py refused
    monkeypatch.setattr(reproduce, 'cell_holder', lambda run_dir: next(answers, None))
    monkeypatch.setenv('FAKE_FAIL', 'DEMO_DJSRH_alexnet_8bit_seed0')
    monkeypatch.setattr(reproduce, 'run_cell', lambda cmd, run_dir, quiet: 2 if
                        'RUN_NAME=DEMO_DJSRH_alexnet_8bit_seed0' in cmd else
                        subprocess.call(cmd))
    argv = ['--table', 'demo', '--bits', '8', '16', '--seeds', '1', '--out-dir', str(fake_train)]
    assert reproduce.main(argv) == 0
    out = capsys.readouterr().out
    assert 'taken by another process meanwhile' in out
    assert (fake_train / 'calls.txt').read_text().split() == ['DEMO_DJSRH_alexnet_16bit_seed0']


def grid_process(fake_train, argv, **env):
    """reproduce.py in a child process, with the stand-in train.py."""
    code = ('import sys, pathlib, reproduce, settings; '
            f'reproduce.TRAIN_PY = pathlib.Path({str(fake_train.parent / "fake_train.py")!r}); '
            f'sys.exit(settings.run_cli(reproduce.main, {argv!r}))')
    return subprocess.Popen([sys.executable, '-c', code], cwd=Path(reproduce.__file__).parent,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, 'PYTHONUNBUFFERED': '1', **env})


def test_sigterm_stops_the_grid_and_its_train_py(fake_train):
    argv = ['--table', 'demo', '--bits', '8', '--seeds', '1', '--out-dir', str(fake_train)]
    grid = grid_process(fake_train, argv, FAKE_BLOCK='DEMO_DJSRH_alexnet_8bit_seed0')
    for line in grid.stdout:   # wait for the child to say it runs
        if line.startswith('fake-started'):
            child = int(line.split()[1])
            break
    grid.send_signal(signal.SIGTERM)
    out, err = grid.communicate(timeout=60)
    assert grid.returncode == 143, err
    assert err.startswith('terminated: the grid stopped, and its train.py with it')
    assert 'Traceback' not in err
    with pytest.raises(ProcessLookupError):   # reaped by the grid: nothing outlives it
        os.kill(child, 0)


def test_dry_run_into_a_closed_pipe_is_quiet(fake_train):
    """`reproduce.py --dry-run | head -1`: more output than a pipe holds, reader gone."""
    argv = ['--dry-run', '--table', 'demo', '--seeds', '400', '--out-dir', str(fake_train)]
    grid = grid_process(fake_train, argv)
    assert 'cells' in grid.stdout.readline()
    grid.stdout.close()
    err = grid.stderr.read()
    assert grid.wait(timeout=60) == 0 and err == ''


# ===== the summary =====
def test_summary_lists_paper_numbers_beside_ours(tmp_path, capsys):
    runs = tmp_path / 'runs'
    mir = {0: (0.80, 0.78), 1: (0.82, 0.79), 2: (0.81, 0.77)}
    for seed, (i2t, t2i) in mir.items():
        fake_results(runs / f'MIRFlickr_16_{seed}', 'MIRFlickr', 'DJSRH', 16, seed, i2t, t2i)
    fake_results(runs / 'deeper' / 'nus', 'NUSWIDE', 'DJSRH-2', 128, 0, 0.70, 0.60, wall=7200)
    fake_results(runs / 'wiki', 'Wiki', 'DJSRH', 64, 0, 0.41, 0.64, topk=100)
    assert reproduce.main(['summary', str(runs)]) == 0
    rows = {(r['dataset'], r['variant'], r['bits'], r['task']): r
            for r in read_table(runs / 'summary.md')}
    assert len(rows) == 6

    row = rows[('MIRFlickr', 'DJSRH', '16', 'I->T')]
    std = statistics.stdev([0.80, 0.82, 0.81])  # sample std, ddof=1
    assert row['ours: mean ± std (n)'] == f'0.810 ± {std:.3f} (n=3)'
    assert row['paper'] == '0.810' and row['diff'] == '+0.000'
    assert row['backbone'] == 'vgg19' and row['commit'] == '0123456789ab'
    assert row['wall time / run'] == '60 s'
    assert rows[('MIRFlickr', 'DJSRH', '16', 'T->I')]['paper'] == '0.786'

    nus = rows[('NUSWIDE', 'DJSRH-2', '128', 'T->I')]
    assert nus['paper'] == '0.581' and nus['diff'] == '+0.019'
    assert nus['ours: mean ± std (n)'] == '0.600 ± - (n=1)'
    assert nus['wall time / run'] == '2.0 h'
    # mAP@100 is not the paper's mAP@50: no paper number beside it
    assert rows[('Wiki', 'DJSRH', '64', 'I->T')]['paper'] == '-'
    assert rows[('Wiki', 'DJSRH', '64', 'I->T')]['metric'] == 'mAP@100'

    with open(runs / 'summary.csv') as f:
        table = list(csv.DictReader(f))
    assert len(table) == 6
    first = table[0]  # Wiki comes first, as in the paper
    assert first['dataset'] == 'Wiki' and first['paper'] == '' and first['std'] == ''
    mir_csv = [r for r in table if r['dataset'] == 'MIRFlickr' and r['task'] == 'I->T'][0]
    assert float(mir_csv['paper']) == 0.810 and float(mir_csv['std']) == pytest.approx(std)
    assert mir_csv['n'] == '3' and mir_csv['seeds'] == '0 1 2'


def test_summary_lists_runs_without_labels_by_recall(tmp_path, capsys):
    """A Custom run without labels (mAP null) beside a benchmark run: the mAP table holds the
    benchmark, and the other run's own-pair recall and median rank are listed under it."""
    runs = tmp_path / 'runs'
    fake_results(runs / 'mir', 'MIRFlickr', 'DJSRH', 16, 0, 0.80, 0.78)
    fake_results(runs / 'mine', 'Custom', 'DJSRH', 64, 2, None, None)
    results = json.loads((runs / 'mine' / 'results.json').read_text())
    results.update(recall_i2t={'1': 0.05, '5': 0.2, '10': 0.3125},
                   recall_t2i={'1': 0.1, '5': 0.25, '10': 0.5}, median_rank_i2t=21.5,
                   median_rank_t2i=10.0)
    (runs / 'mine' / 'results.json').write_text(json.dumps(results))
    assert reproduce.main(['summary', str(runs)]) == 0
    text = (runs / 'summary.md').read_text()
    rows = read_table(runs / 'summary.md')
    assert [(r['dataset'], r['task']) for r in rows[:2]] == [('MIRFlickr', 'I->T'),
                                                              ('MIRFlickr', 'T->I')]
    assert '| mine | Custom | 64 | 2 | 0.050 / 0.200 / 0.312 | 21.5 | 0.100 / 0.250 / 0.500 ' \
           '| 10 |' in text
    with open(runs / 'summary.csv') as f:
        assert [r['dataset'] for r in csv.DictReader(f)] == ['MIRFlickr', 'MIRFlickr']
    # a null mAP is read only with the recall figures beside it
    del results['recall_i2t']
    (runs / 'mine' / 'results.json').write_text(json.dumps(results))
    with pytest.raises(settings.UserError, match='map_i2t is None, expected a number'):
        reproduce.main(['summary', str(runs)])


def test_summary_of_nothing_is_a_user_error(tmp_path):
    with pytest.raises(settings.UserError, match='no results.json'):
        reproduce.main(['summary', str(tmp_path)])
    (tmp_path / 'a_file').write_text('x')
    with pytest.raises(settings.UserError, match='a_file: is a file; expected the folder'):
        reproduce.main(['summary', str(tmp_path / 'a_file')])
    (tmp_path / 'a_file').unlink()
    (tmp_path / 'r').mkdir()
    (tmp_path / 'r' / 'results.json').write_text('{"dataset": "DEMO"}')
    with pytest.raises(settings.UserError, match='missing code_len'):
        reproduce.main(['summary', str(tmp_path)])


GOOD = dict(dataset='DEMO', variant='DJSRH', backbone='alexnet', code_len=16, seed=0,
            topk=50, map_i2t=0.5, map_t2i=0.6)
BROKEN_RESULTS = {  # case -> (results.json text, words of the one-line error)
    'truncated': (json.dumps(GOOD)[:20], ['results.json', 'cannot be read as JSON']),
    'a_list': ('[0.5, 0.6]', ['results.json', 'list']),
    'map_as_text': (json.dumps({**GOOD, 'map_i2t': '0.5'}), ['map_i2t', "'0.5'", 'number']),
    'code_len_as_text': (json.dumps({**GOOD, 'code_len': '16'}), ['code_len', 'integer']),
    'code_len_bool': (json.dumps({**GOOD, 'code_len': True}), ['code_len', 'integer']),
    'map_nan': (json.dumps({**GOOD, 'map_t2i': float('nan')}), ['map_t2i', 'number']),
    'dataset_number': (json.dumps({**GOOD, 'dataset': 3}), ['dataset', 'string']),
    'seed_as_text': (json.dumps({**GOOD, 'seed': 'zero'}), ['seed', 'integer']),
    'recall_as_list': (json.dumps({**GOOD, 'map_i2t': None, 'map_t2i': None, 'median_rank_i2t': 3,
                                   'median_rank_t2i': 4, 'recall_i2t': [0.1, 0.2, 0.3],
                                   'recall_t2i': {'1': 0.1, '5': 0.2, '10': 0.3}}),
                       ['recall_i2t', '[0.1, 0.2, 0.3]', 'recall@1, 5, 10']),
}


@pytest.mark.parametrize('case', list(BROKEN_RESULTS))
def test_summary_of_broken_results_is_one_line(case, tmp_path, capsys):
    text, words = BROKEN_RESULTS[case]
    fake_results(tmp_path / 'good', 'DEMO', 'DJSRH', 16, 1, 0.5, 0.6)
    (tmp_path / 'bad').mkdir()
    (tmp_path / 'bad' / 'results.json').write_text(text)
    with pytest.raises(SystemExit) as exit_:
        settings.run_cli(reproduce.main, ['summary', str(tmp_path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1, err
    for word in words:
        assert word in err, err
    assert not list(tmp_path.glob('summary.*'))


def test_summary_out_names_the_files_it_writes(tmp_path, capsys):
    fake_results(tmp_path / 'runs' / 'a', 'DEMO', 'DJSRH', 16, 0, 0.5, 0.6)
    (tmp_path / 'runs' / 'a' / 'timing.json').write_text('{"wall_time_s": "slow"}')  # ignored
    assert reproduce.main(['summary', str(tmp_path / 'runs'), '--out',
                           str(tmp_path / 'tables' / 'demo.v2')]) == 0
    written = sorted(p.name for p in (tmp_path / 'tables').iterdir())
    assert written == ['demo.v2.csv', 'demo.v2.md']   # the prefix's own dot is kept
    out = capsys.readouterr().out
    assert f"written: {tmp_path / 'tables' / 'demo.v2.md'}, " \
           f"{tmp_path / 'tables' / 'demo.v2.csv'}" in out
    assert read_table(tmp_path / 'tables' / 'demo.v2.md')[0]['wall time / run'] == '?'
    with pytest.raises(SystemExit) as exit_:   # a folder is not a prefix
        settings.run_cli(reproduce.main, ['summary', str(tmp_path / 'runs'), '--out',
                                          str(tmp_path / 'tables')])
    assert exit_.value.code == 2 and 'is a folder' in capsys.readouterr().err


# ===== end to end on DEMO with the real train.py =====
REPRODUCE = Path(reproduce.__file__).resolve()


@pytest.mark.slow  # four real train.py runs: about 25 s each on a busy 2-core machine
def test_demo_grid_interrupted_and_resumed(tmp_path):
    import demo
    data, runs = tmp_path / 'demo', tmp_path / 'runs'
    demo.make_demo(data, n_pairs=80)
    # Tiny settings: one epoch of a randomly initialised AlexNet on 64 x 64 crops.
    cmd = [sys.executable, str(REPRODUCE), '--table', 'demo', '--bits', '8', '16', '--seeds', '2',
           '--out-dir', str(runs), '--quiet', f'DATA_DIR={data}', 'NUM_EPOCH=1', 'BATCH_SIZE=8',
           'RESIZE=72', 'CROP=64', 'NUM_WORKERS=0', 'EVAL_BATCH_SIZE=64', 'EVAL_UNTRAINED=False']
    # Ctrl-C (SIGINT to the whole process group) once the grid says the first cell is done.
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, 'PYTHONUNBUFFERED': '1'},
                            # Ctrl-C must reach it even if pytest runs with SIGINT ignored
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if ': done in ' in line:
            os.killpg(proc.pid, signal.SIGINT)
            break
    out = ''.join(seen) + proc.communicate()[0]
    assert proc.returncode == 130, out
    finished = list(runs.glob('*/results.json'))
    assert len(finished) == 1, out
    stamp = os.stat(finished[0]).st_mtime_ns

    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 0, again.stdout + again.stderr
    assert os.stat(finished[0]).st_mtime_ns == stamp  # the finished cell was not redone
    assert again.stdout.count('skipped') == 1 and 'all 4 cells finished' in again.stdout
    assert len(list(runs.glob('*/results.json'))) == 4
    assert len(list(runs.glob('*/codes/epoch_*.npz'))) >= 4  # every evaluation saves codes

    summary = subprocess.run([sys.executable, str(REPRODUCE), 'summary', str(runs)],
                             capture_output=True, text=True)
    assert summary.returncode == 0, summary.stderr
    rows = read_table(runs / 'summary.md')
    assert len(rows) == 2 * 2 * 2  # 2 code lengths x 2 directions x mAP@50 and full mAP
    assert sorted(r['metric'] for r in rows) == ['mAP@50'] * 4 + ['mAP@all'] * 4
    assert all(re.fullmatch(r'0\.\d{3} ± 0\.\d{3} \(n=2\)', r['ours: mean ± std (n)'])
               for r in rows)
    assert all(r['paper'] == '-' and r['dataset'] == 'DEMO' for r in rows)
