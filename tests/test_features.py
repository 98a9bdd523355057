"""Training and evaluation on stored features (IMAGE_FEATURES, TEXT_FEATURES, PUBLISHED),
the published layouts of UCCH and DGCPN, full mAP against a slow reference, bad input."""
import json
import os

import h5py
import numpy as np
import pytest
import scipy.io
import torch

import datasets
import demo
import features
import metric
import models
import published
import settings
import train
from conftest import MIR_NAMES, config, save_v73, tiny_texts_labels, write_dcmh
from settings import UserError

N_PAIRS = 160


# ===== full mAP =====

def slow_full_map(qu_B, re_B, qu_L, re_L):
    """Per query: Hamming distances, a stable argsort of the whole database, AP over every
    relevant item; a query with none adds 0."""
    qu_B, re_B = np.asarray(qu_B, np.float64), np.asarray(re_B, np.float64)
    total = 0.0
    for i in range(len(qu_B)):
        order = np.argsort(0.5 * (qu_B.shape[1] - re_B @ qu_B[i]), kind='stable')
        relevant = (re_L[order] @ qu_L[i]) > 0
        ranks = np.flatnonzero(relevant) + 1
        if len(ranks):
            total += np.mean(np.arange(1, len(ranks) + 1) / ranks)
    return total / len(qu_B)


@pytest.mark.parametrize('nbits, n_labels', [(4, 5), (16, 10), (64, 70)])
def test_full_map_matches_slow_reference(nbits, n_labels):
    """Few bits: massive ties, broken by database index. 70 labels: two label words."""
    rng = np.random.default_rng(nbits)
    q = rng.choice([-1, 1], size=(37, nbits)).astype(np.int8)
    db = rng.choice([-1, 1], size=(901, nbits)).astype(np.int8)
    ql = (rng.random((37, n_labels)) < 0.15).astype(np.uint8)
    dl = (rng.random((901, n_labels)) < 0.15).astype(np.uint8)
    ql[0] = 0   # a query relevant to nothing
    got = metric.calculate_map(q, db, ql, dl)
    assert got == pytest.approx(slow_full_map(q, db, ql, dl), abs=1e-12)
    # and it is mAP@k with k = the whole database
    assert got == pytest.approx(metric.calculate_top_map(q, db, ql, dl, len(db)), abs=1e-12)


def test_full_map_hand_example():
    """3 database items at distances 1, 0, 1 from the query; relevant: items 0 and 1.
    Ranking (ties by index): item 1, item 0, item 2 -> AP = (1/1 + 2/2) / 2 = 1.
    Labels swapped (relevant: items 0 and 2): ranking gives relevant at 2, 3 -> AP =
    (1/2 + 2/3) / 2."""
    q = np.array([[1, 1]])
    db = np.array([[1, -1], [1, 1], [-1, 1]])
    assert metric.calculate_map(q, db, [[1]], [[1], [1], [0]]) == pytest.approx(1.0)
    assert metric.calculate_map(q, db, [[1]], [[1], [0], [1]]) == pytest.approx(
        (1 / 2 + 2 / 3) / 2)


# ===== a tiny dataset and its feature files =====

@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """A 160-pair generated dataset in the MIRFlickr layout without its image file (so the
    scaled-down split: 16 query, 80 train), and feature files for it."""
    base = tmp_path_factory.mktemp('feat')
    demo.make_demo(str(base / 'demo'), n_pairs=N_PAIRS)
    os.remove(base / 'demo' / MIR_NAMES[0])   # feature mode must not need the images
    rng = np.random.default_rng(0)
    image_features = rng.random((N_PAIRS, 24)).astype(np.float32)
    np.save(base / 'img.npy', image_features)
    text_features = rng.random((N_PAIRS, 12)).astype(np.float32)
    scipy.io.savemat(base / 'txt.mat', {'emb': text_features})
    return base, image_features, text_features


def tiny_cfg(base, **overrides):
    args = dict(IMAGE_FEATURES=str(base / 'img.npy'), FEATURE_HIDDEN=16, CODE_LEN=16,
                BATCH_SIZE=16, NUM_EPOCH=2, EVAL_INTERVAL=2, OUT_DIR=str(base / 'runs'),
                EVAL_BATCH_SIZE=64, DETERMINISTIC=True)
    args.update(overrides)
    return config('MIRFlickr', base / 'demo', **args)


def test_loader_gives_the_stored_rows_of_its_pairs(tiny):
    base, image_features, _ = tiny
    cfg = tiny_cfg(base)
    data = datasets.load(cfg, verbose=False)
    for part in ('train', 'query'):
        gen = torch.Generator().manual_seed(5)
        seen = []
        for feats, texts, labels, idx in datasets.make_loader(data, part, cfg, gen):
            np.testing.assert_array_equal(feats.numpy(), image_features[idx.numpy()])
            np.testing.assert_array_equal(texts.numpy(), data.texts[idx.numpy()])
            np.testing.assert_array_equal(labels.numpy(), data.labels[idx.numpy()])
            seen.extend(idx.tolist())
        indices = getattr(data, part)
        if part == 'train':  # shuffled, drop_last
            assert len(seen) == len(indices) // 16 * 16 and set(seen) <= set(indices.tolist())
        else:
            assert seen == indices.tolist()


def test_s_i_is_built_from_the_stored_features(tiny):
    """FeatNet_I on features is the identity, so the target is joint_semantics of the rows."""
    base, image_features, _ = tiny
    net = models.FeatureImgNet(24, 16, 8)
    x = torch.from_numpy(image_features[:6])
    assert torch.equal(net.frozen_copy().fc7(x), x)
    feat, hid, code = net(x)
    assert feat.shape == (6, 8) and hid.shape == (6, 16)
    assert torch.equal(code, torch.tanh(net.alpha * hid))
    linear = models.FeatureImgNet(24, 16, 0)   # FEATURE_HIDDEN=0: hash layer on fc7
    assert [p.shape for p in linear.parameters()] == [(16, 24), (16,)]


def test_train_and_eval_on_image_and_text_features(tiny):
    base, _, text_features = tiny
    cfg = tiny_cfg(base, TEXT_FEATURES=str(base / 'txt.mat'), EVAL_UNTRAINED=True)
    run_dir = train.main([f'{k}={v!r}' for k, v in vars(cfg).items()
                          if k in ('DATASET', 'DATA_DIR', 'IMAGE_FEATURES', 'TEXT_FEATURES',
                                   'FEATURE_HIDDEN', 'CODE_LEN', 'BATCH_SIZE', 'NUM_EPOCH',
                                   'EVAL_INTERVAL', 'OUT_DIR', 'EVAL_BATCH_SIZE', 'DEVICE',
                                   'NUM_WORKERS', 'EVAL_UNTRAINED', 'DETERMINISTIC')])
    assert os.path.basename(run_dir) == 'MIRFlickr_DJSRH_features-img-text-txt_16bit_seed0'
    with open(os.path.join(run_dir, 'results.json')) as f:
        results = json.load(f)
    for key in ('map_i2t', 'map_t2i', 'map_all_i2t', 'map_all_t2i'):
        assert 0 < results[key] <= 1
    assert results['image_features'].endswith('img.npy')
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        evals = [json.loads(line) for line in f if '"eval": true' in line]
    assert all('map_all_i2t' in e and 'map_all_t2i' in e for e in evals)
    state = torch.load(os.path.join(run_dir, 'checkpoint.pt'), weights_only=True)
    assert state['img_net']['classifier.0.weight'].shape == (16, 24)
    assert state['txt_net']['fc1.weight'].shape == (4096, 12)   # TxtNet on the 12-d file
    # the codes file's full mAP is the value of the slow reference
    with np.load(os.path.join(run_dir, results['codes'])) as z:
        ref = slow_full_map(z['query_img'], z['db_txt'], z['query_labels'], z['db_labels'])
    assert results['map_all_i2t'] == pytest.approx(ref, abs=1e-12)
    # EVAL=True on the checkpoint gives the same numbers
    train.main(['DATASET=MIRFlickr', f'DATA_DIR={str(base / "demo")!r}',
                f'IMAGE_FEATURES={str(base / "img.npy")!r}',
                f'TEXT_FEATURES={str(base / "txt.mat")!r}', 'FEATURE_HIDDEN=16',
                'CODE_LEN=16', 'BATCH_SIZE=16', 'NUM_EPOCH=2', 'EVAL_INTERVAL=2',
                f'OUT_DIR={str(base / "runs")!r}', 'DEVICE="cpu"', 'NUM_WORKERS=0',
                'EVAL_UNTRAINED=True', 'EVAL=True'])
    with open(os.path.join(run_dir, 'eval.json')) as f:
        again = json.load(f)
    assert again['map_all_t2i'] == results['map_all_t2i']


def test_text_features_replace_the_text_vectors(tiny):
    base, _, text_features = tiny
    data = datasets.load(tiny_cfg(base, TEXT_FEATURES=str(base / 'txt.mat')), verbose=False)
    np.testing.assert_array_equal(data.texts, text_features)


# ===== bad input =====

def write_bad(path, array):
    np.save(path, array)
    return str(path)


@pytest.mark.parametrize('case, expected', [
    ('rows', '159 rows, expected one per pair of the dataset (160)'),
    ('nan', 'row 3, column 2 is nan'),
    ('inf', 'row 7, column 0 is inf'),
    ('1d', 'expected a 2-D numeric array'),
    ('missing', 'no such file'),
])
@pytest.mark.parametrize('setting', ['IMAGE_FEATURES', 'TEXT_FEATURES'])
def test_bad_feature_file_is_one_line_error(tiny, tmp_path, case, expected, setting):
    base, image_features, _ = tiny
    array = image_features.copy()
    if case == 'rows':
        array = array[:-1]
    elif case == 'nan':
        array[3, 2] = np.nan
    elif case == 'inf':
        array[7, 0] = np.inf
    elif case == '1d':
        array = array[:, 0]
    path = str(tmp_path / 'missing.npy') if case == 'missing' else \
        write_bad(tmp_path / 'bad.npy', array)
    with pytest.raises(UserError) as err:
        datasets.load(tiny_cfg(base, **{setting: path}), verbose=False)
    message = str(err.value)
    assert message.startswith(f"setting {setting}={path!r}") and expected in message
    assert '\n' not in message


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        settings.run_cli(train.main, argv)
    err = capsys.readouterr().err.strip()
    return stop.value.code, err


def cli_args(base, name, **extra):
    args = {'DATASET': 'MIRFlickr', 'DATA_DIR': str(base / 'demo'), 'FEATURE_HIDDEN': 16,
            'CODE_LEN': 16, 'BATCH_SIZE': 16, 'NUM_EPOCH': 1, 'EVAL_INTERVAL': 1,
            'OUT_DIR': str(base / 'runs'), 'RUN_NAME': name, 'DEVICE': 'cpu',
            'NUM_WORKERS': 0}
    args.update(extra)
    return [f'{k}={v!r}' for k, v in args.items() if v is not None]


def test_width_change_and_switches_are_refused_on_resume(tiny, tmp_path, capsys):
    _, image_features, _ = tiny
    base = tmp_path
    demo.make_demo(str(base / 'demo'), n_pairs=N_PAIRS)   # with its images this time
    first = write_bad(tmp_path / 'a.npy', image_features)
    train.main(cli_args(base, 'switch', IMAGE_FEATURES=first, KEEP_OPTIMIZER=True))
    ckpt = base / 'runs' / 'switch' / 'checkpoint.pt'
    before = ckpt.read_bytes()
    # the same file, now 30 columns wide
    write_bad(tmp_path / 'a.npy', np.hstack([image_features, image_features[:, :6]]))
    code, err = run_cli(cli_args(base, 'switch', IMAGE_FEATURES=first, NUM_EPOCH=2), capsys)
    assert code == 2 and err.count('\n') == 0
    assert 'classifier.0.weight of the image network' in err and "IMAGE_FEATURES=" in err
    # another features file, or the images: another experiment
    other = write_bad(tmp_path / 'b.npy', image_features)
    code, err = run_cli(cli_args(base, 'switch', IMAGE_FEATURES=other, NUM_EPOCH=2), capsys)
    assert code == 2 and 'different experiment' in err and 'IMAGE_FEATURES' in err
    code, err = run_cli(cli_args(base, 'switch', NUM_EPOCH=2, CROP=64, RESIZE=64,
                                 BACKBONE='alexnet', PRETRAINED=False), capsys)
    assert code == 2 and 'different experiment' in err and 'IMAGE_FEATURES' in err
    assert ckpt.read_bytes() == before   # nothing lost


@pytest.mark.parametrize('overrides, expected', [
    (dict(DATASET='Wiki', PUBLISHED='UCCH'), 'UCCH has MIRFlickr, NUSWIDE, IAPR, MSCOCO'),
    (dict(DATASET='IAPR'), "PUBLISHED='' : expected 'UCCH'"),
    (dict(DATASET='MSCOCO', PUBLISHED='DGCPN'), 'DGCPN has MIRFlickr, NUSWIDE'),
    (dict(PUBLISHED='UCCH', IMAGE_FEATURES='x.npy'), 'the image features come from its'),
    (dict(PUBLISHED='ucch'), "one of UCCH, DGCPN"),
    (dict(FEATURE_HIDDEN=-1), 'at least 0'),
])
def test_feature_settings_are_validated(overrides, expected):
    with pytest.raises(UserError) as err:
        settings.resolve(**overrides)
    assert expected.replace(' : ', ': ') in str(err.value)


# ===== the published layouts =====

def ucch_arrays(n, d_img=8, d_txt=6, c=5, seed=0):
    rng = np.random.default_rng(seed)
    texts, labels = tiny_texts_labels(n, d_txt, c, seed)
    return rng.random((n, d_img)).astype(np.float32), texts, labels


@pytest.mark.parametrize('dataset, names, n_query', [
    ('MIRFlickr', ('mirflickr25k-iall-vgg.mat', 'mirflickr25k-yall.mat',
                   'mirflickr25k-lall.mat'), 2000),
    ('MIRFlickr', ('mirflickr25k-iall-vgg-rand.mat', 'mirflickr25k-yall-rand.mat',
                   'mirflickr25k-lall-rand.mat'), 2000),
    ('NUSWIDE', ('nus-wide-tc10-xall-vgg.mat', 'nus-wide-tc10-yall.mat',
                 'nus-wide-tc10-lall.mat'), 2100),
])
def test_ucch_mat_layouts(tmp_path, dataset, names, n_query):
    n = n_query + 30
    images, texts, labels = ucch_arrays(n)
    scipy.io.savemat(tmp_path / names[0], {'XAll': images})
    if dataset == 'NUSWIDE':   # UCCH's first code read this one as MATLAB v7.3
        save_v73(str(tmp_path / names[1]), {'YAll': texts})
    else:
        scipy.io.savemat(tmp_path / names[1], {'YAll': texts})
    scipy.io.savemat(tmp_path / names[2], {'LAll': labels})
    data = datasets.load(config(dataset, tmp_path, PUBLISHED='UCCH'), verbose=False)
    check_ucch_split(data, images, texts, labels, n_query)


def check_ucch_split(data, images, texts, labels, n_query):
    n = len(labels)
    np.testing.assert_array_equal(data.query, np.arange(n - n_query, n))
    np.testing.assert_array_equal(data.train, np.arange(n - n_query))
    np.testing.assert_array_equal(data.database, np.arange(n - n_query))
    np.testing.assert_array_equal(data.images.rows(np.arange(n)), images)
    np.testing.assert_array_equal(data.texts, texts.astype(np.float32))
    np.testing.assert_array_equal(data.labels, labels)


def test_ucch_iapr_layout(tmp_path):
    images, texts, labels = ucch_arrays(2040, seed=2)
    db, test = slice(0, 40), slice(40, None)
    scipy.io.savemat(tmp_path / 'iapr-tc12-rand.mat', {
        'VDatabase': images[db], 'YDatabase': texts[db], 'databaseL': labels[db],
        'VTest': images[test], 'YTest': texts[test], 'testL': labels[test]})
    cfg = config('IAPR', tmp_path, PUBLISHED='UCCH')
    assert cfg.BETA == 0.9 and cfg.LR_IMG == 0.001   # MIRFlickr's values
    check_ucch_split(datasets.load(cfg, verbose=False), images, texts, labels, 2000)


def test_ucch_mscoco_layout(tmp_path):
    images, texts, labels = ucch_arrays(5020, d_txt=4, c=8, seed=3)
    with h5py.File(tmp_path / 'MSCOCO_deep_doc2vec_data_rand.h5py', 'w') as f:
        f['XAll'], f['YAll'], f['LAll'] = images, texts, labels
    data = datasets.load(config('MSCOCO', tmp_path, PUBLISHED='UCCH'), verbose=False)
    check_ucch_split(data, images, texts, labels, 5000)


def test_dgcpn_layout_and_a_run_on_it(tmp_path):
    n = 120
    images, texts, labels = ucch_arrays(n, seed=4)
    rng = np.random.default_rng(4)
    order = rng.permutation(n)
    split = {'test_num.npy': order[:20], 'val_num.npy': order[20:30],
             'train_num.npy': order[30:90], 'database_num.npy': np.sort(order[20:])}
    np.save(tmp_path / 'nus_vgg19.npy', images)
    np.save(tmp_path / 'tags.npy', texts)
    np.save(tmp_path / 'label.npy', labels.astype(int))
    for name, idx in split.items():
        np.save(tmp_path / name, idx)
    cfg = config('NUSWIDE', tmp_path, PUBLISHED='DGCPN', FEATURE_HIDDEN=8, CODE_LEN=8,
                 NUM_EPOCH=1, EVAL_INTERVAL=1, OUT_DIR=str(tmp_path / 'runs'))
    data = datasets.load(cfg, verbose=False)
    np.testing.assert_array_equal(data.query, split['test_num.npy'])
    np.testing.assert_array_equal(data.train, split['train_num.npy'])
    np.testing.assert_array_equal(data.database, split['database_num.npy'])
    np.testing.assert_array_equal(data.images.rows([5, 2]), images[[5, 2]])
    run = train.Run(cfg)
    run.train_to_end()
    with open(os.path.join(run.dir, 'results.json')) as f:
        assert 'map_all_t2i' in json.load(f)
    assert os.path.basename(run.dir) == 'NUSWIDE_DJSRH_dgcpn-features_8bit_seed0'


def test_published_split_indices_out_of_range(tmp_path):
    images, texts, labels = ucch_arrays(50, seed=5)
    np.save(tmp_path / 'flickr_vgg19.npy', images)
    np.save(tmp_path / 'tags.npy', texts)
    np.save(tmp_path / 'label.npy', labels)
    for name in ('test_num.npy', 'train_num.npy', 'database_num.npy'):
        np.save(tmp_path / name, np.arange(10) + (45 if name == 'train_num.npy' else 0))
    with pytest.raises(UserError, match='train_num.npy: expected integer pair indices from 0 '
                                        'to 49'):
        datasets.load(config('MIRFlickr', tmp_path, PUBLISHED='DGCPN'), verbose=False)


def test_ucch_file_too_small_for_its_split(tmp_path):
    images, texts, labels = ucch_arrays(100)
    for name, key, a in zip(published.UCCH_FILES['MIRFlickr'][0], published.UCCH_KEYS,
                            (images, texts, labels)):
        scipy.io.savemat(tmp_path / name, {key: a})
    with pytest.raises(UserError, match='takes the last 2000 as queries'):
        datasets.load(config('MIRFlickr', tmp_path, PUBLISHED='UCCH'), verbose=False)


# ===== reproduce.py: the features grid and the summary's UCCH column =====

def test_features_grid_runs_on_ucch_files(tmp_path, capsys):
    import reproduce
    assert reproduce.main(['--table', 'features', '--seeds', '1', '--bits', '16',
                           '--out-dir', str(tmp_path), '--dry-run']) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if 'would run' in l]
    assert [l.split('DATASET=')[1].split()[0] for l in lines] == \
        ['MIRFlickr', 'NUSWIDE', 'IAPR', 'MSCOCO']
    assert all('PUBLISHED=UCCH' in l and '_ucch-features_16bit_' in l for l in lines)
    with pytest.raises(UserError, match='run it alone'):
        reproduce.main(['--table', 'features', '2', '--dry-run', '--out-dir', str(tmp_path)])


def test_summary_puts_full_map_beside_ucch_numbers():
    import reproduce
    runs = [dict(dataset='MIRFlickr', variant='DJSRH', backbone='vgg19', code_len=128,
                 seed=s, topk=50, map_i2t=0.8, map_t2i=0.7, map_all_i2t=0.70 + s / 100,
                 map_all_t2i=0.69, image_features='UCCH', commit='abc') for s in (0, 1)]
    rows = {(r['metric'], r['task']): r for r in reproduce.summary_rows(runs)}
    full = rows[('mAP@all', 'I->T')]
    assert full['ucch'] == 0.716 and full['paper'] is None and full['mean'] == pytest.approx(0.705)
    assert full['backbone'] == 'UCCH features'
    assert rows[('mAP@50', 'I->T')]['ucch'] is None
    assert rows[('mAP@50', 'I->T')]['paper'] is None   # the paper's are on images
    table = reproduce.markdown_table(list(rows.values()))
    assert 'UCCH: DJSRH on features' in table.splitlines()[0] and '0.716' in table
