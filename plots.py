"""Precision@top-R and Hamming-radius precision-recall curves, drawn from saved codes.

    python plots.py runs/MIRFlickr_DJSRH_vgg19_128bit_seed0 runs/MIRFlickr_DJSRH_vgg19_128bit_seed1 \
        --out curves.png
    python plots.py runs/DEMO_DJSRH_alexnet_32bit_seed0/codes/epoch_000.npz RUN_DIR --out c.png

Each argument is a run directory (its final codes: the file results.json names, else the
latest codes/epoch_EEE.npz; --epoch picks another) or one codes .npz file. Nothing is
retrained or re-encoded: the curves come from the saved codes alone (the keys query_img,
query_txt, db_img, db_txt, query_labels, db_labels; docs/runs.md), through metric.py.

The figure has four panels: precision@top-R for I->T and T->I (R up to 2,000 on Wiki and
5,000 on MIRFlickr and NUS-WIDE, as in the paper's figure; up to the database size
otherwise), and precision against recall as the Hamming radius grows from 0 to the code
length, for I->T and T->I. Every run is one line on each panel.
"""
import json
import os
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np

import metric
import settings

# The largest R of the paper's precision@top-R figure.
R_MAX = {'Wiki': 2000, 'MIRFlickr': 5000, 'NUSWIDE': 5000}
CODE_KEYS = ('query_img', 'query_txt', 'db_img', 'db_txt', 'query_labels', 'db_labels')
# direction -> (query codes, database codes): I->T ranks text codes for image queries.
DIRECTIONS = {'i2t': ('query_img', 'db_txt'), 't2i': ('query_txt', 'db_img')}
DIRECTION_NAMES = {'i2t': 'I->T', 't2i': 'T->I'}


# ===== finding and reading codes =====
def find_codes(path, epoch=None):
    """The codes file of a run directory (or path itself if it is a .npz file)."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise settings.UserError(f"{path}: no such run directory or codes file")
    if epoch is not None:
        chosen = path / 'codes' / f'epoch_{epoch:03d}.npz'
        if not chosen.exists():
            raise settings.UserError(f"{chosen}: no codes saved at epoch {epoch}")
        return chosen
    results = path / 'results.json'
    if results.exists():
        named = read_json(results).get('codes')
        if isinstance(named, str) and named and (path / named).is_file():
            return path / named
    saved = sorted((path / 'codes').glob('epoch_*.npz'))  # zero-padded: sorts by epoch
    if not saved:
        raise settings.UserError(f"{path}: no codes/epoch_EEE.npz in this run directory")
    return saved[-1]


# What np.load raises on a truncated, corrupt or foreign file; anything else is a bug.
NPZ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


def load_codes(npz_path):
    """The six arrays of a codes file, ready for metric.py."""
    try:
        f = np.load(npz_path, allow_pickle=False)
        if not hasattr(f, 'files'):   # a .npy file: one array, not train.py's .npz
            raise settings.UserError(f"{npz_path}: a single array, expected the .npz codes "
                                     f"file of train.py")
        with f:
            missing = [k for k in CODE_KEYS if k not in f.files]
            if missing:
                raise settings.UserError(f"{npz_path}: not a codes file of train.py (no "
                                         f"{', '.join(missing)})")
            codes = {k: f[k] for k in CODE_KEYS}  # metric.py takes the saved int8 as they are
    except NPZ_ERRORS as err:
        raise settings.UserError(f"{npz_path}: cannot be read as an .npz file, truncated or "
                                 f"corrupt? ({type(err).__name__}: {err})") from err
    check_codes(npz_path, codes)
    codes = labelled_queries(npz_path, codes)
    check_shared_labels(npz_path, codes['query_labels'], codes['db_labels'])
    return codes


def labelled_queries(npz_path, codes):
    """The queries that have a label, as train.py's mAP takes them (a Custom folder may label
    only some pairs); none at all is one line, since every curve ranks by shared labels."""
    labelled = codes['query_labels'].any(1)
    if not labelled.any():
        raise settings.UserError(f"{npz_path}: no query has a label (a Custom folder without "
                                 f"labels): precision and recall need labels; the run's "
                                 f"own-pair recall@K is in its results.json")
    if not labelled.all():
        codes = {k: v[labelled] if k.startswith('query_') else v for k, v in codes.items()}
    return codes


def check_codes(npz_path, codes):
    """Shapes that metric.py can rank: codes (items x bits), labels (items x classes)."""
    q, d = len(codes['query_img']), len(codes['db_img'])
    expect = {'query_img': q, 'query_txt': q, 'query_labels': q,
              'db_img': d, 'db_txt': d, 'db_labels': d}
    bits = {codes[k].shape[-1] for k in ('query_img', 'query_txt', 'db_img', 'db_txt')
            if codes[k].ndim == 2}
    classes = {codes[k].shape[-1] for k in ('query_labels', 'db_labels')
               if codes[k].ndim == 2}
    bad = [f"{k} {codes[k].shape}" for k, n in expect.items()
           if codes[k].ndim != 2 or len(codes[k]) != n or codes[k].dtype.kind not in 'iub']
    if bad or len(bits) != 1 or len(classes) != 1 or not q or not d or not min(bits):
        raise settings.UserError(f"{npz_path}: codes or labels of unexpected shapes or types "
                                 f"({', '.join(bad) or 'widths differ'}); expected integer "
                                 f"items x bits codes and items x classes labels")
    for key in ('query_img', 'query_txt', 'db_img', 'db_txt'):
        if codes[key].dtype.kind == 'b' or not np.isin(codes[key], (-1, 1)).all():
            found = ', '.join(str(v) for v in np.unique(codes[key])[:5])
            raise settings.UserError(f"{npz_path}: {key} holds the values {found}; expected "
                                     f"hash codes of -1 and +1 (train.py's codes files)")
    check_labels(npz_path, codes['query_labels'], codes['db_labels'])


def check_labels(npz_path, query_labels, db_labels):
    """Labels of 0 and 1, as train.py saves them."""
    for key, labels in (('query_labels', query_labels), ('db_labels', db_labels)):
        if not np.isin(labels, (0, 1)).all():
            found = ', '.join(str(v) for v in np.unique(labels)[:5])
            raise settings.UserError(f"{npz_path}: {key} holds the values {found}; expected "
                                     f"0 and 1")


def check_shared_labels(npz_path, query_labels, db_labels):
    """Some query sharing a label with some database item: otherwise every precision is 0
    and every recall undefined, and the figure would show nothing."""
    if not (query_labels.any(0) & db_labels.any(0)).any():
        raise settings.UserError(f"{npz_path}: no query shares a label with any database "
                                 f"item, so nothing is relevant and every curve would be 0; "
                                 f"expected the labels train.py saved")


def read_json(path):
    """A JSON object from a run directory (results.json, settings.json)."""
    try:
        found = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise settings.UserError(f"{path}: cannot be read ({type(err).__name__}: {err})") from err
    if not isinstance(found, dict):
        raise settings.UserError(f"{path}: a JSON {type(found).__name__}, expected an object")
    return found


def run_info(npz_path):
    """What the run directory around a codes file says about it: dataset, label."""
    run_dir = Path(npz_path).resolve().parent.parent
    info = {}
    for name in ('settings.json', 'results.json'):
        if (run_dir / name).exists():
            info.update({k.lower(): v for k, v in read_json(run_dir / name).items()})
    label = (f"{info['dataset']} {info.get('variant', 'DJSRH')} {info['code_len']} bits "
             f"seed {info.get('seed', '?')}" if 'dataset' in info and 'code_len' in info
             else run_dir.name)
    epoch = Path(npz_path).stem.replace('epoch_', 'epoch ')
    dataset = info.get('dataset')
    return dict(dataset=dataset if isinstance(dataset, str) else None, label=f'{label}, {epoch}')


# ===== the curves (no drawing) =====
def r_values(db_size, dataset=None, points=50):
    """Up to `points` evenly spaced R from 1 to the paper's R_max (or the database size)."""
    r_max = min(R_MAX.get(dataset, db_size), db_size)
    # more points than R values would only repeat them (and --points 10**12 fill memory)
    return np.unique(np.linspace(1, r_max, min(points, r_max)).round().astype(np.int64))


def curves(codes, r):
    """Per direction: precision@top-R at each R in r, and (precision, recall) per radius."""
    out = {'r': np.asarray(r)}
    for direction, (query, db) in DIRECTIONS.items():
        args = (codes[query], codes[db], codes['query_labels'], codes['db_labels'])
        precision, recall = metric.pr_curve_hamming(*args)
        out[direction] = dict(p_at_r=to_numpy(metric.precision_at_top_r(*args, r)),
                              precision=to_numpy(precision), recall=to_numpy(recall))
    return out


def to_numpy(x):
    return x.detach().cpu().numpy() if hasattr(x, 'detach') else np.asarray(x)


def run_curves(path, epoch=None, points=50):
    """(label, curves) of one run directory or codes file."""
    npz = find_codes(path, epoch)
    codes, info = load_codes(npz), run_info(npz)
    r = r_values(len(codes['db_img']), info['dataset'], points)
    return info['label'], curves(codes, r)


# ===== drawing =====
def draw(series, out_path, title=None):
    """A 2 x 2 figure (rows: precision@top-R, precision-recall; columns: I->T, T->I)."""
    import matplotlib
    matplotlib.use('Agg')  # files only; no display needed
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 2, figsize=(11, 8.5))
    for label, c in series:
        label = plain_text(label)
        for col, direction in enumerate(DIRECTIONS):
            d = c[direction]
            axes[0, col].plot(c['r'], d['p_at_r'], label=label)
            axes[1, col].plot(d['recall'], d['precision'], marker='.', label=label)
    for col, direction in enumerate(DIRECTIONS):
        name = DIRECTION_NAMES[direction]
        axes[0, col].set(title=f'{name}: precision@top-R', xlabel='R (number retrieved)',
                         ylabel='precision')
        axes[1, col].set(title=f'{name}: precision-recall by Hamming radius',
                         xlabel='recall', ylabel='precision', xlim=(0, 1.02))
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize='small')
    if title:
        fig.suptitle(plain_text(title))
    fig.tight_layout()
    out_path = Path(out_path)
    # under a temporary name (same ending: it picks the format), renamed when complete, so
    # that a failed or interrupted write never leaves half a picture under --out
    tmp = out_path.with_name(f".{out_path.stem}.partial{out_path.suffix}")
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, out_path)
    except OSError as err:
        raise settings.UserError(f"--out {out_path}: cannot write it ({type(err).__name__}: "
                                 f"{err})") from err
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()


def plain_text(text):
    """Text that matplotlib draws as written: a '$' would start a formula (a run directory
    named 'a$b$c' would fail to parse or be drawn as mathematics)."""
    return text.replace('$', r'\$')


FORMATS = ('png', 'pdf', 'svg', 'jpg', 'jpeg', 'eps', 'tif', 'tiff', 'webp')


def check_out(path):
    """--out names exactly the file written: an image file name, not a folder."""
    path = Path(path)
    if path.is_dir():
        raise settings.UserError(f"--out {path}: is a folder; expected a file name such as "
                                 f"{path / 'curves.png'}")
    if path.suffix.lower().lstrip('.') not in FORMATS:
        raise settings.UserError(f"--out {path}: unknown image type {path.suffix or '(none)'}; "
                                 f"expected a name ending in one of "
                                 f"{', '.join('.' + f for f in FORMATS)}")


# ===== command line =====
def parse(argv):
    """The command line, checked; nothing is read or drawn."""
    p = settings.ArgumentParser(prog='plots.py', description=__doc__.split('\n')[0])
    p.add_argument('runs', nargs='+', metavar='RUN_DIR',
                   help="run directories or codes .npz files; one line each")
    p.add_argument('--out', required=True, help="the PNG file to write")
    p.add_argument('--epoch', type=int, help="use codes/epoch_EEE.npz of each run directory "
                                             "instead of the final codes")
    p.add_argument('--points', type=int, default=50, help="R values per curve (default 50)")
    p.add_argument('--title', help="a title over the figure")
    args = p.parse_args(argv)
    check_out(args.out)
    if args.points < 1:
        raise settings.UserError(f"--points {args.points}: expected at least 1")
    return args


def main(argv):
    args = parse(argv)
    series = [run_curves(path, args.epoch, args.points) for path in args.runs]
    draw(series, args.out, args.title)
    print(f'written: {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(settings.run_cli(main, sys.argv[1:]))
