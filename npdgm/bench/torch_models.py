"""npdgm's models written again in plain PyTorch autograd: the one PyTorch version of each model (optional;
torch is never a runtime dependency of npdgm, and nothing else in npdgm imports this module at import time).

The models are functions of a parameter dict ``P`` that maps npdgm's parameter names ("encoder.0.W",
"3.net.2.b", ...) to tensors, plus the model's ``config`` (as saved in a checkpoint manifest; see
docs/checkpoints.md). A Linear computes ``x @ W + b`` with W stored (in, out) -- the transpose of
``torch.nn.Linear.weight``. Nothing here imports the rest of npdgm, so this file is what a port to PyTorch
looks like; tests/mirror rebuilds every saved model with it and checks loss and gradients at rel 1e-8.

    vae_terms(P, config, x, eps)    -> {"loss", "recon", "kl", "nelbo"}   VAE.loss_and_grad
    vae_iwae(P, config, x, eps)     -> (B,) log p(x) estimates             VAE.log_likelihood
    vae_decode(P, config, z)        -> E[x|z]                               VAE.decode
    flow_forward(P, config, x, c)   -> (z, logdet)                          Flow.forward (c: context or None)
    flow_log_prob(P, config, x, c)  -> (B,)                                 Flow.log_prob (loss = -mean)
    flow_inverse(P, config, z, c)   -> (x, logdet_inv)                      Flow.inverse(z, logdet=True)
                                       (every layer type, Glow's image layers included: glow_layer)
    cvae_terms, m2_terms                                                    CVAE / M2 .loss_and_grad

The benchmark peers (``npdgm bench``'s torch backend) are the same functions wrapped as ``torch.nn.Module``s
that own their parameters (:class:`VAE`, :class:`ConvVAE`, :class:`NICE`, :class:`RealNVP2d`, :class:`Glow`;
torch's default init, noise as an argument as in npdgm, so the same inputs give the same loss).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LOG_2PI = math.log(2 * math.pi)


# -- building blocks -----------------------------------------------------------------------------------
def softplus(x):
    return torch.logaddexp(x, torch.zeros_like(x))  # exact for every x (F.softplus switches to x above 20)


ACTIVATIONS = {
    "relu": torch.relu,
    "leaky_relu": lambda x: F.leaky_relu(x, 0.01),
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "softplus": softplus,
    "elu": F.elu,
    "identity": lambda x: x,
}


def mlp(P, prefix, activation, x):
    """npdgm.nn.MLP: Linear layers at Sequential indices 0, 2, 4, ... with ``activation`` between them."""
    n = 0
    while f"{prefix}.{2 * n}.W" in P:
        n += 1
    if n == 0:
        raise KeyError(f"no Linear layers named {prefix}.0.W, {prefix}.2.W, ... in the parameters")
    act = ACTIVATIONS[activation]
    for k in range(n):
        W, b = P[f"{prefix}.{2 * k}.W"], P[f"{prefix}.{2 * k}.b"]
        x = torch.addmm(b, x, W) if x.dim() == 2 else x @ W + b  # x @ W + b (one fused call, as nn.Linear)
        if k < n - 1:
            x = act(x)
    return x


def conv_encoder(P, cfg, x):
    """npdgm.nn.conv.conv_encoder: Reshape (0), 4x4 stride-2 Conv2d + activation pairs (1, 2), (3, 4), ...,
    Reshape, Linear."""
    C, H, W = cfg["image_shape"]
    act, n = ACTIVATIONS[cfg["activation"]], len(cfg["channels"])
    h = x.reshape(-1, C, H, W)
    for k in range(n):
        h = act(F.conv2d(h, P[f"encoder.{1 + 2 * k}.W"], P[f"encoder.{1 + 2 * k}.b"], stride=2, padding=1))
    return h.flatten(1) @ P[f"encoder.{2 * n + 2}.W"] + P[f"encoder.{2 * n + 2}.b"]


def conv_decoder(P, cfg, z):
    """npdgm.nn.conv.conv_decoder: Linear (0) + activation, Reshape, 4x4 stride-2 ConvTranspose2d layers at
    3, 5, ... (activation between them, none after the last), Reshape."""
    C, H, W = cfg["image_shape"]
    act, ch = ACTIVATIONS[cfg["activation"]], cfg["channels"]
    n = len(ch)
    h = act(z @ P["decoder.0.W"] + P["decoder.0.b"]).reshape(-1, ch[-1], H >> n, W >> n)
    for k in range(n):
        h = F.conv_transpose2d(h, P[f"decoder.{3 + 2 * k}.W"], P[f"decoder.{3 + 2 * k}.b"], stride=2, padding=1)
        if k < n - 1:
            h = act(h)
    return h.flatten(1)


def _net(P, cfg, part, x):
    """The VAE's encoder or decoder: an MLP, or the convolutional nets of arch="conv"."""
    if cfg.get("arch", "mlp") == "conv":
        return (conv_encoder if part == "encoder" else conv_decoder)(P, cfg, x)
    return mlp(P, part, cfg["activation"], x)


# -- VAE -----------------------------------------------------------------------------------------------
def vae_encode(P, cfg, x):
    h = _net(P, cfg, "encoder", x)
    Z = cfg["z_dim"]
    return h[:, :Z], h[:, Z:]


def _nll_rows(P, cfg, out, x):
    """-log p(x | decoder output) summed over pixels, one value per row."""
    if cfg["likelihood"] == "bernoulli":
        return (softplus(out) - x * out).sum(dim=1)
    lv = P["logvar_x"] if cfg["sigma"] is None else out.new_tensor(2 * math.log(cfg["sigma"]))
    lv = lv.expand_as(out)
    return 0.5 * ((x - out) ** 2 * torch.exp(-lv) + lv + LOG_2PI).sum(dim=1)


def vae_terms(P, cfg, x, eps):
    """The VAE training loss: eps (K, B, Z); recon and kl are batch means of per-image sums."""
    mu, logvar = vae_encode(P, cfg, x)
    K, B, Z = eps.shape
    z = mu + torch.exp(0.5 * logvar) * eps
    out = _net(P, cfg, "decoder", z.reshape(K * B, Z))
    recon = _nll_rows(P, cfg, out, x if K == 1 else x.repeat(K, 1)).mean()
    kl = (0.5 * (mu ** 2 + torch.exp(logvar) - 1 - logvar).sum(dim=1)).mean()
    return {"loss": recon + cfg["beta"] * kl, "recon": recon, "kl": kl, "nelbo": recon + kl}


def vae_iwae(P, cfg, x, eps):
    """logsumexp_k [log p(x|z_k) + log N(z_k; 0, I) - log q(z_k|x)] - log K, eps (K, B, Z)."""
    mu, logvar = vae_encode(P, cfg, x)
    K, B, Z = eps.shape
    z = mu + torch.exp(0.5 * logvar) * eps
    out = _net(P, cfg, "decoder", z.reshape(K * B, Z))
    log_px = -_nll_rows(P, cfg, out, x.repeat(K, 1)).reshape(K, B)
    log_pz = -0.5 * (z ** 2 + LOG_2PI).sum(dim=2)
    log_qz = -0.5 * ((z - mu) ** 2 * torch.exp(-logvar) + logvar + LOG_2PI).sum(dim=2)
    return torch.logsumexp(log_px + log_pz - log_qz, dim=0) - math.log(K)


def vae_decode(P, cfg, z):
    out = _net(P, cfg, "decoder", z)
    return torch.sigmoid(out) if cfg["likelihood"] == "bernoulli" else out


# -- flows -----------------------------------------------------------------------------------------------
def make_mask(spec):
    """Bool (dim,) array, True = conditioning half, from a coupling layer's spec."""
    dim, mask, parity = spec["dim"], spec["mask"], spec["parity"]
    if mask == "half":
        m = np.arange(dim) < dim // 2
    elif mask == "alternate":
        m = np.arange(dim) % 2 == 0
    elif mask in ("checkerboard", "channel"):
        shape = tuple(spec["image_shape"])
        shape = (1, *shape) if len(shape) == 2 else shape
        c, h, w = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
        m = (((h + w) % 2 == 0) if mask == "checkerboard" else (c < shape[0] // 2)).ravel()
    else:
        m = np.asarray(mask).astype(bool)
    return ~m if parity == 1 else m


class _Split:
    """Split x into (conditioning a, transformed b) by a coupling mask and merge back; plain slices when both
    halves are contiguous (the "half" masks), index gathers otherwise."""

    def __init__(self, spec):
        m = make_mask(spec)
        ia, ib = np.flatnonzero(m), np.flatnonzero(~m)
        self.nb = len(ib)
        self.slices = None
        if all(len(i) and i[-1] - i[0] == len(i) - 1 for i in (ia, ib)):
            self.slices = slice(ia[0], ia[-1] + 1), slice(ib[0], ib[-1] + 1), ia[0] < ib[0]
        self.ia, self.ib = torch.from_numpy(ia), torch.from_numpy(ib)
        self.undo = torch.from_numpy(np.argsort(np.concatenate([ia, ib])))

    def split(self, x):
        if self.slices:
            return x[:, self.slices[0]], x[:, self.slices[1]]
        return x[:, self.ia], x[:, self.ib]

    def merge(self, a, b):
        if self.slices:
            return torch.cat([a, b] if self.slices[2] else [b, a], dim=1)
        return torch.cat([a, b], dim=1)[:, self.undo]


def _perm(spec):
    if spec["kind"] == "reverse":
        return np.arange(spec["dim"])[::-1].copy()
    return np.random.default_rng(int(spec["seed"])).permutation(spec["dim"])


def _clamp(raw, spec):
    b = spec["scale_bound"]
    if spec["scale"] == "tanh":
        return b * torch.tanh(raw / b)
    if spec["scale"] == "atan":
        return (2 * b / math.pi) * torch.atan(raw / b)
    return raw


def _cond(spec, a, c):
    """A conditioner's input: a, or [a | c] for a layer built with context_dim > 0 (conditional flows)."""
    return torch.cat([a, c], dim=1) if spec.get("context_dim") else a


def _coupling_st(P, pre, spec, sp, a, c=None):
    h = mlp(P, pre + "net", spec["activation"], _cond(spec, a, c))
    return _clamp(h[:, :sp.nb], spec), h[:, sp.nb:]


def layer_forward(P, pre, spec, x, c=None):
    """One layer x -> (y, log|det dy/dx| per row); c the context of a conditional layer."""
    t = spec["type"]
    zero = x.new_zeros(x.shape[0])
    if t == "AdditiveCoupling":
        sp = _Split(spec)
        a, b = sp.split(x)
        return sp.merge(a, b + mlp(P, pre + "net", spec["activation"], _cond(spec, a, c))), zero
    if t == "AffineCoupling":
        sp = _Split(spec)
        a, b = sp.split(x)
        s, sh = _coupling_st(P, pre, spec, sp, a, c)
        return sp.merge(a, b * torch.exp(s) + sh), s.sum(dim=1)
    if t == "Permutation":
        return x[:, torch.from_numpy(_perm(spec))], zero
    if t == "Scaling":
        ls = P[pre + "log_scale"]
        return x * torch.exp(ls), zero + ls.sum()
    if t == "ActNorm":
        ls = P[pre + "log_scale"]
        return (x + P[pre + "loc"]) * torch.exp(ls), zero + ls.sum()
    if t == "InvertibleLinear":
        W, ls = _lu_weight(P, pre, spec)
        return x @ W, zero + ls.sum()
    if t in AUTOREGRESSIVE:
        return AUTOREGRESSIVE[t][0](P, pre, spec, x, c)
    if t in GLOW_TYPES:
        return glow_layer(P, pre, spec, x)
    if t == "LogitTransform":
        a = spec["alpha"]
        p = a + (1 - 2 * a) * x
        lp, l1p = torch.log(p), torch.log1p(-p)
        return lp - l1p, (math.log(1 - 2 * a) - lp - l1p).sum(dim=1)
    raise ValueError(f"unknown layer type {t!r}")


def layer_inverse(P, pre, spec, y, c=None):
    """One layer y -> (x, log|det dx/dy| per row); c the context of a conditional layer."""
    t = spec["type"]
    zero = y.new_zeros(y.shape[0])
    if t == "AdditiveCoupling":
        sp = _Split(spec)
        a, b = sp.split(y)
        return sp.merge(a, b - mlp(P, pre + "net", spec["activation"], _cond(spec, a, c))), zero
    if t == "AffineCoupling":
        sp = _Split(spec)
        a, b = sp.split(y)
        s, sh = _coupling_st(P, pre, spec, sp, a, c)
        return sp.merge(a, (b - sh) * torch.exp(-s)), -s.sum(dim=1)
    if t == "Permutation":
        return y[:, torch.from_numpy(np.argsort(_perm(spec)))], zero
    if t == "Scaling":
        ls = P[pre + "log_scale"]
        return y * torch.exp(-ls), zero - ls.sum()
    if t == "ActNorm":
        ls = P[pre + "log_scale"]
        return y * torch.exp(-ls) - P[pre + "loc"], zero - ls.sum()
    if t == "InvertibleLinear":
        W, ls = _lu_weight(P, pre, spec)
        return torch.linalg.solve(W.T, y.T).T, zero - ls.sum()
    if t in AUTOREGRESSIVE:
        return AUTOREGRESSIVE[t][1](P, pre, spec, y, c)
    if t in GLOW_TYPES:
        return glow_layer(P, pre, spec, y, inverse=True)
    if t == "LogitTransform":
        a = spec["alpha"]
        ld = (F.logsigmoid(y) + F.logsigmoid(-y) - math.log(1 - 2 * a)).sum(dim=1)
        return (torch.sigmoid(y) - a) / (1 - 2 * a), ld
    raise ValueError(f"unknown layer type {t!r}")


def _lu_weight(P, pre, spec):
    """InvertibleLinear: W = P L1 U1, L1 = tril(L, -1) + I, U1 = triu(U, 1) + diag(sign exp(log_s)); P_ij = 1 iff
    i = perm[j] (so x @ P = x[:, perm])."""
    n = spec["dim"]
    perm = torch.zeros(n, n, dtype=torch.float64)
    perm[torch.tensor(spec["perm"]), torch.arange(n)] = 1.0
    ls = P[pre + "log_s"]
    L1 = torch.tril(P[pre + "L"], -1) + torch.eye(n, dtype=ls.dtype, device=ls.device)
    U1 = torch.triu(P[pre + "U"], 1) + torch.diag(ls.new_tensor(spec["sign"]) * torch.exp(ls))
    return perm.to(ls) @ L1 @ U1, ls


def made_masks(dim, hidden):
    """MADE masks (in, out): input degree d + 1, hidden unit k of H degree 1 + floor(k (D-2) / (H-1)); hidden layers
    keep m_out >= m_in, the output layer (two blocks of input degrees) m_out > m_in."""
    deg = [np.arange(1, dim + 1)] + [np.arange(h) * (dim - 2) // max(h - 1, 1) + 1 for h in hidden]
    masks = [d_out[None, :] >= d_in[:, None] for d_in, d_out in zip(deg[:-1], deg[1:])]
    masks.append(np.tile(deg[0], 2)[None, :] > deg[-1][:, None])
    return [torch.from_numpy(m.astype(np.float64)) for m in masks]


def _made(P, pre, spec, x, c=None):
    """(alpha, mu) of a MAF/IAF layer: the masked MLP, then the scale clamp on the first D outputs. A conditional
    layer's input is [x | c], the context rows of the first mask all ones."""
    masks, act = made_masks(spec["dim"], spec["hidden"]), ACTIVATIONS[spec["activation"]]
    if spec.get("context_dim"):
        masks[0] = torch.cat([masks[0], torch.ones(spec["context_dim"], masks[0].shape[1], dtype=masks[0].dtype)])
        x = torch.cat([x, c], dim=1)
    for k, m in enumerate(masks):
        x = x @ (P[f"{pre}made.{2 * k}.W"] * m.to(x)) + P[f"{pre}made.{2 * k}.b"]
        if k < len(masks) - 1:
            x = act(x)
    D = spec["dim"]
    return _clamp(x[:, :D], spec), x[:, D:]


def _one_pass(P, pre, spec, x, c=None):
    """z = (x - mu(x)) e^-alpha(x), logdet = -sum alpha (MAF forward, IAF inverse)."""
    alpha, mu = _made(P, pre, spec, x, c)
    return (x - mu) * torch.exp(-alpha), -alpha.sum(dim=1)


def _d_pass(P, pre, spec, z, c=None):
    """x with z = (x - mu(x)) e^-alpha(x), coordinate by coordinate (MAF inverse, IAF forward); logdet = +sum alpha.
    Autograd differentiates through all D passes (no implicit-function shortcut)."""
    x = torch.zeros_like(z)
    for _ in range(spec["dim"]):
        alpha, mu = _made(P, pre, spec, x, c)
        x = z * torch.exp(alpha) + mu
    return x, _made(P, pre, spec, x, c)[0].sum(dim=1)


def _rq_spline(P, pre, spec, sp, a, v, inverse):
    """SplineCoupling on the transformed half v given the conditioner's input a (the conditioning half, with the
    context of a conditional layer): (out, log g' per row (forward map)).
    Knots from net(a) as (B, nb, 3K-1); the bin by counting interior knots <= v; the inverse by the stable root
    of the bin's quadratic; identity outside [-bound, bound]."""
    K, B0 = spec["bins"], spec["bound"]
    u = mlp(P, pre + "net", spec["activation"], a).reshape(a.shape[0], sp.nb, 3 * K - 1)

    def knots(raw, lo):
        size = 2 * B0 * (lo + (1 - K * lo) * torch.softmax(raw, dim=-1))
        return size, torch.cat([torch.zeros_like(size[..., :1]), torch.cumsum(size, -1)], -1) - B0

    W, xk = knots(u[..., :K], spec["min_width"])
    H, yk = knots(u[..., K:2 * K], spec["min_height"])
    one = torch.ones_like(u[..., :1])
    shift = math.log(math.expm1(1 - spec["min_derivative"]))  # u = 0: slope 1 (npdgm.kernels.spline.derivative_shift)
    d = torch.cat([one, spec["min_derivative"] + softplus(u[..., 2 * K:] + shift), one], -1)
    inside = v.abs() <= B0
    vc = v.clamp(-B0, B0)
    k = (vc[..., None] >= (yk if inverse else xk)[..., 1:K]).sum(-1, keepdim=True)
    x0, w, y0, h = xk.gather(-1, k)[..., 0], W.gather(-1, k)[..., 0], yk.gather(-1, k)[..., 0], H.gather(-1, k)[..., 0]
    d0, d1 = d.gather(-1, k)[..., 0], d.gather(-1, k + 1)[..., 0]
    s = h / w
    if inverse:
        dy, c = vc - y0, d1 + d0 - 2 * s
        qa, qb, qc = h * (s - d0) + dy * c, h * d0 - dy * c, -s * dy
        xi = 2 * qc / (-qb - torch.sqrt(qb * qb - 4 * qa * qc))
    else:
        xi = (vc - x0) / w
    th = xi * (1 - xi)
    den = s + (d1 + d0 - 2 * s) * th
    logd = 2 * torch.log(s) + torch.log(d1 * xi ** 2 + 2 * s * th + d0 * (1 - xi) ** 2) - 2 * torch.log(den)
    out = (x0 + xi * w) if inverse else (y0 + h * (s * xi ** 2 + d0 * th) / den)
    return torch.where(inside, out, v), torch.where(inside, logd, torch.zeros_like(logd)).sum(dim=1)


def _spline(inverse):
    def run(P, pre, spec, x, c=None):
        sp = _Split(spec)
        a, b = sp.split(x)
        out, logd = _rq_spline(P, pre, spec, sp, _cond(spec, a, c), b, inverse)
        return sp.merge(a, out), (-logd if inverse else logd)
    return run


AUTOREGRESSIVE = {"MAF": (_one_pass, _d_pass), "IAF": (_d_pass, _one_pass),  # type -> (forward, inverse)
                  "SplineCoupling": (_spline(False), _spline(True))}


# -- Glow's image layers (npdgm.models.glow_layers): the image is x[:, :C H W] in NCHW order, the rest passes ----
GLOW_TYPES = ("Squeeze", "ChannelActNorm", "InvertibleConv1x1", "ConvAffineCoupling")


def _glow_coupling_net(P, pre, a):
    """(t, s, log s) of a ConvAffineCoupling: h = conv3x3 -> ReLU -> conv1x1 -> ReLU -> conv3x3 (pad 1),
    t = h[:, 0::2], s = sigmoid(h[:, 1::2] + 2)."""
    h = F.relu(F.conv2d(a, P[pre + "net.0.W"], P[pre + "net.0.b"], padding=1))
    h = F.relu(F.conv2d(h, P[pre + "net.2.W"], P[pre + "net.2.b"]))
    h = F.conv2d(h, P[pre + "net.4.W"], P[pre + "net.4.b"], padding=1)
    r = h[:, 1::2] + 2
    return h[:, 0::2], torch.sigmoid(r), F.logsigmoid(r)


def glow_layer(P, pre, spec, x, inverse=False):
    """A layer of npdgm.models.glow_layers on rows x (B, D): the image x[:, :n] (n = C H W, NCHW) is mapped,
    x[:, n:] (the factored-out channels of earlier levels) passes through. Returns (out, log|det| per row);
    ``inverse``: the inverse map and its log-det.
        Squeeze             pixel_unshuffle(x, 2)                                 log|det| = 0
        ChannelActNorm      (x + loc_c) exp(ls_c)                                 H W sum ls
        InvertibleConv1x1   conv2d(x, W^T as (C, C, 1, 1)), W = P L (U + diag s)  H W sum log|s|
        ConvAffineCoupling  [x_a, (x_b + t) s], (t, s) from the conv net on x_a    sum log s"""
    t, (C, H, W) = spec["type"], spec["image_shape"]
    n, B = C * H * W, x.shape[0]
    img = x[:, :n].reshape(B, C, H, W)
    zero = x.new_zeros(B)
    if t == "Squeeze":
        out = F.pixel_shuffle(x[:, :n].reshape(B, 4 * C, H // 2, W // 2), 2) if inverse else F.pixel_unshuffle(img, 2)
        ld = zero
    elif t == "ChannelActNorm":
        loc, ls = P[pre + "loc"][:, None, None], P[pre + "log_scale"]
        out = img * torch.exp(-ls)[:, None, None] - loc if inverse else (img + loc) * torch.exp(ls)[:, None, None]
        ld = zero + H * W * ls.sum()
    elif t == "InvertibleConv1x1":
        Wm, ls = _lu_weight(P, pre + "lin.", {"dim": C, "perm": spec["perm"], "sign": spec["sign"]})
        out = F.conv2d(img, (torch.linalg.inv(Wm) if inverse else Wm).T[:, :, None, None])
        ld = zero + H * W * ls.sum()
    elif t == "ConvAffineCoupling":
        ca = C // 2
        a, b = img[:, :ca], img[:, ca:]
        sh, s, logs = _glow_coupling_net(P, pre, a)
        out = torch.cat([a, b / s - sh if inverse else (b + sh) * s], dim=1)
        ld = logs.sum(dim=(1, 2, 3))
    else:
        raise ValueError(f"unknown Glow layer type {t!r}")
    return torch.cat([out.reshape(B, n), x[:, n:]], dim=1), (-ld if inverse else ld)


def prior_log_prob(name, z):
    if name == "gaussian":
        return -0.5 * (z ** 2 + LOG_2PI).sum(dim=1)
    if name == "logistic":
        return -(softplus(z) + softplus(-z)).sum(dim=1)
    raise ValueError(f"unknown prior {name!r}")


def flow_forward(P, cfg, x, c=None):
    logdet = x.new_zeros(x.shape[0])
    for i, spec in enumerate(cfg["layers"]):
        x, ld = layer_forward(P, f"{i}.", spec, x, c)
        logdet = logdet + ld
    return x, logdet


def flow_log_prob(P, cfg, x, c=None):
    z, logdet = flow_forward(P, cfg, x, c)
    return prior_log_prob(cfg["prior"], z) + logdet


def flow_inverse(P, cfg, z, c=None):
    total = z.new_zeros(z.shape[0])
    for i in range(len(cfg["layers"]) - 1, -1, -1):
        z, ld = layer_inverse(P, f"{i}.", cfg["layers"][i], z, c)
        total = total + ld
    return z, total


# -- CVAE and M2: the label enters as a one-hot row concatenated to the encoder and decoder inputs ----------
def one_hot(y, C, dtype=torch.float64):
    return F.one_hot(torch.as_tensor(y), C).to(dtype)


def _elbo_rows(P, cfg, x, e, eps):
    """Per-row recon NLL and KL for q(z|x, y), p(x|z, y) with class rows e; eps (K, B, Z)."""
    h = mlp(P, "encoder", cfg["activation"], torch.cat([x, e], dim=1))
    Z = cfg["z_dim"]
    mu, logvar = h[:, :Z], h[:, Z:]
    K, B, _ = eps.shape
    z = (mu + torch.exp(0.5 * logvar) * eps).reshape(K * B, Z)
    out = mlp(P, "decoder", cfg["activation"], torch.cat([z, e.repeat(K, 1)], dim=1))
    rec = _nll_rows(P, cfg, out, x.repeat(K, 1))
    kl = 0.5 * (mu ** 2 + torch.exp(logvar) - 1 - logvar).sum(dim=1)
    return rec, kl


def cvae_terms(P, cfg, x, y, eps):
    """CVAE.loss_and_grad: the VAE loss with [x | s e_y] into the encoder and [z | s e_y] into the decoder
    (s = label_scale)."""
    rec, kl = _elbo_rows(P, cfg, x, cfg.get("label_scale", 1.0) * one_hot(y, cfg["num_classes"], x.dtype), eps)
    recon, kl = rec.mean(), kl.mean()
    return {"loss": recon + cfg["beta"] * kl, "recon": recon, "kl": kl, "nelbo": recon + kl}


def m2_terms(P, cfg, x_l, y_l, x_u, eps_l, eps_u):
    """M2.loss_and_grad: mean L(x_l, y_l) + alpha mean CE + mean U(x_u), L = -ELBO(x, y) + log C,
    U(x) = sum_c q(c|x) L(x, c) - H(q(.|x)); eps_l (B_l, Z), eps_u (C, B_u, Z) (class c uses eps_u[c])."""
    C = cfg["num_classes"]
    cfg = dict(cfg, likelihood="bernoulli")
    rec, kl = _elbo_rows(P, cfg, x_l, one_hot(y_l, C, x_l.dtype), eps_l[None])
    L = rec + kl + math.log(C)
    s_l = mlp(P, "classifier", cfg["activation"], x_l)
    ce = F.cross_entropy(s_l, torch.as_tensor(y_l), reduction="none")
    Lu = torch.stack([sum(_elbo_rows(P, cfg, x_u, one_hot([c] * x_u.shape[0], C, x_u.dtype), eps_u[c][None]))
                      for c in range(C)], dim=1) + math.log(C)                      # (B_u, C)
    logq = torch.log_softmax(mlp(P, "classifier", cfg["activation"], x_u), dim=1)
    H = -(logq.exp() * logq).sum(dim=1)
    U = (logq.exp() * Lu).sum(dim=1) - H
    loss = L.mean() + cfg["alpha"] * ce.mean() + U.mean()
    return {"loss": loss, "labelled": L.mean(), "ce": ce.mean(), "recon_l": rec.mean(), "kl_l": kl.mean(),
            "unlabelled": U.mean(), "entropy": H.mean()}


# -- the benchmark peers: the functions above as nn.Modules that own their parameters ---------------------
class Peer(nn.Module):
    """A model as (config, parameters named as npdgm names them). ``P`` is the {npdgm name: Parameter} dict the
    functions above take; :meth:`load` copies npdgm arrays in by name."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self._names = []

    def _add(self, name, value):
        self.register_parameter(name.replace(".", "_"), nn.Parameter(value))
        self._names.append(name)

    def _add_linears(self, prefix, sizes):
        """An npdgm MLP's Linear layers (Sequential indices 0, 2, ...) with torch.nn.Linear's default init."""
        for k in range(len(sizes) - 1):
            lin = nn.Linear(sizes[k], sizes[k + 1])
            self._add(f"{prefix}{2 * k}.W", lin.weight.detach().T.contiguous())
            self._add(f"{prefix}{2 * k}.b", lin.bias.detach().clone())

    @property
    def P(self):
        return {n: getattr(self, n.replace(".", "_")) for n in self._names}

    @torch.no_grad()
    def load(self, arrays):
        """Copy {npdgm name: array} (e.g. ``model.params``) into the parameters; names and shapes must match."""
        P = self.P
        if set(arrays) != set(P):
            raise ValueError(f"parameter names differ: {sorted(set(arrays) ^ set(P))}")
        for n, p in P.items():
            v = torch.as_tensor(np.asarray(arrays[n]))
            if tuple(v.shape) != tuple(p.shape):
                raise ValueError(f"{n}: shape {tuple(v.shape)} does not fit {tuple(p.shape)}")
            p.copy_(v)
        return self


class VAE(Peer):
    """Gaussian encoder q(z|x) = N(mu, exp(logvar)), Bernoulli decoder; loss = batch mean of the negative ELBO
    (:func:`vae_terms`, one sample, eps (B, Z))."""

    def __init__(self, x_dim=784, hidden=(400,), z_dim=20):
        hidden = [hidden] if isinstance(hidden, int) else list(hidden)
        super().__init__(dict(x_dim=x_dim, hidden=hidden, z_dim=z_dim, activation="relu", likelihood="bernoulli",
                              sigma=None, beta=1.0))
        self._add_linears("encoder.", [x_dim, *hidden, 2 * z_dim])
        self._add_linears("decoder.", [z_dim, *hidden[::-1], x_dim])

    def loss(self, x, eps):
        return vae_terms(self.P, self.config, x, eps[None])["loss"]


class ConvVAE(Peer):
    """:class:`VAE` with npdgm's ``arch="conv"`` nets (:func:`conv_encoder` / :func:`conv_decoder`): torch's
    default Conv2d / ConvTranspose2d / Linear init, weights in PyTorch's layout (as npdgm stores them)."""

    def __init__(self, image_shape=(1, 28, 28), channels=(32, 64), z_dim=20):
        C, H, W = image_shape
        n = len(channels)
        super().__init__(dict(x_dim=C * H * W, z_dim=z_dim, arch="conv", channels=list(channels),
                              image_shape=list(image_shape), activation="relu", likelihood="bernoulli", sigma=None,
                              beta=1.0))
        c = C
        for k, ch in enumerate(channels):
            self._add_module_params(f"encoder.{1 + 2 * k}.", nn.Conv2d(c, ch, 4, stride=2, padding=1))
            c = ch
        flat = c * (H >> n) * (W >> n)
        self._add_module_params(f"encoder.{2 * n + 2}.", nn.Linear(flat, 2 * z_dim), transpose=True)
        self._add_module_params("decoder.0.", nn.Linear(z_dim, flat), transpose=True)
        for k, ch in enumerate([*channels[::-1][1:], C]):
            self._add_module_params(f"decoder.{3 + 2 * k}.", nn.ConvTranspose2d(c, ch, 4, stride=2, padding=1))
            c = ch

    def _add_module_params(self, prefix, mod, transpose=False):
        W = mod.weight.detach()
        self._add(prefix + "W", (W.T if transpose else W).contiguous())
        self._add(prefix + "b", mod.bias.detach().clone())

    def loss(self, x, eps):
        return vae_terms(self.P, self.config, x, eps[None])["loss"]


class _FlowPeer(Peer):
    def log_prob(self, x):
        return flow_log_prob(self.P, self.config, x)

    def loss(self, x):
        return -self.log_prob(x).mean()


class NICE(_FlowPeer):
    """Additive couplings (first/second half swapping roles), then a diagonal Scaling; logistic or Gaussian
    prior -- npdgm.models.flows.nice(..., logit=False)."""

    def __init__(self, dim=784, n_couplings=4, hidden=1000, n_hidden=5, prior="logistic"):
        if prior not in ("logistic", "gaussian"):
            raise ValueError(f"prior must be 'logistic' or 'gaussian', got {prior!r}")
        layers = [dict(type="AdditiveCoupling", dim=dim, mask="half", parity=i % 2, activation="relu")
                  for i in range(n_couplings)]
        super().__init__(dict(layers=layers + [dict(type="Scaling", dim=dim)], prior=prior))
        half = dim // 2
        for i in range(n_couplings):
            cond, out = (half, dim - half) if i % 2 == 0 else (dim - half, half)
            self._add_linears(f"{i}.net.", [cond, *[hidden] * n_hidden, out])
        self._add(f"{n_couplings}.log_scale", torch.zeros(dim))


class RealNVP2d(_FlowPeer):
    """Affine couplings on R^2, s = tanh(s_raw) (bounded scale), Gaussian prior --
    npdgm.models.flows.realnvp2d(..., scale="tanh", scale_bound=1) without ActNorm."""

    def __init__(self, n_couplings=8, hidden=256, n_hidden=2):
        layers = [dict(type="AffineCoupling", dim=2, mask="half", parity=i % 2, activation="relu", scale="tanh",
                       scale_bound=1.0) for i in range(n_couplings)]
        super().__init__(dict(layers=layers, prior="gaussian"))
        for i in range(n_couplings):
            self._add_linears(f"{i}.net.", [1, *[hidden] * n_hidden, 2])


class Glow(_FlowPeer):
    """A Glow flow (npdgm.models.flows.glow) from its config {"layers": [layer specs], "prior"}: the specs fix the
    image shapes, the 1x1 convolutions' permutations and signs and the coupling widths. Own init: every coupling's
    first two convolutions torch.nn.Conv2d's default, the last one zero (openai/glow); each 1x1 convolution
    starts as its signed permutation (L = U = 0, log s = 0; npdgm starts from a random rotation: :meth:`load` npdgm's
    arrays to start from the same weights). ActNorm is initialised from the first batch the model sees (loc = -mean,
    log_scale = -log(std + eps) per channel), as npdgm's, unless :meth:`load` gave it trained values."""

    def __init__(self, config):
        super().__init__(config)
        self.initialized = False
        for i, spec in enumerate(config["layers"]):
            t, C = spec["type"], spec["image_shape"][0]
            if t == "ChannelActNorm":
                self._add(f"{i}.loc", torch.zeros(C))
                self._add(f"{i}.log_scale", torch.zeros(C))
            elif t == "InvertibleConv1x1":
                for name, value in (("L", torch.zeros(C, C)), ("U", torch.zeros(C, C)), ("log_s", torch.zeros(C))):
                    self._add(f"{i}.lin.{name}", value)
            elif t == "ConvAffineCoupling":
                ca, cb, h = C // 2, C - C // 2, spec["hidden"]
                for k, conv in ((0, nn.Conv2d(ca, h, 3, padding=1)), (2, nn.Conv2d(h, h, 1)),
                                (4, nn.Conv2d(h, 2 * cb, 3, padding=1))):
                    W, b = conv.weight.detach().clone(), conv.bias.detach().clone()
                    self._add(f"{i}.net.{k}.W", W.zero_() if k == 4 else W)
                    self._add(f"{i}.net.{k}.b", b.zero_() if k == 4 else b)
            elif t != "Squeeze":
                raise ValueError(f"Glow's config holds a {t!r} layer; expected {', '.join(GLOW_TYPES)}")

    def load(self, arrays, initialized=True):
        """Copy npdgm's {name: array} in; ``initialized=False`` keeps ActNorm's data-dependent init to come."""
        super().load(arrays)
        self.initialized = initialized
        return self

    @torch.no_grad()
    def initialize(self, x):
        """ActNorm's data-dependent init on the batch x: each ChannelActNorm gets loc = -mean, log_scale =
        -log(std + eps) over (batch, H, W) per channel of its input."""
        P = self.P
        for i, spec in enumerate(self.config["layers"]):
            if spec["type"] == "ChannelActNorm":
                C, H, W = spec["image_shape"]
                img = x[:, :C * H * W].reshape(-1, C, H, W)
                P[f"{i}.loc"].copy_(-img.mean(dim=(0, 2, 3)))
                P[f"{i}.log_scale"].copy_(-torch.log(img.std(dim=(0, 2, 3), correction=0) + spec["eps"]))
            x, _ = layer_forward(P, f"{i}.", spec, x)
        self.initialized = True

    def log_prob(self, x):
        if not self.initialized:
            self.initialize(x)
        return super().log_prob(x)
