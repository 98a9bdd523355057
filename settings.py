"""Every setting of DJSRH, as plain constants.

The values below are the defaults. A run resolves them in this order:
the constants here, then the preset of DATASET (PRESETS), then the ablation VARIANT
(VARIANTS), then KEY=VALUE overrides from the command line. `resolve(argv)` does that and
returns a namespace; importing this module reads no file and no command line.
"""
import ast
import sys
import types

# ===== data =====
DATASET = 'MIRFlickr'    # 'MIRFlickr' | 'NUSWIDE' | 'Wiki' | 'DEMO' (its preset applies first)
DATA_DIR = ''            # folder with the dataset's files; '' = the preset's default folder
SPLIT_SEED = 0           # seeds the query/train/database split; separate from SEED
IN_MEMORY = False        # hold the whole IAll in RAM as uint8 (MIRFlickr: ~3 GB); never NUS-WIDE
NUM_WORKERS = 2          # DataLoader worker processes (0 = load in the main process)
RESIZE = 256             # images are resized to RESIZE, then cropped to CROP (authors: 256, 224)
CROP = 224

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
NUM_EPOCH = 80
LR_IMG = 0.001
LR_TXT = 0.01
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
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
DEVICE = ''              # '' = cuda when available, else cpu
DETERMINISTIC = False    # deterministic kernels (bit-identical reruns on CPU)
BF16 = False             # CUDA only: bf16 autocast for the CNN forwards (S and the loss stay fp32)
TF32 = False             # CUDA only: allow TF32 matmuls and convolutions
CHANNELS_LAST = True     # CUDA only: channels_last memory format for the CNNs

# Per-dataset hyperparameters of the authors' code (SPEC section 2).
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
}

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


class UserError(Exception):
    """A mistake in the user's settings or files: reported as one line, no traceback."""


def defaults():
    """The constants of this module as a dict (UPPER_CASE names only)."""
    return {k: v for k, v in globals().items()
            if k.isupper() and k not in ('PRESETS', 'VARIANTS', 'BACKBONES')}


def parse_overrides(argv):
    """KEY=VALUE strings -> dict of UPPER_CASE key to Python value (unchecked)."""
    out = {}
    for arg in argv:
        key, sep, text = arg.lstrip('-').partition('=')
        if not sep or not key:
            raise UserError(f"argument {arg!r}: expected KEY=VALUE")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a bare word such as DATASET=Wiki is taken as a string
        out[key.upper()] = value
    return out


def _check_type(key, value, default):
    if isinstance(default, bool) or isinstance(value, bool):
        ok = type(value) is type(default)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float))
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise UserError(f"setting {key}={value!r}: expected a {type(default).__name__} "
                        f"like the default {default!r}")
    return float(value) if isinstance(default, float) else value


def resolve(argv=(), **overrides):
    """Defaults, then the dataset preset, then the variant, then the overrides."""
    base = defaults()
    given = parse_overrides(argv)
    given.update({k.upper(): v for k, v in overrides.items()})
    unknown = sorted(set(given) - set(base))
    if unknown:
        raise UserError(f"unknown setting {', '.join(unknown)}; valid settings: "
                        f"{', '.join(sorted(base))}")
    checked = {k: _check_type(k, v, base[k]) for k, v in given.items()}
    dataset = checked.get('DATASET', base['DATASET'])
    variant = checked.get('VARIANT', base['VARIANT'])
    if dataset not in PRESETS:
        raise UserError(f"setting DATASET={dataset!r}: expected one of {', '.join(PRESETS)}")
    if variant not in VARIANTS:
        raise UserError(f"setting VARIANT={variant!r}: expected one of {', '.join(VARIANTS)}")
    cfg = {**base, **PRESETS[dataset], **VARIANTS[variant], **checked}
    validate(cfg)
    return types.SimpleNamespace(**cfg)


def validate(cfg):
    """Range checks that a type check cannot do."""
    def need(ok, key, expected):
        if not ok:
            raise UserError(f"setting {key}={cfg[key]!r}: expected {expected}")
    need(cfg['BACKBONE'] in BACKBONES, 'BACKBONE', f"one of {', '.join(BACKBONES)}")
    need(1 <= cfg['CODE_LEN'] <= 4096, 'CODE_LEN', "an integer from 1 to 4096")
    need(cfg['BATCH_SIZE'] >= 2, 'BATCH_SIZE', "an integer of at least 2")
    need(cfg['EVAL_BATCH_SIZE'] >= 1, 'EVAL_BATCH_SIZE', "an integer of at least 1")
    need(0.0 <= cfg['BETA'] <= 1.0, 'BETA', "a number from 0 to 1")
    need(0.0 <= cfg['ETA'] <= 1.0, 'ETA', "a number from 0 to 1")
    need(cfg['NUM_EPOCH'] >= 1, 'NUM_EPOCH', "an integer of at least 1")
    need(cfg['EVAL_INTERVAL'] >= 1, 'EVAL_INTERVAL', "an integer of at least 1")
    need(cfg['TOPK'] >= 1, 'TOPK', "an integer of at least 1")
    need(cfg['NUM_WORKERS'] >= 0, 'NUM_WORKERS', "an integer of at least 0")
    need(cfg['CROP'] >= 63, 'CROP', "at least 63 pixels (the backbones need it)")
    need(cfg['RESIZE'] >= cfg['CROP'], 'RESIZE', f"at least CROP={cfg['CROP']}")
    need(cfg['DEVICE'] in ('', 'cpu') or cfg['DEVICE'].startswith('cuda'), 'DEVICE',
         "'', 'cpu' or 'cuda[:N]'")


def default_run_name(cfg):
    """The run directory's name when RUN_NAME is '' (train.py and reproduce.py share it)."""
    return f"{cfg.DATASET}_{cfg.VARIANT}_{cfg.BACKBONE}_{cfg.CODE_LEN}bit_seed{cfg.SEED}"


def run_cli(main, argv):
    """Run main(argv); a UserError becomes one line on stderr and exit status 2."""
    try:
        return main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
