"""Every entry of the kernel table against PyTorch autograd (float64); skipped without torch.

The inputs are the entry's own (``make``), the same ones gradcheck and the reference vectors use. TORCH
holds a PyTorch version of each entry, ``f(**tensors) -> {output name: tensor}``; the test runs the npdgm
forward/backward (``entry.run``), and backpropagates L = sum_o sum(outputs[o] * upstream[o]) through the
PyTorch version. A new table entry without a PyTorch version fails here."""
import math

import numpy as np
import pytest

from npdgm.kernels.table import ALPHA, CONV, FREE_BITS, SPLINE, TABLE

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


def _rq_knots(u):
    """The knot map of npdgm.kernels.spline with the table's constants (SPLINE)."""
    K, B, c = (u.shape[-1] + 1) // 3, SPLINE["bound"], math.log(math.expm1(1 - SPLINE["min_derivative"]))

    def knots(raw, lo):
        size = 2 * B * (lo + (1 - K * lo) * torch.softmax(raw, -1))
        return torch.cat([torch.zeros_like(size[..., :1]), torch.cumsum(size, -1)], -1) - B

    one = torch.ones_like(u[..., :1])
    return {"xk": knots(u[..., :K], SPLINE["min_width"]), "yk": knots(u[..., K:2 * K], SPLINE["min_height"]),
            "d": torch.cat([one, SPLINE["min_derivative"] + _softplus(u[..., 2 * K:] + c), one], -1)}


def _rq_bin(v, edges, xk, yk, d):
    """(x_k, w, y_k, h, d0, d1) of the bin of v (searched in ``edges``) and whether v is inside the knots."""
    k = (v[..., None] >= edges[..., 1:-1]).sum(-1, keepdim=True)
    at = lambda a, j: a.gather(-1, j)[..., 0]  # noqa: E731
    return ((at(xk, k), at(xk, k + 1) - at(xk, k), at(yk, k), at(yk, k + 1) - at(yk, k), at(d, k), at(d, k + 1)),
            (v >= edges[..., 0]) & (v <= edges[..., -1]))


def _rq_logg(xi, s, d0, d1):
    th = xi * (1 - xi)
    return 2 * torch.log(s) + torch.log(d1 * xi ** 2 + 2 * s * th + d0 * (1 - xi) ** 2) \
        - 2 * torch.log(s + (d1 + d0 - 2 * s) * th)


def _rq_spline(x, xk, yk, d):
    (x0, w, y0, h, d0, d1), inside = _rq_bin(x, xk, xk, yk, d)
    s, xi = h / w, (torch.minimum(torch.maximum(x, xk[..., 0]), xk[..., -1]) - x0) / w
    th = xi * (1 - xi)
    y = y0 + h * (s * xi ** 2 + d0 * th) / (s + (d1 + d0 - 2 * s) * th)
    return {"y": torch.where(inside, y, x), "logg": torch.where(inside, _rq_logg(xi, s, d0, d1), 0 * x)}


def _rq_spline_inverse(y, xk, yk, d):
    (x0, w, y0, h, d0, d1), inside = _rq_bin(y, yk, xk, yk, d)
    s, dy = h / w, torch.minimum(torch.maximum(y, yk[..., 0]), yk[..., -1]) - y0  # tails: no NaN in the unused branch
    c = d1 + d0 - 2 * s
    qa, qb, qc = h * (s - d0) + dy * c, h * d0 - dy * c, -s * dy
    xi = 2 * qc / (-qb - torch.sqrt(qb * qb - 4 * qa * qc))
    return {"x": torch.where(inside, x0 + xi * w, y),
            "logdet_inv": torch.where(inside, -_rq_logg(xi, s, d0, d1), 0 * y)}


TORCH = {
    "linear": lambda x, W, b: {"y": x @ W + b},
    "linear_relu": lambda x, W, b: {"y": F.relu(x @ W + b)},
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
    "kl_free_bits": lambda mu, logvar: {"kl": torch.clamp((-0.5 * (1 + logvar - mu ** 2 - torch.exp(logvar))).mean(0),
                                                          min=FREE_BITS).sum()},
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
    "masked_linear": lambda x, W, M, b: {"y": x @ (W * M) + b},
    "rq_knots": _rq_knots,
    "rq_spline": _rq_spline,
    "rq_spline_inverse": _rq_spline_inverse,
    "conv2d": lambda x, W, b: {"y": F.conv2d(x, W, b, **CONV)},
    "conv_transpose2d": lambda x, W, b: {"y": F.conv_transpose2d(x, W, b, **CONV)},
    "squeeze": lambda x: {"y": F.pixel_unshuffle(x, 2)},
    "unsqueeze": lambda x: {"y": F.pixel_shuffle(x, 2)},
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
