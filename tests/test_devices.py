"""The branches written for CUDA, run on the CPU: bf16 autocast, channels_last, the
deterministic pooling, resume across layouts and devices, the random state of the training
GPU, DEVICE='cuda:N'. What needs a GPU itself is faked only where the logic is ours (which
GPU's state, which index); the numbers are always computed for real on the CPU."""
import io
import math
import types

import pytest
import torch

import datasets
import demo
import models
import settings
import train
from conftest import config
from settings import UserError

STEPS = 1   # the loss of a step, and the codes after its update


@pytest.fixture(scope='module')
def demo_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp('devices') / 'demo'
    demo.make_demo(str(folder), n_pairs=96)
    return folder


def session_for(demo_dir, **overrides):
    cfg = config('DEMO', demo_dir, BATCH_SIZE=4, CODE_LEN=16, SEED=3, **overrides)
    return train.Session(cfg, datasets.load(cfg, verbose=False))


def first_batches(session, n=STEPS):
    loader = datasets.make_loader(session.data, 'train', session.cfg,
                                  generator=torch.Generator().manual_seed(0))
    return [(images, texts) for (images, texts, _, _), _ in zip(loader, range(n))]


def losses_and_codes(session, batches):
    """The loss of each step, then the query codes of both networks after them."""
    losses = [session.train_step(images, texts).item() for images, texts in batches]
    img_codes, txt_codes, _ = session.encode('query')
    return losses, torch.cat([img_codes, txt_codes], 1)


@pytest.fixture(scope='module')
def fp32(demo_dir):
    """The reference: fp32, the default layout."""
    session = session_for(demo_dir)
    return losses_and_codes(session, first_batches(session))


# ===== BF16 and CHANNELS_LAST on the CPU, against fp32 =====

def test_channels_last_is_fp32_up_to_rounding(demo_dir, fp32):
    """The same arithmetic in another memory order: only the order of the sums differs,
    ~1e-7 relative a layer (measured: loss within 3e-7 relative), so the loss within 1e-5
    relative and the codes (signs, none that close to 0 here) identical."""
    session = session_for(demo_dir, CHANNELS_LAST=True)
    batches = first_batches(session)
    weight = session.img_net.features[0].weight
    assert weight.is_contiguous(memory_format=torch.channels_last)
    assert not weight.is_contiguous()
    assert session.images_to_device(batches[0][0]).is_contiguous(
        memory_format=torch.channels_last)
    losses, codes = losses_and_codes(session, batches)
    assert losses == pytest.approx(fp32[0], rel=1e-5)
    assert torch.equal(codes, fp32[1])
    # the epoch yields each loss as a tensor on the device: no .item() (a wait) a step
    steps = session.train_epoch(0)
    loss = next(steps)
    steps.close()
    assert isinstance(loss, torch.Tensor) and loss.shape == () and not loss.requires_grad


def test_bf16_autocast_on_the_cpu_stays_near_fp32(demo_dir, fp32):
    """bf16 keeps 8 significant bits: each product of the CNN forwards is rounded by up to
    2**-9 (0.2%), the sums and the loss stay fp32. The loss is held to 1% relative (about 2.5
    bf16 rounding units; measured 0.03-0.14%) and at least 90% of the query codes' bits to
    fp32's (measured: all of them); the hash layer's output is bf16, its tanh fp32."""
    session = session_for(demo_dir, BF16=True)
    batches = first_batches(session)
    losses, codes = losses_and_codes(session, batches)
    with torch.no_grad(), session.autocast():
        _, hid, code = session.img_net(session.images_to_device(batches[0][0]))
    assert hid.dtype == torch.bfloat16 and code.dtype == torch.float32
    assert losses == pytest.approx(fp32[0], rel=1e-2)
    assert losses != fp32[0]   # the bf16 path ran
    assert (codes == fp32[1]).float().mean() >= 0.9


def test_hash_activation_gradient_is_fp32_under_bf16():
    """B = tanh(alpha H) with H from a bf16 layer: its gradient is the fp32 formula
    alpha (1 - tanh(alpha H)^2) on H's bf16 values, also where tanh rounds to 1 in bf16
    (|alpha H| from ~3.5) and a bf16 tanh would give no gradient at all."""
    net = models.TxtNet(4, 8)
    net.set_alpha(8)   # alpha = 3
    hid = torch.tensor([[-3.0, -1.5, -0.2, 0.0, 0.3, 1.2, 2.0, 3.0]]).to(torch.bfloat16)
    hid.requires_grad_(True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        _, _, code = net.output(None, hid)
    assert code.dtype == torch.float32
    upstream = torch.linspace(0.5, 1.5, 8)[None]
    code.backward(upstream)
    h32 = hid.detach().float()
    want = (upstream * 3 * (1 - torch.tanh(3 * h32) ** 2)).to(torch.bfloat16)
    assert torch.equal(hid.grad, want)
    assert (hid.grad != 0).all()
    bf16_tanh = torch.tanh(3 * hid.detach())   # what the activation in bf16 would give
    assert (1 - bf16_tanh[0, [0, 5, 7]].float() ** 2 == 0).all()


# ===== the backbone's pooling =====

@pytest.fixture(scope='module')
def alexnet():
    torch.manual_seed(0)
    return models.ImgNet('alexnet', 8, pretrained=False).eval()


@pytest.mark.parametrize('crop,pools', [(224, False), (64, False), (160, True)])
def test_pooling_skipped_only_where_it_moves_no_number(alexnet, crop, pools, monkeypatch):
    """AlexNet pools a 6 x 6 map at 224 px (identity) and a 1 x 1 one at 64 px (each output
    cell one input cell): there ImgNet.pool gives AdaptiveAvgPool2d's numbers without it
    (its CUDA backward is not deterministic); at 160 px (4 x 4) it still pools."""
    net = alexnet
    x = torch.randn(2, 3, crop, crop)
    calls = []
    real = net.avgpool.forward
    monkeypatch.setattr(net.avgpool, 'forward', lambda t: calls.append(1) or real(t))
    with torch.no_grad():
        fmap = net.features(x)
        want = net.classifier(torch.flatten(real(fmap), 1))
        calls.clear()
        got = net.fc7(x)
    assert torch.equal(got, want)
    assert bool(calls) == pools == net.pools_for_real(crop)


def test_deterministic_on_cuda_refuses_a_crop_that_pools(alexnet):
    """What Session checks before DETERMINISTIC=True trains on CUDA (the device faked: the
    check reads only the trunk's map size, computed here on the CPU)."""
    net = alexnet
    for crop, ok in ((224, True), (64, True), (160, False)):
        fake = types.SimpleNamespace(
            cfg=types.SimpleNamespace(DETERMINISTIC=True, TRAIN_ALL_IMG=True, CROP=crop,
                                      BACKBONE='alexnet'),
            device=torch.device('cuda'), on_features=False, img_net=net)
        if ok:
            train.Session.check_deterministic(fake)
        else:
            with pytest.raises(UserError, match='DETERMINISTIC=True.*CROP=160'):
                train.Session.check_deterministic(fake)
        fake.device = torch.device('cpu')   # the CPU's pooling backward is deterministic
        train.Session.check_deterministic(fake)


# ===== resume across layouts (and devices) =====

@pytest.mark.parametrize('saved,resumed', [
    pytest.param(True, False, marks=pytest.mark.slow),   # 10 s: channels_last on a CPU
    (False, True)])
def test_resume_with_another_layout_updates_as_sgd_does(demo_dir, saved, resumed):
    """A checkpoint saved with CHANNELS_LAST=saved, resumed with CHANNELS_LAST=resumed:
    the next step is SGD's update, w - lr (momentum buf + grad + wd w), of the weights and
    momentum it holds (fused SGD pairs a buffer's elements with the weight's by memory
    order: a buffer left in the saved layout updates the wrong elements)."""
    first = session_for(demo_dir, CHANNELS_LAST=saved)
    batches = first_batches(first, 2)
    first.train_step(*batches[0])
    saved = io.BytesIO()
    torch.save(first.state_dict(), saved)   # a checkpoint keeps its tensors' strides
    del first
    saved.seek(0)
    state = torch.load(saved, weights_only=True)
    session = session_for(demo_dir, CHANNELS_LAST=resumed)
    session.load_checkpoint('checkpoint.pt', state, optimizer=True)
    cfg = session.cfg
    before = {}
    for opt, lr in ((session.opt_img, cfg.LR_IMG), (session.opt_txt, cfg.LR_TXT)):
        for weight in opt.param_groups[0]['params']:
            buf = opt.state[weight]['momentum_buffer']
            assert buf.stride() == weight.stride() and buf.device == weight.device
            before[weight] = (weight.detach().clone(), buf.clone(), lr)
    session.train_step(*batches[1])
    worst = 0.0
    for weight, (w0, buf0, lr) in before.items():
        want = w0 - lr * (cfg.MOMENTUM * buf0 + weight.grad + cfg.WEIGHT_DECAY * w0)
        worst = max(worst, (weight.detach() - want).abs().max().item())
    assert worst < 1e-6   # the update's own rounding; a misplaced buffer: 5e-5 already


def test_relay_momentum_moves_buffers_to_the_weights_layout():
    weight = torch.nn.Parameter(torch.randn(3, 4, 5, 2).contiguous(
        memory_format=torch.channels_last))
    opt = torch.optim.SGD([weight], lr=0.1, momentum=0.9)
    saved = torch.randn(3, 4, 5, 2)   # the default layout, as a CPU checkpoint has it
    opt.state[weight]['momentum_buffer'] = saved
    train.relay_momentum(opt)
    buf = opt.state[weight]['momentum_buffer']
    assert buf.stride() == weight.stride() and torch.equal(buf, saved)


# ===== the random state: the training GPU's only =====

class FakeCuda:
    """torch.cuda's random-state calls, recorded (there is no GPU here)."""

    def __init__(self, monkeypatch):
        self.calls = []
        monkeypatch.setattr(torch.cuda, 'get_rng_state',
                            lambda device='cuda': self.calls.append(('get', device))
                            or torch.tensor([7], dtype=torch.uint8))
        monkeypatch.setattr(torch.cuda, 'set_rng_state',
                            lambda state, device='cuda': self.calls.append(
                                ('set', state.tolist(), device)))
        monkeypatch.setattr(torch.cuda, 'get_rng_state_all', self.fail)
        monkeypatch.setattr(torch.cuda, 'set_rng_state_all', self.fail)
        monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)

    def fail(self, *args):
        raise AssertionError("every GPU's state touched")


def test_rng_state_keeps_the_training_gpu_only(monkeypatch):
    cuda = FakeCuda(monkeypatch)
    on = lambda name: types.SimpleNamespace(device=torch.device(name))   # noqa: E731
    state = train.Session.rng_state(on('cpu'))
    assert set(state) == {'cpu'} and cuda.calls == []   # CUDA present but not trained on
    state = train.Session.rng_state(on('cuda:1'))
    assert set(state) == {'cpu', 'cuda'} and cuda.calls == [('get', torch.device('cuda:1'))]
    cpu = torch.get_rng_state()
    one = torch.tensor([1], dtype=torch.uint8)
    two = torch.tensor([2], dtype=torch.uint8)
    cases = [  # (state's cuda entry, GPU trained on, device now, state restored there)
        (one, 0, 'cuda:1', [1]),           # this format: into the training device
        ([one, two], 1, 'cuda:0', [2]),    # older: the trained GPU's entry, cuda:1 -> cuda:0
        ([one], 1, 'cuda:0', None),        # older, fewer GPUs then: nothing, no IndexError
        ([one, two], 0, 'cpu', None),      # resumed on the CPU
    ]
    for entry, trained_on, now, restored in cases:
        cuda.calls.clear()
        train.Session.set_rng_state(on(now), {'cpu': cpu, 'cuda': entry}, trained_on)
        want = [] if restored is None else [('set', restored, torch.device(now))]
        assert cuda.calls == want, (entry, trained_on, now)
    assert train.saved_gpu({'DEVICE': 'cuda:3'}) == 3
    assert train.saved_gpu({'DEVICE': ''}) == train.saved_gpu({}) == 0


# ===== DEVICE =====

def test_device_index_is_checked_and_made_current(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    monkeypatch.setattr(torch.cuda, 'set_device', chosen.append)
    cfg = settings.resolve(DEVICE='cuda:1')
    assert train.pick_device(cfg) == torch.device('cuda:1')
    assert chosen == [torch.device('cuda:1')]   # the loader's pinning thread goes there
    with pytest.raises(UserError) as err:
        train.pick_device(settings.resolve(DEVICE='cuda:5'))
    assert "DEVICE='cuda:5'" in str(err.value) and '2 CUDA devices' in str(err.value)
    assert '\n' not in str(err.value)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    with pytest.raises(UserError, match='CUDA is not available'):
        train.pick_device(settings.resolve(DEVICE='cuda:0'))
    assert train.pick_device(settings.resolve(DEVICE='cpu')) == torch.device('cpu')
    with pytest.raises(UserError, match="DEVICE='cuda:x'"):
        settings.resolve(DEVICE='cuda:x')


# ===== the losses, read in bulk =====

def test_losses_are_read_in_bulk_and_a_bad_one_is_named(tmp_path):
    run = train.Run(settings.resolve(OUT_DIR=str(tmp_path)))
    pending = [torch.tensor(0.5), torch.tensor(0.25)]
    run.count_losses(pending)
    assert (run.progress.step, run.progress.loss_sum, pending) == (2, 0.75, [])
    pending = [torch.tensor(1.0), torch.tensor(math.nan), torch.tensor(2.0)]
    with pytest.raises(UserError, match='loss is nan at epoch 1, step 4'):
        run.count_losses(pending)
    run.count_losses([])
    assert run.progress.step == 3


def test_pinned_memory_follows_the_training_device(demo_dir, monkeypatch):
    """The loader pins its batches (for non_blocking copies) only when the run trains on
    CUDA; pinning itself needs a CUDA build, which ignores it here with a warning."""
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    for device, pinned in (('cpu', False), ('', True), ('cuda:0', True)):
        cfg = config('DEMO', demo_dir, DEVICE=device)
        data = datasets.load(cfg, verbose=False)
        assert datasets.make_loader(data, 'query', cfg).pin_memory == pinned, device
