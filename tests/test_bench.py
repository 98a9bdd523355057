"""bench.py gpu, the GPU acceptance run, on the CPU: the grid prediction against a hand
computation, the CPU-against-CPU agreement of the same training steps, and (slow) the whole
command at its smallest sizes, its JSON and markdown files."""
import json
import math
import os

import pytest
import torch

import bench
import datasets
import demo
import settings


@pytest.fixture(scope='module')
def tiny_demo(tmp_path_factory):
    folder = tmp_path_factory.mktemp('bench') / 'demo'
    demo.make_demo(str(folder), n_pairs=96)   # 9 query, 48 train, 87 database
    return str(folder)


TINY = dict(bench.GPU_SIZES['small'], crop=64, batch=4, workers=0, agree_steps=2,
            precision_steps=2, demo_epochs=1, demo_share=0.75, speed_backbones=('alexnet',),
            floor_steps=1, loop_steps=1, eval_images=12)


def by_hand(step_s, eval_rate, untrained=0):
    """Seconds of one run of each dataset, written out from the paper's schedule: Wiki 200
    epochs of 2,173 // 32 = 67 steps, evaluated at 100 and 200 on 693 + 2,173 images;
    MIRFlickr and NUS-WIDE 80 epochs of 5,000 // 32 = 156 steps, evaluated at 40 and 80 on
    2,000 + 18,015 and 2,000 + 184,577 images."""
    evals = 2 + untrained
    return {'Wiki': 200 * 67 * step_s + evals * 2866 / eval_rate,
            'MIRFlickr': 80 * 156 * step_s + evals * 20015 / eval_rate,
            'NUSWIDE': 80 * 156 * step_s + evals * 186577 / eval_rate}


def test_grid_prediction_is_runs_times_the_time_of_a_run():
    figures = {'vgg19': dict(step_s=0.25, eval_images_per_s=400.0),
               'alexnet': dict(step_s=0.05, eval_images_per_s=2000.0)}
    run = by_hand(0.25, 400.0)
    table2 = bench.predict_grid_hours(figures, ('2',))
    assert {d: e['runs'] for d, e in table2['datasets'].items()} == {
        'Wiki': 12, 'MIRFlickr': 12, 'NUSWIDE': 12}
    for dataset, seconds in run.items():
        assert math.isclose(table2['datasets'][dataset]['hours'], 12 * seconds / 3600)
    assert math.isclose(table2['hours'], 12 * sum(run.values()) / 3600)
    table1 = bench.predict_grid_hours(figures, ('1',))   # 7 variants x 2 lengths x 3 seeds
    assert table1['runs'] == 42 and math.isclose(table1['hours'], 42 * run['NUSWIDE'] / 3600)
    both = bench.predict_grid_hours(figures, ('2', '1'))  # NUS-WIDE DJSRH 64, 128 run once
    assert both['runs'] == 72
    assert math.isclose(both['hours'], (12 * (run['Wiki'] + run['MIRFlickr'])
                                        + 48 * run['NUSWIDE']) / 3600)
    # the grid's own settings: another backbone, an untrained evaluation, one seed
    alex = bench.predict_grid_hours(figures, ('2',), seeds=1,
                                    extra=['BACKBONE=alexnet', 'EVAL_UNTRAINED=True'])
    assert alex['runs'] == 12
    assert math.isclose(alex['hours'], 4 * sum(by_hand(0.05, 2000.0, 1).values()) / 3600)


def test_same_steps_agree_on_the_cpu(tiny_demo):
    """CPU with its threads against CPU with one: the same losses to LOSS_RTOL, the same
    weight changes to UPDATE_RTOL, from the same weights and batches."""
    data = datasets.load(settings.resolve(['DATASET=DEMO', f'DATA_DIR={tiny_demo!r}']))
    r = bench.agreement(data, [f'DATA_DIR={tiny_demo!r}'], 'cpu', TINY, 'alexnet')
    assert r['steps'] == 2 and len(r['losses']) == len(r['reference_losses']) == 2
    assert all(math.isfinite(x) and x > 0 for x in r['losses'])
    worst = max(abs(a - b) / abs(b) for a, b in zip(r['losses'], r['reference_losses']))
    assert r['loss_rel_diff'] == worst <= bench.LOSS_RTOL
    assert set(r['update_rel_diff']) == {'img_net', 'txt_net'}
    assert max(r['update_rel_diff'].values()) <= bench.UPDATE_RTOL
    assert r['ok'] is True
    assert r['losses'][0] != r['losses'][1]   # two batches, a step between them


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_a_gpu_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        settings.run_cli(bench.main, ['gpu', '--device', 'cuda', '--out', str(tmp_path),
                                      f"DATA_DIR={str(tmp_path / 'demo')!r}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('error:') and 'CUDA is not available' in err and '\n' not in err
    assert not os.path.exists(tmp_path / 'demo')   # refused before generating anything


def test_dataset_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        settings.run_cli(bench.main, ['gpu', '--device', 'cpu', '--out', str(tmp_path),
                                      'DATASET=Wiki'])
    assert exit_info.value.code == 2 and 'DATASET' in capsys.readouterr().err


@pytest.mark.parametrize('argv, words', [
    (['gpu', '--device='], ["--device ''", 'cpu, cuda or cuda:N']),   # '' ran the full sizes
    (['gpu', '--device', 'tpu'], ["--device 'tpu'"]),
    (['gpu', '--device', 'cpu', 'DEVICE=cuda'], ['setting DEVICE', '--device']),
    (['gpu', '--device', 'cpu', '--out', 'A_FILE'], ['--out', 'is a file']),
    (['--part', 'loader', 'CHUNK=1000000000'], ['CHUNK=1000000000', 'expected 1 to 20015']),
    (['--part', 'loader', 'CHUNK=0'], ['CHUNK=0']),
    (['--part', 'loader', 'DATASET=Wiki'], ["DATASET='Wiki'", "replica is MIRFlickr's"]),
    (['--part', 'loader', 'DATA_DIR=DEMO', 'CHUNK=8'], ['CHUNK=8', 'replica only']),
    (['--part', 'loader', 'DATA_DIR=DEMO', 'IMAGE_FEATURES="x.npy"'], ['IMAGE_FEATURES']),
    (['--part', 'eval', '--bits', '0'], ['--bits 0', 'at least 1']),   # ran on 0 bits
    (['--part', 'eval', '--repeats', '0'], ['--repeats 0']),          # UnboundLocalError
    (['--part', 'eval', '--device', 'tpu'], ["--device 'tpu'"]),      # torch's RuntimeError
    (['--part', 'loader', '--seconds', '-1'], ['--seconds -1.0']),
    (['--part', 'bogus'], ["invalid choice: 'bogus'", 'python bench.py --help']),  # usage too
    (['search', '--nflips', 'a'], ['--nflips a']),                    # int('a'): ValueError
    (['search', '--sizes', '10'], ['--sizes 10', 'items:bits']),
    (['search', '--kinds', 'foo'], ['--kinds foo']),
])
def test_bad_arguments_are_one_line_before_any_work(argv, words, tiny_demo, tmp_path,
                                                     monkeypatch, capsys):
    """Refused before a replica, a DEMO or a report is written (a replica takes minutes)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'A_FILE').write_text('mine')
    argv = [a.replace('DEMO', tiny_demo) if a.startswith('DATA_DIR') else a for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        settings.run_cli(bench.main, argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith('error: ') and err.count('\n') == 1, err
    assert all(word in err for word in words), err
    assert sorted(os.listdir(tmp_path)) == ['A_FILE']


@pytest.mark.parametrize('dataset', ['Wiki', 'DEMO'])
def test_loader_part_on_image_files_and_on_an_iall(dataset, tiny_demo, tmp_path, capsys):
    """Wiki's (and Custom's) images are files, not an IAll: measured, not a KeyError."""
    import conftest
    folder = tiny_demo
    if dataset == 'Wiki':
        folder = str(tmp_path / 'wiki')
        conftest.write_wiki(folder, n_train=8, n_test=4)
    bench.main_loader([f'DATASET={dataset}', f'DATA_DIR={folder!r}', 'NUM_WORKERS=0',
                       'BATCH_SIZE=4', 'RESIZE=64', 'CROP=64'], seconds=0.2)
    out = capsys.readouterr().out
    assert ('image files' if dataset == 'Wiki' else 'chunks of') in out
    assert 'loader database:' in out


def test_an_interrupted_replica_leaves_nothing(tmp_path, monkeypatch):
    def stop(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(bench, 'replica_images', stop)
    folder = tmp_path / 'data' / 'bench-loader' / 'replica'
    with pytest.raises(KeyboardInterrupt):
        bench.write_loader_replica(str(folder), 8, n=16, size=16)
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_the_whole_run_on_the_cpu(tiny_demo, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(bench.GPU_SIZES, 'small', TINY)
    out = tmp_path / 'out'
    bench.main(['gpu', '--device', 'cpu', '--out', str(out), f'DATA_DIR={tiny_demo!r}',
                'BACKBONE=alexnet'])
    printed = capsys.readouterr().out
    paths = dict(line.split(': ', 1) for line in printed.splitlines()
                 if line.startswith(('figures: ', 'table: ')))
    with open(paths['figures']) as f:
        r = json.load(f)
    assert {'machine', 'device', 'sizes', 'agreement', 'precision', 'speed', 'grid',
            'seconds'} <= set(r)
    assert r['agreement']['ok'] and r['agreement']['loss_rtol'] == bench.LOSS_RTOL
    assert r['agreement']['runs'][0]['loss_rel_diff'] <= bench.LOSS_RTOL
    settings_ = r['precision']['settings']
    assert set(settings_) == {'off', 'BF16', 'TF32', 'CHANNELS_LAST'}
    assert settings_['off']['applied'] and len(settings_['off']['losses']) == 2
    assert settings_['TF32']['applied'] is False   # TF32 exists on CUDA only
    for entry in settings_.values():
        if entry['applied']:
            assert 0 <= entry['map_i2t'] <= 1 and 0 <= entry['map_t2i'] <= 1
            assert math.isfinite(entry['losses'][-1]) and entry['loss_rel_diff'] < 0.1
        else:
            assert 'note' in entry
    s = r['speed']['alexnet']
    assert s['floor_pairs_per_s'] > 0 and s['loop_pairs_per_s'] > 0 and s['scaled']
    assert s['train_peak_bytes'] > 0 and s['eval_images_per_s'] > 0
    assert math.isclose(s['grid_step_s'], 32 / s['loop_pairs_per_s'] * (224 / 64) ** 2)
    run = by_hand(s['grid_step_s'], s['grid_eval_images_per_s'])
    assert math.isclose(r['grid']['table 2']['hours'], 12 * sum(run.values()) / 3600)
    with open(paths['table']) as f:
        table = f.read()
    assert '| alexnet | 64 | 4 |' in table and 'PASS' in table
    again = bench.write_gpu_report(r, str(out))   # a second report never replaces the first
    assert again[0] != paths['figures'] and os.path.exists(paths['figures'])
