"""Wiki (Rasiwasia et al.) in the layout the authors read:

    images/<category>/<name>.jpg, raw_features.mat (T_tr, T_te),
    trainset_txt_img_cat.list, testset_txt_img_cat.list

The list files give the split (query = test, database = train = train); one JPEG a pair,
decoded by OpenCV as the authors do (pairs.FileImages).
"""
import os

import numpy as np

import matfile
from pairs import Data, FileImages, check_texts, fmt_shape, where_to_get
from settings import UserError

WIKI_FEATURES = 'raw_features.mat'
WIKI_LISTS = ('trainset_txt_img_cat.list', 'testset_txt_img_cat.list')
WIKI_IMAGES = 'images'
# The authors' folder names, in the order of the lists' 1-based category numbers.
WIKI_CATEGORIES = ('art', 'biology', 'geography', 'history', 'literature', 'media', 'music',
                   'royalty', 'sport', 'warfare')


def load(cfg, need_images=True):
    """The Data of Wiki in cfg.DATA_DIR, split by its list files."""
    find_files(cfg, need_images)
    return load_wiki(cfg.DATA_DIR, need_images)


def find_files(cfg, need_images=True):
    """The topic file, the two lists and (need_images) the images folder, as found in
    DATA_DIR; a missing one is named with where to get the dataset. Nothing is read."""
    names = [WIKI_FEATURES, *WIKI_LISTS] + ([WIKI_IMAGES] if need_images else [])
    paths = [os.path.join(cfg.DATA_DIR, name) for name in names]
    missing = [name for name, path in zip(names, paths) if not os.path.exists(path)]
    if missing:
        raise UserError(f"missing {', '.join(missing)} in DATA_DIR={cfg.DATA_DIR!r}: expected "
                        f"the Wiki files ({', '.join(names)}); {where_to_get('Wiki')}")
    return paths


def read_wiki_list(path, n_categories=len(WIKI_CATEGORIES)):
    """(image names, 0-based categories) from a list file: text id, image name, category."""
    matfile.need_file(path, "one pair a line: text id, image name, category number (1-based)")
    names, cats = [], []
    with open(path, 'rb') as f:
        for number, raw in enumerate(f, 1):
            fields = raw.decode('utf-8', 'replace').split()
            if not fields:
                continue
            if len(fields) < 3 or not fields[-1].isdigit() or not (
                    1 <= int(fields[-1]) <= n_categories):
                raise UserError(f"{path} line {number}: expected 'text_id image_name category' "
                                f"with a category from 1 to {n_categories}, found "
                                f"{raw.decode('utf-8', 'replace').strip()[:80]!r}")
            names.append(fields[1])
            cats.append(int(fields[-1]) - 1)
    return names, np.array(cats, np.int64)


def missing_image(path):
    """A folder this user may not enter is not a missing image: say which it is."""
    try:
        os.stat(path)
    except PermissionError:
        return (f"cannot read {path}: permission denied on a folder of its path; expected "
                f"the image named in the list files")
    except OSError:
        pass
    return (f"missing file {path}: expected the image named in the list files; "
            f"{where_to_get('Wiki')}")


def load_wiki(data_dir, need_images=True):
    """Wiki: the given lists (query = test, database = train = train), one image a file
    (need_images=False: on stored features, the image files need not exist)."""
    parts = []
    for list_name, key in zip(WIKI_LISTS, ('T_tr', 'T_te')):
        names, cats = read_wiki_list(os.path.join(data_dir, list_name))
        var = matfile.describe(os.path.join(data_dir, WIKI_FEATURES), key)
        if len(var.shape) != 2:
            raise UserError(f"{var.name()}: expected a 2-D pairs x topics matrix, found shape "
                            f"{var.shape}")
        if len(names) not in var.shape:
            raise UserError(f"pair counts disagree: {list_name} lists {len(names)} pairs, "
                            f"{var.name()} is {fmt_shape(var.shape)}")
        texts = matfile.orient(matfile.read_var(var, np.float32), len(names), var)
        texts = check_texts(texts, var)
        parts.append((names, cats, texts, var))
    names = parts[0][0] + parts[1][0]
    cats = np.concatenate([parts[0][1], parts[1][1]])
    if parts[0][2].shape[1] != parts[1][2].shape[1]:
        raise UserError(f"{os.path.join(data_dir, WIKI_FEATURES)}: T_tr has "
                        f"{parts[0][2].shape[1]} topics, T_te {parts[1][2].shape[1]}; expected "
                        f"the same")
    texts = np.concatenate([parts[0][2], parts[1][2]])
    labels = np.eye(len(WIKI_CATEGORIES), dtype=np.uint8)[cats]
    paths = [os.path.join(data_dir, WIKI_IMAGES, WIKI_CATEGORIES[c], name + '.jpg')
             for name, c in zip(names, cats)]
    for path in paths if need_images else ():  # named now, not in a worker mid-epoch
        if not os.path.isfile(path):
            raise UserError(missing_image(path))
    n_train = len(parts[0][0])
    train = np.arange(n_train, dtype=np.int64)
    query = np.arange(n_train, len(names), dtype=np.int64)
    files = [(os.path.join(data_dir, WIKI_FEATURES),
              f"T_tr {parts[0][3].version:4}  {fmt_shape(parts[0][2].shape)}, T_te "
              f"{fmt_shape(parts[1][2].shape)} {parts[0][3].mclass}"),
             (os.path.join(data_dir, WIKI_LISTS[0]), f"{n_train} pairs (train = database)"),
             (os.path.join(data_dir, WIKI_LISTS[1]), f"{len(query)} pairs (query)"),
             (os.path.join(data_dir, WIKI_IMAGES), f"{len(paths)} image files")]
    return Data('Wiki', texts, labels, FileImages(paths), query, train, train.copy(), files, [])
