"""Cross-modal search with a trained run's hash codes, on FAISS binary indexes.

    python search.py index RUN=runs/DEMO_DJSRH_alexnet_32bit_seed0
    python search.py index RUN=... IMAGES=~/photos          # index a folder of your own images
    python search.py query RUN=... TEXT="red03 blue07 blue12" --grid hits.png
    python search.py query RUN=... IMAGE=photo.jpg           # its texts; TARGET=image: images
    python search.py query RUN=... TEXT_OF=17 --grid hits.png   # the text of pair 17

`index` puts the run's database codes (the codes file of the checkpoint's epoch, or, when
there is none, the database encoded again with the checkpoint's networks) into two
`faiss.IndexBinaryFlat`s, image and text codes, saved under RUN/search/ with the items'
pair numbers and labels beside them; IMAGES=<folder> encodes a folder of JPEG/PNG files
with the trained image network and indexes them as COLLECTION=images.
`query` encodes a query with the run's networks and prints the top K hits, one a line,
rank first: rank, Hamming distance, item (pair number or file), labels, tags of a text.
Ties in distance come back in ascending item id: the ranking of metric.py.

Every setting is KEY=VALUE (SETTINGS below); `--grid out.png` is GRID=out.png. The
evaluation engine (faiss_top_map, faiss_map) and sharded search (search_shards) are here
too; docs/search.md describes all of it.
"""
import hashlib
import os
import sys
import types
import zipfile
import zlib

import numpy as np

import custom
import datasets
import dcmh
import demo
import matfile
import pairs
import settings
import wiki
from settings import UserError

SETTINGS = dict(
    RUN='',                  # the run directory (train.py's OUT_DIR/RUN_NAME)
    IMAGES='',               # index: a folder of JPEG/PNG images to index instead
    TEXT='',                 # query: words of the dataset's tag vocabulary
    IMAGE='',                # query: an image file
    TEXT_OF=-1,              # query: the text of this pair of the dataset (labels known)
    IMAGE_OF=-1,             # query: the image of this pair of the dataset (labels known)
    K=10,                    # hits to return
    TARGET='',               # 'image' | 'text'; '' = the other modality than the query's
    COLLECTION='database',   # 'database' (the run's database set) | 'images' (IMAGES=)
    GRID='',                 # query: write a picture of the query and its hits here
    DATA_DIR='',             # '' = the run's DATA_DIR
    VOCAB='',                # '' = DATA_DIR/<prefix>-tags.txt (prepare.py writes it)
    BATCH=64,                # images encoded at a time
)
COMMANDS = ('index', 'query')
MODALITIES = ('image', 'text')
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png')
# What GRID= may end in: formats matplotlib writes with Pillow installed (no ending: PNG).
GRID_FORMATS = ('png', 'pdf', 'svg', 'jpg', 'jpeg', 'eps', 'tif', 'tiff', 'webp')
# What np.load raises on a truncated, corrupt or foreign .npz file; anything else is a bug.
NPZ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)
QUERY_CHUNK_BYTES = 2 ** 28  # distances and ids of one chunk of queries (evaluation)
# Label names of the DEMO set: the colour each label paints (demo.DEMO_COLOURS).
DEMO_LABEL_NAMES = ('red', 'green', 'blue', 'yellow', 'magenta', 'cyan', 'orange', 'white')


# ===== the engine: packing, exact ranking, mAP, shards =====
def pack_codes(codes):
    """+-1 codes (n, nbits) -> (n, ceil(nbits / 8)) uint8, bit set where the code is +1.
    The padding bits are 0 in every code, so they add nothing to any distance."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or not np.isin(codes, (-1, 1)).all():
        raise ValueError("codes must be a 2-D array of -1 and +1")
    return np.packbits(codes > 0, axis=1)


def flat_index(packed):
    """An exact FAISS binary index over packed codes; item id = row."""
    import faiss
    index = faiss.IndexBinaryFlat(packed.shape[1] * 8)
    index.add(np.ascontiguousarray(packed))
    return index


def ranking(index, packed_queries, k):
    """(distances, ids), each (n_query, k) int64: the k nearest items of each query,
    ordered by (distance, id). FAISS's binary heaps keep the smaller id among equal
    distances (tests/test_search.py checks the selection and the order against a stable
    sort); the lexsort only guards the order."""
    k = min(int(k), index.ntotal)
    dist, ids = index.search(np.ascontiguousarray(packed_queries), k)
    dist, ids = dist.astype(np.int64), ids.astype(np.int64)
    rows = np.arange(len(ids))[:, None]
    order = np.lexsort((ids, dist), axis=1)
    return dist[rows, order], ids[rows, order]


def search_shards(shards, packed_queries, k):
    """Search one index per shard and merge: shards is a list of (index, first_id), the
    shard's items having ids first_id, first_id + 1, ... Each shard's exact top k holds
    every item the whole top k takes from it, so the merge equals one index's ranking."""
    dists, ids = [], []
    for index, first_id in shards:
        d, i = ranking(index, packed_queries, k)
        dists.append(d)
        ids.append(i + first_id)
    dist, ids = np.concatenate(dists, 1), np.concatenate(ids, 1)
    order = np.lexsort((ids, dist), axis=1)[:, :k]
    rows = np.arange(len(ids))[:, None]
    return dist[rows, order], ids[rows, order]


def faiss_top_map(qu_B, re_B, qu_L, re_L, topk):
    """mAP@topk (metric.calculate_top_map's definition) from the ranking of a FAISS
    IndexBinaryFlat over re_B. NumPy inputs: codes +-1, labels 0/1. The AP is metric.py's:
    what this checks is the ranking."""
    import torch
    import metric
    qu_L, re_L = np.asarray(qu_L) != 0, np.asarray(re_L) != 0
    index = flat_index(pack_codes(re_B))
    queries = pack_codes(qu_B)
    k = min(int(topk), index.ntotal)
    rows = max(1, QUERY_CHUNK_BYTES // (16 * k))
    total = 0.0
    for lo in range(0, len(queries), rows):
        _, ids = ranking(index, queries[lo:lo + rows], k)
        relevant = (qu_L[lo:lo + rows, None, :] & re_L[ids]).any(2)
        total += metric.average_precision(torch.from_numpy(relevant)).sum().item()
    return total / len(queries)


def faiss_map(qu_B, re_B, qu_L, re_L):
    """Full mAP: AP over the whole ranking."""
    return faiss_top_map(qu_B, re_B, qu_L, re_L, len(re_B))


# ===== settings and the command line =====
def parse(argv):
    """(command, options namespace) from `index|query KEY=VALUE ... [--grid out.png]`."""
    argv = list(argv)
    if any(arg in ('-h', '--help', 'help') for arg in argv):
        raise settings.HelpRequested()   # run_cli prints the usage, exit status 0
    if not argv or argv[0] not in COMMANDS:
        raise UserError(f"expected a command, {' or '.join(COMMANDS)}: python search.py index "
                        f"RUN=<run dir> | python search.py query RUN=<run dir> TEXT=\"words\"")
    command, rest, given = argv[0], argv[1:], []
    while rest:
        arg = rest.pop(0)
        if arg == '--grid':
            if not rest:
                raise UserError("--grid: expected a file name after it")
            arg = 'GRID=' + rest.pop(0)
        elif arg.startswith('--grid='):
            arg = 'GRID=' + arg[len('--grid='):]
        given.append(arg)
    return command, options(given)


def options(args):
    opts, given = dict(SETTINGS), {}
    for arg in args:
        key, sep, text = arg.partition('=')
        key = key.upper()
        if not sep or key not in SETTINGS:
            raise UserError(f"argument {settings.shorten(arg)}: expected KEY=VALUE with KEY "
                            f"one of {', '.join(SETTINGS)}")
        opts[key] = option_value(key, text)
        if key in ('TEXT_OF', 'IMAGE_OF') and opts[key] < 0:   # -1 is only the default's "none"
            raise UserError(f"{key}={opts[key]}: expected a pair number of at least 0")
        if key in given:   # the last wins, as in settings.py
            settings.warn_repeated(key, given[key], opts[key])
        given[key] = opts[key]
    if opts['TARGET'] not in ('',) + MODALITIES:
        raise UserError(f"setting TARGET={opts['TARGET']!r}: expected 'image' or 'text'")
    if opts['COLLECTION'] not in ('database', 'images'):
        raise UserError(f"setting COLLECTION={opts['COLLECTION']!r}: expected 'database' or "
                        f"'images'")
    if opts['K'] < 1 or opts['BATCH'] < 1:
        raise UserError("settings K and BATCH: expected integers of at least 1")
    if not opts['RUN']:
        raise UserError("setting RUN: expected the run directory, RUN=<OUT_DIR/RUN_NAME>")
    if opts['GRID']:
        check_grid(opts['GRID'], opts['IMAGE'])
    return types.SimpleNamespace(**opts)


def check_grid(path, query_image):
    """GRID names a picture file that can be written, checked before any work is done."""
    ending = os.path.splitext(path)[1][1:].lower()
    if ending and ending not in GRID_FORMATS:
        raise UserError(f"GRID={path!r}: .{ending} is not a picture format; expected a name "
                        f"ending in {', '.join('.' + f for f in GRID_FORMATS)}")
    if os.path.isdir(path):
        raise UserError(f"GRID={path!r}: is a folder; expected a file name such as "
                        f"{os.path.join(path, 'hits.png')}")
    folder = os.path.dirname(path) or '.'
    if not os.path.isdir(folder):
        raise UserError(f"GRID={path!r}: no folder {folder}; expected a file in an existing "
                        f"folder")
    if query_image and os.path.exists(path) and os.path.samefile(path, query_image):
        raise UserError(f"GRID={path!r}: is the query image IMAGE=; expected another file "
                        f"name (the query image is never overwritten)")


def option_value(key, text):
    """Strings are taken as written (quotes around them removed); integers must be integers."""
    value = settings.literal(text)
    if isinstance(SETTINGS[key], str):
        value = value if isinstance(value, str) else text
        return value if key in ('TEXT', 'TARGET', 'COLLECTION') else os.path.expanduser(value)
    if type(value) is not int:
        raise UserError(f"setting {key}={settings.shorten(text)}: expected an integer")
    return value


# ===== the run: settings, checkpoint, networks, codes =====
def open_run(path):
    """The run's settings (defaults for keys it predates) and checkpoint, read-only."""
    ckpt = os.path.join(path, 'checkpoint.pt')
    if not os.path.isdir(path):
        what = 'is a file' if os.path.exists(path) else 'no such directory'
        raise UserError(f"RUN={path!r}: {what}; expected a run directory of train.py")
    if not os.path.isfile(ckpt):
        raise UserError(f"RUN={path!r}: no checkpoint.pt; expected a run directory written by "
                        f"train.py")
    cfg = run_settings(os.path.join(path, 'settings.json'))
    state = read_checkpoint(ckpt)
    return types.SimpleNamespace(dir=path, cfg=cfg, state=state, ckpt=ckpt,
                                 fingerprint=fingerprint(state, cfg.CODE_LEN),
                                 img_net=None, txt_net=None, data=None)


def run_settings(path):
    """The settings a run was trained with, checked as train.py checks its command line
    (settings it predates take their defaults; settings newer than this code are ignored)."""
    import json
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot be read ({matfile.one_line(err)}); expected "
                        f"train.py's settings.json") from None
    if not isinstance(saved, dict):
        raise UserError(f"{path}: a JSON {type(saved).__name__}; expected train.py's "
                        f"settings.json (an object)")
    known = settings.defaults()
    try:
        return settings.resolve(**{k: v for k, v in saved.items() if k in known})
    except UserError as err:
        raise UserError(f"{path}: {err} (this file is not as train.py writes it)") from None


def read_checkpoint(path):
    import train
    return train.read_checkpoint(path, mmap=True,
                                 advice="expected the checkpoint.pt that train.py writes")


def fingerprint(state, code_len):
    """Names the networks: a digest of each network's last layer (its hash layer). An
    index built from another run, or another code length, carries another fingerprint."""
    digest = hashlib.blake2b(str(code_len).encode(), digest_size=12)
    for net in ('img_net', 'txt_net'):
        for key in list(state[net])[-2:]:   # the last layer's weight and bias
            digest.update(key.encode())
            digest.update(state[net][key].float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def on_features(run):
    """True for a run trained on stored image features (docs/features.md): its image
    network is an MLP on feature vectors, and the CNN that made them is not in the run."""
    return settings.uses_image_features(run.cfg)


def image_net(run):
    """The run's image network in eval mode, on the CPU (built once, only when used): the
    CNN of BACKBONE, or on a features run the MLP in the shapes the checkpoint holds."""
    if run.img_net is None:
        import models
        cfg, state = run.cfg, run.state['img_net']
        what = (f"an MLP on stored features ({feature_source(run)})" if on_features(run)
                else f"BACKBONE={cfg.BACKBONE!r}")
        try:
            if on_features(run):
                first = state.get('classifier.0.weight', state['hash.weight'])
                hidden = first.shape[0] if 'classifier.0.weight' in state else 0
                net = models.FeatureImgNet(first.shape[1], cfg.CODE_LEN, hidden)
            else:
                net = models.ImgNet(cfg.BACKBONE, cfg.CODE_LEN, pretrained=False)
            net.load_state_dict(state)
        except (RuntimeError, KeyError, IndexError) as err:
            raise UserError(f"checkpoint {run.ckpt}: its image network does not fit {what}, "
                            f"CODE_LEN={cfg.CODE_LEN} ({matfile.one_line(err)})") from None
        run.img_net = net.eval()
    return run.img_net


def text_net(run):
    """The run's text network in eval mode, on the CPU (built once, only when used)."""
    if run.txt_net is None:
        import models
        state = run.state['txt_net']
        try:
            net = models.TxtNet(state['fc1.weight'].shape[1], run.cfg.CODE_LEN)
            net.load_state_dict(state)
        except (RuntimeError, KeyError, IndexError) as err:
            raise UserError(f"checkpoint {run.ckpt}: its text network does not fit CODE_LEN="
                            f"{run.cfg.CODE_LEN} ({matfile.one_line(err)})") from None
        run.txt_net = net.eval()
    return run.txt_net


def feature_source(run):
    import train
    return train.feature_source(run.cfg)


def refuse_image_files(run, setting):
    """On a features run a new image cannot be encoded: one line saying why, and what works."""
    if on_features(run):
        raise UserError(f"{setting}: this run was trained on stored image features "
                        f"({feature_source(run)}): its image network reads feature vectors, "
                        f"and the CNN that made them is not part of the run, so it cannot "
                        f"encode an image file; query with TEXT=, TEXT_OF=<pair> or "
                        f"IMAGE_OF=<pair> (the pair's stored features)")


def run_data(run, data_dir=''):
    """The run's dataset (images read lazily), split as the checkpoint saved it. data.texts
    are what the text network reads, data.tags the dataset's own texts (what a hit shows):
    they differ on a TEXT_FEATURES run."""
    if run.data is None:
        cfg = {**vars(run.cfg), 'DATA_DIR': data_dir or run.cfg.DATA_DIR}
        data = datasets.load(types.SimpleNamespace(**{**cfg, 'TEXT_FEATURES': ''}),
                             generate=False, verbose=False)
        data.tags = data.texts
        if run.cfg.TEXT_FEATURES:
            import features
            features.apply_text_features(types.SimpleNamespace(**cfg), data)
        check_data_fits(run, data, cfg['DATA_DIR'])
        for key, idx in run.state['split'].items():
            setattr(data, key, idx.numpy())
        run.data = data
    return run.data


def check_data_fits(run, data, data_dir):
    """The data is the run's: its split, text width and feature width fit the checkpoint."""
    import train
    train.check_same_data(run.ckpt, run.state, data)
    where = f"the data in DATA_DIR={data_dir!r}"
    n_pairs = len(data.labels)
    if max(int(idx.max()) if len(idx) else -1 for idx in run.state['split'].values()) >= n_pairs:
        raise UserError(f"checkpoint {run.ckpt}: its split indexes pairs beyond the {n_pairs} "
                        f"of {where}; expected the data it was trained on (DATA_DIR=)")
    widths = [('text', data.texts.shape[1], run.state['txt_net'].get('fc1.weight'))]
    if on_features(run):
        img = run.state['img_net']
        widths.append(('image feature', data.images.dim,
                       img.get('classifier.0.weight', img.get('hash.weight'))))
    for what, width, weight in widths:
        if weight is not None and weight.ndim == 2 and weight.shape[1] != width:
            raise UserError(f"checkpoint {run.ckpt}: its {what} input is {weight.shape[1]}-d, "
                            f"{where} gives {width}-d {what} vectors; expected the data it was "
                            f"trained on")


def encode_images(run, pil_images):
    """Codes (n, CODE_LEN) int8 of PIL images: the test transform, the image network."""
    import torch
    import models
    transform = datasets.test_transform(run.cfg)
    batch = torch.stack([transform(img) for img in pil_images])
    with torch.inference_mode():
        _, hid, _ = image_net(run)(datasets.normalize(batch))
    return models.binarize(hid).numpy()


def encode_features(run, rows):
    """Codes (n, CODE_LEN) int8 of stored image features (a features run's image side)."""
    import torch
    import models
    with torch.inference_mode():
        _, hid, _ = image_net(run)(torch.from_numpy(np.array(rows, np.float32)))  # a copy
    return models.binarize(hid).numpy()


def encode_texts(run, vectors):
    import torch
    import models
    with torch.inference_mode():
        _, hid, _ = text_net(run)(torch.from_numpy(np.array(vectors, np.float32)))  # a copy
    return models.binarize(hid).numpy()


def database_codes(run, opts):
    """(image codes, text codes, pair numbers, labels) of the database: the codes file of
    the checkpoint's epoch when there is one, else encoded again with the networks."""
    path = codes_file(run)
    if path is None:
        return encode_database(run, opts)
    try:
        with np.load(path) as z:
            codes = {k: z[k] for k in ('db_img', 'db_txt', 'db_labels')}
            ids = z['db_index'] if 'db_index' in z.files else None
    except NPZ_ERRORS as err:
        raise UserError(f"codes file {path}: cannot be read, truncated or corrupt? "
                        f"({matfile.one_line(err)}); expected db_img, db_txt and db_labels; "
                        f"move it away to encode the database again") from None
    if ids is None:  # codes files written before they carried their pair numbers
        ids = run.state['split']['database'].numpy()
    check_codes_file(run, path, codes, ids)
    print(f"database codes from {path}")
    return codes['db_img'], codes['db_txt'], np.asarray(ids, np.int64), codes['db_labels']


def check_codes_file(run, path, codes, ids):
    """One row per pair of the checkpoint's database split, CODE_LEN bits of -1 / +1,
    2-D labels."""
    database = run.state['split']['database'].numpy()
    rows = {len(ids), *(len(codes[k]) for k in codes)}
    if len(rows) != 1 or not np.array_equal(ids, database):
        raise UserError(f"codes file {path}: {len(codes['db_img'])} database rows of pairs "
                        f"other than the checkpoint's database split ({len(database)} pairs); "
                        f"expected this run's codes file, one row per database pair")
    for key in ('db_img', 'db_txt'):
        a = codes[key]
        if a.ndim != 2 or a.shape[1] != run.cfg.CODE_LEN or a.dtype == bool \
                or not np.isin(a, (-1, 1)).all():
            raise UserError(f"codes file {path}: {key} is {a.dtype} {a.shape}; expected "
                            f"{run.cfg.CODE_LEN}-bit codes of -1 and +1, one row per pair")
    labels = codes['db_labels']
    if labels.ndim != 2 or labels.dtype.kind not in 'iub':
        raise UserError(f"codes file {path}: db_labels is {labels.dtype} {labels.shape}; "
                        f"expected 0/1 labels, one row per pair")


def codes_file(run):
    """The codes file written at the checkpoint's epoch, or None."""
    import glob
    epoch = int(run.state['epoch'])
    found = sorted(glob.glob(os.path.join(run.dir, 'codes', f'epoch_{epoch:03d}*.npz')))
    return found[0] if found else None


def encode_database(run, opts):
    from tqdm import tqdm
    data = run_data(run, opts.DATA_DIR)
    ids = data.database
    print(f"no codes file of epoch {int(run.state['epoch'])} in {run.dir}/codes: encoding the "
          f"{len(ids)} database pairs with the checkpoint's networks")
    img, txt = [], []
    for lo in tqdm(range(0, len(ids), opts.BATCH), desc='encode database', unit='batch'):
        part = ids[lo:lo + opts.BATCH]
        img.append(encode_features(run, data.images.rows(part)) if on_features(run)
                   else encode_images(run, [data.images.pil(i) for i in part]))
        txt.append(encode_texts(run, data.texts[part]))
    return np.concatenate(img), np.concatenate(txt), ids, data.labels[ids]


# ===== index files =====
def index_paths(run_dir, collection, modality):
    base = os.path.join(run_dir, 'search', f'{collection}_{modality}')
    return base + '.faiss', base + '.npz'


def save_index(run, collection, modality, codes, items, labels):
    """Writes the FAISS index and, beside it, the items (pair numbers or file paths), their
    labels and what the index was built from; each file atomically."""
    import faiss
    import train
    index = flat_index(pack_codes(codes))
    blob = faiss.serialize_index_binary(index)
    index_path, meta_path = index_paths(run.dir, collection, modality)
    try:
        os.makedirs(os.path.dirname(index_path), exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot make the folder {os.path.dirname(index_path)} "
                        f"({matfile.one_line(err)})") from None
    meta = dict(items=np.asarray(items), labels=np.asarray(labels, np.uint8),
                code_len=run.cfg.CODE_LEN, fingerprint=run.fingerprint,
                digest=hashlib.blake2b(blob.tobytes(), digest_size=16).hexdigest())
    train.atomic_write(index_path, lambda f: f.write(blob.tobytes()))
    train.atomic_write(meta_path, lambda f: np.savez(f, **meta))
    print(f"{collection} {modality} index: {index.ntotal} items of {run.cfg.CODE_LEN} bits -> "
          f"{index_path}")


def load_index(run, collection, modality):
    """(index, meta) checked against the run: same networks, same code length, and the
    index file the one its meta file was written with."""
    import faiss
    index_path, meta_path = index_paths(run.dir, collection, modality)
    build = f"python search.py index RUN={run.dir}" + (' IMAGES=<folder>'
                                                       if collection == 'images' else '')
    if not (os.path.isfile(index_path) and os.path.isfile(meta_path)):
        raise UserError(f"no {collection} {modality} index {index_path}; build it with {build}")
    try:
        with open(index_path, 'rb') as f:
            blob = f.read()
        with np.load(meta_path) as z:
            meta = {k: z[k] for k in ('items', 'labels', 'code_len', 'fingerprint', 'digest')}
        meta['fingerprint'], meta['digest'] = str(meta['fingerprint']), str(meta['digest'])
        meta['code_len'] = int(meta['code_len'])
    except NPZ_ERRORS + (TypeError,) as err:   # TypeError: a key of another shape
        raise UserError(f"index {meta_path}: cannot be read, truncated or corrupt? "
                        f"({matfile.one_line(err)}); rebuild it with {build}") from None
    if hashlib.blake2b(blob, digest_size=16).hexdigest() != meta['digest']:
        raise UserError(f"index {index_path} is not the one {meta_path} was written with; "
                        f"rebuild it with {build}")
    if meta['code_len'] != run.cfg.CODE_LEN or meta['fingerprint'] != run.fingerprint:
        raise UserError(f"index {index_path} was built from another run ({meta['code_len']} "
                        f"bits; expected this run's networks, CODE_LEN={run.cfg.CODE_LEN}); "
                        f"rebuild it with {build}")
    index = faiss.deserialize_index_binary(np.frombuffer(blob, np.uint8))
    if not index.ntotal == len(meta['items']) == len(meta['labels']) or meta['labels'].ndim != 2:
        raise UserError(f"index {meta_path}: {len(meta['items'])} items for the "
                        f"{index.ntotal} codes of {index_path}; rebuild it with {build}")
    return index, meta


# ===== index command =====
def cmd_index(opts):
    run = open_run(opts.RUN)
    if opts.IMAGES:
        refuse_image_files(run, f"IMAGES={opts.IMAGES!r}")
        paths, codes = encode_folder(run, opts.IMAGES, opts.BATCH)
        save_index(run, 'images', 'image', codes, paths, np.zeros((len(paths), 0)))
        return
    img, txt, ids, labels = database_codes(run, opts)
    save_index(run, 'database', 'image', img, ids, labels)
    save_index(run, 'database', 'text', txt, ids, labels)


def image_files(folder):
    if not os.path.isdir(folder):
        raise UserError(f"IMAGES={folder!r}: no such folder; expected a folder of JPEG/PNG "
                        f"images")
    found = sorted(os.path.join(root, name) for root, _, names in os.walk(folder)
                   for name in names if name.lower().endswith(IMAGE_SUFFIXES))
    if not found:
        raise UserError(f"IMAGES={folder!r}: no .jpg, .jpeg or .png file in it")
    return found


def open_image(path):
    """An RGB PIL image (EXIF orientation applied), or None when it cannot be decoded."""
    return decode_image(path)[0]


def decode_image(path):
    """(RGB PIL image, None), or (None, why it cannot be used)."""
    from PIL import Image, ImageOps
    try:
        with Image.open(path) as img:
            problem = pairs.elongated(*img.size)   # as FileImages refuses
            if problem:
                return None, problem
            return ImageOps.exif_transpose(img).convert('RGB'), None
    except Image.DecompressionBombError:
        return None, (f"more pixels than PIL's limit of {2 * Image.MAX_IMAGE_PIXELS} "
                      f"(a decompression bomb?); expected a smaller image")
    except (OSError, ValueError, SyntaxError):
        return None, "cannot be decoded; expected a JPEG or PNG image"


def encode_folder(run, folder, batch):
    """(paths, codes) of the folder's decodable images; the others are listed, skipped."""
    from tqdm import tqdm
    paths = image_files(folder)
    kept, codes, bad = [], [], []
    for lo in tqdm(range(0, len(paths), batch), desc='encode images', unit='batch'):
        images = [(p, open_image(p)) for p in paths[lo:lo + batch]]
        bad += [p for p, img in images if img is None]
        images = [(p, img) for p, img in images if img is not None]
        if images:
            kept += [p for p, _ in images]
            codes.append(encode_images(run, [img for _, img in images]))
    for path in bad:
        print(f"skipped (cannot be decoded): {path}")
    if not kept:
        raise UserError(f"IMAGES={folder!r}: none of its {len(paths)} image files can be "
                        f"decoded")
    print(f"encoded {len(kept)} images, skipped {len(bad)}")
    return np.array([os.path.abspath(p) for p in kept]), np.concatenate(codes)


# ===== vocabulary and label names =====
def vocabulary(run, opts, n_tags=None):
    """(words in YAll's column order, where they come from). The file has one word a line
    (anything after a tab, such as prepare.py's counts, is ignored). n_tags: the width of
    the texts it names (None: what the text network reads)."""
    cfg = run.cfg
    if cfg.DATASET == 'Wiki':
        raise UserError("TEXT: Wiki's texts are topic vectors, not words; query with "
                        "TEXT_OF=<pair> or IMAGE=<file>")
    if cfg.DATASET == 'Custom' and not opts.VOCAB:
        return custom_vocabulary(run, n_tags)
    side = side_file(cfg, 'tags')
    if not (opts.VOCAB or side):
        raise UserError(f"TEXT: no tag vocabulary is known for DATASET={cfg.DATASET!r}; "
                        f"expected VOCAB=<file>, one word a line in the order of the text "
                        f"vectors' columns")
    path = opts.VOCAB or os.path.join(opts.DATA_DIR or cfg.DATA_DIR, side)
    if not os.path.isfile(path) and cfg.DATASET == 'DEMO' and not opts.VOCAB:
        words, path = demo_vocabulary(), 'the DEMO vocabulary'
    else:
        words = read_vocabulary(path)
    if n_tags is None:
        n_tags = int(run.state['txt_net']['fc1.weight'].shape[1])
    if len(words) != n_tags:
        raise UserError(f"vocabulary {path}: {len(words)} words; expected {n_tags}, one per "
                        f"column of YAll")
    return words, path


def custom_vocabulary(run, n_tags=None):
    """A Custom run's own vocabulary (RUN/vocabulary.json, written when it started), checked
    to name the n_tags columns of its texts (None: what the text network reads)."""
    path = os.path.join(run.dir, custom.VOCABULARY_FILE)
    words = custom.read_vocabulary(run.dir)['words']
    width = n_tags
    if width is None and not run.cfg.TEXT_FEATURES:
        width = int(run.state['txt_net']['fc1.weight'].shape[1])
    if width is not None and len(words) != width:
        raise UserError(f"{path}: {len(words)} words; the run's texts have {width} columns, "
                        f"one a word (the file was changed since train.py wrote it?)")
    return words, path


def read_vocabulary(path):
    try:
        with open(path, encoding='utf-8') as f:
            return [line.split('\t')[0].strip().lower() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        why = err.strerror if isinstance(err, OSError) else 'not UTF-8 text'
        raise UserError(f"no tag vocabulary {path} ({why}): expected one word a line, "
                        f"in the order of YAll's columns (prepare.py writes it), or VOCAB=<file>"
                        ) from None


def side_file(cfg, what):
    """prepare.py's side files: <DCMH prefix>-tags.txt and <DCMH prefix>-labels.txt; None
    for a dataset that has no DCMH files (IAPR and MSCOCO exist here only as features)."""
    if cfg.DATASET not in dcmh.DCMH_FILES:
        return None
    return dcmh.DCMH_FILES[cfg.DATASET][0].replace('-iall.mat', f'-{what}.txt')


def demo_vocabulary():
    """Names for the DEMO tags: label k owns DEMO_TAGS_PER_LABEL tags (its colour and a
    number), the rest are noise tags (demo.demo_texts)."""
    per = demo.DEMO_TAGS_PER_LABEL
    words = [f"{DEMO_LABEL_NAMES[k]}{j:02d}" for k in range(demo.DEMO_LABELS)
             for j in range(per)]
    return words + [f"noise{j:02d}" for j in range(demo.DEMO_TAGS - len(words))]


def label_names(run, opts, n_labels):
    cfg = run.cfg
    if cfg.DATASET == 'Wiki':
        return list(wiki.WIKI_CATEGORIES)
    if cfg.DATASET == 'DEMO':
        return list(DEMO_LABEL_NAMES)
    if cfg.DATASET == 'Custom':   # the manifest's names, saved with the run
        names = custom.read_vocabulary(run.dir).get('label_names', [])
        return names if len(names) == n_labels else [f"label{c}" for c in range(n_labels)]
    side, names = side_file(cfg, 'labels'), []
    try:
        if side:
            with open(os.path.join(opts.DATA_DIR or cfg.DATA_DIR, side), encoding='utf-8') as f:
                names = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError):
        pass   # no names: label0, label1, ...
    return names if len(names) == n_labels else [f"label{c}" for c in range(n_labels)]


# ===== query command =====
def make_query(run, opts):
    """The query: modality, code (1, CODE_LEN), labels (None when unknown), what to show."""
    given = [k for k in ('TEXT', 'IMAGE', 'TEXT_OF', 'IMAGE_OF') if getattr(opts, k) not in
             ('', -1)]
    if len(given) != 1:
        raise UserError("query: expected exactly one of TEXT=\"words\", IMAGE=<file>, "
                        f"TEXT_OF=<pair>, IMAGE_OF=<pair>; got {', '.join(given) or 'none'}")
    q = types.SimpleNamespace(modality='image' if 'IMAGE' in given[0] else 'text',
                              labels=None, image=None, words=None)
    if opts.TEXT:
        q.words, vocab = text_words(run, opts)
        column = {}
        for j, word in enumerate(vocab):
            column.setdefault(word, j)
        vector = np.zeros((1, len(vocab)), np.float32)
        vector[0, [column[w] for w in q.words]] = 1
        q.code, q.title = encode_texts(run, vector), f"text \"{' '.join(q.words)}\""
    elif opts.IMAGE:
        refuse_image_files(run, f"IMAGE={opts.IMAGE!r}")
        if not os.path.isfile(opts.IMAGE):
            what = 'is a folder' if os.path.isdir(opts.IMAGE) else 'no such file'
            raise UserError(f"IMAGE={opts.IMAGE!r}: {what}; expected a JPEG or PNG image")
        q.image, why = decode_image(opts.IMAGE)
        if q.image is None:
            raise UserError(f"IMAGE={opts.IMAGE!r}: {why}")
        q.code, q.title = encode_images(run, [q.image]), f"image {opts.IMAGE}"
    else:
        pair_query(run, opts, q, given[0])
    return q


def text_words(run, opts):
    """(the known words of TEXT, the vocabulary); unknown words are named in a warning."""
    if run.cfg.TEXT_FEATURES:
        raise UserError(f"TEXT: this run's text network reads TEXT_FEATURES="
                        f"{run.cfg.TEXT_FEATURES!r}, vectors that typed words cannot be turned "
                        f"into; query with TEXT_OF=<pair> or IMAGE_OF=<pair>")
    words = opts.TEXT.replace(',', ' ').lower().split()
    if run.cfg.DATASET == 'Custom':   # a sentence is read as the training texts were
        words = custom.tokens(opts.TEXT)
    vocab, source = vocabulary(run, opts)
    known = set(vocab)
    kept = [w for w in dict.fromkeys(words) if w in known]
    if not words and run.cfg.DATASET == 'Custom':   # the tokenizer dropped every word
        raise UserError(f"TEXT={opts.TEXT!r}: only stop words (such as a, the, of), "
                        f"one-letter words or punctuation, which the vocabulary leaves out; "
                        f"expected words such as {', '.join(vocab[:3])}")
    if not kept:
        raise UserError(f"TEXT={opts.TEXT!r}: no word of it is in {source} ({len(vocab)} "
                        f"words, such as {', '.join(vocab[:3])})")
    unknown = [w for w in words if w not in known]
    if unknown:
        print(f"warning: not in the vocabulary, ignored: {', '.join(unknown)}", file=sys.stderr)
    return kept, vocab


def pair_query(run, opts, q, key):
    data = run_data(run, opts.DATA_DIR)
    pair = getattr(opts, key)
    if not 0 <= pair < len(data.labels):
        raise UserError(f"{key}={pair}: expected a pair number from 0 to {len(data.labels) - 1}")
    q.labels = data.labels[pair] if data.labels[pair].any() else None   # Custom: unknown
    if key == 'TEXT_OF':
        q.code = encode_texts(run, data.texts[pair:pair + 1])
        q.words = text_of(run, opts, data.tags[pair])
        q.title = f"text of pair {pair}"
    elif on_features(run):   # the pair's stored features; there is no picture to show
        q.code = encode_features(run, data.images.rows([pair]))
        q.words, q.title = no_picture(pair), f"image of pair {pair} (its stored features)"
    else:
        q.image = data.images.pil(pair)
        q.code, q.title = encode_images(run, [q.image]), f"image of pair {pair}"


def no_picture(pair):
    """What a grid shows for an image of a features run."""
    return [f"pair {pair}:", "image features, no picture"]


def text_of(run, opts, vector):
    """The words of a text vector (data.tags); column numbers when there is no vocabulary
    file; a vector that is no bag of words is only named."""
    if run.cfg.DATASET == 'Wiki':
        return [f"topic{c}:{vector[c]:.2f}" for c in np.argsort(-vector)[:3]]
    if not np.isin(vector, (0, 1)).all():
        return [f"({len(vector)}-d text vector)"]
    columns = np.flatnonzero(vector)
    try:
        vocab = vocabulary(run, opts, len(vector))[0]
    except UserError:
        return [f"tag{c}" for c in columns]
    return [vocab[c] for c in columns]


def cmd_query(opts):
    import faiss
    run = open_run(opts.RUN)
    q = make_query(run, opts)
    # an image finds texts, a text images; a folder of images has only images
    target = opts.TARGET or ('image' if q.modality == 'text' or opts.COLLECTION == 'images'
                             else 'text')
    if opts.COLLECTION == 'images' and target == 'text':
        raise UserError("COLLECTION=images holds images only; use TARGET=image")
    if opts.COLLECTION == 'images':
        refuse_image_files(run, "COLLECTION=images")
    index, meta = load_index(run, opts.COLLECTION, target)
    if opts.K > index.ntotal:
        raise UserError(f"K={opts.K}: the {opts.COLLECTION} {target} index holds only "
                        f"{index.ntotal} items; expected K <= {index.ntotal}")
    faiss.omp_set_num_threads(1)  # one query: OpenMP threads only wait on a busy machine
    dist, rows = ranking(index, pack_codes(q.code), opts.K)
    hits = describe_hits(run, opts, meta, target, dist[0], rows[0])
    print(f"query: {q.title} -> {target}s of the {opts.COLLECTION} ({index.ntotal} items), "
          f"top {opts.K}" + (f"; query labels: {', '.join(hits.names_of(q.labels))}"
                             if q.labels is not None else ''))
    print("rank  distance  item  labels" + ("  tags" if target == 'text' else ''))
    for hit in hits.rows:
        print(hit.line)
    if opts.GRID:
        write_grid(opts.GRID, q, hits, target)
        print(f"grid: {opts.GRID}")
    return hits


def describe_hits(run, opts, meta, target, dist, rows):
    labels = meta['labels']
    names = label_names(run, opts, labels.shape[1])
    out = types.SimpleNamespace(rows=[], names_of=lambda lab: [names[c] for c in
                                                                np.flatnonzero(lab)])
    database = opts.COLLECTION == 'database'
    # the dataset: for the tags of text hits, and for the pictures of a grid (a features
    # run has none to show)
    pictures = opts.GRID and target == 'image' and not on_features(run)
    data = run_data(run, opts.DATA_DIR) if database and (target == 'text' or pictures) \
        else None
    for rank, (d, row) in enumerate(zip(dist, rows), 1):
        hit = types.SimpleNamespace(rank=rank, distance=int(d), item=meta['items'][row],
                                    labels=labels[row] if labels.shape[1] else None,
                                    words=None, data=data)
        item = f"pair {hit.item}" if database else str(hit.item)
        line = f"{rank:>4}  {int(d):>8}  {item}"
        if hit.labels is not None:
            line += f"  {','.join(out.names_of(hit.labels)) or '-'}"
        if target == 'text':
            hit.words = text_of(run, opts, data.tags[int(hit.item)])
            line += f"  {' '.join(hit.words)}"
        elif database and on_features(run):
            hit.words = no_picture(hit.item)
        hit.line = line
        out.rows.append(hit)
    return out


# ===== the grid picture =====
def write_grid(path, q, hits, target, columns=6):
    """The query (its image or words) and the hits, each with its distance; a hit is framed
    green when it shares a label with the query, red when not, grey when labels are
    unknown. Text hits show their tags."""
    import io
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import train
    n = len(hits.rows) + 1
    rows = -(-n // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.1 * columns, 2.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    panel(axes.flat[0], q.image, q.words, 'query', '#1f5fbf')
    for ax, hit in zip(axes.flat[1:], hits.rows):
        shares = None if q.labels is None or hit.labels is None else bool(
            (np.asarray(q.labels) > 0) @ (np.asarray(hit.labels) > 0))
        colour = {True: '#2ca02c', False: '#d62728', None: '#888888'}[shares]
        image = hit_image(hit) if target == 'image' and not hit.words else None
        panel(ax, image, hit.words, f"#{hit.rank}  d={hit.distance}", colour)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format=os.path.splitext(path)[1][1:].lower() or 'png', dpi=100)
    plt.close(fig)
    try:
        train.atomic_write(path, lambda f: f.write(buffer.getvalue()))
    except OSError as err:
        raise UserError(f"GRID={path!r}: cannot be written ({err.strerror})") from None


def panel(ax, image, words, title, colour):
    import textwrap
    ax.set_axis_on()
    ax.set_xticks([])
    ax.set_yticks([])
    if image is not None:
        ax.imshow(image)
    else:
        text = textwrap.fill(' '.join(words or ['(unreadable)'])[:200], 22)
        ax.text(0.5, 0.5, text.replace('$', r'\$'),   # a '$' would start a formula
                ha='center', va='center', fontsize=8, transform=ax.transAxes)
    ax.set_title(title, fontsize=9, color=colour)
    for spine in ax.spines.values():
        spine.set_color(colour)
        spine.set_linewidth(4)


def hit_image(hit):
    if hit.data is not None:
        return hit.data.images.pil(int(hit.item))
    return open_image(str(hit.item))


def main(argv):
    command, opts = parse(argv)
    if command == 'index':
        cmd_index(opts)
    else:
        cmd_query(opts)
    return 0


if __name__ == '__main__':
    settings.run_cli(main, sys.argv[1:])
