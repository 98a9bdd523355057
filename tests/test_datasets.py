"""datasets.py: the file layouts, the split, the loaders, the check command, DEMO."""
import os
import pickle
import re
import subprocess
import sys

import h5py
import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image
from torchvision import transforms as T

import cv2

import datasets
import demo
import matfile
import metric
import pairs
import settings
import wiki
from conftest import (MIR_NAMES, NUS_NAMES, PUBLISHED_LAYOUTS, blue_of, config,
                      pattern_image, save_v5, save_v73, tiny_texts_labels, write_dcmh,
                      write_published, write_wiki)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ===== reading each layout =====

@pytest.mark.parametrize('versions', [('v7.3', 'v5', 'v5'), ('v5', 'v7.3', 'v7.3'),
                                      ('v7.3', 'v7.3', 'v7.3'), ('v5', 'v5', 'v5')])
def test_dcmh_any_version_reads_aligned_and_upright(tmp_path, versions):
    texts, labels = write_dcmh(tmp_path, MIR_NAMES, n=30, versions=versions)
    data = datasets.load(config('MIRFlickr', tmp_path), verbose=False)
    assert data.texts.dtype == np.float32 and data.labels.dtype == np.uint8
    np.testing.assert_array_equal(data.texts, texts)
    np.testing.assert_array_equal(data.labels, labels)
    for i in (0, 7, 29):
        np.testing.assert_array_equal(data.images[i], pattern_image(i, 20, 12))
    assert data.files[0][1].startswith(f"IAll {versions[0]}")


def test_v73_file_is_what_matlab_writes(layouts):
    """The test files really are MATLAB-style v7.3: scipy refuses them, h5py sees (N, 3, W, H)."""
    path = os.path.join(layouts['MIRFlickr'][0], MIR_NAMES[0])
    with open(path, 'rb') as f:
        head = f.read(128)
    assert head.startswith(b'MATLAB 7.3 MAT-file') and head[124:128] == b'\x00\x02IM'
    with pytest.raises(NotImplementedError):
        scipy.io.loadmat(path)
    with h5py.File(path, 'r') as f:
        assert f['IAll'].shape == (60, 3, 12, 20)
        assert f['IAll'].attrs['MATLAB_class'] == b'uint8'


def test_nuswide_layout_yall_v73_transposed(layouts):
    folder, (texts, labels) = layouts['NUSWIDE']
    with h5py.File(os.path.join(folder, NUS_NAMES[1]), 'r') as f:
        assert f['YAll'].shape == (20, 50)   # MATLAB's 50 x 20, reversed
    data = datasets.load(config('NUSWIDE', folder), verbose=False)
    np.testing.assert_array_equal(data.texts, texts)
    np.testing.assert_array_equal(data.labels, labels)
    assert data.images[49].shape == (20, 12, 3)


@pytest.mark.parametrize('layout', sorted(PUBLISHED_LAYOUTS))
def test_published_layouts_pass_the_check(tmp_path, capsys, layout):
    data_dir, dataset, texts, labels, paths = write_published(tmp_path, layout)
    code, out, err = run_check([f'DATASET={dataset}', f'DATA_DIR={data_dir}'], capsys)
    assert code == 0 and err == '', err
    assert 'passes the check' in out and 'pairs 40; text 12-d; 5 labels' in out
    data = datasets.load(config(dataset, data_dir), verbose=False)
    assert [path for path, _ in data.files] == list(paths.values())   # found where they are
    np.testing.assert_array_equal(data.texts, texts)
    np.testing.assert_array_equal(data.labels, labels)
    for i in (0, 39):
        np.testing.assert_array_equal(data.images[i], pattern_image(i, 14, 10))


def test_missing_file_names_every_path_tried(tmp_path, capsys):
    data_dir, _, _, _, paths = write_published(tmp_path, 'MIRFlickr Cleared-Set')
    os.remove(paths[MIR_NAMES[1]])
    code, _, err = run_check(['DATASET=MIRFlickr', f'DATA_DIR={data_dir}'], capsys)
    assert code == 2 and err.count('\n') == 1, err
    for tried in ('', 'YAll', os.path.join('YAll', 'YAll')):
        assert os.path.join(data_dir, tried, MIR_NAMES[1]) + (',' if tried != os.path.join(
            'YAll', 'YAll') else ';') in err, err


def test_flat_file_wins_over_a_nested_copy(tmp_path):
    """A file found in several places: DATA_DIR itself first, then <X>/, then <X>/<X>/."""
    write_dcmh(tmp_path, NUS_NAMES, n=20)
    os.makedirs(tmp_path / 'IAll')
    write_dcmh(tmp_path / 'IAll', NUS_NAMES[:1], n=20, height=6, width=8)
    data = datasets.load(config('NUSWIDE', tmp_path), verbose=False)
    assert data.files[0][0] == str(tmp_path / NUS_NAMES[0])
    assert data.images[0].shape == (20, 12, 3)


# ===== orientation of an image array: by its shape, not by MATLAB's attribute =====

def save_h5_images(path, stored, attribute):
    """An IAll as another tool may re-save it: the given stored order, with or without
    MATLAB's class attribute, no MATLAB header."""
    with h5py.File(path, 'w') as f:
        f['IAll'] = stored
        if attribute:
            f['IAll'].attrs['MATLAB_class'] = np.bytes_('uint8')


@pytest.mark.parametrize('order', ['matlab (N, 3, W, H)', 'numpy (N, H, W, 3)'])
@pytest.mark.parametrize('attribute', [True, False])
def test_image_orientation_decided_by_the_array(tmp_path, order, attribute):
    n, h, w = 12, 9, 7            # not square: a swap of height and width cannot pass
    stack = np.stack([pattern_image(i, h, w) for i in range(n)])        # (N, H, W, 3)
    stored = stack.transpose(0, 3, 2, 1) if order.startswith('matlab') else stack
    save_h5_images(tmp_path / MIR_NAMES[0], np.ascontiguousarray(stored), attribute)
    texts, labels = tiny_texts_labels(n, 5, 3)
    save_v5(tmp_path / MIR_NAMES[1], {'YAll': texts})
    save_v5(tmp_path / MIR_NAMES[2], {'LAll': labels})
    for i in (0, 5, 11):
        np.testing.assert_array_equal(datasets.read_image(str(tmp_path / MIR_NAMES[0]), i),
                                      pattern_image(i, h, w))
    for in_memory in (False, True):
        data = datasets.load(config('MIRFlickr', tmp_path, IN_MEMORY=in_memory), verbose=False)
        assert data.files[0][1].endswith(f"{n} images of {h} x {w} x 3 uint8")
        for i in range(n):
            np.testing.assert_array_equal(data.images[i], pattern_image(i, h, w))


def test_image_array_in_no_known_order_is_refused():
    """(N, H, 3, W): the colour axis neither next to the pairs nor at the other end."""
    var = matfile.MatVar('odd.mat', 'IAll', 'v7.3', (12, 9, 3, 7), 'uint8')
    with pytest.raises(settings.UserError, match='neither H x W x 3 x pairs nor'):
        matfile.ImageLayout(var, 12)
    assert matfile.ImageLayout(var, 7).n_axis == 3    # 12 x 9 x 3 x 7: MATLAB's order


def test_wiki_lists_texts_labels_images(layouts):
    folder, (names, cats, texts) = layouts['Wiki']
    data = datasets.load(config('Wiki', folder), verbose=False)
    np.testing.assert_array_equal(data.query, np.arange(30, 40))
    np.testing.assert_array_equal(data.train, np.arange(30))
    np.testing.assert_array_equal(data.database, np.arange(30))
    np.testing.assert_allclose(data.texts, texts, rtol=1e-6)
    np.testing.assert_array_equal(data.labels.argmax(1), cats)
    assert (data.labels.sum(1) == 1).all()
    for i in (0, 1, 35):
        img = data.images[i]
        assert img.ndim == 3 and img.shape[2] == 3           # grey picture 1 comes as RGB
        assert img[:3, :, 0].mean() > 200 and img[-3:, :, 0].mean() < 50   # upright
        expected = os.path.join(folder, 'images', wiki.WIKI_CATEGORIES[cats[i]],
                                names[i] + '.jpg')
        np.testing.assert_array_equal(img, cv2.imread(expected)[..., ::-1])


def wiki_jpeg(path, kind):
    """A non-square picture saved as a grey, CMYK, progressive or EXIF-rotated JPEG."""
    rng = np.random.default_rng(len(kind))
    img = Image.fromarray((rng.random((30, 44, 3)) * 255).astype(np.uint8))
    if kind == 'grey':
        img.convert('L').save(path, quality=90)
    elif kind == 'cmyk':
        img.convert('CMYK').save(path, quality=90)
    elif kind == 'progressive':
        img.save(path, quality=90, progressive=True)
    else:
        exif = Image.Exif()
        exif[0x0112] = 6          # "rotate 90 clockwise to display"
        img.save(path, quality=90, exif=exif)


@pytest.mark.parametrize('kind', ['grey', 'cmyk', 'progressive', 'exif_rotated'])
def test_wiki_images_decode_as_opencv(tmp_path, kind):
    path = str(tmp_path / f'{kind}.jpg')
    wiki_jpeg(path, kind)
    expected = cv2.imread(path)[..., ::-1]     # the authors: cv2.imread, then BGR -> RGB
    images = pairs.FileImages([path])
    np.testing.assert_array_equal(images[0], expected)
    np.testing.assert_array_equal(np.asarray(images.pil(0)), expected)
    assert images.pil(0).mode == 'RGB'
    if kind == 'cmyk':   # where PIL's own decoding differs: the test can tell them apart
        assert (np.asarray(Image.open(path).convert('RGB')) != expected).any()
    if kind == 'exif_rotated':
        assert expected.shape == (44, 30, 3)


def test_in_memory_equals_lazy(layouts):
    folder = layouts['MIRFlickr'][0]
    lazy = datasets.load(config('MIRFlickr', folder), verbose=False)
    held = datasets.load(config('MIRFlickr', folder, IN_MEMORY=True), verbose=False)
    assert isinstance(lazy.images, pairs.H5Images)
    assert isinstance(held.images, pairs.ArrayImages)
    assert held.images.array.dtype == np.uint8 and held.images.array.shape == (60, 20, 12, 3)
    for i in range(60):
        np.testing.assert_array_equal(held.images[i], lazy.images[i])


# ===== the split =====

def check_split(q, t, d, n, nq, nt):
    assert (len(q), len(t), len(d)) == (nq, nt, n - nq)
    assert q.dtype == t.dtype == d.dtype == np.int64
    assert len(set(q)) == nq and len(set(t)) == nt
    assert not set(q) & set(d)
    assert set(t) <= set(d)
    assert set(q) | set(d) == set(range(n))


def random_labels(n, c, low, high, seed):
    rng = np.random.default_rng(seed)
    return (rng.random((n, c)) < np.linspace(low, high, c)).astype(np.uint8)


@pytest.mark.parametrize('dataset,n,c', [('MIRFlickr', 20015, 24), ('NUSWIDE', 186577, 10)])
def test_split_sizes_and_seed(dataset, n, c):
    labels = random_labels(n, c, 0.02, 0.4, seed=1)
    q, t, d = datasets.split_indices(labels, dataset, 0)
    check_split(q, t, d, n, 2000, 5000)
    assert len(d) == {'MIRFlickr': 18015, 'NUSWIDE': 184577}[dataset]
    np.testing.assert_array_equal(d, np.sort(d))        # the authors' database order
    again = datasets.split_indices(labels, dataset, 0)
    for a, b in zip((q, t, d), again):
        np.testing.assert_array_equal(a, b)
    other = datasets.split_indices(labels, dataset, 1)
    assert set(other[0]) != set(q)


def block_labels(sizes, n=20015):
    """Disjoint classes: class k owns the next sizes[k] items; the rest have no label."""
    labels = np.zeros((n, len(sizes)), np.uint8)
    start = 0
    for k, size in enumerate(sizes):
        labels[start:start + size, k] = 1
        start += size
    return labels


def per_class(indices, labels):
    return labels[indices].sum(0)


def test_split_per_class_quotas():
    labels = block_labels([600] * 24)
    q, t, d = datasets.split_indices(labels, 'MIRFlickr', 5)
    check_split(q, t, d, len(labels), 2000, 5000)
    assert list(per_class(q, labels)) == [160] + [80] * 23
    assert list(per_class(t, labels)) == [400] + [200] * 23   # no top-up needed


def test_split_short_class_is_topped_up_from_database():
    sizes = [600] * 24
    sizes[5] = 150
    labels = block_labels(sizes)
    q, t, d = datasets.split_indices(labels, 'MIRFlickr', 0)
    check_split(q, t, d, len(labels), 2000, 5000)
    assert per_class(q, labels)[5] == 80
    # the classes' quotas come first, in class order; then 130 drawn from the database
    quotas = [400] + [200] * 23
    quotas[5] = 70
    assert list(per_class(t[:4870], labels)) == quotas


def test_split_skips_items_taken_by_earlier_classes():
    labels = block_labels([600] + [400] * 23)
    labels[:600, 1] = 1   # class 1 also holds all of class 0's items
    q, t, d = datasets.split_indices(labels, 'MIRFlickr', 0)
    check_split(q, t, d, len(labels), 2000, 5000)
    # class 0 took 560 of its 600; class 1 draws its 280 from the other 40 + its own 400
    assert per_class(q, labels)[1] == 160 + 80 and per_class(t, labels)[1] == 400 + 200


def test_split_tiny_hand_made():
    """DEMO protocol on 20 pairs, 1 class: query 2, train 10 (first class 2q/2t = 2/10)."""
    labels = np.ones((20, 1), np.uint8)
    q, t, d = datasets.split_indices(labels, 'DEMO', 0)
    check_split(q, t, d, 20, 2, 10)


@pytest.mark.parametrize('n,sizes', [(240, (24, 120, 216)), (2000, (200, 1000, 1800))])
def test_split_demo_scaled(n, sizes):
    labels = demo.demo_labels(np.random.default_rng(0), n)
    q, t, d = datasets.split_indices(labels, 'DEMO', 0)
    check_split(q, t, d, n, sizes[0], sizes[1])
    assert len(d) == sizes[2]


def test_split_wiki_is_refused():
    with pytest.raises(ValueError):
        datasets.split_indices(np.ones((10, 2)), 'Wiki', 0)


def test_split_seed_is_not_the_training_seed(layouts):
    folder = layouts['MIRFlickr'][0]
    a = datasets.load(config('MIRFlickr', folder, SEED=1), verbose=False)
    b = datasets.load(config('MIRFlickr', folder, SEED=2), verbose=False)
    c = datasets.load(config('MIRFlickr', folder, SPLIT_SEED=9), verbose=False)
    np.testing.assert_array_equal(a.query, b.query)
    assert set(a.query) != set(c.query)


# ===== loaders =====

def test_eval_loader_batches_aligned_upright(layouts):
    folder, (texts, labels) = layouts['MIRFlickr']
    data = datasets.load(config('MIRFlickr', folder), verbose=False)
    loader = datasets.make_loader(data, 'database', config('MIRFlickr', folder))
    seen = []
    for images, txt, lab, idx in loader:
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, 64, 64)
        assert txt.dtype == torch.float32 and lab.dtype == torch.uint8 and idx.dtype == torch.int64
        np.testing.assert_array_equal(txt.numpy(), texts[idx.numpy()])
        np.testing.assert_array_equal(lab.numpy(), labels[idx.numpy()])
        blue = images[:, 2].float().mean((1, 2)).numpy()
        np.testing.assert_allclose(blue, [blue_of(i) for i in idx.tolist()], atol=1)
        red, green = images[:, 0].float(), images[:, 1].float()
        assert (red[:, -1].mean(1) > red[:, 0].mean(1) + 100).all()     # row 0 is the top
        assert (green[:, :, -1].mean(1) > green[:, :, 0].mean(1) + 100).all()
        seen += idx.tolist()
    assert seen == list(data.database)   # in order, nothing dropped


def test_test_transform_is_torchvision_pil(layouts):
    folder = layouts['MIRFlickr'][0]
    cfg = config('MIRFlickr', folder, RESIZE=72, CROP=64)
    data = datasets.load(cfg, verbose=False)
    images, _, _, idx = next(iter(datasets.make_loader(data, 'query', cfg)))
    reference = T.Compose([T.Resize(72), T.CenterCrop(64), T.PILToTensor()])
    for image, i in zip(images, idx.tolist()):
        assert torch.equal(image, reference(Image.fromarray(pattern_image(i, 20, 12))))


def test_normalize_matches_totensor_normalize():
    rng = np.random.default_rng(0)
    arrays = rng.integers(0, 256, (3, 10, 9, 3), dtype=np.uint8)
    reference = T.Compose([T.ToTensor(), T.Normalize(datasets.IMAGENET_MEAN,
                                                     datasets.IMAGENET_STD)])
    expected = torch.stack([reference(Image.fromarray(a)) for a in arrays])
    got = datasets.normalize(torch.from_numpy(arrays).permute(0, 3, 1, 2))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # the mean and std are made once per device (on a GPU each making is a wait), and
    # stay ordinary tensors when first made under inference mode
    datasets.imagenet_stats.cache_clear()
    with torch.inference_mode():
        datasets.normalize(torch.from_numpy(arrays).permute(0, 3, 1, 2))
    again = datasets.normalize(torch.from_numpy(arrays).permute(0, 3, 1, 2))
    assert torch.equal(again, got) and not again.is_inference()
    info = datasets.imagenet_stats.cache_info()
    assert (info.misses, info.hits) == (1, 1)


def test_train_loader_reproducible_with_workers(layouts):
    folder = layouts['MIRFlickr'][0]
    cfg = config('MIRFlickr', folder, NUM_WORKERS=2, BATCH_SIZE=8, RESIZE=72)
    data = datasets.load(cfg, verbose=False)

    def epoch(seed):
        loader = datasets.make_loader(data, 'train', cfg, torch.Generator().manual_seed(seed))
        return [(images.clone(), idx.clone()) for images, _, _, idx in loader]

    a, b, c = epoch(0), epoch(0), epoch(1)
    assert len(a) == len(data.train) // 8                 # drop_last
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))
    assert not all(torch.equal(x[0], y[0]) for x, y in zip(a, c))
    assert data.images._file is None   # the workers opened the file, never the main process


def test_train_augmentation_uses_torch_rng(layouts):
    folder = layouts['MIRFlickr'][0]
    cfg = config('MIRFlickr', folder, RESIZE=80, BATCH_SIZE=8)
    data = datasets.load(cfg, verbose=False)
    torch.manual_seed(0)
    a = [b[0] for b in datasets.make_loader(data, 'train', cfg, torch.Generator().manual_seed(0))]
    torch.manual_seed(0)
    b = [b[0] for b in datasets.make_loader(data, 'train', cfg, torch.Generator().manual_seed(0))]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    flipped = [(x[:, 1, :, -1].float().mean(1) < x[:, 1, :, 0].float().mean(1)) for x in a]
    flips = torch.cat(flipped)
    assert 0 < flips.sum() < len(flips)    # some flipped, some not


def test_one_hdf5_handle_per_process(layouts, monkeypatch):
    folder = layouts['MIRFlickr'][0]
    cfg = config('MIRFlickr', folder, BATCH_SIZE=4)
    data = datasets.load(cfg, verbose=False)
    assert data.images._file is None      # load() left no handle open
    opened = []
    real = h5py.File
    monkeypatch.setattr(pairs.h5py, 'File', lambda *a, **k: opened.append(a) or real(*a, **k))
    for _ in datasets.make_loader(data, 'database', cfg):
        pass
    assert len(opened) == 1                # once for 54 images, not once per image
    state = pickle.loads(pickle.dumps(data.images))
    assert state._file is None and state[5].shape == (20, 12, 3)
    data.images.close()


def test_wiki_train_uses_test_transform(layouts):
    folder = layouts['Wiki'][0]
    cfg = config('Wiki', folder, BATCH_SIZE=5)
    data = datasets.load(cfg, verbose=False)
    train = datasets.make_loader(data, 'train', cfg, torch.Generator().manual_seed(0))
    reference = T.Compose([T.Resize(64), T.CenterCrop(64), T.PILToTensor()])
    images, _, _, idx = next(iter(train))
    for image, i in zip(images, idx.tolist()):
        assert torch.equal(image, reference(data.images.pil(i)))


def test_batch_larger_than_train_set_is_a_user_error(layouts):
    folder = layouts['MIRFlickr'][0]
    cfg = config('MIRFlickr', folder, BATCH_SIZE=64)
    with pytest.raises(settings.UserError, match='BATCH_SIZE=64.*30 training pairs'):
        datasets.load(cfg, verbose=False)   # at load, before any evaluation or checkpoint


# ===== the check command =====

def run_check(argv, capsys):
    """`python datasets.py ...` in this process: (exit status, stdout, stderr)."""
    try:
        code = settings.run_cli(datasets.main, argv)
    except SystemExit as stop:
        code = stop.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_check_command_subprocess(tmp_path):
    """The real command line: a problem is one line on stderr and exit status 2."""
    bad = subprocess.run([sys.executable, 'datasets.py', 'DATASET=NUSWIDE',
                          f'DATA_DIR={tmp_path}'], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.count('\n') == 1 and 'Traceback' not in bad.stderr
    assert 'nus-wide-tc10-iall.mat' in bad.stderr


@pytest.mark.parametrize('dataset', ['MIRFlickr', 'NUSWIDE', 'Wiki'])
def test_check_accepts_each_layout(layouts, capsys, dataset):
    code, out, err = run_check([f'DATASET={dataset}', f'DATA_DIR={layouts[dataset][0]}'], capsys)
    assert code == 0, err
    assert 'passes the check' in out and err == ''
    assert 'pairs with no label: 0; with no text: 0' in out
    sizes = {'MIRFlickr': 'query 6, train 30, database 54',
             'NUSWIDE': 'query 5, train 25, database 45',
             'Wiki': 'query 10, train 30, database 30'}[dataset]
    assert sizes in out


def truncate(path, keep):
    """Cut the file at path to keep(its size) bytes, as an interrupted copy leaves it."""
    size = os.path.getsize(path)
    with open(path, 'r+b') as f:
        f.truncate(keep(size))


def broken_dcmh(tmp_path, how):
    """A MIRFlickr folder with one problem; returns the file name the error must name."""
    texts, labels = write_dcmh(tmp_path, MIR_NAMES, n=24)
    iall, yall, lall = (str(tmp_path / name) for name in MIR_NAMES)
    if how == 'missing':
        os.remove(yall)
        return MIR_NAMES[1]
    if how == 'corrupt':
        with open(lall, 'wb') as f:
            f.write(np.random.default_rng(0).bytes(3000))
        return MIR_NAMES[2]
    if how == 'truncated_v73':
        truncate(iall, lambda size: size // 2)
        return MIR_NAMES[0]
    if how == 'truncated_v5':
        scipy.io.savemat(yall, {'YAll': texts}, do_compression=True)
        truncate(yall, lambda size: size - 50)
        return MIR_NAMES[1]
    if how == 'wrong_key':
        save_v5(lall, {'Labels': labels})
        return MIR_NAMES[2]
    if how == 'wrong_shape':
        save_v5(lall, {'LAll': labels[:, :, None].repeat(2, 2)})
        return MIR_NAMES[2]
    if how == 'counts_disagree':
        save_v5(yall, {'YAll': texts[:-1]})
        return 'disagree'
    if how == 'not_binary':
        labels[3, 2] = 2
        save_v5(lall, {'LAll': labels})
        return MIR_NAMES[2]
    if how == 'not_uint8':
        images = np.zeros((20, 12, 3, 24), np.float64)
        save_v73(iall, {'IAll': images})
        return MIR_NAMES[0]
    if how == 'four_channels':
        save_v73(iall, {'IAll': np.zeros((20, 12, 4, 24), np.uint8)})
        return MIR_NAMES[0]
    if how == 'nan_text':
        texts[1, 1] = np.nan
        save_v5(yall, {'YAll': texts})
        return MIR_NAMES[1]
    raise ValueError(how)


@pytest.mark.parametrize('how', ['missing', 'corrupt', 'truncated_v73', 'truncated_v5',
                                 'wrong_key', 'wrong_shape', 'counts_disagree', 'not_binary',
                                 'not_uint8', 'four_channels', 'nan_text'])
def test_check_one_line_error(tmp_path, capsys, how):
    named = broken_dcmh(tmp_path, how)
    code, out, err = run_check(['DATASET=MIRFlickr', f'DATA_DIR={tmp_path}'], capsys)
    assert code == 2
    assert err.startswith('error: ') and err.count('\n') == 1, err
    assert named in err and 'Traceback' not in err


def broken_wiki(folder, how):
    names, cats, _ = write_wiki(folder, n_train=6, n_test=3)
    image = os.path.join(folder, 'images', wiki.WIKI_CATEGORIES[cats[2]], names[2] + '.jpg')
    if how == 'not_an_image':
        with open(image, 'w') as f:
            f.write('this is not a picture\n')
        return names[2]
    if how == 'truncated_image':
        truncate(image, lambda size: size // 3)
        return names[2]
    if how == 'missing_image':
        os.remove(image)
        return names[2]
    if how == 'bad_category':
        with open(os.path.join(folder, 'testset_txt_img_cat.list'), 'a') as f:
            f.write('t99\tsomeimage\t11\n')
        return 'testset_txt_img_cat.list'
    if how == 'count_mismatch':
        with open(os.path.join(folder, 'trainset_txt_img_cat.list'), 'a') as f:
            f.write('t99\tsomeimage\t1\n')
        return 'disagree'
    raise ValueError(how)


@pytest.mark.parametrize('how', ['not_an_image', 'truncated_image', 'missing_image',
                                 'bad_category', 'count_mismatch'])
def test_check_wiki_one_line_error(tmp_path, capsys, how):
    named = broken_wiki(tmp_path, how)
    code, out, err = run_check(['DATASET=Wiki', f'DATA_DIR={tmp_path}'], capsys)
    assert code == 2 and err.count('\n') == 1 and named in err, err


def test_check_missing_data_dir(tmp_path, capsys):
    code, _, err = run_check(['DATASET=MIRFlickr', f'DATA_DIR={tmp_path / "nowhere"}'], capsys)
    assert code == 2 and 'DATA_DIR' in err and 'nowhere' in err


def test_suspicious_data_warns_with_counts(tmp_path, capsys):
    texts, labels = write_dcmh(tmp_path, MIR_NAMES, n=30)
    texts[4] = 0                     # a text of zeros
    labels[7] = 0                    # a pair with no label
    texts[9], labels[9] = texts[8], labels[8]     # a repeated pair
    save_v5(tmp_path / MIR_NAMES[1], {'YAll': texts})
    save_v5(tmp_path / MIR_NAMES[2], {'LAll': labels})
    code, out, err = run_check(['DATASET=MIRFlickr', f'DATA_DIR={tmp_path}'], capsys)
    assert code == 0, err
    assert 'pairs with no label: 1; with no text: 1' in out
    assert 'warning: 1 of 30 pairs have no label' in out
    assert 'warning: 1 of 30 pairs have an all-zero text vector' in out
    assert 'warning: 1 pairs repeat the text and labels' in out
    data = datasets.load(config('MIRFlickr', tmp_path), verbose=False)
    assert np.isfinite(data.texts).all() and not data.texts[4].any()


@pytest.mark.parametrize('tagless', [1, 20])
def test_nuswide_tagless_pairs_are_a_note_not_a_warning(tmp_path, capsys, tagless):
    """DCMH's NUS-WIDE keeps a few thousand pairs with no tag (of 186,577): on that file the
    check says so as information. Far more than that is still a warning."""
    texts, labels = write_dcmh(tmp_path, NUS_NAMES, n=50, d=20, c=10, seed=1)
    texts[:tagless] = 0
    save_v5(tmp_path / NUS_NAMES[1], {'YAll': texts})
    code, out, err = run_check(['DATASET=NUSWIDE', f'DATA_DIR={tmp_path}'], capsys)
    assert code == 0, err
    assert f'pairs with no label: 0; with no text: {tagless}' in out
    note = f'note: {tagless} of 50 pairs have an all-zero text vector, as expected'
    warning = f'warning: {tagless} of 50 pairs have an all-zero text vector'
    assert (note in out, warning in out) == ((True, False) if tagless == 1 else (False, True))


# ===== a bug of ours keeps its traceback; only a bad file is a one-line error =====

def boom(*args, **kwargs):
    raise ZeroDivisionError('a bug, not a bad file')


@pytest.mark.parametrize('where', ['matfile.describe', 'matfile.read_var', 'H5Images',
                                   'in_memory', 'wiki_opencv', 'wiki_pil'])
def test_a_bug_is_not_reported_as_a_bad_file(layouts, monkeypatch, capsys, where):
    dataset = 'Wiki' if where.startswith('wiki') else 'MIRFlickr'
    argv = [f'DATASET={dataset}', f'DATA_DIR={layouts[dataset][0]}']
    if where == 'matfile.describe':
        monkeypatch.setattr(matfile.scipy.io, 'whosmat', boom)
    elif where == 'matfile.read_var':
        monkeypatch.setattr(matfile.scipy.io, 'loadmat', boom)
    elif where in ('H5Images', 'in_memory'):
        monkeypatch.setattr(matfile.ImageLayout, 'image', boom)
        monkeypatch.setattr(matfile.ImageLayout, 'block', boom)
        argv.append(f'IN_MEMORY={where == "in_memory"}')
    elif where == 'wiki_opencv':
        monkeypatch.setattr(cv2, 'imread', boom)
    else:
        monkeypatch.setattr(pairs.Image, 'open', boom)
    with pytest.raises(ZeroDivisionError):      # not UserError, not SystemExit(2)
        settings.run_cli(datasets.main, argv)
    assert 'error:' not in capsys.readouterr().err


# ===== DEMO =====

def test_make_demo_layout_and_determinism(tmp_path):
    demo.make_demo(str(tmp_path / 'a'), n_pairs=400, seed=3)
    demo.make_demo(str(tmp_path / 'b'), n_pairs=400, seed=3)
    a = datasets.load(config('DEMO', tmp_path / 'a'), verbose=False)
    b = datasets.load(config('DEMO', tmp_path / 'b'), verbose=False)
    np.testing.assert_array_equal(a.texts, b.texts)
    for i in (0, 399):
        np.testing.assert_array_equal(a.images[i], b.images[i])
    with open(tmp_path / 'a' / MIR_NAMES[0], 'rb') as f:
        assert f.read(19) == b'MATLAB 7.3 MAT-file'
    assert a.images[0].shape == (demo.DEMO_SIZE, demo.DEMO_SIZE, 3)
    assert a.texts.shape == (400, demo.DEMO_TAGS)
    assert a.labels.shape == (400, demo.DEMO_LABELS)
    assert (a.labels.sum(1) >= 1).all() and (a.labels.sum(1) <= 3).all()
    assert scipy.io.loadmat(tmp_path / 'a' / MIR_NAMES[2])['LAll'].shape == (400, 8)


def test_demo_modalities_carry_the_labels(tmp_path):
    demo.make_demo(str(tmp_path), n_pairs=300, seed=0)
    data = datasets.load(config('DEMO', tmp_path), verbose=False)
    images = np.stack([data.images[i] for i in range(300)]).astype(np.float32)
    masks = demo.demo_masks()
    per = demo.DEMO_TAGS_PER_LABEL
    for k, colour in enumerate(demo.DEMO_COLOURS):
        has = data.labels[:, k] == 1
        # image: the label's cell is close to the label's colour when present
        cell = masks[k] > 0
        dist = np.abs(images[:, cell] - np.array(colour, np.float32)).mean((1, 2))
        assert dist[has].mean() + 40 < dist[~has].mean()
        # text: the label's own tags appear when present, rarely otherwise
        own = data.texts[:, k * per:(k + 1) * per].sum(1)
        assert own[has].mean() > 5 * own[~has].mean()
    # not trivial: some present labels are not painted, so the cell test is imperfect
    k = 0
    has = data.labels[:, k] == 1
    dist = np.abs(images[:, masks[k] > 0] - np.array(demo.DEMO_COLOURS[0])).mean((1, 2))
    assert (dist[has] > 60).any()


def test_load_generates_demo_on_first_use(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(demo, 'DEMO_PAIRS', 240)
    data = datasets.load(config('DEMO', tmp_path / 'demo'))
    assert 'DEMO: generating 240 pairs' in capsys.readouterr().out
    assert (len(data.query), len(data.train), len(data.database)) == (24, 120, 216)
    datasets.load(config('DEMO', tmp_path / 'demo'))
    assert 'generating' not in capsys.readouterr().out


# ===== end to end through train.py =====

def train_briefly(dataset, data_dir, out_dir):
    import json
    import train
    run_dir = train.main([f'DATASET={dataset}', f'DATA_DIR={str(data_dir)!r}', 'NUM_EPOCH=1',
                          'BATCH_SIZE=8', 'CODE_LEN=16', "BACKBONE='alexnet'",
                          'PRETRAINED=False', 'RESIZE=72', 'CROP=64', 'NUM_WORKERS=0',
                          f'OUT_DIR={str(out_dir)!r}', 'EVAL_BATCH_SIZE=64', "DEVICE='cpu'"])
    with open(os.path.join(run_dir, 'results.json')) as f:
        results = json.load(f)
    assert results['dataset'] == dataset
    with np.load(os.path.join(run_dir, results['codes'])) as codes:   # the number is the codes'
        assert results['map_i2t'] == metric.calculate_top_map(
            codes['query_img'], codes['db_txt'], codes['query_labels'], codes['db_labels'], 50)
    split = np.load(os.path.join(run_dir, 'split.npz'))
    assert not set(split['query']) & set(split['database'])
    return run_dir


@pytest.mark.parametrize('dataset', ['MIRFlickr', 'NUSWIDE', 'Wiki'])
def test_train_end_to_end_on_each_layout(layouts, tmp_path, dataset):
    train_briefly(dataset, layouts[dataset][0], tmp_path)


@pytest.mark.parametrize('layout', sorted(set(PUBLISHED_LAYOUTS) - {'NUSWIDE flat'}))
def test_train_on_each_published_folder_tree(tmp_path, layout):
    """(The flat NUS-WIDE folder trains in test_train_end_to_end_on_each_layout.)"""
    data_dir, dataset, _, _, _ = write_published(tmp_path, layout)
    run_dir = train_briefly(dataset, data_dir, tmp_path / 'runs')
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        epochs = [line for line in f if '"loss"' in line]
    assert len(epochs) == 1       # one epoch of 20 training pairs: 2 batches of 8


# ===== the troubleshooting table of docs/data.md quotes what the code prints =====

def code_messages():
    """The project's source with implicitly concatenated string literals joined, so that a
    message split over several lines of code reads as one line."""
    text = ''
    for name in sorted(os.listdir(ROOT)):
        if name.endswith('.py'):
            with open(os.path.join(ROOT, name), encoding='utf-8') as f:
                text += f.read() + '\n'
    return re.sub(r'''(["'])[ \t]*\n[ \t]*(?:[rbfRBF]{1,2})?\1''', '', text)


def quoted(message, source):
    """Whether the source can print `message`: its fixed parts in order on one line, where
    '...' and '<word>' in the docs stand for anything."""
    kind, _, rest = message.partition(': ')
    assert kind in ('error', 'warning', 'note'), message
    assert f'f"{kind}: {{' in source, kind          # run_cli / load / check print the prefix
    parts = re.split(r'\.\.\.|<[^<>]*>', rest)
    pattern = '.*?'.join(re.escape(part) for part in parts)
    return re.search(pattern, source) is not None


def test_docs_troubleshooting_quotes_messages_the_code_prints():
    with open(os.path.join(ROOT, 'docs', 'data.md'), encoding='utf-8') as f:
        docs = f.read()
    section = docs[docs.index('## Troubleshooting'):]
    messages = re.findall(r'^\| `((?:error|warning|note): [^`]+)` \|', section, re.M)
    assert len(messages) >= 20
    source = code_messages()
    missing = [m for m in messages if not quoted(m, source)]
    assert not missing, missing
    # the check can fail: the text that an earlier README quoted is not printed any more
    assert not quoted('error: ... mirflickr25k-iall.mat: no such file', source)
