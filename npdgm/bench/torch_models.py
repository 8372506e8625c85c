"""Plain eager PyTorch mirrors of the benchmark workloads (the optional peer; torch is never a
runtime dependency of npdgm).

Each mirror is the same model as its npdgm counterpart, written the obvious way with
``torch.nn`` layers and autograd, so the benchmark compares like with like and the cross-check
tests can load npdgm's weights into it (:func:`load_linear_stack`; npdgm keeps W as (in, out),
torch as (out, in)).

    vae        784-400-20 ReLU encoder / decoder, Bernoulli decoder (BCE from logits, summed over
               pixels) + closed-form KL to N(0, I); loss = batch mean of the negative ELBO.
    nice       additive couplings (Dinh et al. 2014): y_b = x_b + m(x_a), coupling MLP
               D/2-1000x5(ReLU)-D/2, halves alternating between layers, diagonal scaling exp(s),
               logistic prior; loss = batch mean of -log p(x).
    realnvp2d  affine couplings on R^2: y_b = x_b * exp(s) + t, (s_raw, t) = MLP(x_a) 1-256-256-2,
               s = tanh(s_raw) (bounded scale), standard Gaussian prior; loss = batch mean of -log p(x).

Noise (the VAE's eps) is an argument, as in npdgm, so the same inputs give the same loss.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

LOG_2PI = math.log(2 * math.pi)


def mlp(sizes, activation=nn.ReLU, out_activation=None):
    """Linear(sizes[0], sizes[1]) -> act -> ... -> Linear(sizes[-2], sizes[-1]) [-> out_activation]."""
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(activation())
    if out_activation is not None:
        layers.append(out_activation())
    return nn.Sequential(*layers)


def linears(module):
    """The nn.Linear layers of ``module`` in forward order."""
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


@torch.no_grad()
def load_linear_stack(module, weights):
    """Copy [(W (in, out), b (out,)), ...] (npdgm layout, NumPy arrays) into ``module``'s Linear layers
    in order. Raises ValueError when counts or shapes differ."""
    layers = linears(module)
    weights = list(weights)
    if len(layers) != len(weights):
        raise ValueError(f"module has {len(layers)} Linear layers but {len(weights)} (W, b) pairs were given")
    for i, (lin, (W, b)) in enumerate(zip(layers, weights)):
        W = torch.as_tensor(W).T
        if tuple(W.shape) != tuple(lin.weight.shape) or tuple(b.shape) != tuple(lin.bias.shape):
            raise ValueError(f"layer {i}: npdgm W{tuple(W.T.shape)} b{tuple(b.shape)} does not fit "
                             f"torch Linear({lin.in_features}, {lin.out_features})")
        lin.weight.copy_(W)
        lin.bias.copy_(torch.as_tensor(b))


class VAE(nn.Module):
    """Gaussian encoder q(z|x) = N(mu, exp(logvar)), Bernoulli decoder p(x|z) = Bern(sigmoid(logits))."""

    def __init__(self, x_dim=784, hidden=(400,), z_dim=20):
        super().__init__()
        hidden = [hidden] if isinstance(hidden, int) else list(hidden)
        self.z_dim = z_dim
        self.enc = mlp([x_dim, *hidden, 2 * z_dim])          # -> [mu | logvar]
        self.dec = mlp([z_dim, *hidden[::-1], x_dim])         # -> logits

    def loss(self, x, eps):
        """Batch mean of  BCE_sum(logits, x) + KL(q(z|x) || N(0, I))  (the negative ELBO)."""
        h = self.enc(x)
        mu, logvar = h[:, :self.z_dim], h[:, self.z_dim:]
        z = mu + torch.exp(0.5 * logvar) * eps
        logits = self.dec(z)
        rec = F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
        kl = 0.5 * (mu * mu + logvar.exp() - 1 - logvar).sum()
        return (rec + kl) / x.shape[0]


class NICE(nn.Module):
    """Additive couplings y_b = x_b + m(x_a), halves (first/second half of the features) swapping
    roles at every layer, then h = exp(s) * y, logistic prior:
        log p(x) = sum_d log p_L(h_d) + sum_d s_d,   log p_L(h) = -(softplus(h) + softplus(-h))."""

    def __init__(self, dim=784, n_couplings=4, hidden=1000, n_hidden=5, prior="logistic"):
        super().__init__()
        if prior not in ("logistic", "gaussian"):
            raise ValueError(f"prior must be 'logistic' or 'gaussian', got {prior!r}")
        self.dim, self.half, self.prior = dim, dim // 2, prior
        na, nb = self.half, dim - self.half
        self.couplings = nn.ModuleList()
        for i in range(n_couplings):
            cond, out = (na, nb) if i % 2 == 0 else (nb, na)
            self.couplings.append(mlp([cond, *[hidden] * n_hidden, out]))
        self.log_scale = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        """x -> (h, log|det dh/dx|) per row."""
        a, b = x[:, :self.half], x[:, self.half:]
        for i, m in enumerate(self.couplings):
            if i % 2 == 0:
                b = b + m(a)
            else:
                a = a + m(b)
        h = torch.cat([a, b], dim=1) * torch.exp(self.log_scale)
        return h, self.log_scale.sum().expand(x.shape[0])

    def log_prob(self, x):
        h, logdet = self.forward(x)
        if self.prior == "logistic":
            lp = -(F.softplus(h) + F.softplus(-h)).sum(1)
        else:
            lp = -0.5 * (h * h + LOG_2PI).sum(1)
        return lp + logdet

    def loss(self, x):
        return -self.log_prob(x).mean()


class RealNVP2d(nn.Module):
    """Affine couplings on R^2. Layer i conditions on coordinate a = i % 2 and moves b = 1 - a:
        (s_raw, t) = MLP(x_a),  s = tanh(s_raw),  y_b = x_b * exp(s) + t,  log det += s.
    Standard Gaussian prior."""

    def __init__(self, n_couplings=8, hidden=256, n_hidden=2):
        super().__init__()
        self.nets = nn.ModuleList(mlp([1, *[hidden] * n_hidden, 2]) for _ in range(n_couplings))

    def forward(self, x):
        cols = [x[:, 0:1], x[:, 1:2]]
        logdet = x.new_zeros(x.shape[0])
        for i, net in enumerate(self.nets):
            a = i % 2
            st = net(cols[a])
            s = torch.tanh(st[:, 0:1])
            cols[1 - a] = cols[1 - a] * torch.exp(s) + st[:, 1:2]
            logdet = logdet + s[:, 0]
        return torch.cat(cols, dim=1), logdet

    def log_prob(self, x):
        y, logdet = self.forward(x)
        return -0.5 * (y * y + LOG_2PI).sum(1) + logdet

    def loss(self, x):
        return -self.log_prob(x).mean()
