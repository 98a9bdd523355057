"""The README's demo command, whole: it must learn, and EVAL=True must give its numbers back.

About three minutes on a 2-core CPU, so marked slow: `python -m pytest -m slow`."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_demo_learns_and_eval_reproduces(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, 'train.py'), 'DATASET=DEMO']
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / 'runs' / 'DEMO_DJSRH_alexnet_32bit_seed0'
    assert f"run directory: {os.path.join('runs', run_dir.name)}" in proc.stdout
    results = json.loads((run_dir / 'results.json').read_text())
    assert results['map_i2t'] >= results['untrained_map_i2t'] + 0.10
    assert results['map_t2i'] >= results['untrained_map_t2i'] + 0.10
    proc = subprocess.run(cmd + ['EVAL=True'], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evaluated = json.loads((run_dir / 'eval.json').read_text())
    assert (evaluated['map_i2t'], evaluated['map_t2i']) == (results['map_i2t'],
                                                          results['map_t2i'])
