"""plots.py: the curves it draws are metric.py's numbers for the right code pairs, they behave
as they must on codes whose answer is known, and the PNG comes from saved codes alone."""
import json
from pathlib import Path

import numpy as np
import pytest

import metric
import plots
import settings

BITS = 16
CLASSES = 4


def make_codes(rng, per_class_db=30, per_class_query=5, flip=0.0):
    """Single-label data: every item's code is its class's codeword with a fraction `flip` of
    bits flipped, image and text codes flipped independently. int8, as train.py saves them."""
    words = rng.choice([-1, 1], size=(CLASSES, BITS))
    words[1] = -words[0]  # keep the classes far apart
    def part(n_per_class):
        labels = np.repeat(np.eye(CLASSES, dtype=np.uint8), n_per_class, axis=0)
        base = words[labels.argmax(1)]
        noisy = lambda: np.where(rng.random(base.shape) < flip, -base, base).astype(np.int8)
        return noisy(), noisy(), labels
    q_img, q_txt, q_lab = part(per_class_query)
    d_img, d_txt, d_lab = part(per_class_db)
    return dict(query_img=q_img, query_txt=q_txt, db_img=d_img, db_txt=d_txt,
                query_labels=q_lab, db_labels=d_lab)


def save_run(run_dir, codes, epoch=3, results=None):
    """A run directory holding only codes/epoch_EEE.npz (and results.json if given)."""
    (run_dir / 'codes').mkdir(parents=True)
    np.savez_compressed(run_dir / 'codes' / f'epoch_{epoch:03d}.npz', **codes)
    if results is not None:
        (run_dir / 'results.json').write_text(json.dumps(results))
    return run_dir


def test_curves_are_metric_values_of_the_right_pairs():
    codes = make_codes(np.random.default_rng(0), flip=0.2)
    r = plots.r_values(len(codes['db_img']), None)
    c = plots.curves(codes, r)
    for direction, query, db in (('i2t', 'query_img', 'db_txt'), ('t2i', 'query_txt', 'db_img')):
        args = (codes[query], codes[db], codes['query_labels'], codes['db_labels'])
        np.testing.assert_allclose(c[direction]['p_at_r'], metric.precision_at_top_r(*args, r))
        precision, recall = metric.pr_curve_hamming(*args)
        np.testing.assert_allclose(c[direction]['precision'], precision)
        np.testing.assert_allclose(c[direction]['recall'], recall)
    assert not np.allclose(c['i2t']['p_at_r'], c['t2i']['p_at_r'])  # the two pairs differ


def test_precision_at_r_on_exact_codes():
    # Every item carries its class's codeword: the top 30 (its class in the database) are all
    # relevant, and after that precision falls as 30 / R, never rising again.
    codes = make_codes(np.random.default_rng(1), per_class_db=30)
    r = plots.r_values(len(codes['db_img']), None)
    assert r[0] == 1 and r[-1] == len(codes['db_img'])
    c = plots.curves(codes, r)
    for direction in ('i2t', 't2i'):
        p = np.asarray(c[direction]['p_at_r'])
        np.testing.assert_allclose(p[r <= 30], 1.0)
        np.testing.assert_allclose(p[r > 30], 30 / r[r > 30])
        assert np.all(np.diff(p) <= 1e-12)
        assert p[-1] == pytest.approx(1 / CLASSES)  # R = whole database


def test_pr_curve_reaches_full_recall_at_full_radius():
    codes = make_codes(np.random.default_rng(2), flip=0.3)
    c = plots.curves(codes, np.array([1]))
    for direction in ('i2t', 't2i'):
        precision = np.asarray(c[direction]['precision'])
        recall = np.asarray(c[direction]['recall'])
        assert len(recall) == BITS + 1  # radius 0 .. code length
        assert np.all(np.diff(recall) >= -1e-12)  # a larger ball never loses items
        assert recall[-1] == pytest.approx(1.0)
        # at the full radius everything is retrieved: precision = share of relevant items
        assert precision[-1] == pytest.approx(1 / CLASSES)


def test_r_max_follows_the_paper():
    assert plots.r_values(20000, 'MIRFlickr')[-1] == 5000
    assert plots.r_values(3000, 'Wiki')[-1] == 2000
    assert plots.r_values(184577, 'NUSWIDE', points=10)[-1] == 5000
    assert plots.r_values(180, 'DEMO')[-1] == 180  # DEMO: the whole database
    assert len(plots.r_values(20000, 'MIRFlickr', points=50)) == 50


def test_png_from_saved_codes_alone(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    bare = save_run(tmp_path / 'bare', make_codes(rng, flip=0.1))  # no json of any kind
    named = save_run(tmp_path / 'named', make_codes(rng, flip=0.2), epoch=6, results=dict(
        dataset='DEMO', variant='DJSRH', code_len=BITS, seed=1, codes='codes/epoch_006.npz'))
    np.savez_compressed(named / 'codes' / 'epoch_000.npz', **make_codes(rng, flip=0.5))
    drawn = []
    real_draw = plots.draw
    monkeypatch.setattr(plots, 'draw', lambda series, *a: (drawn.extend(series),
                                                           real_draw(series, *a)))
    out = tmp_path / 'fig' / 'curves.png'
    assert plots.main([str(bare), str(named), '--out', str(out)]) == 0
    assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and out.stat().st_size > 10_000
    labels = [label for label, _ in drawn]
    assert labels == ['bare, epoch 003', 'DEMO DJSRH 16 bits seed 1, epoch 006']
    # what was drawn is metric.py's value for the saved codes
    saved = plots.load_codes(named / 'codes' / 'epoch_006.npz')
    expect = metric.precision_at_top_r(saved['query_img'], saved['db_txt'],
                                       saved['query_labels'], saved['db_labels'], drawn[1][1]['r'])
    np.testing.assert_allclose(drawn[1][1]['i2t']['p_at_r'], expect)


def test_which_codes_file(tmp_path):
    rng = np.random.default_rng(4)
    run = save_run(tmp_path / 'run', make_codes(rng), epoch=40)
    np.savez_compressed(run / 'codes' / 'epoch_000.npz', **make_codes(rng))
    np.savez_compressed(run / 'codes' / 'epoch_080.npz', **make_codes(rng))
    assert plots.find_codes(run).name == 'epoch_080.npz'  # the latest without results.json
    (run / 'results.json').write_text(json.dumps({'codes': 'codes/epoch_040.npz'}))
    assert plots.find_codes(run).name == 'epoch_040.npz'  # the one results.json names
    assert plots.find_codes(run, epoch=0).name == 'epoch_000.npz'
    assert plots.find_codes(run / 'codes' / 'epoch_080.npz').name == 'epoch_080.npz'


def broken(tmp_path, how):
    """A run directory or codes file spoiled in one way; returns the argument to pass."""
    rng = np.random.default_rng(5)
    run = save_run(tmp_path / 'RUN', make_codes(rng))
    npz = run / 'codes' / 'epoch_003.npz'
    if how == 'truncated_npz':
        npz.write_bytes(npz.read_bytes()[:300])
    elif how == 'foreign_npz':
        np.savez(npz, weights=np.zeros(3))
    elif how == 'npy_file':
        np.save(tmp_path / 'codes.npy', np.zeros(3))
        return tmp_path / 'codes.npy'
    elif how == 'text_file':
        (tmp_path / 'notes.npz').write_text('not a zip')
        return tmp_path / 'notes.npz'
    elif how == 'shapes':
        codes = make_codes(rng)
        codes['db_labels'] = codes['db_labels'][:, 0]   # 1-D labels
        np.savez(npz, **codes)
    elif how in ('codes_01', 'codes_bool', 'no_bits'):
        codes = make_codes(rng)
        if how == 'codes_01':
            codes['query_txt'] = (codes['query_txt'] > 0).astype(np.int8)
        elif how == 'codes_bool':
            codes['db_img'] = codes['db_img'] > 0
        else:
            codes = {k: v[:, :0] if k.endswith(('img', 'txt')) else v for k, v in codes.items()}
        np.savez(npz, **codes)
    elif how == 'no_labels':   # as a Custom run without labels saves them: no label column
        codes = make_codes(rng)
        codes.update(query_labels=codes['query_labels'][:, :0],
                     db_labels=codes['db_labels'][:, :0])
        np.savez(npz, **codes)
    elif how in ('labels_zero', 'labels_signed'):
        codes = make_codes(rng)
        if how == 'labels_zero':   # labelled queries, an unlabelled database
            codes['db_labels'][:] = 0
        else:
            codes['db_labels'] = codes['db_labels'].astype(np.int8) * -1
        np.savez(npz, **codes)
    elif how == 'results_list':
        (run / 'results.json').write_text('[1, 2]')
    elif how == 'results_codes_number':
        (run / 'results.json').write_text('{"codes": 5, "dataset": "DEMO"}')
    elif how == 'results_not_json':
        (run / 'results.json').write_text('{"codes": ')
    return run


BROKEN = {  # case -> (output name, words of the one-line error)
    'nowhere': ('x.png', ['no such run directory']),
    'epoch_missing': ('x.png', ['no codes saved at epoch 7']),
    'truncated_npz': ('x.png', ['epoch_003.npz', 'cannot be read']),
    'foreign_npz': ('x.png', ['epoch_003.npz', 'not a codes file', 'query_img']),
    'npy_file': ('x.png', ['codes.npy', 'single array']),
    'text_file': ('x.png', ['notes.npz', 'cannot be read']),
    'shapes': ('x.png', ['epoch_003.npz', 'db_labels']),
    'codes_01': ('x.png', ['epoch_003.npz', 'query_txt', 'values 0, 1', '-1 and +1']),
    'codes_bool': ('x.png', ['epoch_003.npz', 'db_img', '-1 and +1']),
    'no_bits': ('x.png', ['epoch_003.npz', 'unexpected shapes']),
    'no_labels': ('x.png', ['epoch_003.npz', 'no query has a label', 'recall@K']),
    'labels_zero': ('x.png', ['epoch_003.npz', 'no query shares a label']),  # drew nothing
    'labels_signed': ('x.png', ['epoch_003.npz', 'db_labels', 'values -1, 0', '0 and 1']),
    'results_list': ('x.png', ['results.json', 'list']),
    'results_codes_number': ('x.png', None),   # the codes it names cannot be: the latest ones
    'results_not_json': ('x.png', ['results.json', 'cannot be read']),
    'out_is_a_folder': ('folder', ['--out', 'is a folder']),
    'out_unknown_type': ('x.xyz', ['--out', '.xyz', '.png']),
    'out_no_extension': ('curves', ['--out', '(none)']),
}


@pytest.mark.parametrize('case', list(BROKEN))
def test_broken_input_is_one_line(case, tmp_path, capsys):
    import settings
    out_name, words = BROKEN[case]
    target = broken(tmp_path, case)
    if case == 'nowhere':
        target = tmp_path / 'nowhere'
    (tmp_path / 'folder').mkdir()
    argv = [str(target), '--out', str(tmp_path / out_name)]
    argv += ['--epoch', '7'] if case == 'epoch_missing' else []
    if words is None:   # not an error: results.json's unusable 'codes' is passed over
        assert plots.main(argv) == 0
        assert capsys.readouterr().out.strip() == f'written: {tmp_path / out_name}'
        return
    with pytest.raises(SystemExit) as exit_:
        settings.run_cli(plots.main, argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1, err
    for word in words:
        assert word in err, err
    assert [p.name for p in tmp_path.iterdir() if p.suffix in ('.png', '.xyz')] == []
    assert list((tmp_path / 'folder').iterdir()) == []


def test_partly_labelled_queries_are_curved_over_the_labelled_ones(tmp_path):
    """As train.py's mAP: queries without a label are left out (the database keeps all)."""
    codes = make_codes(np.random.default_rng(6), flip=0.2)
    some = codes['query_labels'].copy()
    some[::3] = 0
    path = save_run(tmp_path / 'RUN', {**codes, 'query_labels': some}) / 'codes' / 'epoch_003.npz'
    got = plots.load_codes(path)
    keep = some.any(1)
    assert 0 < keep.sum() < len(keep) and len(got['query_img']) == keep.sum()
    for key in ('query_img', 'query_txt', 'query_labels'):
        np.testing.assert_array_equal(got[key], {**codes, 'query_labels': some}[key][keep])
    for key in ('db_img', 'db_txt', 'db_labels'):
        np.testing.assert_array_equal(got[key], codes[key])
def test_a_failed_write_leaves_no_partial_picture(tmp_path, monkeypatch, capsys):
    import matplotlib.figure
    run = save_run(tmp_path / 'run', make_codes(np.random.default_rng(8)))
    def half_then_full_disk(fig, path, **kwargs):
        Path(path).write_bytes(b'\x89PNG half')
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(matplotlib.figure.Figure, 'savefig', half_then_full_disk)
    with pytest.raises(settings.UserError, match='No space left'):
        plots.main([str(run), '--out', str(tmp_path / 'figs' / 'c.png')])
    assert list((tmp_path / 'figs').iterdir()) == []


def test_out_names_exactly_the_file_written(tmp_path, capsys):
    run = save_run(tmp_path / 'run', make_codes(np.random.default_rng(6)))
    out = tmp_path / 'figs' / 'curves.v2.pdf'
    assert plots.main([str(run), '--out', str(out)]) == 0
    assert capsys.readouterr().out.strip() == f'written: {out}'
    assert out.read_bytes()[:5] == b'%PDF-'
    assert [p.name for p in (tmp_path / 'figs').iterdir()] == ['curves.v2.pdf']


@pytest.mark.parametrize('argv, words', [
    ([], ['required: RUN_DIR, --out']),
    (['run', '--out', 'x.png', '--epoch', 'last'], ['--epoch', "invalid int value: 'last'"]),
])
def test_command_line_errors_are_one_line(argv, words, capsys):
    import settings
    with pytest.raises(SystemExit) as exit_:
        settings.run_cli(plots.main, argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1, err
    assert all(word in err for word in words), err


def test_dollar_signs_are_drawn_as_written(tmp_path):
    """A run directory or title with '$' is text, not a formula for matplotlib to parse."""
    run = save_run(tmp_path / r'run$\frac{$', make_codes(np.random.default_rng(7)))
    out = tmp_path / 'c.png'
    assert plots.main([str(run), '--out', str(out), '--title', r'$\frac{$ cost']) == 0
    assert out.read_bytes()[:4] == b'\x89PNG'
    assert plots.r_values(100, None, points=10 ** 12).tolist() == list(range(1, 101))
