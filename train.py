"""Train and evaluate DJSRH.

    python train.py                        # MIRFlickr, 64 bits, the paper's settings
    python train.py DATASET=Wiki CODE_LEN=128
    python train.py DATASET=DEMO           # small generated data, CPU, a few minutes
    python train.py DATASET=DEMO EVAL=True # evaluate the run's checkpoint

Every setting lives in settings.py; KEY=VALUE on the command line overrides it (--help lists
them). A run lives in OUT_DIR/RUN_NAME and resumes from its checkpoint when started again;
docs/runs.md describes its files, the lock, Ctrl-C and what is kept when it finishes.
"""
import concurrent.futures
import contextlib
import dataclasses
import errno
import hashlib
import json
import math
import os
import pickle
import platform
import re
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import custom
import datasets
import metric
import models
import settings
from matfile import one_line
from settings import UserError


# ===== the method (paper section 3) =====

def joint_semantics(F_I, F_T, beta, eta, mu):
    """The reconstruction target mu * S from a batch of image and text features."""
    F_I = F.normalize(F_I.float(), dim=1)  # a zero row stays zero (eps), as in the authors' code
    F_T = F.normalize(F_T.float(), dim=1)
    # Features are non-negative, so cosines lie in [0, 1]; the authors map them to [-1, 1].
    S_I = F_I @ F_I.t() * 2 - 1
    S_T = F_T @ F_T.t() * 2 - 1
    S_tilde = beta * S_I + (1 - beta) * S_T
    m = S_tilde.shape[0]
    S = (1 - eta) * S_tilde + eta * (S_tilde @ S_tilde.t()) / m
    return mu * S


def reconstruction_loss(code_I, code_T, S, lambda1, lambda2):
    """mse(B_I B_T^T, S) + lambda1 mse(B_I B_I^T, S) + lambda2 mse(B_T B_T^T, S), rows of B unit."""
    B_I = F.normalize(code_I.float(), dim=1)
    B_T = F.normalize(code_T.float(), dim=1)
    return (F.mse_loss(B_I @ B_T.t(), S)
            + lambda1 * F.mse_loss(B_I @ B_I.t(), S)
            + lambda2 * F.mse_loss(B_T @ B_T.t(), S))


def epoch_seed(seed, epoch):
    """Each epoch's randomness (shuffle, crops, flips, dropout) depends only on (SEED, epoch),
    so a run resumed at an epoch boundary draws exactly what an uninterrupted one draws."""
    return seed * 1_000_003 + epoch


# ===== the session: networks and optimisers; one epoch of training, one evaluation =====

class Session:
    """The authors' Session: the networks and optimisers, one epoch of training, one
    evaluation, and their state. Where the run stands (epoch, step, times) is Run's."""

    def __init__(self, cfg, data):
        self.cfg = cfg
        self.data = data
        self.device = pick_device(cfg)
        torch.manual_seed(cfg.SEED)
        # CodeNet_I, FeatNet_I and CodeNet_T of the authors' code.
        self.on_features = settings.uses_image_features(cfg)  # docs/features.md
        if self.on_features:
            self.img_net = models.FeatureImgNet(data.images.dim, cfg.CODE_LEN,
                                                cfg.FEATURE_HIDDEN).to(self.device)
        else:
            self.img_net = models.ImgNet(cfg.BACKBONE, cfg.CODE_LEN, cfg.PRETRAINED,
                                         cfg.PRETRAINED_PATH).to(self.device)
        self.feat_net = self.img_net.frozen_copy()
        self.txt_net = models.TxtNet(data.texts.shape[1], cfg.CODE_LEN).to(self.device)
        if cfg.CHANNELS_LAST:
            self.img_net.to(memory_format=torch.channels_last)
            self.feat_net.to(memory_format=torch.channels_last)
        self.check_deterministic()
        img_params = (self.img_net.parameters() if cfg.TRAIN_ALL_IMG
                      else self.img_net.head_parameters())
        if not cfg.TRAIN_ALL_IMG:  # Wiki: the conv layers never change, so need no gradient
            self.img_net.features.requires_grad_(False)
        # fused=True: one pass over the weights per step, the same update (5x faster on CPU).
        self.opt_img = torch.optim.SGD(img_params, lr=cfg.LR_IMG, momentum=cfg.MOMENTUM,
                                       weight_decay=cfg.WEIGHT_DECAY, fused=True)
        self.opt_txt = torch.optim.SGD(self.txt_net.parameters(), lr=cfg.LR_TXT,
                                       momentum=cfg.MOMENTUM, weight_decay=cfg.WEIGHT_DECAY,
                                       fused=True)

    def check_deterministic(self):
        """DETERMINISTIC=True on CUDA needs a deterministic backward through the trunk's
        pooling (models.ImgNet.pool): refuse, in one line, crops that take the pooling."""
        cfg = self.cfg
        if (cfg.DETERMINISTIC and self.device.type == 'cuda' and not self.on_features
                and cfg.TRAIN_ALL_IMG and self.img_net.pools_for_real(cfg.CROP)):
            raise UserError(f"setting DETERMINISTIC=True: {cfg.BACKBONE} at CROP={cfg.CROP} "
                            f"pools its feature map with AdaptiveAvgPool2d, which has no "
                            f"deterministic backward on CUDA; use CROP=224, "
                            f"DETERMINISTIC=False, or DEVICE='cpu'")

    # ----- training -----

    def images_to_device(self, images):
        if self.on_features:
            return images.to(self.device, non_blocking=True)
        images = datasets.normalize(images.to(self.device, non_blocking=True))
        if self.cfg.CHANNELS_LAST:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def autocast(self):
        """bf16 autocast for the CNN forwards with BF16=True, on the CPU as on CUDA."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.BF16)

    def train_step(self, images, texts):
        cfg = self.cfg
        images = self.images_to_device(images)
        texts = texts.to(self.device, non_blocking=True)
        with torch.no_grad(), self.autocast():
            F_I = self.feat_net.fc7(images)
        with self.autocast():
            _, _, code_I = self.img_net(images)
        _, _, code_T = self.txt_net(texts)
        S = joint_semantics(F_I, texts, cfg.BETA, cfg.ETA, cfg.MU)
        loss = reconstruction_loss(code_I, code_T, S, cfg.LAMBDA1, cfg.LAMBDA2)
        self.opt_img.zero_grad(set_to_none=True)
        self.opt_txt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_img.step()
        self.opt_txt.step()
        return loss.detach()

    def train_epoch(self, epoch, skip=0):
        """Train on the batches of the 0-based `epoch` from batch `skip` on, yielding each
        batch's loss (a tensor on the device: Run reads them in bulk). The epoch's batches,
        crops and dropout depend only on (SEED, epoch): a resumed epoch replays the loader to
        batch `skip`, then goes on with the random state the checkpoint restored, and draws
        what an uninterrupted one draws."""
        cfg = self.cfg
        alpha_epoch = epoch if cfg.ANNEAL else 0  # alpha = sqrt(0 + 1) = 1 without annealing
        self.img_net.set_alpha(alpha_epoch)
        self.txt_net.set_alpha(alpha_epoch)
        self.img_net.train()
        self.txt_net.train()
        resume_rng = self.rng_state() if skip else None
        torch.manual_seed(epoch_seed(cfg.SEED, epoch))
        generator = torch.Generator().manual_seed(epoch_seed(cfg.SEED, epoch))
        loader = datasets.make_loader(self.data, 'train', cfg, generator=generator)
        for i, (images, texts, _, _) in enumerate(datasets.batches(loader)):
            if i < skip:
                if i == skip - 1:
                    self.set_rng_state(resume_rng)
                continue
            yield self.train_step(images, texts)

    # ----- evaluation -----

    @torch.inference_mode()
    def encode(self, part):
        """Binary codes of both modalities for the query or database set."""
        self.img_net.eval()
        self.txt_net.eval()
        loader = datasets.make_loader(self.data, part, self.cfg)
        img_codes, txt_codes, labels = [], [], []
        for images, texts, batch_labels, _ in tqdm(datasets.batches(loader), total=len(loader),
                                                   desc=f'encode {part}', leave=False,
                                                   disable=not sys.stderr.isatty()):
            with self.autocast():
                _, hid_I, _ = self.img_net(self.images_to_device(images))
            _, hid_T, _ = self.txt_net(texts.to(self.device, non_blocking=True))
            img_codes.append(models.binarize(hid_I))
            txt_codes.append(models.binarize(hid_T))
            labels.append(batch_labels)
        return torch.cat(img_codes), torch.cat(txt_codes), torch.cat(labels).to(self.device)

    def evaluate(self):
        """mAP@TOPK both ways and the own-pair recall; returns (result dict, codes dict of
        NumPy arrays). Row i of the query codes is pair query_index[i], row j of the database
        codes db_index[j]."""
        q_img, q_txt, q_lab = self.encode('query')
        r_img, r_txt, r_lab = self.encode('database')
        result = label_maps(q_img, q_txt, q_lab, r_img, r_txt, r_lab, self.cfg.TOPK)
        result.update(metric.pair_retrieval(q_img, q_txt))   # needs no labels
        # a collapse of the codes shows here before it shows in the mAP
        result.update(distinct_img_codes=len(torch.unique(r_img, dim=0)),
                      distinct_txt_codes=len(torch.unique(r_txt, dim=0)))
        codes = dict(query_img=q_img, query_txt=q_txt, db_img=r_img, db_txt=r_txt,
                     query_labels=q_lab, db_labels=r_lab)
        codes = {k: v.cpu().numpy().astype(np.uint8 if 'labels' in k else np.int8)
                 for k, v in codes.items()}
        codes.update(query_index=self.data.query.astype(np.int64),
                     db_index=self.data.database.astype(np.int64))
        return result, codes

    # ----- state -----

    def rng_state(self):
        """The CPU's random state, and the training GPU's (dropout draws there); not the
        other GPUs', which the run never uses."""
        state = {'cpu': torch.get_rng_state()}
        if self.device.type == 'cuda':
            state['cuda'] = torch.cuda.get_rng_state(self.device)
        return state

    def set_rng_state(self, state, trained_on=0):
        """Restore rng_state(); on CUDA into the training device. Older checkpoints hold a
        list, one state per visible GPU: the one of GPU `trained_on` (the index the run
        trained on) is taken, if that list has it."""
        torch.set_rng_state(state['cpu'])
        cuda = state.get('cuda')
        if isinstance(cuda, (list, tuple)):
            cuda = cuda[trained_on] if trained_on < len(cuda) else None
        if cuda is not None and self.device.type == 'cuda':
            torch.cuda.set_rng_state(cuda, self.device)

    def state_dict(self, optimizer=True):
        """The networks, the split and the settings (what EVAL=True and search need), and
        with optimizer=True what training on needs: the optimisers and the random state.
        FeatNet_I is not saved: it is rebuilt from the same weights, seeded by SEED."""
        state = {'img_net': self.img_net.state_dict(), 'txt_net': self.txt_net.state_dict(),
                 'split': {k: torch.from_numpy(getattr(self.data, k))
                           for k in ('query', 'train', 'database')},
                 'settings': vars(self.cfg)}
        if self.data.digest:
            state[DATA_DIGEST_KEY] = self.data.digest[1]
        if optimizer:
            state.update(opt_img=self.opt_img.state_dict(), opt_txt=self.opt_txt.state_dict(),
                         rng=self.rng_state())
        return state

    def load_checkpoint(self, path, state, optimizer):
        """Load a checkpoint read by read_checkpoint; optimizer=True also loads the optimisers
        and the random state, to train on."""
        check_same_experiment(path, state['settings'], vars(self.cfg))
        check_same_data(path, state, self.data)
        split = {key: idx.numpy() for key, idx in state['split'].items()}
        n_pairs, text_dim = self.data.texts.shape
        if max(idx.max(initial=-1) for idx in split.values()) >= n_pairs:
            raise UserError(f"checkpoint {path}: its split indexes pairs beyond the {n_pairs} "
                            f"of the data in DATA_DIR={self.cfg.DATA_DIR!r}; use the data it "
                            f"was trained on, or RESUME=False")
        saved_dim = state['txt_net'].get('fc1.weight', torch.empty(0, 0)).shape[-1]
        if saved_dim != text_dim:
            raise UserError(f"checkpoint {path}: its text network reads {saved_dim}-d texts, "
                            f"the data in DATA_DIR={self.cfg.DATA_DIR!r} has {text_dim}-d ones; "
                            f"use the data it was trained on, or RESUME=False")
        models.check_shapes(path, f"image network ({feature_source(self.cfg)})", self.img_net,
                            state['img_net'])
        load_weights(path, 'img_net', self.img_net, state['img_net'])
        load_weights(path, 'txt_net', self.txt_net, state['txt_net'])
        if optimizer:
            load_weights(path, 'opt_img', self.opt_img, state['opt_img'])
            load_weights(path, 'opt_txt', self.opt_txt, state['opt_txt'])
            relay_momentum(self.opt_img)
            relay_momentum(self.opt_txt)
            self.set_rng_state(state['rng'], saved_gpu(state['settings']))
        for key, idx in split.items():
            setattr(self.data, key, idx)


MAP_KEYS = ('map_i2t', 'map_t2i', 'map_all_i2t', 'map_all_t2i')
PAIR_KEYS = ('recall_i2t', 'recall_t2i', 'median_rank_i2t', 'median_rank_t2i')


def label_maps(q_img, q_txt, q_lab, r_img, r_txt, r_lab, topk):
    """mAP@topk and full mAP (over the whole retrieval set: the feature protocol's number)
    both ways, over the queries that have a label; each None when none has one (a Custom
    folder without labels: docs/metrics.md). Every benchmark query has a label."""
    labelled = (q_lab != 0).any(1)
    if not bool(labelled.any()):
        return dict.fromkeys(MAP_KEYS)
    if not bool(labelled.all()):
        q_img, q_txt, q_lab = q_img[labelled], q_txt[labelled], q_lab[labelled]
    return {'map_i2t': metric.calculate_top_map(q_img, r_txt, q_lab, r_lab, topk),
            'map_t2i': metric.calculate_top_map(q_txt, r_img, q_lab, r_lab, topk),
            'map_all_i2t': metric.calculate_map(q_img, r_txt, q_lab, r_lab),
            'map_all_t2i': metric.calculate_map(q_txt, r_img, q_lab, r_lab)}


def eval_summary(result, topk):
    """One line of an evaluation's figures: mAP where there are labels, the own-pair R@10."""
    line = ''
    if result.get('map_i2t') is not None:
        line = f"mAP@{topk} I->T {result['map_i2t']:.4f}, T->I {result['map_t2i']:.4f}; "
    if result.get('map_all_i2t') is not None:
        line += (f"mAP@all I->T {result['map_all_i2t']:.4f}, "
                 f"T->I {result['map_all_t2i']:.4f}; ")
    if 'recall_i2t' in result:   # results.json of runs before the own-pair figures lack it
        line += (f"R@10 I->T {result['recall_i2t']['10']:.4f}, "
                 f"T->I {result['recall_t2i']['10']:.4f}; ")
    return line or 'no figures; '


# ===== checkpoints and files =====

# What torch.load raises on a truncated, corrupt or foreign file; anything else is a bug.
CHECKPOINT_ERRORS = (OSError, EOFError, KeyError, ValueError, RuntimeError,
                     pickle.UnpicklingError, zipfile.BadZipFile)
CHECKPOINT_KEYS = ('img_net', 'txt_net', 'split', 'settings', 'epoch', 'evals')
TRAINING_KEYS = ('opt_img', 'opt_txt', 'rng', 'step', 'loss_sum')


def read_checkpoint(path, mmap=False, advice="move it away, or pass RESUME=False to "
                                            "start over"):
    """A checkpoint of train.py, checked to be one; UserError for anything else, ending in
    `advice`. mmap=True reads only the tensors used (search.py: a VGG-19 one is 1 GB)."""
    try:
        state = torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
    except CHECKPOINT_ERRORS as err:
        raise UserError(f"checkpoint {path}: cannot be read, truncated or corrupt? "
                        f"({one_line(err)}); {advice}") from err
    if not isinstance(state, dict):
        found = f"a {type(state).__name__}"
    else:
        missing = [k for k in CHECKPOINT_KEYS if k not in state]
        found = f"no {', '.join(missing)}" if missing else None
        if not missing and not (isinstance(state['settings'], dict)
                                and isinstance(state['split'], dict)
                                and set(state['split']) == {'query', 'train', 'database'}):
            found = "its settings or split are not what train.py writes"
    if found:
        raise UserError(f"checkpoint {path}: not a checkpoint written by train.py ({found}); "
                        f"{advice}")
    verify_digest(path, state, advice)
    return state


def relay_momentum(optimizer):
    """Each momentum buffer on its weight's device and in its memory layout. A checkpoint
    keeps the layout it was saved in, and DEVICE and CHANNELS_LAST may change on resume:
    load_state_dict moves the buffers but keeps their strides, and fused SGD then refuses
    (CUDA) or pairs the wrong elements (CPU)."""
    for group in optimizer.param_groups:
        for weight in group['params']:
            buf = optimizer.state.get(weight, {}).get('momentum_buffer')
            if buf is not None and (buf.device != weight.device
                                    or buf.stride() != weight.stride()):
                optimizer.state[weight]['momentum_buffer'] = torch.empty_like(weight).copy_(buf)


def saved_gpu(saved_settings):
    """The index of the GPU a checkpoint's run trained on, as far as its DEVICE says."""
    match = re.fullmatch(r'cuda:(\d+)', str(saved_settings.get('DEVICE', '')))
    return int(match.group(1)) if match else 0


DIGEST_KEY = 'digest'
DIGEST_PIECE = 64 << 20   # bytes hashed as one piece; the pieces are hashed in threads
DATA_DIGEST_KEY = 'data_digest'   # Custom: the manifest's sha256 (custom.manifest_digest)


def check_same_data(path, state, data):
    """Refuse data other than the checkpoint's: a Custom manifest edited since (a pair added,
    removed or moved, a text or a label changed) would otherwise be evaluated, trained on or
    searched silently, the split's indices naming other pairs. Benchmark files and
    checkpoints older than the digest carry none: nothing to compare."""
    saved = state.get(DATA_DIGEST_KEY)
    if saved is None or data.digest is None:
        return
    manifest, now = data.digest
    if saved != now:
        raise UserError(f"checkpoint {path}: trained on another version of {manifest} (its "
                        f"{saved[:19]}..., now {now[:19]}...): a pair added, removed, moved or "
                        f"edited since; restore that file, or train anew (another RUN_NAME, "
                        f"or RESUME=False)")


def checkpoint_digest(state):
    """sha256 of everything a checkpoint holds but its digest: each value in key order, a
    tensor by its dtype, shape and bytes. save_checkpoint stores it, read_checkpoint checks
    it: a byte changed inside a weight on disk would otherwise load and evaluate silently."""
    lines, pieces = [], []
    describe_value({k: v for k, v in state.items() if k != DIGEST_KEY}, '', lines, pieces)
    workers = min(8, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:  # hashlib frees the GIL
        hashes = list(pool.map(lambda piece: hashlib.sha256(piece).hexdigest(), pieces))
    return 'sha256:' + hashlib.sha256('\n'.join(lines + hashes).encode()).hexdigest()


def describe_value(value, key, lines, pieces):
    """One line per value of a nested checkpoint into `lines`; a tensor's bytes, cut into
    DIGEST_PIECE pieces, into `pieces`."""
    if isinstance(value, dict):
        lines.append(f"{key} dict {len(value)}")
        for k in sorted(value, key=repr):
            describe_value(value[k], f"{key}/{k!r}", lines, pieces)
    elif isinstance(value, (list, tuple)):
        lines.append(f"{key} list {len(value)}")
        for i, item in enumerate(value):
            describe_value(item, f"{key}/{i}", lines, pieces)
    elif isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        lines.append(f"{key} tensor {value.dtype} {tuple(value.shape)} from piece {len(pieces)}")
        pieces += [data[a:a + DIGEST_PIECE] for a in range(0, len(data), DIGEST_PIECE)]
    else:
        lines.append(f"{key} {value!r}")


def verify_digest(path, state, advice):
    """Refuse a checkpoint whose contents changed since it was written. One written before
    checkpoints carried a digest is accepted with a note (the next save adds one)."""
    stored = state.get(DIGEST_KEY)
    if stored is None:
        print(f"note: checkpoint {path} carries no digest (written by an older train.py): "
              f"its contents cannot be verified", file=sys.stderr)
    elif stored != checkpoint_digest(state):
        raise UserError(f"checkpoint {path}: its contents do not match the digest stored when "
                        f"it was written (changed or damaged on disk); {advice}")


def load_weights(path, key, module, state):
    """module.load_state_dict(state), a mismatch being the checkpoint's fault."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, TypeError) as err:
        raise UserError(f"checkpoint {path}: its {key} does not fit this model "
                        f"({one_line(err)}); use another RUN_NAME, or "
                        f"RESUME=False to start over") from err


def check_same_experiment(path, saved, current):
    """Refuse to go on with settings that make another experiment (the speed settings and
    the schedule may change). A setting newer than the run counts as its default."""
    default = settings.defaults()
    diffs = [f"{k}: {saved.get(k, default.get(k))!r} there, {current.get(k)!r} now"
             for k in sorted(set(saved) | set(current))
             if k not in settings.RUN_CONTROL | settings.SCHEDULE | {'commit', 'versions'}
             and saved.get(k, default.get(k)) != current.get(k)]
    if diffs:
        raise UserError(f"{path} is from a different experiment ({'; '.join(diffs)}); "
                        f"use another RUN_NAME, or RESUME=False to start over")


TMP_MARK = '.tmp'   # atomic_write's temporaries are <name>.tmp<pid>


def atomic_write(path, write):
    """Write through a temporary file and rename, so that a crash, a kill or a full disk
    never leaves half a file: the previous version stays until the new one is complete."""
    tmp = f"{path}{TMP_MARK}{os.getpid()}"
    try:
        with open(tmp, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise UserError(write_error(path, err)) from err
    except RuntimeError as err:   # how torch.save reports an error of the file it writes
        cause = err.__context__
        if isinstance(cause, OSError):   # a full disk: "unexpected pos ..."
            raise UserError(write_error(path, cause)) from err
        if isinstance(cause, KeyboardInterrupt):   # a second Ctrl-C while it writes
            raise KeyboardInterrupt from None
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_error(path, err):
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on the device while writing {path}; every file written "
                f"before it is intact (the previous checkpoint too): free some space and run "
                f"the same command to continue")
    return f"cannot write {path} ({one_line(err)})"


def write_json(path, obj):
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + '\n').encode()))


def append_jsonl(path, obj):
    try:
        with open(path, 'a') as f:
            f.write(json.dumps(obj) + '\n')
    except OSError as err:
        raise UserError(write_error(path, err)) from err


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot be read ({one_line(err)}); move it "
                        f"away, or pass RESUME=False to start over") from err


def remove_stale_temporaries(folder):
    """Temporaries of writes that a kill cut short (their names carry the dead process's
    id). Only called under the run directory's lock: no live process is writing them."""
    for root in (folder, os.path.join(folder, 'codes')):
        names = os.listdir(root) if os.path.isdir(root) else []
        for name in names:
            stem, mark, pid = name.rpartition(TMP_MARK)
            if mark and stem and pid.isdigit():
                os.remove(os.path.join(root, name))


# ===== helpers: device, versions, the run directory's lock =====

def feature_source(cfg):
    if cfg.PUBLISHED:
        return f"PUBLISHED={cfg.PUBLISHED!r} in DATA_DIR={cfg.DATA_DIR!r}"
    return f"IMAGE_FEATURES={cfg.IMAGE_FEATURES!r}"


def pick_device(cfg):
    """The device of DEVICE (or CUDA when there is one), made the current CUDA device so
    that CUDA work not given a device (the loader's pinned-memory thread) goes there too."""
    if not cfg.DEVICE:
        device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    elif not cfg.DEVICE.startswith('cuda'):
        return torch.device(cfg.DEVICE)
    elif not torch.cuda.is_available():
        raise UserError(f"setting DEVICE={cfg.DEVICE!r}: CUDA is not available here")
    else:
        device = torch.device(cfg.DEVICE)
    if device.type == 'cuda' and device.index is not None:
        count = torch.cuda.device_count()
        if device.index >= count:
            raise UserError(f"setting DEVICE={cfg.DEVICE!r}: this machine has {count} CUDA "
                            f"device{'s' if count != 1 else ''} (cuda:0 to cuda:{count - 1})")
        torch.cuda.set_device(device)
    return device


def configure_torch(cfg):
    if cfg.DETERMINISTIC:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
    else:
        torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = cfg.TF32
    torch.backends.cudnn.allow_tf32 = cfg.TF32


def settings_line(cfg):
    return ' '.join(f"{k}={v!r}" for k, v in sorted(vars(cfg).items()))


def git_commit():
    try:
        out = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True,
                             text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() or 'unknown'
    except OSError:
        return 'unknown'


def versions():
    import torchvision
    return {'python': platform.python_version(), 'torch': torch.__version__,
            'torchvision': torchvision.__version__, 'numpy': np.__version__}


LOCK_NAME = '.lock'


@contextlib.contextmanager
def locked_run_dir(path, create):
    """Hold an exclusive OS lock on the run directory (the OS drops it when the process
    dies, so a killed run never blocks the next). create=True makes the directory; if the
    block then fails, the folders it made are removed again while they are empty, and a
    lock file it made goes too: a refused start leaves the directory as it found it."""
    made = missing_folders(path) if create else []
    ok = False
    try:
        with contextlib.ExitStack() as stack:
            try:
                for folder in reversed(made):
                    os.mkdir(folder)
                stack.enter_context(lock_file(os.path.join(path, LOCK_NAME),
                                              f"run directory {path}", 'train.py',
                                              "wait for it to end, or choose another RUN_NAME"))
            except OSError as err:
                raise UserError(f"setting OUT_DIR={os.path.dirname(path)!r}: cannot write the "
                                f"run directory {path} ({one_line(err)})") from None
            yield
            ok = True
    finally:
        if not ok and made:
            remove_empty([os.path.join(path, 'codes'), *made])


@contextlib.contextmanager
def lock_file(path, what, command, advice, keep=True):
    """Hold an exclusive lock on the file `path` (made if absent) for the block; `what` is
    what it guards, `command` who else may hold it. The file is removed at the end when
    keep=False, and when the block fails if this block made it."""
    fd, made = acquire_lock(path, what, command, advice)
    ok = False
    try:
        yield
        ok = True
    finally:
        if not keep or (made and not ok):
            remove_empty([path])   # while still held: acquire_lock copes with it
        os.close(fd)


def acquire_lock(path, what, command, advice):
    """(file descriptor, made) of the lock file `path`, locked by this process. A process
    that removes a lock file does so while holding it; one that was waiting on the removed
    file notices afterwards that `path` names another file (or none) and tries again."""
    while True:
        try:
            fd, made = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
        except FileExistsError:
            try:
                fd, made = os.open(path, os.O_RDWR), False
            except FileNotFoundError:   # removed in between: make it
                continue
        locked = False
        try:
            take_lock(fd, path, what, command, advice)
            locked = True
        finally:
            if not locked:
                os.close(fd)
        if same_file(fd, path):
            return fd, made
        os.close(fd)


def same_file(fd, path):
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    here = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (here.st_dev, here.st_ino)


def take_lock(fd, path, what, command, advice):
    """A POSIX record lock (lockf), not flock: a forked process does not inherit it, so the
    DataLoader workers of a killed run, which live on for a moment, never hold it. The
    holder writes its process id into the file; a refusal names it."""
    try:
        import fcntl
    except ImportError:  # no POSIX locks on this platform: run unlocked
        return
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EACCES, errno.EAGAIN):
            raise
        raise UserError(f"{what} is in use by {holder(fd, command)}; {advice}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"process {os.getpid()} on {platform.node()}\n".encode(), 0)


def holder(fd, command):
    """Who holds the lock, from what the holder wrote into the lock file."""
    text = os.pread(fd, 200, 0).decode(errors='replace').strip()
    pid, _, host = text.removeprefix('process ').partition(' on ')
    if not pid.isdigit():
        return f"another {command}"
    if host == platform.node() and not settings.process_alive(int(pid)):
        return (f"another process (the lock file names process {pid}, which has ended: "
                f"another {command} that is just starting?)")
    return f"another {command} ({text})"


def missing_folders(path):
    """The folders os.makedirs(path) would make, deepest first."""
    out = []
    path = os.path.abspath(path)
    while not os.path.exists(path):
        out.append(path)
        path = os.path.dirname(path)
    return out


def remove_empty(paths):
    """Remove these files and empty folders, in order; leave anything that holds more."""
    for path in paths:
        try:
            os.rmdir(path) if os.path.isdir(path) else os.remove(path)
        except OSError:
            pass


# ===== the run =====

@dataclasses.dataclass
class Progress:
    """Where a run stands, saved in every checkpoint. Only Run's loop moves it on."""
    epoch: int = 0          # epochs completed
    step: int = 0           # batches completed of the next epoch (after a Ctrl-C)
    loss_sum: float = 0.0   # the loss summed over those batches
    train_s: float = 0.0    # seconds of training, over every resume
    eval_s: float = 0.0     # seconds of evaluation, the untrained and final ones included
    evals: list = dataclasses.field(default_factory=list)  # every evaluation's result

    @classmethod
    def from_checkpoint(cls, state):
        return cls(epoch=state['epoch'], step=state.get('step', 0),
                   loss_sum=state.get('loss_sum', 0.0),
                   train_s=state.get('train_s', state.get('elapsed', 0.0)),
                   eval_s=state.get('eval_s', 0.0), evals=list(state['evals']))


class Run:
    """One run directory: its files, its lock, and the loop over epochs."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.dir = os.path.join(cfg.OUT_DIR, cfg.RUN_NAME or settings.default_run_name(cfg))
        self.ckpt = os.path.join(self.dir, 'checkpoint.pt')
        self.metrics = os.path.join(self.dir, 'metrics.jsonl')
        self.results = os.path.join(self.dir, 'results.json')
        self.commit = git_commit()
        self.progress = Progress()
        self.stop_requested = False
        self.started_fresh = False   # start_fresh has removed the earlier outputs

    def train_to_end(self):
        """Train from scratch or from the checkpoint to NUM_EPOCH, then write the results."""
        print(f"run directory: {self.dir}")
        with locked_run_dir(self.dir, create=True):
            remove_stale_temporaries(self.dir)
            results = self.finished_results()
            if results:
                return self.report_finished(results)
            if self.cfg.RESUME and not os.path.exists(self.ckpt):
                self.refuse_outputs_without_checkpoint()
            self.start()
            with self.taken_back_unless_saved():
                self.resume_or_start_fresh()
            with self.ctrl_c_stops_after_batch():
                self.loop()
            self.finish()

    def start(self):
        cfg = self.cfg
        configure_torch(cfg)
        print(f"commit {self.commit}, " + ', '.join(f"{k} {v}" for k, v in versions().items()))
        print(f"settings: {settings_line(cfg)}")
        self.session = Session(cfg, datasets.load(cfg))
        data = self.session.data
        print(f"device: {self.session.device}; pairs: query {len(data.query)}, "
              f"train {len(data.train)}, database {len(data.database)}")

    # ----- the loop -----

    def loop(self):
        """Epochs from where the run stands to NUM_EPOCH: train, log, evaluate, save."""
        cfg, p = self.cfg, self.progress
        read_every = 1 if self.session.device.type == 'cpu' else LOSS_READ_EVERY
        while p.epoch < cfg.NUM_EPOCH and not self.stop_requested:
            start, first_step, pending = time.perf_counter(), p.step, []
            for loss in self.session.train_epoch(p.epoch, skip=p.step):
                pending.append(loss)
                if len(pending) == read_every or self.stop_requested:
                    self.count_losses(pending)
                if self.stop_requested:
                    break
            self.count_losses(pending)
            seconds = time.perf_counter() - start
            p.train_s += seconds
            if self.stop_requested:
                break
            speed = (p.step - first_step) * cfg.BATCH_SIZE / seconds
            line = {'epoch': p.epoch + 1, 'loss': p.loss_sum / p.step, 'images_per_s': speed}
            p.epoch, p.step, p.loss_sum = p.epoch + 1, 0, 0.0
            append_jsonl(self.metrics, line)
            print(f"epoch {p.epoch}/{cfg.NUM_EPOCH}: loss {line['loss']:.5f}, "
                  f"{speed:.1f} images/s")
            if p.epoch % cfg.EVAL_INTERVAL == 0 or p.epoch == cfg.NUM_EPOCH:
                self.evaluate_and_save()
            self.save_checkpoint()
        if self.stop_requested:
            self.save_checkpoint()
            print(f"interrupted: saved {self.ckpt} at epoch {p.epoch}, step {p.step}; "
                  f"run the same command to continue")
            sys.exit(130)

    def count_losses(self, pending):
        """Move the steps whose losses are in `pending` (tensors on the device) into the
        progress, and empty it: one read of the device for them all, since each read waits
        for the device to finish its queue."""
        cfg, p = self.cfg, self.progress
        for loss in torch.stack(pending).tolist() if pending else []:
            if not math.isfinite(loss):
                raise UserError(f"loss is {loss} at epoch {p.epoch + 1}, step {p.step + 1}; "
                                f"stopped (the last good checkpoint is kept); settings: "
                                f"{settings_line(cfg)}")
            p.step, p.loss_sum = p.step + 1, p.loss_sum + loss
        pending.clear()

    def evaluate_and_save(self, tag=''):
        """Evaluate the networks now; save the codes; log the result (tag '' only: EVAL=True
        passes '_eval' and leaves the run's own record alone)."""
        p, start = self.progress, time.perf_counter()
        result, codes = self.session.evaluate()
        name = f"codes/epoch_{p.epoch:03d}{tag}.npz"
        os.makedirs(os.path.join(self.dir, 'codes'), exist_ok=True)
        atomic_write(os.path.join(self.dir, name), lambda f: np.savez_compressed(f, **codes))
        seconds = time.perf_counter() - start
        result = {'epoch': p.epoch, **result, 'eval_time_s': seconds, 'codes': name}
        print(f"epoch {p.epoch}: {eval_summary(result, self.cfg.TOPK)}distinct database "
              f"codes: image {result['distinct_img_codes']}, text "
              f"{result['distinct_txt_codes']} ({seconds:.1f} s)")
        if not tag:
            p.eval_s += seconds
            p.evals.append(result)
            untrained = {'untrained': True} if p.epoch == 0 else {}
            append_jsonl(self.metrics, {**result, 'eval': True, **untrained})
        return result

    def save_checkpoint(self):
        """The whole state while training is left (or KEEP_OPTIMIZER=True); at the end only
        what EVAL=True and search need: the networks, the split, the settings."""
        p = self.progress
        training_left = p.epoch < self.cfg.NUM_EPOCH
        state = self.session.state_dict(optimizer=training_left or self.cfg.KEEP_OPTIMIZER)
        state.update(dataclasses.asdict(p))
        state[DIGEST_KEY] = checkpoint_digest(state)
        atomic_write(self.ckpt, lambda f: torch.save(state, f))

    @contextlib.contextmanager
    def ctrl_c_stops_after_batch(self):
        """The first Ctrl-C lets the current batch finish, then the loop saves and stops; a
        second one stops at once (KeyboardInterrupt), leaving the last checkpoint intact."""
        def request_stop(signum, frame):
            print("Ctrl-C: stopping after this batch (press again to stop at once)",
                  flush=True)
            self.stop_requested = True
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:   # `nohup ... &`: not for us
            yield
            return
        previous = signal.signal(signal.SIGINT, request_stop)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    # ----- starting, resuming, finishing -----

    def resume_or_start_fresh(self):
        cfg = self.cfg
        if not (cfg.RESUME and os.path.exists(self.ckpt)):
            return self.start_fresh()
        state = read_checkpoint(self.ckpt)
        progress = Progress.from_checkpoint(state)
        training_left = progress.epoch < cfg.NUM_EPOCH
        missing = [k for k in TRAINING_KEYS if k not in state]
        if training_left and missing:
            raise UserError(f"checkpoint {self.ckpt} holds no optimiser state (a run finished "
                            f"at epoch {progress.epoch} keeps only its networks, unless "
                            f"KEEP_OPTIMIZER=True): it cannot train on to NUM_EPOCH="
                            f"{cfg.NUM_EPOCH}; use another RUN_NAME, or RESUME=False")
        self.session.load_checkpoint(self.ckpt, state, optimizer=training_left)
        self.progress = progress
        trim_metrics(self.metrics, progress)
        print(f"resumed from {self.ckpt} at epoch {progress.epoch}, step {progress.step}")

    def start_fresh(self):
        """A new run in this directory: earlier results go, then settings, split, the
        untrained evaluation (EVAL_UNTRAINED) and the first checkpoint."""
        cfg, data = self.cfg, self.session.data
        codes = os.path.join(self.dir, 'codes')
        old = [os.path.join(codes, n) for n in (os.listdir(codes) if os.path.isdir(codes) else [])
               if n.startswith('epoch_') and n.endswith('.npz')]
        for path in [*(os.path.join(self.dir, name) for name in FRESH_START_REMOVES), *old]:
            if os.path.exists(path):
                os.remove(path)
        self.started_fresh = True
        write_json(os.path.join(self.dir, 'settings.json'),
                   {**vars(cfg), 'commit': self.commit, 'versions': versions()})
        split = {k: getattr(data, k) for k in ('query', 'train', 'database')}
        atomic_write(os.path.join(self.dir, 'split.npz'), lambda f: np.savez(f, **split))
        if data.vocabulary:   # Custom: search.py reads typed queries with it
            write_json(os.path.join(self.dir, custom.VOCABULARY_FILE), data.vocabulary)
        if cfg.EVAL_UNTRAINED:
            self.evaluate_and_save()
        self.save_checkpoint()

    def refuse_outputs_without_checkpoint(self):
        """RESUME=True and no checkpoint: a fresh start replaces only what a start of ours
        leaves before its first checkpoint (settings.json, split.npz, the untrained
        evaluation). Other run outputs (a finished run whose checkpoint was deleted, a
        folder of the user's) are refused, never overwritten."""
        found = [name for name in RUN_OUTPUTS if os.path.exists(os.path.join(self.dir, name))]
        codes = os.path.join(self.dir, 'codes')
        if os.path.isdir(codes):
            found += [f"codes/{name}" for name in sorted(os.listdir(codes))]
        unexplained = [name for name in found if name not in self.start_leftovers()]
        if unexplained:
            shown = ', '.join(unexplained[:4]) + (', ...' if len(unexplained) > 4 else '')
            raise UserError(f"run directory {self.dir} holds run outputs ({shown}) but no "
                            f"checkpoint to resume from (a finished run whose checkpoint was "
                            f"deleted, or a folder train.py did not write?); choose another "
                            f"RUN_NAME, or pass RESUME=False to start over there, replacing "
                            f"them")

    def start_leftovers(self):
        """The files of a start killed before its first checkpoint, if settings.json says
        train.py wrote them: settings, split, the untrained evaluation."""
        lines = []
        try:
            with open(os.path.join(self.dir, 'settings.json')) as f:
                saved = json.load(f)
            if os.path.exists(self.metrics):
                with open(self.metrics) as f:
                    lines = [json.loads(line) for line in f if line.strip()]
        except (OSError, ValueError):
            return set()
        if not (isinstance(saved, dict) and {'commit', 'versions'} <= set(saved)):
            return set()
        leftovers = {'settings.json', 'split.npz', 'codes/epoch_000.npz'}
        if all(isinstance(line, dict) and line.get('untrained') for line in lines):
            leftovers.add('metrics.jsonl')
        return leftovers

    @contextlib.contextmanager
    def taken_back_unless_saved(self):
        """A fresh start that fails before its first checkpoint (a full disk, Ctrl-C or a
        bad image in the untrained evaluation) removes the files it wrote: the next start
        finds the directory as this one found it."""
        ok = False
        try:
            yield
            ok = True
        finally:
            if not ok and self.started_fresh and not os.path.exists(self.ckpt):
                codes = os.path.join(self.dir, 'codes')
                written = [os.path.join(codes, name) for name in
                           (os.listdir(codes) if os.path.isdir(codes) else [])
                           if name.startswith('epoch_') and name.endswith('.npz')]
                remove_empty([*written, codes, *(os.path.join(self.dir, name)
                                                 for name in RUN_OUTPUTS)])

    def finished_results(self):
        """results.json of this run if it is finished for these settings, else None."""
        cfg = self.cfg
        if not (cfg.RESUME and os.path.exists(self.results)):
            return None
        saved_settings = os.path.join(self.dir, 'settings.json')
        if os.path.exists(saved_settings):
            saved = read_json(saved_settings)
            if isinstance(saved, dict):
                check_same_experiment(saved_settings, saved, vars(cfg))
        results = read_json(self.results)
        if not isinstance(results, dict) or not isinstance(results.get('epoch'), int):
            raise UserError(f"{self.results}: not what train.py writes (no epoch); move it "
                            f"away, or pass RESUME=False to start over")
        return results if results['epoch'] >= cfg.NUM_EPOCH else None

    def report_finished(self, results):
        untrained = {k[len('untrained_'):]: v for k, v in results.items()
                     if k.startswith('untrained_')}
        untrained = (f" (untrained: {eval_summary(untrained, results.get('topk'))[:-2]})"
                     if untrained else '')
        print(f"finished already at epoch {results['epoch']}: "
              f"{eval_summary(results, results.get('topk'))[:-2]}{untrained}")
        print(f"results: {self.results} (RESUME=False trains it again; a larger NUM_EPOCH "
              f"trains on if KEEP_OPTIMIZER=True kept the optimiser state)")

    def finish(self):
        cfg, p = self.cfg, self.progress
        final = p.evals[-1] if p.evals else None
        if final is None or final['epoch'] != p.epoch:  # NUM_EPOCH lowered after a resume
            final = self.evaluate_and_save()
            self.save_checkpoint()
        results = {'dataset': cfg.DATASET, 'variant': cfg.VARIANT, 'backbone': cfg.BACKBONE,
                   'code_len': cfg.CODE_LEN, 'seed': cfg.SEED, 'split_seed': cfg.SPLIT_SEED,
                   'topk': cfg.TOPK, 'epoch': final['epoch'], 'map_i2t': final['map_i2t'],
                   'map_t2i': final['map_t2i'], 'map_all_i2t': final.get('map_all_i2t'),
                   'map_all_t2i': final.get('map_all_t2i'), 'image_features':
                   cfg.PUBLISHED or cfg.IMAGE_FEATURES, 'text_features': cfg.TEXT_FEATURES,
                   'distinct_img_codes': final.get('distinct_img_codes'),
                   'distinct_txt_codes': final.get('distinct_txt_codes')}
        results.update(pair_results(final, p.evals))
        untrained = [e for e in p.evals if e['epoch'] == 0]
        if untrained:
            results['untrained_map_i2t'] = untrained[0]['map_i2t']
            results['untrained_map_t2i'] = untrained[0]['map_t2i']
        results.update(commit=self.commit, codes=final['codes'])
        # Timing apart, so that two runs with the same seed write identical results.json.
        write_json(os.path.join(self.dir, 'timing.json'),
                   {'train_time_s': round(p.train_s, 1), 'eval_time_s': round(p.eval_s, 1),
                    'wall_time_s': round(p.train_s + p.eval_s, 1)})
        write_json(self.results, results)   # last: its presence marks the run finished
        print(f"final: {eval_summary(final, cfg.TOPK)[:-2]}")
        print(f"results: {self.results}")

    def eval_checkpoint(self):
        """EVAL=True: evaluate the run's checkpoint; write eval.json, never results.json."""
        print(f"run directory: {self.dir}")
        if not os.path.isfile(self.ckpt):
            raise UserError(f"EVAL=True: no checkpoint at {self.ckpt}; train first, or set "
                            f"RUN_NAME/OUT_DIR to the run to evaluate")
        with locked_run_dir(self.dir, create=False):
            self.start()
            state = read_checkpoint(self.ckpt)
            self.session.load_checkpoint(self.ckpt, state, optimizer=False)
            self.progress = Progress.from_checkpoint(state)
            result = self.evaluate_and_save(tag='_eval')
            write_json(os.path.join(self.dir, 'eval.json'), result)
            print(f"evaluated {self.ckpt}; written {os.path.join(self.dir, 'eval.json')}")


def pair_results(final, evals):
    """The own-pair figures of results.json: the final evaluation's, and the untrained one's
    (untrained_recall_i2t, ...) when there is one. Absent from evaluations made by a run
    older than them (resumed), which then add nothing."""
    out = {key: final[key] for key in PAIR_KEYS if key in final}
    untrained = [e for e in evals if e['epoch'] == 0]
    if untrained:
        out.update({f"untrained_{key}": untrained[0][key] for key in PAIR_KEYS
                    if key in untrained[0]})
    return out


# Steps between two reads of the losses on a GPU (on the CPU each step's is read at once):
# a non-finite loss stops the run at most this many steps late, naming its own step.
LOSS_READ_EVERY = 50

FRESH_START_REMOVES = ('metrics.jsonl', 'results.json', 'timing.json', 'eval.json',
                       custom.VOCABULARY_FILE)
# What a run writes in its directory besides checkpoint.pt, codes/ and the lock.
RUN_OUTPUTS = ('settings.json', 'split.npz', *FRESH_START_REMOVES)


def trim_metrics(path, progress):
    """metrics.jsonl as of the checkpoint: lines written after it (by a run killed, or
    failing to save, before its next checkpoint) go, so that each epoch appears once."""
    if not os.path.exists(path):
        return
    try:
        with open(path) as f:
            lines = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot be read ({one_line(err)}); move it "
                        f"away to resume without it") from err
    kept, evals, epochs = [], 0, set()
    for line in lines:
        if line.get('eval'):
            evals += 1
            if evals <= len(progress.evals):
                kept.append(line)
        elif line.get('epoch', 0) <= progress.epoch and line.get('epoch') not in epochs:
            epochs.add(line.get('epoch'))
            kept.append(line)
    if kept != lines:
        atomic_write(path, lambda f: f.write(''.join(json.dumps(l) + '\n' for l in kept)
                                             .encode()))


def main(argv):
    cfg = settings.resolve(argv)
    run = Run(cfg)
    if cfg.EVAL:
        run.eval_checkpoint()
    else:
        run.train_to_end()
    return run.dir


if __name__ == '__main__':
    settings.run_cli(main, sys.argv[1:])
