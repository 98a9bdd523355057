"""Train and evaluate DJSRH.

    python train.py                        # MIRFlickr, 64 bits, the paper's settings
    python train.py DATASET=Wiki CODE_LEN=128
    python train.py DATASET=DEMO           # small generated data, CPU, a few minutes
    python train.py DATASET=DEMO EVAL=True # evaluate the run's checkpoint

Every setting lives in settings.py; KEY=VALUE on the command line overrides it. A run lives in
OUT_DIR/RUN_NAME and resumes from its checkpoint when started again.
"""
import json
import os
import platform
import signal
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import datasets
import metric
import models
import settings
from settings import UserError

# Settings that may change between a checkpoint and its resume: they change where or how
# fast the run goes, not what it computes.
RUN_CONTROL = {'EVAL', 'RESUME', 'NUM_EPOCH', 'EVAL_INTERVAL', 'EVAL_UNTRAINED', 'DATA_DIR',
               'OUT_DIR', 'RUN_NAME', 'NUM_WORKERS', 'IN_MEMORY', 'EVAL_BATCH_SIZE', 'DEVICE',
               'DETERMINISTIC', 'PRETRAINED_PATH', 'BF16', 'TF32', 'CHANNELS_LAST'}


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


# ===== the session: networks, optimisers, train / eval / save / load =====

class Session:
    """The authors' Session: the networks and optimisers, with train (one epoch), eval,
    save and load."""

    def __init__(self, cfg, data):
        self.cfg = cfg
        self.data = data
        self.device = pick_device(cfg)
        torch.manual_seed(cfg.SEED)
        # CodeNet_I, FeatNet_I and CodeNet_T of the authors' code.
        self.img_net = models.ImgNet(cfg.BACKBONE, cfg.CODE_LEN, cfg.PRETRAINED,
                                     cfg.PRETRAINED_PATH).to(self.device)
        self.feat_net = self.img_net.frozen_copy()
        self.txt_net = models.TxtNet(data.texts.shape[1], cfg.CODE_LEN).to(self.device)
        if self.device.type == 'cuda' and cfg.CHANNELS_LAST:
            self.img_net.to(memory_format=torch.channels_last)
            self.feat_net.to(memory_format=torch.channels_last)
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
        self.epoch = 0        # epochs completed
        self.step = 0         # batches completed in the current epoch (after an interrupt)
        self.loss_sum = 0.0   # of those batches
        self.elapsed = 0.0    # training and evaluation seconds, over all resumes
        self.evals = []       # every evaluation: {'epoch', 'map_i2t', 'map_t2i'}
        self.stop_requested = False

    # ----- training -----

    def images_to_device(self, images):
        images = datasets.normalize(images.to(self.device, non_blocking=True))
        if self.device.type == 'cuda' and self.cfg.CHANNELS_LAST:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def autocast(self):
        return torch.autocast('cuda', dtype=torch.bfloat16,
                              enabled=self.cfg.BF16 and self.device.type == 'cuda')

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

    def train(self, epoch):
        """One epoch from batch self.step on; returns (mean loss, pairs per second) or None
        when SIGINT asked to stop part-way."""
        cfg = self.cfg
        alpha_epoch = epoch if cfg.ANNEAL else 0  # alpha = sqrt(0 + 1) = 1 without annealing
        self.img_net.set_alpha(alpha_epoch)
        self.txt_net.set_alpha(alpha_epoch)
        self.img_net.train()
        self.txt_net.train()
        skip, resume_rng = self.step, self.rng_state() if self.step else None
        torch.manual_seed(epoch_seed(cfg.SEED, epoch))
        generator = torch.Generator().manual_seed(epoch_seed(cfg.SEED, epoch))
        loader = datasets.make_loader(self.data, 'train', cfg, generator=generator)
        start, done = time.perf_counter(), 0
        for i, (images, texts, _, _) in enumerate(loader):
            if i < skip:  # replay the loader to batch `skip`, so the same data follows
                if i == skip - 1:
                    self.set_rng_state(resume_rng)
                continue
            loss = self.train_step(images, texts)
            if not torch.isfinite(loss):
                raise UserError(f"loss is {loss.item()} at epoch {epoch + 1}, step {i + 1}; "
                                f"stopped (the last good checkpoint is kept); settings: "
                                f"{settings_line(cfg)}")
            self.loss_sum += loss.item()
            self.step, done = i + 1, done + len(images)
            if self.stop_requested:
                return None
        seconds = time.perf_counter() - start
        self.elapsed += seconds
        mean_loss = self.loss_sum / max(self.step, 1)
        self.step, self.loss_sum = 0, 0.0
        return mean_loss, done / seconds

    # ----- evaluation -----

    @torch.inference_mode()
    def encode(self, part):
        """Binary codes of both modalities for the query or database set."""
        self.img_net.eval()
        self.txt_net.eval()
        loader = datasets.make_loader(self.data, part, self.cfg)
        img_codes, txt_codes, labels = [], [], []
        for images, texts, batch_labels, _ in tqdm(loader, desc=f'encode {part}', leave=False,
                                                   disable=not sys.stderr.isatty()):
            with self.autocast():
                _, hid_I, _ = self.img_net(self.images_to_device(images))
            _, hid_T, _ = self.txt_net(texts.to(self.device, non_blocking=True))
            img_codes.append(models.binarize(hid_I))
            txt_codes.append(models.binarize(hid_T))
            labels.append(batch_labels)
        return torch.cat(img_codes), torch.cat(txt_codes), torch.cat(labels).to(self.device)

    def eval(self):
        """mAP@TOPK both ways; returns (result dict, codes dict of NumPy arrays)."""
        start = time.perf_counter()
        q_img, q_txt, q_lab = self.encode('query')
        r_img, r_txt, r_lab = self.encode('database')
        topk = self.cfg.TOPK
        result = {'epoch': self.epoch,
                  'map_i2t': metric.calculate_top_map(q_img, r_txt, q_lab, r_lab, topk),
                  'map_t2i': metric.calculate_top_map(q_txt, r_img, q_lab, r_lab, topk),
                  # a collapse of the codes shows here before it shows in the mAP
                  'distinct_img_codes': len(torch.unique(r_img, dim=0)),
                  'distinct_txt_codes': len(torch.unique(r_txt, dim=0))}
        result['eval_time_s'] = time.perf_counter() - start
        codes = dict(query_img=q_img, query_txt=q_txt, db_img=r_img, db_txt=r_txt,
                     query_labels=q_lab, db_labels=r_lab)
        codes = {k: v.cpu().numpy().astype(np.uint8 if 'labels' in k else np.int8)
                 for k, v in codes.items()}
        return result, codes

    # ----- checkpoints -----

    def rng_state(self):
        state = {'cpu': torch.get_rng_state()}
        if torch.cuda.is_available():
            state['cuda'] = torch.cuda.get_rng_state_all()
        return state

    def set_rng_state(self, state):
        torch.set_rng_state(state['cpu'])
        if 'cuda' in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state['cuda'])

    def state_dict(self):
        # FeatNet_I is not saved: it is rebuilt from the same weights, seeded by SEED.
        return {'img_net': self.img_net.state_dict(), 'txt_net': self.txt_net.state_dict(),
                'opt_img': self.opt_img.state_dict(), 'opt_txt': self.opt_txt.state_dict(),
                'epoch': self.epoch, 'step': self.step, 'loss_sum': self.loss_sum,
                'elapsed': self.elapsed, 'evals': self.evals, 'rng': self.rng_state(),
                'split': {k: torch.from_numpy(getattr(self.data, k))
                          for k in ('query', 'train', 'database')},
                'settings': vars(self.cfg)}

    def save(self, path):
        atomic_write(path, lambda f: torch.save(self.state_dict(), f))

    def load(self, path):
        state = read_checkpoint(path)
        check_same_experiment(path, state['settings'], vars(self.cfg))
        split = {key: idx.numpy() for key, idx in state['split'].items()}
        n_pairs = len(self.data.texts)
        if max(idx.max(initial=-1) for idx in split.values()) >= n_pairs:
            raise UserError(f"checkpoint {path}: its split indexes pairs beyond the {n_pairs} "
                            f"of the data in DATA_DIR={self.cfg.DATA_DIR!r}; use the data it "
                            f"was trained on, or RESUME=False")
        self.img_net.load_state_dict(state['img_net'])
        self.txt_net.load_state_dict(state['txt_net'])
        self.opt_img.load_state_dict(state['opt_img'])
        self.opt_txt.load_state_dict(state['opt_txt'])
        for key in ('epoch', 'step', 'loss_sum', 'elapsed', 'evals'):
            setattr(self, key, state[key])
        for key, idx in split.items():
            setattr(self.data, key, idx)
        self.set_rng_state(state['rng'])


# ===== helpers: device, files, logging =====

def pick_device(cfg):
    if cfg.DEVICE:
        if cfg.DEVICE.startswith('cuda') and not torch.cuda.is_available():
            raise UserError(f"setting DEVICE={cfg.DEVICE!r}: CUDA is not available here")
        return torch.device(cfg.DEVICE)
    return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


def configure_torch(cfg):
    if cfg.DETERMINISTIC:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
    else:
        torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = cfg.TF32
    torch.backends.cudnn.allow_tf32 = cfg.TF32


def atomic_write(path, write):
    """Write through a temporary file and rename, so a crash never leaves half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + '\n').encode()))


def append_jsonl(path, obj):
    with open(path, 'a') as f:
        f.write(json.dumps(obj) + '\n')


def read_checkpoint(path):
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:
        raise UserError(f"checkpoint {path}: cannot be read ({type(err).__name__}); "
                        f"move it away or pass RESUME=False to start over") from None


def check_same_experiment(path, saved, current):
    diffs = [f"{k}: {saved.get(k)!r} in the checkpoint, {current.get(k)!r} now"
             for k in sorted(set(saved) | set(current))
             if k not in RUN_CONTROL and saved.get(k) != current.get(k)]
    if diffs:
        raise UserError(f"checkpoint {path} is from a different experiment ({'; '.join(diffs)}); "
                        f"use another RUN_NAME, or RESUME=False to start over")


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


def make_run_dir(cfg):
    path = os.path.join(cfg.OUT_DIR, cfg.RUN_NAME or settings.default_run_name(cfg))
    try:
        os.makedirs(os.path.join(path, 'codes'), exist_ok=True)
        probe = os.path.join(path, f'.write_test{os.getpid()}')
        open(probe, 'w').close()
        os.remove(probe)
    except OSError as err:
        raise UserError(f"setting OUT_DIR={cfg.OUT_DIR!r}: cannot write the run directory "
                        f"{path} ({err.strerror})") from None
    return path


# ===== the run =====

class Run:
    """One run directory: its files, the session, the loop over epochs."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.dir = make_run_dir(cfg)
        self.ckpt = os.path.join(self.dir, 'checkpoint.pt')
        self.metrics = os.path.join(self.dir, 'metrics.jsonl')
        self.commit = git_commit()

    def start(self):
        cfg = self.cfg
        configure_torch(cfg)
        print(f"run directory: {self.dir}")
        print(f"commit {self.commit}, " + ', '.join(f"{k} {v}" for k, v in versions().items()))
        print(f"settings: {settings_line(cfg)}")
        self.session = Session(cfg, datasets.load(cfg))
        print(f"device: {self.session.device}; pairs: query {len(self.session.data.query)}, "
              f"train {len(self.session.data.train)}, database {len(self.session.data.database)}")

    def evaluate(self, tag=''):
        sess = self.session
        result, codes = sess.eval()
        name = f"codes/epoch_{sess.epoch:03d}{tag}.npz"
        atomic_write(os.path.join(self.dir, name), lambda f: np.savez_compressed(f, **codes))
        result['codes'] = name
        print(f"epoch {sess.epoch}: mAP@{self.cfg.TOPK} I->T {result['map_i2t']:.4f}, "
              f"T->I {result['map_t2i']:.4f}; distinct database codes: image "
              f"{result['distinct_img_codes']}, text {result['distinct_txt_codes']} "
              f"({result['eval_time_s']:.1f} s)")
        return result

    def train(self):
        cfg, sess = self.cfg, self.session
        if cfg.RESUME and os.path.exists(self.ckpt):
            sess.load(self.ckpt)
            print(f"resumed from {self.ckpt} at epoch {sess.epoch}, step {sess.step}")
        else:
            self.fresh_start()
        previous = signal.signal(signal.SIGINT, self.request_stop)
        try:
            self.loop()
        finally:
            signal.signal(signal.SIGINT, previous)
        if sess.stop_requested:
            sess.save(self.ckpt)
            print(f"interrupted: saved {self.ckpt} at epoch {sess.epoch}, step {sess.step}; "
                  f"run the same command to continue")
            sys.exit(130)
        self.finish()

    def fresh_start(self):
        cfg, sess = self.cfg, self.session
        for name in ('metrics.jsonl', 'results.json', 'timing.json', 'eval.json'):
            if os.path.exists(os.path.join(self.dir, name)):
                os.remove(os.path.join(self.dir, name))
        write_json(os.path.join(self.dir, 'settings.json'),
                   {**vars(cfg), 'commit': self.commit, 'versions': versions()})
        split = {k: getattr(sess.data, k) for k in ('query', 'train', 'database')}
        atomic_write(os.path.join(self.dir, 'split.npz'), lambda f: np.savez(f, **split))
        if cfg.EVAL_UNTRAINED:
            result = self.evaluate()
            sess.evals.append(result)
            append_jsonl(self.metrics, {**result, 'eval': True, 'untrained': True})
        sess.save(self.ckpt)

    def request_stop(self, signum, frame):
        print("SIGINT: stopping after this batch (press again to abort at once)")
        self.session.stop_requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def loop(self):
        cfg, sess = self.cfg, self.session
        epochs = range(sess.epoch, cfg.NUM_EPOCH)
        for epoch in tqdm(epochs, desc='epochs', disable=not sys.stderr.isatty()):
            out = sess.train(epoch)
            if out is None:
                return
            loss, speed = out
            sess.epoch = epoch + 1
            line = {'epoch': sess.epoch, 'loss': loss, 'images_per_s': speed}
            append_jsonl(self.metrics, line)
            print(f"epoch {sess.epoch}/{cfg.NUM_EPOCH}: loss {loss:.5f}, {speed:.1f} images/s")
            if sess.epoch % cfg.EVAL_INTERVAL == 0 or sess.epoch == cfg.NUM_EPOCH:
                result = self.evaluate()
                sess.elapsed += result['eval_time_s']
                sess.evals.append(result)
                append_jsonl(self.metrics, {**result, 'eval': True})
            sess.save(self.ckpt)

    def finish(self):
        cfg, sess = self.cfg, self.session
        final = sess.evals[-1]
        if final['epoch'] != sess.epoch:  # NUM_EPOCH raised after the last evaluation
            final = self.evaluate()
            sess.evals.append(final)
            sess.save(self.ckpt)
        results = {'dataset': cfg.DATASET, 'variant': cfg.VARIANT, 'backbone': cfg.BACKBONE,
                   'code_len': cfg.CODE_LEN, 'seed': cfg.SEED, 'split_seed': cfg.SPLIT_SEED,
                   'topk': cfg.TOPK, 'epoch': final['epoch'], 'map_i2t': final['map_i2t'],
                   'map_t2i': final['map_t2i'],
                   'distinct_img_codes': final.get('distinct_img_codes'),
                   'distinct_txt_codes': final.get('distinct_txt_codes')}
        untrained = [e for e in sess.evals if e['epoch'] == 0]
        if untrained:
            results['untrained_map_i2t'] = untrained[0]['map_i2t']
            results['untrained_map_t2i'] = untrained[0]['map_t2i']
        results.update(commit=self.commit, codes=final['codes'])
        # Timing apart, so that two runs with the same seed write identical results.json.
        write_json(os.path.join(self.dir, 'timing.json'), {'wall_time_s': round(sess.elapsed, 1)})
        write_json(os.path.join(self.dir, 'results.json'), results)
        print(f"final mAP@{cfg.TOPK}: I->T {final['map_i2t']:.4f}, T->I {final['map_t2i']:.4f}")
        print(f"results: {os.path.join(self.dir, 'results.json')}")

    def eval_checkpoint(self):
        if not os.path.exists(self.ckpt):
            raise UserError(f"EVAL=True: no checkpoint at {self.ckpt}; train first, or set "
                            f"RUN_NAME/OUT_DIR to the run to evaluate")
        self.session.load(self.ckpt)
        result = self.evaluate(tag='_eval')
        write_json(os.path.join(self.dir, 'eval.json'), result)
        print(f"evaluated {self.ckpt}; written {os.path.join(self.dir, 'eval.json')}")


def main(argv):
    cfg = settings.resolve(argv)
    run = Run(cfg)
    run.start()
    if cfg.EVAL:
        run.eval_checkpoint()
    else:
        run.train()
    return run.dir


if __name__ == '__main__':
    settings.run_cli(main, sys.argv[1:])
