"""prepare.py: building the DCMH files from small trees in the real raw layouts."""
import contextlib
import io
import os
import shutil
import subprocess
import sys
import zipfile
import zlib

import h5py
import numpy as np
import pytest
import scipy.io
from PIL import Image

import conftest
import datasets
import matfile
import prepare
import settings
from conftest import config

# The 24 annotation lists of mirflickr25k_annotations_v080.zip (14 also have an _r1 list).
MIR_LABELS = ('animals', 'baby', 'bird', 'car', 'clouds', 'dog', 'female', 'flower', 'food',
              'indoor', 'lake', 'male', 'night', 'people', 'plant_life', 'portrait', 'river',
              'sea', 'sky', 'structures', 'sunset', 'transport', 'tree', 'water')
MIR_R1 = ('animals', 'baby', 'bird', 'car', 'clouds', 'dog', 'female', 'flower', 'male',
          'night', 'people', 'portrait', 'river', 'sea', 'tree')
K = 60                        # images im1.jpg .. im60.jpg
NO_LABEL = {5, 17}


def jpeg(height, width, grey=False):
    """Top half red, bottom half blue: tells whether a picture comes back upright."""
    img = np.zeros((height, width, 3), np.uint8)
    img[:height // 2, :, 0] = 255
    img[height // 2:, :, 2] = 255
    buf = io.BytesIO()
    Image.fromarray(img).convert('L' if grey else 'RGB').save(buf, 'JPEG', quality=95)
    return buf.getvalue()


def mir_labels_of(i):
    if i in NO_LABEL:
        return set()
    return {MIR_LABELS[i % 24]} | ({'sky'} if i % 4 == 0 else set())


def mir_tags_of(i):
    tags = []
    if i <= 30:
        tags.append('common_a')        # 30 images
    if i % 2 == 0:
        tags.append('common_b')        # 30 images
    if i <= 19:
        tags += ['edge19', 'edge19']   # 19 images (twice in a file still counts once)
    if i >= 41:
        tags += ['edge20', 'café']     # 20 images each
    if i == 35:
        tags.append('rare35')
    return tags


def mir_files():
    """{path inside the download: bytes} for both MIRFlickr zips."""
    images, annotations = {}, {}
    for i in range(1, K + 1):
        images[f'mirflickr/im{i}.jpg'] = jpeg(30 + i % 3 * 10, 40 - i % 2 * 10, grey=i == 3)
        images[f'mirflickr/meta/tags/tags{i}.txt'] = \
            ''.join(t + '\r\n' for t in mir_tags_of(i)).encode('utf-8')
        # decoys: the raw tags and the EXIF files must not be read as tags
        images[f'mirflickr/meta/tags_raw/tags{i}.txt'] = b'RawTag\nAnother Raw\n'
        images[f'mirflickr/meta/exif/exif{i}.txt'] = b'-Make\nCanon\n'
    images['mirflickr/doc/common_tags.txt'] = \
        'common_a 30\ncommon_b 30\ncafé 20\nedge20 20\nedge19 19\n'.encode('utf-8')
    for name in MIR_LABELS:
        ids = [i for i in range(1, K + 1) if name in mir_labels_of(i)]
        annotations[f'{name}.txt'] = ''.join(f'{i}\n' for i in ids).encode()
    for name in MIR_R1:   # the _r1 lists would give the unlabelled images a label
        annotations[f'{name}_r1.txt'] = b'5\n17\n'
    annotations['README.txt'] = b'MIRFLICKR-25000 annotations v0.80\n'
    return images, annotations


def expected_mir():
    kept = [i for i in range(1, K + 1) if i not in NO_LABEL and
            {'common_a', 'common_b', 'edge20', 'café'} & set(mir_tags_of(i))]
    vocab = ['common_a', 'common_b', 'café', 'edge20']   # most used first, ties by name
    texts = np.array([[t in mir_tags_of(i) for t in vocab] for i in kept], np.float32)
    labels = np.array([[name in mir_labels_of(i) for name in MIR_LABELS] for i in kept],
                      np.uint8)
    return kept, vocab, texts, labels


def write_tree(root, files):
    for rel, data in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, 'wb') as f:
            f.write(data)


def write_zip(path, files):
    with zipfile.ZipFile(path, 'w') as z:
        for rel, data in files.items():
            z.writestr(rel, data)


def build(raw, out, dataset='MIRFlickr', **extra):
    argv = [f'DATASET={dataset}', f'RAW_DIR={str(raw)!r}', f'DATA_DIR={str(out)!r}', 'SIZE=32']
    argv += [f'{k}={v!r}' for k, v in extra.items()]
    return prepare.main(argv)


@pytest.fixture(scope='module')
def mir_built(tmp_path_factory):
    """The same raw MIRFlickr download built twice: unpacked, and as the two zip files."""
    base = tmp_path_factory.mktemp('mir')
    images, annotations = mir_files()
    write_tree(base / 'raw_dirs', images)
    write_tree(base / 'raw_dirs' / 'mirflickr25k_annotations_v080', annotations)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        build(base / 'raw_dirs', base / 'out_dirs', WORKERS=1)
    (base / 'printed.txt').write_text(printed.getvalue())
    os.makedirs(base / 'raw_zips')
    write_zip(base / 'raw_zips' / 'mirflickr25k.zip', images)
    write_zip(base / 'raw_zips' / 'mirflickr25k_annotations_v080.zip', annotations)
    build(base / 'raw_zips', base / 'out_zips', WORKERS=2)
    return base


@pytest.mark.parametrize('variant', ['out_dirs', 'out_zips'])
def test_mirflickr_from_raw(mir_built, variant):
    out = mir_built / variant
    kept, vocab, texts, labels = expected_mir()
    assert len(kept) == K - 2 - 5            # 2 without a label, 31..39 odd without a tag
    data = datasets.load(config('MIRFlickr', out), verbose=False)
    np.testing.assert_array_equal(data.texts, texts)
    np.testing.assert_array_equal(data.labels, labels)
    with open(out / 'mirflickr25k-ids.txt') as f:
        assert [int(line) for line in f] == kept
    with open(out / 'mirflickr25k-tags.txt', encoding='utf-8') as f:
        assert [line.split('\t')[0] for line in f] == vocab
    with open(out / 'mirflickr25k-labels.txt') as f:
        assert f.read().split() == list(MIR_LABELS)
    for i in (0, len(kept) - 1):
        img = datasets.read_image(str(out / 'mirflickr25k-iall.mat'), i)
        assert img.shape == (32, 32, 3)
        assert img[:8, :, 0].mean() > 200 and img[:8, :, 2].mean() < 50      # red on top
        assert img[-8:, :, 2].mean() > 200 and img[-8:, :, 0].mean() < 50    # blue below
    grey = datasets.read_image(str(out / 'mirflickr25k-iall.mat'), kept.index(3))
    assert (grey[..., 0] == grey[..., 1]).all()    # grey picture stored as three channels


def test_mirflickr_file_versions(mir_built):
    out = mir_built / 'out_dirs'
    with open(out / 'mirflickr25k-iall.mat', 'rb') as f:
        assert f.read(19) == b'MATLAB 7.3 MAT-file'
    with h5py.File(out / 'mirflickr25k-iall.mat', 'r') as f:
        assert f['IAll'].shape == (53, 3, 32, 32)
        assert f['IAll'].attrs['MATLAB_class'] == b'uint8'
    assert scipy.io.loadmat(out / 'mirflickr25k-yall.mat')['YAll'].shape == (53, 4)
    assert scipy.io.loadmat(out / 'mirflickr25k-lall.mat')['LAll'].shape == (53, 24)


def test_zip_and_unpacked_give_the_same_files(mir_built):
    a = datasets.load(config('MIRFlickr', mir_built / 'out_dirs'), verbose=False)
    b = datasets.load(config('MIRFlickr', mir_built / 'out_zips'), verbose=False)
    np.testing.assert_array_equal(a.texts, b.texts)
    for i in range(len(a.labels)):
        np.testing.assert_array_equal(a.images[i], b.images[i])


def test_builder_prints_the_counts(mir_built):
    printed = (mir_built / 'printed.txt').read_text()
    assert 'MIRFlickr raw: 60 images (expected 25000)' in printed
    assert '24 labels (expected 24)' in printed
    assert 'vocabulary: 4 tags used by at least 20 images (expected 1386)' in printed
    assert 'doc/common_tags.txt lists the same 4 tags' in printed
    assert '2 images have no label, 5 have none of those tags; 53 pairs kept' in printed
    assert 'passes the check' in printed


def test_built_files_pass_the_check(mir_built, capsys):
    datasets.check(config('MIRFlickr', mir_built / 'out_dirs'))
    out = capsys.readouterr().out
    assert 'passes the check' in out and 'pairs with no label: 0; with no text: 0' in out


# ===== NUS-WIDE =====

FREQUENT = ('water', 'sky', 'person', 'clouds', 'animal', 'grass', 'buildings', 'window',
            'plants', 'lake')
RARE = ('zebra', 'actor')
M = 40


def nus_files():
    labels = {c: np.zeros(M, int) for c in FREQUENT + RARE}
    tags = np.zeros((M, 1000), int)
    files, listing = {}, []
    for j in range(M):
        concept = FREQUENT[j % 10]
        name = f'{j:04d}_{1000 + j * 37}.jpg'
        listing.append(f'C:\\ImageData\\Flickr\\{concept}\\{name}')
        if j == 3:
            labels['zebra'][j] = 1
        elif j == 4:
            labels['actor'][j] = 1
        else:
            labels[concept][j] = 1
            if j % 3 == 0:
                labels[FREQUENT[(j + 1) % 10]][j] = 1
        if j != 6:                     # one image with none of the 1,000 tags
            tags[j, [j * 7 % 1000, 999]] = 1
        if j == 9:
            files[f'Flickr/{concept}/{name}'] = b'not a jpeg at all'
        elif j != 8:
            files[f'Flickr/{concept}/{name}'] = jpeg(24 + j % 4, 30)
    files['ImageList/Imagelist.txt'] = '\r\n'.join(listing).encode() + b'\r\n'
    for c, column in labels.items():
        files[f'Groundtruth/AllLabels/Labels_{c}.txt'] = \
            ''.join(f'{v}\n' for v in column).encode()
    files['NUS_WID_Tags/AllTags1k.txt'] = ''.join(
        '\t'.join(str(v) for v in row) + '\n' for row in tags).encode()
    files['NUS_WID_Tags/TagList1k.txt'] = ''.join(f'tag{t}\n' for t in range(1000)).encode()
    return files, labels, tags


def test_nuswide_from_raw(tmp_path, capsys):
    files, labels, tags = nus_files()
    write_tree(tmp_path / 'raw', files)
    build(tmp_path / 'raw', tmp_path / 'out', dataset='NUSWIDE', WORKERS=1, SPLIT_SEED=7)
    printed = capsys.readouterr().out
    assert 'split (SPLIT_SEED=7)' in printed    # the check after building used the settings
    # dropped: 3 and 4 (no top-10 concept), 8 (no image), 9 (not a JPEG); 6 has no tag
    # and is kept, as DCMH's files keep theirs
    kept = [j for j in range(M) if j not in (3, 4, 8, 9)]
    names = sorted(FREQUENT)
    data = datasets.load(config('NUSWIDE', tmp_path / 'out'), verbose=False)
    np.testing.assert_array_equal(data.labels, np.stack([labels[c][kept] for c in names], 1))
    np.testing.assert_array_equal(data.texts, tags[kept])
    assert not data.texts[kept.index(6)].any()
    with open(tmp_path / 'out' / 'nus-wide-tc10-ids.txt') as f:
        assert [int(line.split('\t')[0]) for line in f] == kept
    with open(tmp_path / 'out' / 'nus-wide-tc10-labels.txt') as f:
        assert f.read().split() == names
    with open(tmp_path / 'out' / 'nus-wide-tc10-yall.mat', 'rb') as f:
        assert f.read(10) == b'MATLAB 7.3'       # YAll is v7.3, as in the DCMH files
    img = data.images[0]
    assert img.shape == (32, 32, 3) and img[:8, :, 0].mean() > 200
    assert ('38 images have one of the 10 concepts (DCMH\'s files: 186577); 1 of them have '
            'none of the 1000 tags and are kept') in printed
    assert 'dropped 1 pairs whose image file is missing' in printed
    assert 'dropped 1 pairs whose image is not readable' in printed
    assert 'note: 1 of 36 pairs have an all-zero text vector, as expected' in printed
    assert 'warning: 1 of 36' not in printed and 'passes the check' in printed


# ===== bad input =====

def run_prepare(argv, capsys):
    try:
        code = settings.run_cli(prepare.main, argv)
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr().err


def test_prepare_errors_are_one_line(tmp_path, capsys):
    images, annotations = mir_files()
    write_tree(tmp_path / 'no_annotations', images)
    bad = dict(annotations)
    bad['dog.txt'] = b'12\nseven\n'
    write_tree(tmp_path / 'bad_list', images)
    write_tree(tmp_path / 'bad_list' / 'ann', bad)
    cases = [
        ([f'RAW_DIR={str(tmp_path / "nowhere")!r}'], 'RAW_DIR'),
        ([f'RAW_DIR={str(tmp_path / "no_annotations")!r}'], 'animals.txt'),
        ([f'RAW_DIR={str(tmp_path / "bad_list")!r}'], 'dog.txt line 2'),
        (['COLOUR=1'], 'unknown setting COLOUR'),
        (['SIZE=1.5'], 'SIZE'),
        (['SIZE=0'], 'setting SIZE=0: expected a positive integer'),
        (['WORKERS=-1'], 'WORKERS=-1'),
        (['RAW_DIR=3'], "setting RAW_DIR=3: expected a str"),
        (['SPLIT_SEED=0.5'], 'SPLIT_SEED'),            # a setting of settings.py, checked
        (['DATASET=Flickr'], "DATASET='Flickr'"),
        (['DATASET=Custom', 'REPACK=True'], "DATASET='Custom' has none"),   # was a KeyError
        (['DATASET=IAPR', 'PUBLISHED="UCCH"', 'REPACK=True'], "DATASET='IAPR' has none"),
        (['IMAGE_FEATURES="x.npy"', 'REPACK=True'], 'leave IMAGE_FEATURES and PUBLISHED empty'),
    ]
    for argv, named in cases:
        base = ['DATASET=MIRFlickr', f'DATA_DIR={str(tmp_path / "o")!r}']
        code, err = run_prepare(settings.with_defaults(base, argv), capsys)
        assert code == 2 and err.count('\n') == 1 and named in err, (argv, err)
    assert not os.path.exists(tmp_path / 'o')


def test_prepare_settings_are_settings(capsys):
    """prepare.py resolves its own keys and settings.py's through settings.resolve: one
    namespace, the same type checks, and the unknown-key error lists both."""
    cfg = prepare.resolve(['DATASET=NUSWIDE', 'raw_dir=downloads', 'SIZE=64', 'SPLIT_SEED=3'])
    assert (cfg.DATASET, cfg.RAW_DIR, cfg.SIZE, cfg.SPLIT_SEED) == ('NUSWIDE', 'downloads', 64, 3)
    assert cfg.DATA_DIR == settings.PRESETS['NUSWIDE']['DATA_DIR'] and cfg.BETA == 0.6
    assert cfg.TOP_CONCEPTS == prepare.SETTINGS['TOP_CONCEPTS']
    code, err = run_prepare(['COLOUR=1'], capsys)
    assert code == 2 and 'RAW_DIR' in err and 'SPLIT_SEED' in err


def boom(*args, **kwargs):
    raise ZeroDivisionError('a bug, not a bad file')


@pytest.mark.parametrize('where', ['decode', 'zip_read'])
def test_a_bug_is_not_reported_as_a_bad_download(tmp_path, monkeypatch, where):
    """Only what a bad image or a damaged zip raises becomes a one-line error (or a dropped
    pair); our own bug keeps its traceback."""
    images, annotations = mir_files()
    write_zip(tmp_path / 'mirflickr25k.zip', images)
    write_zip(tmp_path / 'mirflickr25k_annotations_v080.zip', annotations)
    if where == 'decode':
        monkeypatch.setattr(prepare.Image, 'open', boom)
    else:
        monkeypatch.setattr(zipfile.ZipFile, 'read', boom)
    with pytest.raises(ZeroDivisionError):
        settings.run_cli(prepare.main, ['DATASET=MIRFlickr', f'RAW_DIR={str(tmp_path)!r}',
                                        f"DATA_DIR={str(tmp_path / 'out')!r}", 'WORKERS=1'])


# ===== REPACK=True: one image per chunk =====
def test_repack_gives_one_image_per_chunk_byte_identical(tmp_path, capsys):
    import bench
    folder = tmp_path / 'mir'
    bench.write_loader_replica(str(folder), 64, n=300, size=32)
    path = folder / 'mirflickr25k-iall.mat'
    with open(path, 'rb') as fh:
        header = fh.read(512)
    with h5py.File(path, 'r') as f:
        before, attrs = f['IAll'][()], dict(f['IAll'].attrs)
        assert f['IAll'].chunks == (64, 3, 32, 32)
    argv = ['DATASET=MIRFlickr', f'DATA_DIR={str(folder)!r}', 'REPACK=True']
    assert prepare.main(argv) == 0
    with h5py.File(path, 'r') as f:
        ds = f['IAll']
        assert ds.chunks == (1, 3, 32, 32)
        assert (ds.compression, ds.compression_opts) == ('gzip', bench.LOADER_LEVEL)
        assert ds.attrs['MATLAB_class'] == attrs['MATLAB_class']
        np.testing.assert_array_equal(ds[()], before)
    with open(path, 'rb') as fh:
        assert fh.read(512) == header          # MATLAB's header kept
    with h5py.File(str(path) + '.before-repack', 'r') as f:   # the original, untouched
        assert f['IAll'].chunks == (64, 3, 32, 32)
        np.testing.assert_array_equal(f['IAll'][()], before)
    assert sorted(os.listdir(folder)) == sorted(
        ['mirflickr25k-iall.mat', 'mirflickr25k-iall.mat.before-repack',
         'mirflickr25k-yall.mat', 'mirflickr25k-lall.mat'])   # no temporary file left
    out = capsys.readouterr().out
    assert 'byte-identical' in out and 'passes the check' in out
    prepare.main(argv)
    assert 'already one image per chunk' in capsys.readouterr().out
    shutil.copy(str(path) + '.before-repack', path)   # chunked again, the kept copy still there
    with pytest.raises(settings.UserError, match='before-repack exists'):
        prepare.main(argv)   # it would have to overwrite the kept original


def rewrite_iall(path, **options):
    """The IAll of `path` stored again with these h5py dataset options (chunks of 8 images);
    unknown=True: compressed with HDF5 filter 32001 (blosc), whose plugin h5py lacks here."""
    with h5py.File(path, 'a') as f:
        images, attrs = f['IAll'][()], dict(f['IAll'].attrs)
        del f['IAll']
        chunks = (8,) + images.shape[1:]
        if options.pop('unknown', False):
            ds = f.create_dataset('IAll', shape=images.shape, dtype=images.dtype, chunks=chunks,
                                  compression=32001, allow_unknown_filter=True)
            for a in range(0, len(images), 8):   # the chunks as that filter would store them
                ds.id.write_direct_chunk((a, 0, 0, 0), zlib.compress(images[a:a + 8].tobytes()))
        else:
            ds = f.create_dataset('IAll', data=images, chunks=chunks, **options)
        for name, value in attrs.items():
            ds.attrs[name] = value
    return images


def repack_argv(folder):
    return ['DATASET=MIRFlickr', f'DATA_DIR={str(folder)!r}', 'REPACK=True', 'BATCH_SIZE=4']


@pytest.mark.parametrize('options', [dict(compression='lzf', shuffle=True, fletcher32=True),
                                     dict(scaleoffset=0), dict(compression='gzip')])
def test_repack_keeps_every_filter(tmp_path, options, capsys):
    """Same filters after the repack (scaleoffset was dropped)."""
    folder = tmp_path / 'mir'
    conftest.write_dcmh(folder, conftest.MIR_NAMES, n=24)
    path = folder / conftest.MIR_NAMES[0]
    images = rewrite_iall(path, **options)
    def filters(ds):   # names and settings (scaleoffset's own parameters hold the chunk size)
        return sorted(ds._filters), ds.compression_opts, ds.shuffle, ds.scaleoffset
    with h5py.File(path, 'r') as f:
        before = filters(f['IAll'])
    assert prepare.main(repack_argv(folder)) == 0
    with h5py.File(path, 'r') as f:
        assert f['IAll'].chunks[0] == 1 and filters(f['IAll']) == before
        np.testing.assert_array_equal(f['IAll'][()], images)


def test_a_filter_h5py_cannot_decode_is_named(tmp_path, capsys):
    """Not HDF5's words about a plugin folder: the filter, and that the file is not at fault."""
    folder = tmp_path / 'mir'
    conftest.write_dcmh(folder, conftest.MIR_NAMES, n=24)
    rewrite_iall(folder / conftest.MIR_NAMES[0], unknown=True)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    for main, argv in ((prepare.main, repack_argv(folder)),    # REPACK, then the check
                       (datasets.main, repack_argv(folder)[:2])):
        with pytest.raises(SystemExit) as stop:
            settings.run_cli(main, argv)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.count('\n') == 1, err
        assert 'IAll is compressed with HDF5 filter 32001' in err and 'cannot decode' in err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def hold_folder_lock(folder):
    """Another process holding the folder's flock, as a running REPACK does, until its
    stdin closes."""
    code = ("import fcntl, os, sys\n"
            "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
            "print('locked', flush=True)\n"
            "sys.stdin.read()\n")
    proc = subprocess.Popen([sys.executable, '-c', code, str(folder)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == 'locked\n'
    return proc


def test_repack_while_another_runs_is_refused(tmp_path, capsys):
    """Two REPACKs of one file wrote the same temporary file: each removed the other's and
    both failed with a misleading message. The second is now refused before it writes."""
    folder = tmp_path / 'mir'
    conftest.write_dcmh(folder, conftest.MIR_NAMES, n=24)
    rewrite_iall(folder / conftest.MIR_NAMES[0], compression='gzip')
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    other = hold_folder_lock(folder)
    try:
        code, err = run_prepare(repack_argv(folder), capsys)
    finally:
        conftest.release(other)
    assert code == 2 and 'another REPACK is running' in err and err.count('\n') == 1
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert prepare.main(repack_argv(folder)) == 0   # the lock went with its process


def test_repack_of_an_incomplete_folder_changes_nothing(tmp_path, capsys):
    """LAll missing: refused before the IAll is rewritten (it was rewritten, then the check
    failed with exit status 2)."""
    folder = tmp_path / 'mir'
    conftest.write_dcmh(folder, conftest.MIR_NAMES, n=24)
    rewrite_iall(folder / conftest.MIR_NAMES[0], compression='gzip')
    os.remove(folder / conftest.MIR_NAMES[2])
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    code, err = run_prepare(repack_argv(folder), capsys)
    assert code == 2 and 'missing file mirflickr25k-lall.mat' in err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_repack_never_writes_over_a_kept_file_made_meanwhile(tmp_path, monkeypatch, capsys):
    folder = tmp_path / 'mir'
    conftest.write_dcmh(folder, conftest.MIR_NAMES, n=24)
    path = folder / conftest.MIR_NAMES[0]
    rewrite_iall(path, compression='gzip')
    original = path.read_bytes()
    kept = folder / (path.name + '.before-repack')
    same = matfile.same_images
    def someone_writes_kept(*args):
        kept.write_text('theirs')
        return same(*args)
    monkeypatch.setattr(matfile, 'same_images', someone_writes_kept)
    code, err = run_prepare(repack_argv(folder), capsys)
    assert code == 2 and 'made while REPACK ran' in err
    assert kept.read_text() == 'theirs' and path.read_bytes() == original
    assert sorted(p.name for p in folder.iterdir()) == sorted([*conftest.MIR_NAMES, kept.name])


def test_repack_of_a_symlinked_iall(tmp_path, capsys):
    """The link is replaced by the new file; the file it pointed to is untouched, and the
    kept name is the link (deleting it frees nothing: the message says so)."""
    folder, store = tmp_path / 'mir', tmp_path / 'store'
    conftest.write_dcmh(folder, conftest.MIR_NAMES, n=24)
    store.mkdir()
    path = folder / conftest.MIR_NAMES[0]
    rewrite_iall(path, compression='gzip')
    os.replace(path, store / 'real.mat')
    os.symlink('../store/real.mat', path)
    original = (store / 'real.mat').read_bytes()
    assert prepare.main(repack_argv(folder)) == 0
    out = capsys.readouterr().out
    assert 'was a link' in out and str(store / 'real.mat') in out
    kept = folder / (path.name + '.before-repack')
    assert os.readlink(kept) == '../store/real.mat' and not path.is_symlink()
    assert (store / 'real.mat').read_bytes() == original
    with h5py.File(path, 'r') as f:
        assert f['IAll'].chunks[0] == 1


@pytest.mark.parametrize('argv, said', [
    (['DATASET=IAPR', 'PUBLISHED=UCCH'], "UCCH's feature files are read as they are"),
    (['DATASET=MIRFlickr', 'PUBLISHED=UCCH'], "UCCH's feature files are read as they are"),
    (['DATASET=Custom'], 'Custom is your own folder'),
])
def test_nothing_to_build_says_what_it_checks(argv, said, tmp_path, capsys):
    """Not Wiki's words for every dataset it builds nothing for; and nothing is built into
    a published layout's folder."""
    with pytest.raises(SystemExit) as stop:   # the check then finds no such folder
        settings.run_cli(prepare.main, [*argv, f"DATA_DIR={str(tmp_path / 'none')!r}"])
    out = capsys.readouterr().out
    assert stop.value.code == 2 and said in out and 'Wiki' not in out
    assert os.listdir(tmp_path) == []
