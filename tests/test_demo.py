"""The README's demo command: it must learn without collapsing, EVAL=True must give its numbers
back, and the distinct-code counts it reports must be those of its saved codes.

The whole demo takes about three minutes on a 2-core CPU, so it is marked slow:
`python -m pytest -m slow`."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import datasets
import demo
import settings
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def distinct_rows(codes):
    """Independent count: rows as bytes in a set."""
    return len({row.tobytes() for row in np.ascontiguousarray(codes)})


def test_distinct_codes_reported(tmp_path, capsys):
    """results.json, metrics.jsonl and the printed line carry the numbers of distinct image
    and text codes among the database items, counted as in the saved codes file."""
    demo.make_demo(str(tmp_path / 'demo'), n_pairs=160)
    argv = ['DATASET=DEMO', f"DATA_DIR={str(tmp_path / 'demo')!r}", 'BATCH_SIZE=16',
            'CODE_LEN=8', 'NUM_EPOCH=1', 'NUM_WORKERS=0', 'EVAL_BATCH_SIZE=64',
            f"OUT_DIR={str(tmp_path)!r}", "RUN_NAME='run'"]
    settings.run_cli(train.main, argv)
    printed = capsys.readouterr().out
    run_dir = tmp_path / 'run'
    evals = [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()
             if '"eval": true' in line]
    assert [e['epoch'] for e in evals] == [0, 1]   # untrained and final
    for e in evals:
        with np.load(run_dir / e['codes']) as z:
            assert e['distinct_img_codes'] == distinct_rows(z['db_img'])
            assert e['distinct_txt_codes'] == distinct_rows(z['db_txt'])
        assert (f"distinct database codes: image {e['distinct_img_codes']}, "
                f"text {e['distinct_txt_codes']}") in printed
    results = json.loads((run_dir / 'results.json').read_text())
    assert (results['distinct_img_codes'], results['distinct_txt_codes']) == (
        evals[-1]['distinct_img_codes'], evals[-1]['distinct_txt_codes'])


@pytest.mark.slow
def test_demo_learns_at_16_bits_and_eval_reproduces(tmp_path):
    """16 bits is where the demo used to fail: every image got the same code."""
    cmd = [sys.executable, os.path.join(ROOT, 'train.py'), 'DATASET=DEMO', 'CODE_LEN=16']
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / 'runs' / 'DEMO_DJSRH_alexnet_16bit_seed0'
    assert f"run directory: {os.path.join('runs', run_dir.name)}" in proc.stdout
    results = json.loads((run_dir / 'results.json').read_text())
    assert results['map_i2t'] >= results['untrained_map_i2t'] + 0.10
    assert results['map_t2i'] >= results['untrained_map_t2i'] + 0.10
    # 1,800 database items: a collapse leaves a handful of codes
    assert results['distinct_img_codes'] >= 20
    assert results['distinct_txt_codes'] >= 20
    proc = subprocess.run(cmd + ['EVAL=True'], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evaluated = json.loads((run_dir / 'eval.json').read_text())
    assert (evaluated['map_i2t'], evaluated['map_t2i']) == (results['map_i2t'],
                                                          results['map_t2i'])


def test_learning_table_by_hand():
    import reproduce
    runs = [dict(dataset='DEMO', variant='DJSRH', backbone='alexnet', code_len=32, seed=1,
                 map_i2t=0.6, map_t2i=0.5, untrained_map_i2t=0.4, untrained_map_t2i=0.45,
                 distinct_img_codes=300, distinct_txt_codes=900),
            dict(dataset='DEMO', variant='DJSRH', backbone='alexnet', code_len=16, seed=0,
                 map_i2t=0.55, map_t2i=0.41, untrained_map_i2t=0.4, untrained_map_t2i=0.41,
                 distinct_img_codes=1, distinct_txt_codes=700),
            # the same dataset, bits and seed on stored features: its row names the source
            dict(dataset='DEMO', variant='DJSRH', backbone='alexnet', code_len=16, seed=0,
                 map_i2t=0.55, map_t2i=0.41, untrained_map_i2t=0.4, untrained_map_t2i=0.41,
                 distinct_img_codes=1, distinct_txt_codes=700,
                 image_features='data/demo/fc7.npy'),
            dict(dataset='Wiki', variant='DJSRH', code_len=16, seed=0, map_i2t=0.3,
                 map_t2i=0.5)]  # no untrained evaluation: not listed
    lines = reproduce.learning_table(runs).splitlines()
    assert lines[0].startswith('| dataset | variant | images | bits |')
    assert lines[2:] == [
        '| DEMO | DJSRH | alexnet | 16 | 0 | 0.400 -> 0.550 (+0.150) | 0.410 -> 0.410 (+0.000) '
        '| 1 / 700 |',
        '| DEMO | DJSRH | alexnet | 32 | 1 | 0.400 -> 0.600 (+0.200) | 0.450 -> 0.500 (+0.050) '
        '| 300 / 900 |',
        '| DEMO | DJSRH | features fc7.npy | 16 | 0 | 0.400 -> 0.550 (+0.150) | 0.410 -> 0.410 '
        '(+0.000) | 1 / 700 |']
    assert reproduce.learning_table(runs[3:]) == ''
