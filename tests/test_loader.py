"""The image loader at the real files' scale: the cached train split, runs of consecutive
images, the chunk cache and the faster fixed-size test transform give exactly what the
plain per-image reader with torchvision's transforms gives."""
import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

import bench
import datasets
import pairs
from conftest import config


class PlainImages:
    """The uncached reader: one image at a time through pairs.read_image (a fresh handle
    with h5py's default chunk cache each time)."""

    def __init__(self, path):
        self.path = path

    def pil(self, i):
        return Image.fromarray(pairs.read_image(self.path, int(i)))


class PlainPairs(datasets.Pairs):
    """Pairs without the batch reader: the DataLoader asks for one item at a time."""
    __getitems__ = None


def plain_loader(data, part, cfg, transform, generator, path):
    train = part == 'train'
    return torch.utils.data.DataLoader(
        PlainPairs(data, getattr(data, part), transform, PlainImages(path)),
        batch_size=cfg.BATCH_SIZE if train else cfg.EVAL_BATCH_SIZE, shuffle=train,
        drop_last=train, generator=generator, num_workers=cfg.NUM_WORKERS,
        multiprocessing_context=datasets.worker_context(cfg.NUM_WORKERS))


def all_batches(loader):
    return [[x.clone() for x in batch] for batch in loader]


def assert_same_batches(got, expected):
    assert len(got) == len(expected) > 0
    for a, b in zip(got, expected):
        for x, y in zip(a, b):   # images, texts, labels, pair indices
            assert x.dtype == y.dtype
            torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.fixture(scope='module')
def replica64(tmp_path_factory):
    """300 images of 56 px, 64 images a chunk, gzip (bench.py's replica writer)."""
    folder = tmp_path_factory.mktemp('replica64')
    bench.write_loader_replica(str(folder), 64, n=300, size=56)
    return folder


@pytest.mark.parametrize('workers, resize', [(1, 64), (0, 72)])
def test_cached_train_batches_are_the_uncached_readers(replica64, workers, resize):
    # 56 -> 64 resizes with torch's kernel (exact there), 56 -> 72 with PIL's
    cfg = config('MIRFlickr', replica64, RESIZE=resize, CROP=63, NUM_WORKERS=workers,
                 BATCH_SIZE=8)
    data = datasets.load(cfg, verbose=False)
    path = str(replica64 / 'mirflickr25k-iall.mat')
    for epoch in (0, 1):   # the first fills the cache, the second reuses it
        torch.manual_seed(100 + epoch)
        rng_before = torch.get_rng_state()
        loader = datasets.make_loader(data, 'train', cfg, torch.Generator().manual_seed(epoch))
        assert torch.equal(torch.get_rng_state(), rng_before)   # filling draws nothing
        got = all_batches(loader)
        torch.manual_seed(100 + epoch)
        expected = all_batches(plain_loader(data, 'train', cfg, v2.Compose([
            v2.RandomHorizontalFlip(), v2.Resize(resize), v2.RandomCrop(63), v2.PILToTensor()]),
            torch.Generator().manual_seed(epoch), path))
        assert_same_batches(got, expected)
    key, cached, resized = data.images.train_cache
    assert resized and cached.array.shape == (len(data.train), resize, resize, 3)
    assert sorted(np.flatnonzero(cached.row >= 0)) == sorted(data.train)


@pytest.mark.parametrize('part, resize, workers', [('query', 64, 0), ('database', 72, 1)])
def test_evaluation_batches_are_the_uncached_readers(replica64, part, resize, workers):
    cfg = config('MIRFlickr', replica64, RESIZE=resize, CROP=63, EVAL_BATCH_SIZE=50,
                 NUM_WORKERS=workers)
    data = datasets.load(cfg, verbose=False)
    got = all_batches(datasets.make_loader(data, part, cfg))
    expected = all_batches(plain_loader(data, part, cfg, v2.Compose([
        v2.Resize(resize), v2.CenterCrop(63), v2.PILToTensor()]), None,
        str(replica64 / 'mirflickr25k-iall.mat')))
    assert_same_batches(got, expected)


def test_each_handle_caches_several_chunks(replica64):
    cfg = config('MIRFlickr', replica64)
    images = datasets.load(cfg, verbose=False).images
    images[0]
    nbytes = images._file.id.get_access_plist().get_cache()[2]
    assert images.per_chunk == 64
    assert nbytes >= 4 * 64 * 56 * 56 * 3 > 1 << 20   # four chunks, more than h5py's default
    images.close()


@pytest.mark.parametrize('shape, resize', [((224, 224), 256), ((64, 64), 72), ((56, 56), 64),
                                           ((30, 41), 64), ((41, 30), 72)])
def test_resized_is_torchvisions_resize_on_pil(shape, resize):
    image = np.random.default_rng(1).integers(0, 256, shape + (3,), dtype=np.uint8)
    expected = np.asarray(v2.Resize(resize)(Image.fromarray(image)))
    np.testing.assert_array_equal(datasets.resized(image, resize), expected)
    crop = v2.Compose([v2.Resize(resize), v2.CenterCrop(63), v2.PILToTensor()])
    assert torch.equal(datasets.FixedSizeTestTransform(resize, 63)(image),
                       crop(Image.fromarray(image)))


def test_runs_cover_each_index_once():
    rng = np.random.default_rng(0)
    for per_chunk in (1, 8, 64):
        indices = rng.choice(2000, size=300, replace=False)
        found = pairs.runs(indices, per_chunk, image_bytes=1000, run_bytes=100_000)
        rows = np.concatenate([r[3] for r in found])
        assert sorted(rows) == list(range(300))
        for a, b, wanted, where in found:
            assert a <= wanted.min() and wanted.max() < b and b - a <= 100 + per_chunk
            np.testing.assert_array_equal(indices[where], wanted)
        starts = [r[0] for r in found]
        assert starts == sorted(starts)   # in file order
        for here, after in zip(found, found[1:]):   # split at a gap of a chunk or more,
            assert (after[0] // per_chunk - (here[1] - 1) // per_chunk >= 2   # or at the cap
                    or after[0] - here[0] >= 100)


def test_uncached_random_reads_give_the_images(replica64):
    """H5Images.many in any order equals one image at a time."""
    cfg = config('MIRFlickr', replica64)
    images = datasets.load(cfg, verbose=False).images
    order = np.random.default_rng(3).permutation(300)[:70]
    with h5py.File(replica64 / 'mirflickr25k-iall.mat', 'r') as f:
        stored = f['IAll'][()]   # (N, 3, W, H)
    for got, i in zip(images.many(order), order):
        np.testing.assert_array_equal(got, stored[i].transpose(2, 1, 0))
    images.close()


def test_the_check_tells_the_chunking_and_advises_repack(replica64, capsys, monkeypatch):
    cfg = config('MIRFlickr', replica64)
    monkeypatch.setattr(datasets, 'SLOW_RANDOM_READS', float('inf'))   # any rate is slow
    datasets.check(cfg)
    out = capsys.readouterr().out
    assert 'IAll storage: chunks of 64 images (64, 3, 56, 56), gzip level 3; reads ' in out
    assert 'REPACK=True' in out
    monkeypatch.setattr(datasets, 'SLOW_RANDOM_READS', 0)
    datasets.check(cfg)
    assert 'REPACK' not in capsys.readouterr().out
