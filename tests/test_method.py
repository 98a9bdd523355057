"""The paper's target and loss, as the authors' code computes them, against plain loops."""
import math

import numpy as np
import pytest
import torch

import models
import train


def unit_rows(x):
    out = np.zeros_like(x)
    for i, row in enumerate(x):
        norm = math.sqrt(sum(v * v for v in row))
        out[i] = row / max(norm, 1e-12)
    return out


def reference_target(F_I, F_T, beta, eta, mu):
    """The target mu S (cosines mapped by S * 2 - 1, then the joint and second-order
    terms) written out entry by entry."""
    m = len(F_I)
    a, b = unit_rows(F_I), unit_rows(F_T)
    S_tilde = np.zeros((m, m))
    for i in range(m):
        for j in range(m):
            s_i = 2 * sum(a[i] * a[j]) - 1
            s_t = 2 * sum(b[i] * b[j]) - 1
            S_tilde[i, j] = beta * s_i + (1 - beta) * s_t
    S = np.zeros((m, m))
    for i in range(m):
        for j in range(m):
            second = sum(S_tilde[i, k] * S_tilde[j, k] for k in range(m)) / m
            S[i, j] = (1 - eta) * S_tilde[i, j] + eta * second
    return mu * S


def reference_loss(code_I, code_T, target, lambda1, lambda2):
    """The reconstruction loss: mean squared error over all m x m entries of three cosine
    matrices."""
    a, b = unit_rows(code_I), unit_rows(code_T)
    m = len(a)

    def mse(x, y):
        return sum((float(np.dot(x[i], y[j])) - target[i, j]) ** 2
                   for i in range(m) for j in range(m)) / (m * m)
    return mse(a, b) + lambda1 * mse(a, a) + lambda2 * mse(b, b)


@pytest.mark.parametrize('beta,eta,mu', [(0.9, 0.4, 1.5), (0.3, 0.0, 1.0), (1.0, 1.0, 2.0)])
def test_joint_semantics_matches_reference(beta, eta, mu):
    rng = np.random.default_rng(int(beta * 10 + eta * 100))
    F_I = rng.random((9, 20))            # fc7 features are non-negative (after ReLU)
    F_T = rng.integers(0, 2, (9, 15)).astype(float)
    F_T[3] = 0                           # a text with no tag: its row normalises to zero
    got = train.joint_semantics(torch.tensor(F_I), torch.tensor(F_T), beta, eta, mu)
    want = reference_target(F_I, F_T, beta, eta, mu)
    assert got.shape == (9, 9)
    np.testing.assert_allclose(got.double().numpy(), want, atol=1e-6, rtol=0)


def test_joint_semantics_is_symmetric_and_scaled():
    F_I = torch.rand(6, 4)
    S1 = train.joint_semantics(F_I, F_I, 0.5, 0.4, 1.0)
    S2 = train.joint_semantics(F_I, F_I, 0.5, 0.4, 1.5)
    assert torch.allclose(S1, S1.t(), atol=1e-6)
    assert torch.allclose(S2, 1.5 * S1, atol=1e-6)
    # identical features: cosine 1 on the diagonal -> S~ = 1 there.
    assert torch.allclose(train.joint_semantics(F_I, F_I, 0.5, 0.0, 1.0).diagonal(),
                          torch.ones(6), atol=1e-6)


@pytest.mark.parametrize('lambda1,lambda2', [(0.1, 0.1), (0.3, 0.0), (0.0, 0.7)])
def test_reconstruction_loss_matches_reference(lambda1, lambda2):
    rng = np.random.default_rng(7)
    code_I = np.tanh(rng.normal(size=(8, 16)) * 2)
    code_T = np.tanh(rng.normal(size=(8, 16)))
    target = 1.5 * (rng.random((8, 8)) * 2 - 1)
    got = train.reconstruction_loss(torch.tensor(code_I), torch.tensor(code_T),
                                    torch.tensor(target, dtype=torch.float32), lambda1, lambda2)
    want = reference_loss(code_I, code_T, target, lambda1, lambda2)
    assert got.ndim == 0
    assert abs(got.item() - want) < 1e-6


def test_loss_is_zero_when_codes_reconstruct_the_target():
    codes = torch.tensor([[1., 1.], [1., -1.], [-1., -1.]])
    target = torch.nn.functional.normalize(codes) @ torch.nn.functional.normalize(codes).t()
    assert train.reconstruction_loss(codes, codes, target, 0.1, 0.1).item() < 1e-12


def test_alpha_schedule_is_sqrt_of_one_based_epoch():
    net = models.TxtNet(5, 8)
    for epoch in (0, 3, 79):
        net.set_alpha(epoch)
        assert net.alpha == pytest.approx(math.sqrt(epoch + 1))
    x = torch.rand(4, 5)
    _, hid, code = net(x)
    assert torch.allclose(code, torch.tanh(math.sqrt(80) * hid))


def test_binarize_gives_plus_minus_one_only():
    hid = torch.tensor([[-0.5, 0.0, 2.0], [0.0, -0.0, -3.0]])
    codes = models.binarize(hid)
    assert codes.tolist() == [[-1, 1, 1], [1, 1, -1]]


@pytest.mark.parametrize('backbone', ['alexnet', 'vgg19'])
def test_imgnet_outputs_fc7_and_frozen_copy_matches(backbone):
    torch.manual_seed(0)
    net = models.ImgNet(backbone, code_len=12, pretrained=False).eval()
    feat_net = net.frozen_copy()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feat, hid, code = net(x)
        assert feat.shape == (2, 4096) and hid.shape == (2, 12)
        assert (feat >= 0).all()  # fc7 after its ReLU
        assert torch.equal(feat_net.fc7(x), feat)
    assert not any(p.requires_grad for p in feat_net.parameters())
    head = {id(p) for p in net.head_parameters()}
    assert {id(p) for p in net.hash.parameters()} <= head
    assert not {id(p) for p in net.features.parameters()} & head
