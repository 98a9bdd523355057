"""Every setting of DJSRH, as plain constants.

The values below are the defaults. A run resolves them in this order:
the constants here, then the preset of DATASET (PRESETS), then the ablation VARIANT
(VARIANTS), then KEY=VALUE overrides from the command line. `resolve(argv)` does that and
returns a namespace; importing this module reads no file and no command line.
"""
import argparse
import ast
import math
import os
import re
import sys
import textwrap
import types

# ===== data =====
DATASET = 'MIRFlickr'    # 'MIRFlickr' | 'NUSWIDE' | 'Wiki' | 'DEMO' (its preset applies first);
                         # 'IAPR' | 'MSCOCO' on UCCH's feature files only (PUBLISHED='UCCH');
                         # 'Custom': your own folder of image-text pairs (docs/custom.md)
DATA_DIR = ''            # folder with the dataset's files; '' = the preset's default folder
SPLIT_SEED = 0           # seeds the query/train/database split; separate from SEED
IN_MEMORY = False        # hold the whole IAll in RAM as uint8 (MIRFlickr: ~3 GB); never NUS-WIDE
NUM_WORKERS = 2          # DataLoader worker processes (0 = load in the main process)
RESIZE = 256             # images are resized to RESIZE (shorter side; the authors: 256)
CROP = 224               # then cropped to CROP x CROP (the authors: 224; random in training)
FULL = False             # python datasets.py: read every image, not only the first, middle and last
# ----- your own pairs (DATASET='Custom', docs/custom.md) -----
QUERY_SIZE = 0           # query pairs; 0 = 2,000, or 10% of the pairs when fewer than 20,000
TRAIN_SIZE = 5000        # training pairs (the benchmarks' 5,000), or every non-query pair if fewer
VOCAB_SIZE = 1386        # words kept, most frequent first (MIRFlickr's 1,386 tags: its preset's width)
MIN_WORD_COUNT = 5       # a kept word is in at least this many training pairs
# ----- the fixed-feature protocol (docs/features.md) -----
IMAGE_FEATURES = ''      # an N x d file of image features, row i = pair i (extract.py writes one):
                         # the image side becomes an MLP on it; '' = the CNN on the images
TEXT_FEATURES = ''       # an N x d file replacing the text vectors (e.g. sentence embeddings)
PUBLISHED = ''           # 'UCCH' | 'DGCPN': DATA_DIR holds that project's feature files; their
                         # features, texts, labels and split are used as given
FEATURE_HIDDEN = 4096    # the image MLP on features: Linear(d, 4096), ReLU, Dropout, hash layer
                         # (DGCPN's); 0 = the hash layer alone on the features

# ===== method (paper section 3) =====
VARIANT = 'DJSRH'        # ablation row of the paper's Table 1 (see VARIANTS)
CODE_LEN = 64            # bits per code; the paper reports 16, 32, 64, 128
BATCH_SIZE = 32          # m; also the divisor in S = (1 - eta) S~ + eta S~ S~^T / m
EVAL_BATCH_SIZE = 256    # batch size for encoding the query and database sets
BETA = 0.9               # weight of the image similarity S_I in S~
ETA = 0.4                # weight of the second-order term S~ S~^T / m
MU = 1.5                 # scale of the target: the codes reconstruct mu * S
LAMBDA1 = 0.1            # weight of the image-image term
LAMBDA2 = 0.1            # weight of the text-text term
ANNEAL = True            # B = tanh(alpha H), alpha = sqrt(epoch); False: alpha = 1 (DJSRH-6)

# ===== optimisation (authors' code: SGD, two optimisers) =====
NUM_EPOCH = 80           # epochs of training
LR_IMG = 0.001           # SGD learning rate of the image network
LR_TXT = 0.01            # SGD learning rate of the text network
MOMENTUM = 0.9           # SGD momentum of both optimisers
WEIGHT_DECAY = 5e-4      # SGD weight decay of both optimisers
TRAIN_ALL_IMG = True     # False: train only fc6, fc7 and the hash layer of the image net (Wiki)

# ===== model =====
BACKBONE = 'vgg19'       # 'vgg19' (the paper) | 'alexnet' (the authors' code)
PRETRAINED = True        # start from ImageNet weights (the method needs them)
PRETRAINED_PATH = ''     # a local state_dict file of the backbone; '' = torchvision's download

# ===== run =====
SEED = 0                 # seeds initialisation, shuffling and augmentation
EVAL = False             # True: load the run's checkpoint and evaluate it, no training
EVAL_INTERVAL = 40       # evaluate every this many epochs, and always after the last one
EVAL_UNTRAINED = False   # also evaluate before the first epoch (results: untrained_map_*)
TOPK = 50                # mAP@TOPK is the paper's number
OUT_DIR = 'runs'         # runs live in OUT_DIR/RUN_NAME
RUN_NAME = ''            # '' = derived from dataset, variant, backbone, code length and seed
RESUME = True            # continue from the run directory's checkpoint if there is one
KEEP_OPTIMIZER = False   # keep the optimisers' state in the final checkpoint (to train on later)
DEVICE = ''              # '' = cuda when available, else cpu
DETERMINISTIC = False    # deterministic kernels (bit-identical reruns on one machine)
BF16 = False             # bf16 autocast for the CNN forwards, CPU or CUDA (tanh, S, loss stay fp32)
TF32 = False             # CUDA only: allow TF32 matmuls and convolutions
CHANNELS_LAST = False    # channels_last memory format for the CNNs, CPU or CUDA (rounding only)

# Per-dataset hyperparameters of the authors' code (their per-dataset settings blocks).
PRESETS = {
    'MIRFlickr': dict(DATA_DIR='data/mirflickr', BETA=0.9, LAMBDA1=0.1, LAMBDA2=0.1,
                      NUM_EPOCH=80, LR_IMG=0.001, LR_TXT=0.01, EVAL_INTERVAL=40),
    'NUSWIDE': dict(DATA_DIR='data/nuswide', BETA=0.6, LAMBDA1=0.1, LAMBDA2=0.1,
                    NUM_EPOCH=80, LR_IMG=0.001, LR_TXT=0.01, EVAL_INTERVAL=40),
    'Wiki': dict(DATA_DIR='data/wiki', BETA=0.3, LAMBDA1=0.3, LAMBDA2=0.3,
                 NUM_EPOCH=200, LR_IMG=0.01, LR_TXT=0.01, EVAL_INTERVAL=100,
                 TRAIN_ALL_IMG=False),
    # A small generated dataset in the MIRFlickr layout: runs on a 2-core CPU in about three
    # minutes with randomly initialised AlexNet on 64 x 64 crops (no download). One loader
    # worker: on 2 cores a second one only takes CPU time from the training step.
    # Random AlexNet's fc7 features are nearly parallel whatever the image (cosines ~0.96),
    # so S_I = 2 cos - 1 is ~0.92 for every pair: BETA=0.5 lets it cancel S_T's ~-0.96
    # for unrelated pairs, centring the target on 0. MIRFlickr's LR_IMG=0.001: at 0.01 the
    # shared fc7 direction grows until tanh saturates and every image gets the same code
    # (docs/demo.md).
    'DEMO': dict(DATA_DIR='data/demo', BACKBONE='alexnet', PRETRAINED=False, NUM_WORKERS=1,
                 RESIZE=72, CROP=64, BETA=0.5, LAMBDA1=0.1, LAMBDA2=0.1,
                 NUM_EPOCH=6, LR_IMG=0.001, LR_TXT=0.01, EVAL_INTERVAL=6,
                 EVAL_UNTRAINED=True, CODE_LEN=32),
    # No DJSRH preset exists for these two (the paper never used them); they take MIRFlickr's
    # values: multi-label photo collections with tag / caption text, like MIRFlickr. Only
    # as feature files (PUBLISHED='UCCH').
    'IAPR': dict(DATA_DIR='data/iapr', BETA=0.9, LAMBDA1=0.1, LAMBDA2=0.1,
                 NUM_EPOCH=80, LR_IMG=0.001, LR_TXT=0.01, EVAL_INTERVAL=40),
    'MSCOCO': dict(DATA_DIR='data/mscoco', BETA=0.9, LAMBDA1=0.1, LAMBDA2=0.1,
                   NUM_EPOCH=80, LR_IMG=0.001, LR_TXT=0.01, EVAL_INTERVAL=40),
    # Your own pairs: no DJSRH preset exists for them, so they take MIRFlickr's values (the
    # photo collection with free tags that is most like what users bring); printed when used.
    'Custom': dict(DATA_DIR='data/custom', BETA=0.9, LAMBDA1=0.1, LAMBDA2=0.1,
                   NUM_EPOCH=80, LR_IMG=0.001, LR_TXT=0.01, EVAL_INTERVAL=40),
}
# Datasets without a preset of the authors (printed when used) and the published feature
# layouts that hold each dataset.
BORROWED_PRESETS = {'IAPR': 'MIRFlickr', 'MSCOCO': 'MIRFlickr', 'Custom': 'MIRFlickr'}
PUBLISHED_ONLY = ('IAPR', 'MSCOCO')   # datasets that exist here only as published features
PUBLISHED_LAYOUTS = {'UCCH': ('MIRFlickr', 'NUSWIDE', 'IAPR', 'MSCOCO'),
                     'DGCPN': ('MIRFlickr', 'NUSWIDE')}

# The paper's Table 1. Each row adds to the one above; before DJSRH-4, eta = 0, mu = 1 and
# lambda = 0. 'preset' stands for the dataset's own beta or lambda.
VARIANTS = {
    'DJSRH-1': dict(BETA=1.0, ETA=0.0, MU=1.0, LAMBDA1=0.0, LAMBDA2=0.0),  # S = S_I
    'DJSRH-2': dict(BETA=0.0, ETA=0.0, MU=1.0, LAMBDA1=0.0, LAMBDA2=0.0),  # S = S_T
    'DJSRH-3': dict(ETA=0.0, MU=1.0, LAMBDA1=0.0, LAMBDA2=0.0),            # beta S_I + (1-beta) S_T
    'DJSRH-4': dict(MU=1.0, LAMBDA1=0.0, LAMBDA2=0.0),                     # + eta = 0.4
    'DJSRH-5': dict(LAMBDA1=0.0, LAMBDA2=0.0),                             # + mu = 1.5
    'DJSRH': dict(),                                                       # + lambda1 = lambda2
    'DJSRH-6': dict(ANNEAL=False),                                         # DJSRH with alpha = 1
}

BACKBONES = ('vgg19', 'alexnet')

# Settings that say where or how fast a run goes, not what it computes (BF16 and TF32 change
# rounding only): a checkpoint may be resumed, and a finished grid cell reused, with other
# values of these.
RUN_CONTROL = frozenset({
    'EVAL', 'RESUME', 'DATA_DIR', 'OUT_DIR', 'RUN_NAME', 'NUM_WORKERS', 'IN_MEMORY',
    'EVAL_BATCH_SIZE', 'DEVICE', 'DETERMINISTIC', 'PRETRAINED_PATH', 'BF16', 'TF32',
    'CHANNELS_LAST', 'KEEP_OPTIMIZER', 'FULL'})
# The schedule may change on resume too (train longer, evaluate more often), but a finished
# run made with another schedule holds other numbers.
SCHEDULE = frozenset({'NUM_EPOCH', 'EVAL_INTERVAL', 'EVAL_UNTRAINED'})


# Upper-case names of this module that are not settings.
NOT_SETTINGS = frozenset({'PRESETS', 'VARIANTS', 'BACKBONES', 'RUN_CONTROL', 'SCHEDULE',
                          'SEED_MAX', 'RANGES', 'NOT_SETTINGS', 'SETTING_LINE',
                          'BORROWED_PRESETS', 'PUBLISHED_LAYOUTS', 'PUBLISHED_ONLY',
                          'USAGE_WIDTH', 'CONTINUATION_LINE', 'TYPE_WORDS', 'WARNED'})


class UserError(Exception):
    """A mistake in the user's settings or files: reported as one line, no traceback."""


def defaults():
    """The constants of this module as a dict (UPPER_CASE names only)."""
    return {k: v for k, v in globals().items()
            if k.isupper() and k not in NOT_SETTINGS}


def parse_overrides(argv):
    """KEY=VALUE strings -> dict of UPPER_CASE key to Python value (unchecked). A key given
    twice with different values: the last wins, as in a shell script that overrides its
    common settings (`train.py $COMMON CODE_LEN=32`), and a warning says so."""
    out = {}
    for arg in argv:
        if arg in ('-h', '--help', 'help'):
            raise HelpRequested(arg)
        key, sep, text = arg.lstrip('-').partition('=')
        if not sep or not key:
            raise UserError(f"argument {shorten(arg)}: expected KEY=VALUE")
        value = literal(text)
        key = key.upper()
        if key in out:
            warn_repeated(key, out[key], value)
        out[key] = value
    return out


WARNED = set()   # warn_once's messages: a grid resolves the same arguments once per cell


def warn_once(message):
    """On stdout, as the data's warnings: stderr keeps to the one line of an error."""
    if message not in WARNED:
        WARNED.add(message)
        print(f"warning: {message}")


def warn_repeated(key, before, value):
    """A key given twice: the last value counts, and a different one is worth a warning."""
    if not same_value(before, value):
        warn_once(f"setting {key} given twice ({shorten(before)}, then {shorten(value)}): "
                  f"the last, {shorten(value)}, is used")


def with_defaults(defaults, argv):
    """A command's own KEY=VALUE defaults, then the user's argv: a key the user gives
    replaces the default (without the warning of a key given twice)."""
    given = parse_overrides(argv)
    return [arg for arg in defaults if arg.partition('=')[0].upper() not in given] + list(argv)


def literal(text):
    """A Python literal (numbers, strings, True/False, ...), never evaluated as code; any
    other text is taken as a string (a bare word such as DATASET=Wiki). Deeply nested text
    makes the parser raise MemoryError or RecursionError, and a set of lists TypeError."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def same_value(a, b):
    """1 and 1.0 are the same setting; True and 1 are not."""
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def shorten(value, limit=80):
    """repr(value) for a message, cut to about `limit` characters (a value may be huge)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 20]}...{text[-12:]} " \
        f"({len(text)} characters)"


TYPE_WORDS = {bool: 'True or False', int: 'an integer', float: 'a number', str: 'a string'}


def _check_type(key, value, default):
    if isinstance(default, bool) or isinstance(value, bool):
        ok = type(value) is type(default)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float))
    else:
        ok = isinstance(value, type(default))
    if not ok:
        kind = TYPE_WORDS.get(type(default), f"a {type(default).__name__}")
        raise UserError(f"setting {key}={shorten(value)}: expected {kind} like the default "
                        f"{default!r}")
    return float(value) if isinstance(default, float) else value


def resolve(argv=(), extra=None, **overrides):
    """Defaults, then the dataset preset, then the variant, then the overrides. `extra`
    {KEY: default} adds a command's own settings (prepare.py's RAW_DIR, ...), checked and
    returned in the same namespace."""
    base = {**defaults(), **(extra or {})}
    given = parse_overrides(argv)
    given.update({k.upper(): v for k, v in overrides.items()})
    unknown = sorted(set(given) - set(base))
    if unknown:
        names = ', '.join(key if len(key) <= 40 else key[:37] + '...' for key in unknown)
        raise UserError(f"unknown setting {names}; valid settings: "
                        f"{', '.join(sorted(base))}")
    checked = {k: _check_type(k, v, base[k]) for k, v in given.items()}
    dataset = checked.get('DATASET', base['DATASET'])
    variant = checked.get('VARIANT', base['VARIANT'])
    if dataset not in PRESETS:
        raise UserError(f"setting DATASET={shorten(dataset)}: expected one of "
                        f"{', '.join(PRESETS)}")
    if variant not in VARIANTS:
        raise UserError(f"setting VARIANT={shorten(variant)}: expected one of "
                        f"{', '.join(VARIANTS)}")
    cfg = {**base, **PRESETS[dataset], **VARIANTS[variant], **checked}
    if cfg['PUBLISHED'] and 'DATA_DIR' not in checked:
        cfg['DATA_DIR'] = published_dir(cfg['PUBLISHED'], cfg['DATA_DIR'])
    validate(cfg)
    return types.SimpleNamespace(**cfg)


# The range of every numeric setting: key -> (lowest, highest, what to say). None: no bound.
# Seeds stop at 2**32 - 1 so that SEED * 1,000,003 + epoch stays within what torch.manual_seed
# takes (and SPLIT_SEED within what NumPy's generators take) on every platform.
SEED_MAX = 2**32 - 1
RANGES = {
    'SPLIT_SEED': (0, SEED_MAX, f"an integer from 0 to {SEED_MAX}"),
    'SEED': (0, SEED_MAX, f"an integer from 0 to {SEED_MAX}"),
    'NUM_WORKERS': (0, None, "an integer of at least 0"),
    'RESIZE': (63, None, "at least 63 pixels (and at least CROP)"),
    'CROP': (63, None, "at least 63 pixels (the backbones need it)"),
    'CODE_LEN': (1, 4096, "an integer from 1 to 4096"),
    'BATCH_SIZE': (2, None, "an integer of at least 2"),
    'EVAL_BATCH_SIZE': (1, None, "an integer of at least 1"),
    'BETA': (0.0, 1.0, "a number from 0 to 1"),
    'ETA': (0.0, 1.0, "a number from 0 to 1"),
    'MU': (0.0, None, "a number above 0"),
    'LAMBDA1': (0.0, None, "a number of at least 0"),
    'LAMBDA2': (0.0, None, "a number of at least 0"),
    'NUM_EPOCH': (1, None, "an integer of at least 1"),
    'LR_IMG': (0.0, None, "a number of at least 0"),
    'LR_TXT': (0.0, None, "a number of at least 0"),
    'MOMENTUM': (0.0, 1.0, "a number from 0 to 1"),
    'WEIGHT_DECAY': (0.0, None, "a number of at least 0"),
    'EVAL_INTERVAL': (1, None, "an integer of at least 1"),
    'TOPK': (1, None, "an integer of at least 1"),
    'FEATURE_HIDDEN': (0, None, "an integer of at least 0"),
    'QUERY_SIZE': (0, None, "an integer of at least 1 (0 = 2,000 or 10% of the pairs)"),
    'TRAIN_SIZE': (1, None, "an integer of at least 1"),
    'VOCAB_SIZE': (1, None, "an integer of at least 1"),
    'MIN_WORD_COUNT': (1, None, "an integer of at least 1"),
}


def validate(cfg):
    """Range checks that a type check cannot do: every numeric setting, the names, RUN_NAME."""
    def need(ok, key, expected):
        if not ok:
            raise UserError(f"setting {key}={shorten(cfg[key])}: expected {expected}")
    for key, (low, high, expected) in RANGES.items():
        value = cfg[key]
        need(math.isfinite(value) and value >= low and (high is None or value <= high),
             key, expected)
    need(cfg['MU'] > 0, 'MU', RANGES['MU'][2])
    need(cfg['RESIZE'] >= cfg['CROP'], 'RESIZE', f"at least CROP={cfg['CROP']}")
    need(cfg['BACKBONE'] in BACKBONES, 'BACKBONE', f"one of {', '.join(BACKBONES)}")
    need(cfg['DEVICE'] == '' or names_device(cfg['DEVICE']),
         'DEVICE', "'', 'cpu' or 'cuda[:N]'")
    need(cfg['OUT_DIR'] != '', 'OUT_DIR', "a folder ('.' for the current one)")
    need(stays_inside(cfg['RUN_NAME']), 'RUN_NAME',
         "a name inside OUT_DIR (relative, no '..', '.' or empty parts)")
    validate_features(cfg, need)


def names_device(text):
    """'cpu', 'cuda' or 'cuda:N': one device, as DEVICE and bench.py's --device take it."""
    return text == 'cpu' or re.fullmatch(r'cuda(:\d+)?', text) is not None


def published_dir(layout, preset_dir):
    """A PUBLISHED layout's default DATA_DIR: data/ucch/mirflickr beside DCMH's
    data/mirflickr. UCCH's files share DCMH's names but not their row order, so the two
    projects' files never share a default folder."""
    return os.path.join(os.path.dirname(preset_dir), layout.lower(),
                        os.path.basename(preset_dir))


def stays_inside(name):
    """True for '' and for relative names without '..', '.' or empty parts: a run directory
    stays inside OUT_DIR whatever RUN_NAME says."""
    parts = name.replace('\\', '/').split('/')
    return name == '' or (not os.path.isabs(name)
                          and all(part not in ('', '.', '..') for part in parts))


def validate_features(cfg, need):
    """The fixed-feature settings (docs/features.md)."""
    layouts = PUBLISHED_LAYOUTS.get(cfg['PUBLISHED'], ())
    need(cfg['PUBLISHED'] in ('', *PUBLISHED_LAYOUTS), 'PUBLISHED',
         f"'' or one of {', '.join(PUBLISHED_LAYOUTS)}")
    need(not cfg['PUBLISHED'] or cfg['DATASET'] in layouts, 'PUBLISHED',
         f"a layout that holds DATASET={cfg['DATASET']!r} ({cfg['PUBLISHED']} has "
         f"{', '.join(layouts)})")
    need(not (cfg['PUBLISHED'] and cfg['IMAGE_FEATURES']), 'IMAGE_FEATURES',
         f"'' with PUBLISHED={cfg['PUBLISHED']!r} (the image features come from its files)")
    need(cfg['DATASET'] not in PUBLISHED_ONLY or cfg['PUBLISHED'], 'PUBLISHED',
         f"'UCCH' for DATASET={cfg['DATASET']!r} (it exists here only as UCCH's feature files)")


def uses_image_features(cfg):
    """True when the image side trains on stored features instead of images."""
    return bool(cfg.IMAGE_FEATURES or cfg.PUBLISHED)


def default_run_name(cfg):
    """The run directory's name when RUN_NAME is '' (train.py and reproduce.py share it)."""
    return f"{cfg.DATASET}_{cfg.VARIANT}_{feature_tag(cfg)}_{cfg.CODE_LEN}bit_seed{cfg.SEED}"


def feature_tag(cfg):
    """What the image (and text) side reads, for run names: the backbone on images, else the
    published layout or the feature file's name."""
    tag = cfg.BACKBONE
    if cfg.PUBLISHED:
        tag = f"{cfg.PUBLISHED.lower()}-features"
    elif cfg.IMAGE_FEATURES:
        tag = f"features-{os.path.splitext(os.path.basename(cfg.IMAGE_FEATURES))[0]}"
    if cfg.TEXT_FEATURES:
        tag += f"-text-{os.path.splitext(os.path.basename(cfg.TEXT_FEATURES))[0]}"
    return tag


def run_cli(main, argv):
    """Run main(argv): a UserError becomes one line on stderr and exit status 2, Ctrl-C one
    line and exit status 130, --help the command's usage."""
    try:
        return main(argv)
    except HelpRequested:
        print(usage(sys.modules[main.__module__]))
        return 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: stopped at once; every file written before is intact (run the "
              "same command to continue)", file=sys.stderr)
        sys.exit(130)


def process_alive(pid):
    """Whether process pid (on this machine) still runs: what a lock file names is checked
    against it before a lock is called held."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # alive, another user's
        return True
    return True


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the commands with --options (reproduce.py, bench.py, plots.py): a
    mistake is one line, a UserError (run_cli: exit status 2), not usage and error."""

    def error(self, message):
        raise UserError(f"{message}; see python {self.prog} --help")


# ===== --help =====

class HelpRequested(Exception):
    """-h or --help among the KEY=VALUE arguments: run_cli prints the usage."""


def usage(module):
    """The command's docstring, then its settings: name, default, the constant's comment.
    A command with its own SETTINGS dict (prepare.py) lists those, the others this module's."""
    own = getattr(module, 'SETTINGS', None)
    values = own if isinstance(own, dict) else defaults()
    source = module.__file__ if isinstance(own, dict) else __file__
    meanings = setting_comments(source)
    shown = {key: repr(value) for key, value in values.items()}
    key_width = max(len(key) for key in shown)
    value_width = min(16, max(len(text) for text in shown.values()))
    lines = [(module.__doc__ or '').strip(), '',
             'Settings (KEY=VALUE on the command line; the default, then what it does):']
    indent = 2 + key_width + 1 + value_width + 2
    for key, text in shown.items():
        head = f"  {key:<{key_width}} {text:<{value_width}}  "
        lines.append(textwrap.fill(meanings.get(key, ''), width=max(USAGE_WIDTH, indent + 40),
                                   initial_indent=head, subsequent_indent=' ' * indent,
                                   break_long_words=False, break_on_hyphens=False).rstrip()
                     or head.rstrip())
    if not isinstance(own, dict):
        lines.append("DATASET applies its preset (settings.py, PRESETS) before the overrides.")
    return '\n'.join(lines)


def setting_comments(path):
    """{NAME: comment} of the lines `NAME = value  # comment` (or `NAME=value,  # comment`
    inside a dict) of a source file, each with the indented comment-only lines that follow
    it (a description longer than one line): the meaning of each setting."""
    found, current = {}, None
    with open(path, encoding='utf-8') as f:
        for line in f:
            match = SETTING_LINE.match(line)
            more = CONTINUATION_LINE.match(line)
            if match:
                current = match.group(1) if match.group(1) not in found else None
                if current:
                    found[current] = match.group(2).strip()
            elif more and current:
                found[current] += ' ' + more.group(1).strip()
            else:
                current = None
    return found


SETTING_LINE = re.compile(r"^\s*([A-Z][A-Z0-9_]*)\s*=\s*[^#]*?,?\s+#\s*(.*)$")
CONTINUATION_LINE = re.compile(r"^\s+#\s*(.*)$")   # an indented comment-only line
USAGE_WIDTH = 100
