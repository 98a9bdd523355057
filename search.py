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
import ast
import hashlib
import os
import sys
import types

import numpy as np

import datasets
import dcmh
import demo
import matfile
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
    if not argv or argv[0] not in COMMANDS:
        raise UserError(f"expected a command, {' or '.join(COMMANDS)}: python search.py index "
                        f"RUN=<run dir> | python search.py query RUN=<run dir> TEXT=\"words\"")
    command, rest, pairs = argv[0], argv[1:], []
    while rest:
        arg = rest.pop(0)
        if arg == '--grid':
            if not rest:
                raise UserError("--grid: expected a file name after it")
            arg = 'GRID=' + rest.pop(0)
        elif arg.startswith('--grid='):
            arg = 'GRID=' + arg[len('--grid='):]
        pairs.append(arg)
    return command, options(pairs)


def options(pairs):
    opts = dict(SETTINGS)
    for arg in pairs:
        key, sep, text = arg.partition('=')
        key = key.upper()
        if not sep or key not in SETTINGS:
            raise UserError(f"argument {arg!r}: expected KEY=VALUE with KEY one of "
                            f"{', '.join(SETTINGS)}")
        opts[key] = option_value(key, text)
    if opts['TARGET'] not in ('',) + MODALITIES:
        raise UserError(f"setting TARGET={opts['TARGET']!r}: expected 'image' or 'text'")
    if opts['COLLECTION'] not in ('database', 'images'):
        raise UserError(f"setting COLLECTION={opts['COLLECTION']!r}: expected 'database' or "
                        f"'images'")
    if opts['K'] < 1 or opts['BATCH'] < 1:
        raise UserError("settings K and BATCH: expected integers of at least 1")
    if not opts['RUN']:
        raise UserError("setting RUN: expected the run directory, RUN=<OUT_DIR/RUN_NAME>")
    return types.SimpleNamespace(**opts)


def option_value(key, text):
    """Strings are taken as written (quotes around them removed); integers must be integers."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if isinstance(SETTINGS[key], str):
        value = value if isinstance(value, str) else text
        return value if key in ('TEXT', 'TARGET', 'COLLECTION') else os.path.expanduser(value)
    if type(value) is not int:
        raise UserError(f"setting {key}={text!r}: expected an integer")
    return value


# ===== the run: settings, checkpoint, networks, codes =====
def open_run(path):
    """The run's settings (defaults for keys it predates) and checkpoint, read-only."""
    import json
    ckpt = os.path.join(path, 'checkpoint.pt')
    if not os.path.isdir(path):
        raise UserError(f"RUN={path!r}: no such directory; expected a run directory of train.py")
    if not os.path.isfile(ckpt):
        raise UserError(f"RUN={path!r}: no checkpoint.pt; expected a run directory written by "
                        f"train.py")
    try:
        with open(os.path.join(path, 'settings.json')) as f:
            saved = json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(f"{os.path.join(path, 'settings.json')}: cannot be read "
                        f"({matfile.one_line(err)}); expected train.py's settings.json") from None
    cfg = {**settings.defaults(), **{k: v for k, v in saved.items() if k.isupper()}}
    state = read_checkpoint(ckpt)
    return types.SimpleNamespace(dir=path, cfg=types.SimpleNamespace(**cfg), state=state,
                                 ckpt=ckpt, fingerprint=fingerprint(state, cfg['CODE_LEN']),
                                 nets=None, data=None)


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


def networks(run):
    """The run's image and text networks in eval mode, on the CPU (built once)."""
    if run.nets is None:
        import models
        cfg, state = run.cfg, run.state
        try:
            img_net = models.ImgNet(cfg.BACKBONE, cfg.CODE_LEN, pretrained=False)
            img_net.load_state_dict(state['img_net'])
            txt_net = models.TxtNet(state['txt_net']['fc1.weight'].shape[1], cfg.CODE_LEN)
            txt_net.load_state_dict(state['txt_net'])
        except (RuntimeError, KeyError) as err:
            raise UserError(f"checkpoint {run.ckpt}: its networks do not fit BACKBONE="
                            f"{cfg.BACKBONE!r}, CODE_LEN={cfg.CODE_LEN} "
                            f"({matfile.one_line(err)})") from None
        run.nets = img_net.eval(), txt_net.eval()
    return run.nets


def run_data(run, data_dir=''):
    """The run's dataset (images read lazily), split as the checkpoint saved it."""
    if run.data is None:
        cfg = types.SimpleNamespace(**{**vars(run.cfg), 'DATA_DIR': data_dir or run.cfg.DATA_DIR})
        data = datasets.load(cfg, generate=False, verbose=False)
        for key, idx in run.state['split'].items():
            setattr(data, key, idx.numpy())
        run.data = data
    return run.data


def encode_images(run, pil_images):
    """Codes (n, CODE_LEN) int8 of PIL images: the test transform, the image network."""
    import torch
    import models
    transform = datasets.test_transform(run.cfg)
    batch = torch.stack([transform(img) for img in pil_images])
    with torch.inference_mode():
        _, hid, _ = networks(run)[0](datasets.normalize(batch))
    return models.binarize(hid).numpy()


def encode_texts(run, vectors):
    import torch
    import models
    with torch.inference_mode():
        _, hid, _ = networks(run)[1](torch.as_tensor(np.asarray(vectors, np.float32)))
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
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"codes file {path}: cannot be read ({matfile.one_line(err)}); "
                        f"expected db_img, db_txt and db_labels") from None
    if ids is None:  # codes files written before they carried their pair numbers
        ids = run.state['split']['database'].numpy()
    if not len(ids) == len(codes['db_img']) == len(codes['db_txt']) == len(codes['db_labels']):
        raise UserError(f"codes file {path}: {len(codes['db_img'])} database rows, the split "
                        f"has {len(ids)}; expected one row per database pair")
    print(f"database codes from {path}")
    return codes['db_img'], codes['db_txt'], np.asarray(ids, np.int64), codes['db_labels']


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
        img.append(encode_images(run, [data.images.pil(i) for i in part]))
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
    os.makedirs(os.path.dirname(index_path), exist_ok=True)
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
            meta = {k: z[k] for k in z.files}
        meta['fingerprint'], meta['digest'] = str(meta['fingerprint']), str(meta['digest'])
        meta['code_len'] = int(meta['code_len'])
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"index {meta_path}: cannot be read ({matfile.one_line(err)}); "
                        f"rebuild it with {build}") from None
    if hashlib.blake2b(blob, digest_size=16).hexdigest() != meta['digest']:
        raise UserError(f"index {index_path} is not the one {meta_path} was written with; "
                        f"rebuild it with {build}")
    if meta['code_len'] != run.cfg.CODE_LEN or meta['fingerprint'] != run.fingerprint:
        raise UserError(f"index {index_path} was built from another run ({meta['code_len']} "
                        f"bits; expected this run's networks, CODE_LEN={run.cfg.CODE_LEN}); "
                        f"rebuild it with {build}")
    index = faiss.deserialize_index_binary(np.frombuffer(blob, np.uint8))
    return index, meta


# ===== index command =====
def cmd_index(opts):
    run = open_run(opts.RUN)
    if opts.IMAGES:
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
    from PIL import Image, ImageOps
    try:
        with Image.open(path) as img:
            return ImageOps.exif_transpose(img).convert('RGB')
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


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
def vocabulary(run, opts):
    """(words in YAll's column order, where they come from). The file has one word a line
    (anything after a tab, such as prepare.py's counts, is ignored)."""
    cfg = run.cfg
    if cfg.DATASET == 'Wiki':
        raise UserError("TEXT: Wiki's texts are topic vectors, not words; query with "
                        "TEXT_OF=<pair> or IMAGE=<file>")
    path = opts.VOCAB or os.path.join(opts.DATA_DIR or cfg.DATA_DIR, side_file(cfg, 'tags'))
    if not os.path.isfile(path) and cfg.DATASET == 'DEMO' and not opts.VOCAB:
        return demo_vocabulary(), 'the DEMO vocabulary'
    try:
        with open(path, encoding='utf-8') as f:
            words = [line.split('\t')[0].strip().lower() for line in f if line.strip()]
    except OSError as err:
        raise UserError(f"no tag vocabulary {path} ({err.strerror}): expected one word a line, "
                        f"in the order of YAll's columns (prepare.py writes it), or VOCAB=<file>"
                        ) from None
    n_tags = int(run.state['txt_net']['fc1.weight'].shape[1])
    if len(words) != n_tags:
        raise UserError(f"vocabulary {path}: {len(words)} words; expected {n_tags}, one per "
                        f"column of YAll")
    return words, path


def side_file(cfg, what):
    """prepare.py's side files: <DCMH prefix>-tags.txt and <DCMH prefix>-labels.txt."""
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
    path = os.path.join(opts.DATA_DIR or cfg.DATA_DIR, side_file(cfg, 'labels'))
    try:
        with open(path, encoding='utf-8') as f:
            names = [line.strip() for line in f if line.strip()]
    except OSError:
        names = []
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
        if not os.path.isfile(opts.IMAGE):
            raise UserError(f"IMAGE={opts.IMAGE!r}: no such file; expected a JPEG or PNG image")
        q.image = open_image(opts.IMAGE)
        if q.image is None:
            raise UserError(f"IMAGE={opts.IMAGE!r}: cannot be decoded; expected a JPEG or PNG "
                            f"image")
        q.code, q.title = encode_images(run, [q.image]), f"image {opts.IMAGE}"
    else:
        pair_query(run, opts, q, given[0])
    return q


def text_words(run, opts):
    """(the known words of TEXT, the vocabulary); unknown words are named in a warning."""
    words = opts.TEXT.replace(',', ' ').lower().split()
    vocab, source = vocabulary(run, opts)
    known = set(vocab)
    kept = [w for w in dict.fromkeys(words) if w in known]
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
    q.labels = data.labels[pair]
    if key == 'TEXT_OF':
        q.code = encode_texts(run, data.texts[pair:pair + 1])
        q.words = text_of(run, opts, data.texts[pair])
        q.title = f"text of pair {pair}"
    else:
        q.image = data.images.pil(pair)
        q.code, q.title = encode_images(run, [q.image]), f"image of pair {pair}"


def text_of(run, opts, vector):
    """The words of a text vector; column numbers when there is no vocabulary file."""
    columns = np.flatnonzero(vector)
    if run.cfg.DATASET == 'Wiki':
        return [f"topic{c}:{vector[c]:.2f}" for c in np.argsort(-vector)[:3]]
    try:
        vocab = vocabulary(run, opts)[0]
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
    data = run_data(run, opts.DATA_DIR) if database and (target == 'text' or opts.GRID) \
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
            hit.words = text_of(run, opts, data.texts[int(hit.item)])
            line += f"  {' '.join(hit.words)}"
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
        image = hit_image(hit) if target == 'image' else None
        panel(ax, image, hit.words, f"#{hit.rank}  d={hit.distance}", colour)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format=os.path.splitext(path)[1][1:] or 'png', dpi=100)
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
        ax.text(0.5, 0.5, textwrap.fill(' '.join(words or ['(unreadable)'])[:200], 22),
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
