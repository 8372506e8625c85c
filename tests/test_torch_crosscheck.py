"""Every entry of the kernel table against PyTorch autograd (float64); skipped without torch.

The inputs are the entry's own (``make``), the same ones gradcheck and the reference vectors use. TORCH
holds a PyTorch version of each entry, ``f(**tensors) -> {output name: tensor}``; the test runs the npdgm
forward/backward (``entry.run``), and backpropagates L = sum_o sum(outputs[o] * upstream[o]) through the
PyTorch version. A new table entry without a PyTorch version fails here."""
import math

import numpy as np
import pytest

from npdgm.kernels.table import ALPHA, TABLE

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _softplus(x):  # F.softplus switches to x above 20, torch.logaddexp is exact everywhere
    return torch.logaddexp(x, torch.zeros_like(x))


def _clamp(kind, b=1.7):
    if kind == "tanh":
        return lambda raw: {"s": b * torch.tanh(raw / b)}
    if kind == "atan":
        return lambda raw: {"s": (2 * b / math.pi) * torch.atan(raw / b)}
    return lambda raw: {"s": raw * 1.0}


def _logit(x):
    p = ALPHA + (1 - 2 * ALPHA) * x
    return {"y": torch.log(p) - torch.log1p(-p),
            "logdet": (math.log(1 - 2 * ALPHA) - torch.log(p) - torch.log1p(-p)).sum(1)}


def _logit_inverse(y):
    return {"x": (torch.sigmoid(y) - ALPHA) / (1 - 2 * ALPHA),
            "logdet_inv": (F.logsigmoid(y) + F.logsigmoid(-y) - math.log(1 - 2 * ALPHA)).sum(1)}


def _gaussian_nll(mu, x, logvar):
    return {"loss": -torch.distributions.Normal(mu, torch.exp(0.5 * logvar)).log_prob(x).sum(1)}


def _bernoulli_nll(logits, x):
    return {"loss": F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(1)}


def _reparameterize(mu, logvar, eps):
    return {"z": mu + torch.exp(0.5 * logvar) * eps}


TORCH = {
    "linear": lambda x, W, b: {"y": x @ W + b},
    "relu": lambda x: {"y": F.relu(x)},
    "leaky_relu": lambda x: {"y": F.leaky_relu(x, 0.01)},
    "tanh": lambda x: {"y": torch.tanh(x)},
    "sigmoid": lambda x: {"y": torch.sigmoid(x)},
    "softplus": lambda x: {"y": _softplus(x)},
    "elu": lambda x: {"y": F.elu(x)},
    "identity": lambda x: {"y": x * 1.0},
    "bernoulli_nll": _bernoulli_nll,
    "bernoulli_nll_saturated": _bernoulli_nll,
    "gaussian_nll": _gaussian_nll,
    "gaussian_nll_scalar": _gaussian_nll,
    "gaussian_nll_per_elem": _gaussian_nll,
    "mse": lambda pred, target: {"loss": F.mse_loss(pred, target)},
    "logsumexp": lambda a: {"y": torch.logsumexp(a, 1)},
    "reparameterize": _reparameterize,
    "reparameterize_samples": _reparameterize,
    "kl_std_normal": lambda mu, logvar: {"kl": -0.5 * (1 + logvar - mu ** 2 - torch.exp(logvar)).sum(1)},
    "softmax": lambda logits: {"q": torch.softmax(logits, -1)},
    "log_softmax": lambda logits: {"y": torch.log_softmax(logits, -1)},
    "softmax_ce": lambda logits, labels: {"loss": F.cross_entropy(logits, labels, reduction="none")},
    "softmax_entropy": lambda logits: {"H": torch.distributions.Categorical(logits=logits).entropy()},
    "softmax_expectation": lambda logits, v: {"y": (torch.softmax(logits, -1) * v).sum(-1)},
    "affine_coupling_half": lambda xb, s, t: {"yb": xb * torch.exp(s) + t, "logdet": s.sum(1)},
    "affine_coupling_half_inverse": lambda yb, s, t: {"xb": (yb - t) * torch.exp(-s), "logdet_inv": -s.sum(1)},
    "diag_scale": lambda x, log_scale: {"y": x * torch.exp(log_scale),
                                        "logdet": log_scale.sum().expand(x.shape[0])},
    "diag_scale_inverse": lambda y, log_scale: {"x": y * torch.exp(-log_scale),
                                                "logdet_inv": (-log_scale.sum()).expand(y.shape[0])},
    "logit": _logit,
    "logit_inverse": _logit_inverse,
    "prior_gaussian": lambda z: {"logp": torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1)},
    "prior_logistic": lambda z: {"logp": -(_softplus(z) + _softplus(-z)).sum(1)},
    "scale_clamp_tanh": _clamp("tanh"),
    "scale_clamp_atan": _clamp("atan"),
    "scale_clamp_none": _clamp("none"),
}


def test_every_table_entry_has_a_torch_version():
    assert sorted(TORCH) == sorted(k.name for k in TABLE)


@pytest.mark.parametrize("k", TABLE, ids=lambda k: k.name)
def test_kernel_matches_torch(k):
    inputs = k.make(np.random.default_rng(1), np.float64)
    outputs, grads = k.run(inputs)
    upstream = k.upstream(outputs)
    fn = TORCH[k.name]
    args = {n: torch.tensor(a, requires_grad=a.dtype.kind == "f") for n, a in inputs.items()
            if n not in upstream.values()}
    got = fn(**args)
    assert sorted(got) == sorted(outputs)
    loss = 0
    for o, t in got.items():
        np.testing.assert_allclose(outputs[o], t.detach().numpy(), rtol=1e-12, atol=1e-12, err_msg=f"output {o}")
        loss = loss + (t * torch.tensor(inputs[upstream[o]])).sum()
    loss.backward()
    for n, g in grads.items():
        np.testing.assert_allclose(g, args[n].grad.numpy(), rtol=1e-10, atol=1e-12, err_msg=f"grad of {n}")
