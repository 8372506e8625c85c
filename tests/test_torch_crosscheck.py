"""Kernel outputs and gradients against PyTorch autograd (float64); skipped without torch."""
import numpy as np
import pytest

from npdgm import kernels as K

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _t(a):
    return torch.tensor(a, dtype=torch.float64, requires_grad=True)


def _compare(ours_y, ours_grads, torch_fn, inputs, dy):
    ts = [_t(a) for a in inputs]
    ty = torch_fn(*ts)
    np.testing.assert_allclose(ours_y, ty.detach().numpy(), rtol=1e-12, atol=1e-12)
    ty.backward(torch.tensor(dy))
    for g, t in zip(ours_grads, ts):
        if g is not None:
            np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-10, atol=1e-12)


ACTS = {
    "relu": F.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "softplus": F.softplus,
    "elu": F.elu, "leaky_relu": lambda x: F.leaky_relu(x, 0.01),
}


@pytest.mark.parametrize("name", sorted(ACTS))
def test_activation(name, rng):
    x = rng.standard_normal((6, 7)) * 5
    f, df, needs = K.get_activation(name)
    y = f(x)
    dy = rng.standard_normal(y.shape)
    _compare(y, [df(dy, y if needs == "y" else x)], ACTS[name], [x], dy)


def test_linear(rng):
    x, W, b = rng.standard_normal((5, 4)), rng.standard_normal((4, 3)), rng.standard_normal(3)
    y = K.linear_forward(x, W, b)
    dy = rng.standard_normal(y.shape)
    _compare(y, K.linear_backward(dy, x, W), lambda x, W, b: x @ W + b, [x, W, b], dy)


def test_bce_with_logits(rng):
    l, x = rng.standard_normal((4, 9)) * 20, rng.uniform(0, 1, (4, 9))
    y = K.bernoulli_nll_forward(l, x)
    dy = rng.standard_normal(4)
    _compare(y, [K.bernoulli_nll_backward(dy, l, x), None],
             lambda l, x: F.binary_cross_entropy_with_logits(l, x, reduction="none").sum(1), [l, x], dy)


def test_gaussian_nll_learned_logvar(rng):
    mu, x, lv = rng.standard_normal((4, 3)), rng.standard_normal((4, 3)), rng.standard_normal(3)
    y = K.gaussian_nll_forward(mu, x, lv)
    dy = rng.standard_normal(4)
    dmu, dlv = K.gaussian_nll_backward(dy, mu, x, lv)
    _compare(y, [dmu, None, dlv], lambda mu, x, lv: -torch.distributions.Normal(mu, torch.exp(0.5 * lv))
             .log_prob(x).sum(1), [mu, x, lv], dy)


def test_mse(rng):
    p, t = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    _compare(K.mse_forward(p, t), [K.mse_backward(1.0, p, t), None], F.mse_loss, [p, t], np.array(1.0))


def test_logsumexp(rng):
    a = rng.standard_normal((3, 8)) * 30
    y = K.logsumexp_forward(a, axis=1)
    dy = rng.standard_normal(3)
    _compare(y, [K.logsumexp_backward(dy, a, y, axis=1)], lambda a: torch.logsumexp(a, 1), [a], dy)


def test_reparameterize_and_kl(rng):
    mu, lv, eps = rng.standard_normal((4, 3)), rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    z = K.reparameterize_forward(mu, lv, eps)
    dz = rng.standard_normal(z.shape)
    _compare(z, K.reparameterize_backward(dz, lv, eps), lambda m, l: m + torch.exp(0.5 * l) * torch.tensor(eps),
             [mu, lv], dz)
    kl = K.kl_std_normal_forward(mu, lv)
    dk = rng.standard_normal(4)
    _compare(kl, K.kl_std_normal_backward(dk, mu, lv),
             lambda m, l: -0.5 * (1 + l - m ** 2 - torch.exp(l)).sum(1), [mu, lv], dk)
