"""Normalizing flows: invertible layers with exact log-determinants, every backward by hand.

A flow G^-1 maps data x to latents z = f(x) through invertible layers; the change of variables
gives the exact log-density

    log p(x) = log p_Z(f(x)) + sum_layers log|det d y_l / d y_{l-1}|

which is maximized directly (mean negative log-likelihood in nats). Sampling runs the layers
backwards: x = f^-1(z), z ~ p_Z (optionally scaled by a temperature).

The layers and masks live in :mod:`npdgm.models.flow_layers` (re-exported here, so
``flows.AffineCoupling`` still works): AdditiveCoupling (NICE), AffineCoupling (RealNVP, bounded
scale), Permutation, Scaling, ActNorm, LogitTransform, each with forward / backward / inverse /
inverse_backward (shapes in their docstrings). This module: the container :class:`Flow`.
Factories used by the CLI and the benchmarks: :func:`nice`, :func:`realnvp2d`, :func:`realnvp`, :func:`maf`,
:func:`glow` (its image layers are in :mod:`npdgm.models.glow_layers`).

    >>> import npdgm, numpy as np
    >>> flow = npdgm.models.flows.realnvp2d(n_couplings=8, hidden=(256, 256), seed=0)
    >>> x = np.random.default_rng(0).standard_normal((512, 2)).astype(np.float32)
    >>> loss = flow.loss_and_grad(x)          # mean NLL (nats); fills flow.grads
    >>> xs = flow.sample(16, temperature=0.8, rng=0)
"""
from __future__ import annotations

import math

import numpy as np

from .. import backend
from .registry import register_model
from ..kernels import coupling as C
from ..validate import as_rng, check_float, check_int
from .base import Model
from .flow_layers import (FLOW_LAYERS, MASKS, ActNorm, AdditiveCoupling, AffineCoupling, FlowLayer,  # noqa: F401
                          InvertibleLinear, LogitTransform, Permutation, Scaling, SplineCoupling, _check_input,
                          build_layer, check_context, make_mask)
from .autoregressive import IAF, MAF  # noqa: E402,F401  (registers the MAF / IAF layer specs)
from .glow_layers import ChannelActNorm, ConvAffineCoupling, InvertibleConv1x1, Squeeze  # noqa: F401  (and specs)

__all__ = ["FlowLayer", "AdditiveCoupling", "AffineCoupling", "Permutation", "Scaling", "ActNorm",
           "LogitTransform", "InvertibleLinear", "SplineCoupling", "MAF", "IAF", "Flow", "make_mask", "nice",
           "realnvp2d", "realnvp", "maf2d", "maf", "spline2d", "glow", "bits_per_dim", "FLOW_LAYERS",
           "Squeeze", "ChannelActNorm", "InvertibleConv1x1", "ConvAffineCoupling"]


def bits_per_dim(nll_nats, dim, levels=256):
    """bits/dim = (NLL_nats / D + log(levels)) / log 2  for ``levels``-level data scaled to [0, 1]
    (the density of the dequantized data in [0, 1]^D bounds the discrete likelihood). A device scalar
    stays on the device (no host sync inside a training step)."""
    return (nll_nats / dim + math.log(levels)) / math.log(2)


# -- the container ---------------------------------------------------------------------------------
CHECK_MODES = ("off", "loss", "layers")


@register_model
class Flow(Model):
    """A stack of invertible layers and a prior ("gaussian" | "logistic").

    ``layers``: FlowLayer instances or their spec dicts (``config`` keeps the specs, so ``npdgm.load``
    rebuilds the same stack with the same masks and permutations). ``checked`` says how non-finite
    values are caught: "loss" (default) checks the loss of every ``loss_and_grad`` and, when it is not
    finite, replays the batch layer by layer and raises FloatingPointError naming the first layer
    whose output or log-det overflowed, and likewise the result of every ``inverse`` (so ``sample``
    never returns NaN silently; its input z must be finite); "layers" checks after every layer of every
    forward/inverse; "off" checks nothing (no host sync: benchmarks).

    Calling the flow is its forward pass: ``flow(x)`` = ``flow.forward(x)`` -> (z (B, D), logdet (B,)),
    the direction the density is computed in (``log_prob(x)`` adds the prior; ``inverse(z)`` samples).

    A conditional flow p(x | c) (``context_dim`` > 0: some layers were built with ``context_dim=C``, all with the
    same C) takes ``context`` (B, C) in forward / inverse / log_prob / nll / loss_and_grad / sample and hands it
    to its conditional layers only (the others pass it by); its ``backward`` / ``inverse_backward`` return
    (dx, dc), dc the sum of the layers' context gradients.
    """

    kind = "flow"

    def __init__(self, layers, prior="gaussian", checked="loss"):
        built = [layer if isinstance(layer, FlowLayer) else build_layer(layer) for layer in layers]
        if not built:
            raise ValueError("a flow needs at least one layer")
        C.prior_logprob(prior)
        if checked not in CHECK_MODES:
            raise ValueError(f"checked must be one of {CHECK_MODES}, got {checked!r}")
        dims = {layer.dim for layer in built}
        if len(dims) != 1:
            raise ValueError(f"all flow layers must have the same dim, got {[layer.dim for layer in built]}")
        contexts = {layer.context_dim for layer in built if layer.context_dim}
        if len(contexts) > 1:
            raise ValueError(f"the conditional layers of a flow must share one context_dim, got "
                             f"{[layer.context_dim for layer in built]}")
        context_dim = contexts.pop() if contexts else 0
        super().__init__(layers=[layer.spec() for layer in built], prior=prior, checked=checked)
        self.context_dim = context_dim
        self.layers = built
        for i, layer in enumerate(built):
            self._modules[str(i)] = layer
        self.dim = built[0].dim
        self.prior = prior
        self.checked = checked
        self._prior_f, self._prior_b = C.prior_logprob(prior)
        self.flatten()

    # -- state (weights + ActNorm init flags) ------------------------------------------------------
    def state_dict(self):
        """Weights plus non-trainable buffers ("<i>.initialized" of ActNorm layers)."""
        state = super().state_dict()
        for i, layer in enumerate(self.layers):
            state.update({f"{i}.{k}": v for k, v in layer.buffers().items()})
        return state

    def load_state_dict(self, state):
        state = dict(state)
        for i, layer in enumerate(self.layers):
            names = list(layer.buffers())
            if names:
                missing = [f"{i}.{n}" for n in names if f"{i}.{n}" not in state]
                if missing:
                    raise KeyError(f"state dict lacks the buffers {missing} of layer {i} ({type(layer).__name__})")
                layer.load_buffers({n: state.pop(f"{i}.{n}") for n in names})
        return super().load_state_dict(state)

    # -- passes --------------------------------------------------------------------------------------
    def _dtype(self):
        p = self.flat_params
        return p.dtype if p is not None else np.dtype(backend.get_dtype())

    def _validate(self, name, x):
        _check_input(name, x, self.dim)
        if x.dtype != self._dtype():
            raise TypeError(f"{name} is {x.dtype} but the flow's parameters are {self._dtype()}; cast it first")

    def _context(self, context, rows):
        """The checked context (rows, context_dim) of a conditional flow (None for a context-free one)."""
        context = check_context("this flow", context, self.context_dim, rows)
        if context is not None and context.dtype != self._dtype():
            raise TypeError(f"context is {context.dtype} but the flow's parameters are {self._dtype()}; cast it first")
        return context

    @staticmethod
    def _run(layer, method, h, context, **kw):
        """layer.method(h, ...) with the context for a conditional layer (the others never see it)."""
        if layer.context_dim:
            kw["context"] = context
        return getattr(layer, method)(h, **kw)

    def _back(self, layer, method, dh, dlogdet, dc, **kw):
        """One layer's backward: (dh, dc) with the layer's context gradient added to dc."""
        out = getattr(layer, method)(dh, dlogdet, **kw)
        if not layer.context_dim:
            return out, dc
        dh, dcl = out
        return dh, (dcl if dc is None else dc + dcl)

    def _check_layer(self, i, direction, y, ld, inp):
        xp = backend.array_module(y)
        if bool(xp.isfinite(y).all()) and bool(xp.isfinite(ld).all()):
            return
        layer = self.layers[i]
        what = "output" if not bool(xp.isfinite(y).all()) else "log-det"
        lo, hi = float(xp.min(inp)), float(xp.max(inp))
        extra = ""
        if isinstance(layer, AffineCoupling):
            extra = (f"; its scale clamp is {layer.scale!r}" +
                     (" (unbounded: exp(s) overflowed, use scale='tanh')" if layer.scale == "none" else ""))
        elif isinstance(layer, LogitTransform):
            extra = "; LogitTransform expects data in [0, 1]"
        if not bool(xp.isfinite(inp).all()):
            detail = "its input already held non-finite values"
        else:
            detail = f"its input lies in [{lo:.4g}, {hi:.4g}]"
        raise FloatingPointError(f"flow layer {i} ({type(layer).__name__}) produced a non-finite {what} in the "
                                 f"{direction} pass; {detail}{extra}")

    def forward(self, x, context=None):
        """z = f(x; c) and the summed log|det df/dx| per row (caches for :meth:`backward`)."""
        self._validate("x", x)
        context = self._context(context, x.shape[0])
        xp = backend.array_module(x)
        logdet = xp.zeros(x.shape[0], dtype=x.dtype)
        h = x
        for i, layer in enumerate(self.layers):
            y, ld = self._run(layer, "forward", h, context)
            if self.checked == "layers":
                self._check_layer(i, "forward", y, ld, h)
            logdet += ld
            h = y
        return h, logdet

    def backward(self, dz, dlogdet=None, need_dx=True):
        """dx from dL/dz (B, D) and dL/dlogdet (B,); accumulates every parameter gradient.
        ``need_dx=False`` (a loss of the data): the first layer may skip dx and None is returned.
        A conditional flow returns (dx, dc), dc (B, context_dim) = sum over its conditional layers."""
        dc = None
        for i in range(len(self.layers) - 1, -1, -1):
            dz, dc = self._back(self.layers[i], "backward", dz, dlogdet, dc, need_dx=need_dx or i > 0)
        dz = dz if need_dx else None
        return (dz, dc) if self.context_dim else dz

    def inverse(self, z, logdet=False, context=None):
        """x = f^-1(z; c) (and log|det df^-1/dz| per row when ``logdet``); caches for :meth:`inverse_backward`.

        Unless ``checked="off"``: ValueError when z is not finite, and FloatingPointError naming the first
        layer whose inverse output or log-det overflowed (e.g. exp(-s) of an unbounded scale)."""
        self._validate("z", z)
        if self.checked != "off":
            backend.check_finite("z", z)
        context = self._context(context, z.shape[0])
        xp = backend.array_module(z)
        total = xp.zeros(z.shape[0], dtype=z.dtype)
        h = z
        for i in range(len(self.layers) - 1, -1, -1):
            x, ld = self._run(self.layers[i], "inverse", h, context, logdet=True)
            if self.checked == "layers":
                self._check_layer(i, "inverse", x, ld, h)
            total += ld
            h = x
        if self.checked == "loss" and not (bool(xp.isfinite(h).all()) and bool(xp.isfinite(total).all())):
            self.diagnose_inverse(z, context)
        return (h, total) if logdet else h

    def diagnose_inverse(self, z, context=None):
        """Replay the inverse of ``z`` layer by layer and raise FloatingPointError at the first layer whose
        output or log-det is not finite (ValueError when ``z`` itself is not). None when all is finite."""
        backend.check_finite("z", z)
        h = z
        for i in range(len(self.layers) - 1, -1, -1):
            x, ld = self._run(self.layers[i], "inverse", h, context, logdet=True)
            self._check_layer(i, "inverse", x, ld, h)
            h = x

    def inverse_backward(self, dx, dlogdet=None):
        """dz from dL/dx of x = f^-1(z) (and dL/dlogdet_inv); accumulates parameter gradients.
        A conditional flow returns (dz, dc)."""
        dc = None
        for layer in self.layers:
            dx, dc = self._back(layer, "inverse_backward", dx, dlogdet, dc)
        return (dx, dc) if self.context_dim else dx

    def log_prob(self, x, context=None):
        """log p(x) per row (nats): log p_Z(f(x)) + log|det df/dx|  (log p(x | c) for a conditional flow)."""
        z, logdet = self.forward(x, context)
        return self._prior_f(z) + logdet

    def nll(self, x, batch_size=1000, context=None):
        """Mean negative log-likelihood (nats, float) over ``x`` (given ``context``), in batches (no gradients).
        ValueError for an empty or non-finite ``x``."""
        return self.nll_terms(x, batch_size, context)["nll"]

    def nll_terms(self, x, batch_size=1000, context=None):
        """The mean NLL over ``x`` and its two terms, floats in nats, in batches (no gradients):

            -nll = logprior + logdet,  logprior = mean_i log p_Z(f(x_i)),  logdet = mean_i log|det df/dx (x_i)|.

        The prior term alone is largest when every z = f(x) is 0 (the prior's mode); the log-det term
        rewards f for expanding space around the data: the tension the likelihood balances.
        ValueError for an empty or non-finite ``x``."""
        self._validate("x", x)
        if x.shape[0] == 0:
            raise ValueError(f"x is empty (shape {tuple(x.shape)}): the mean NLL needs at least one row")
        backend.check_finite("x", x)
        context = self._context(context, x.shape[0])
        batch_size = check_int(batch_size, "batch_size", lo=1)
        prior = logdet = 0.0
        for s in range(0, x.shape[0], batch_size):
            c = None if context is None else context[s:s + batch_size]
            z, ld = self.forward(x[s:s + batch_size], c)
            prior += float(self._prior_f(z).sum())
            logdet += float(ld.sum())
        n = x.shape[0]
        return {"nll": -(prior + logdet) / n, "logprior": prior / n, "logdet": logdet / n}

    def train_step(self, x, rng=None, shard=slice(None), context=None):
        """One training step's gradient, added into ``grads`` (the loop zeroes them): the rows ``shard`` of
        the batch x (B, dim) (one process's share of a data-parallel batch) through :meth:`loss_and_grad`
        (and of ``context`` (B, context_dim) for a conditional flow).
        A flow's loss needs no noise (``rng`` is unused; images are dequantized before). Returns
        {"loss", "nll", "logprior", "logdet"} (0-d arrays; -nll = logprior + logdet,
        see :meth:`loss_terms_and_grad`)."""
        t = self.loss_terms_and_grad(x[shard], zero_grad=False, context=None if context is None else context[shard])
        return {"loss": t["nll"], **t}

    def loss_and_grad(self, x, zero_grad=True, context=None):
        """Mean NLL in nats over the batch (0-d array) and the gradient of every parameter in ``grads``
        (conditional flow: of -log p(x | c) for the rows of ``context``).

        L = -(1/B) sum_i [log p_Z(z_i) + logdet_i]:  dL/dlogdet_i = -1/B,  dL/dz_i = -(1/B) d log p_Z / dz_i.
        """
        return self.loss_terms_and_grad(x, zero_grad, context)["nll"]

    def loss_terms_and_grad(self, x, zero_grad=True, context=None):
        """:meth:`loss_and_grad` and the likelihood's two terms, 0-d arrays in nats:
        {"nll": L, "logprior": (1/B) sum_i log p_Z(z_i), "logdet": (1/B) sum_i logdet_i}, -L = logprior + logdet."""
        if zero_grad:
            self.zero_grad()
        z, logdet = self.forward(x, context)
        prior = self._prior_f(z)
        lp = prior + logdet
        loss = -lp.mean()
        if self.checked != "off" and not math.isfinite(float(loss)):
            self.diagnose(x, context)
            raise FloatingPointError(f"the flow's loss is {float(loss)} although every layer output is finite; "
                                     f"the {self.prior} prior log-density overflowed (|z| up to "
                                     f"{float(backend.array_module(z).abs(z).max()):.4g})")
        xp = backend.array_module(x)
        dlp = xp.full(x.shape[0], -1.0 / x.shape[0], dtype=x.dtype)
        self.backward(self._prior_b(dlp, z), dlp, need_dx=False)
        return {"nll": loss, "logprior": prior.mean(), "logdet": logdet.mean()}

    def reverse_kl_and_grad(self, z, target, zero_grad=True):
        """Reverse KL to an unnormalised target p* through the flow's own samples x_b = f^-1(z_b), z (B, D) drawn
        from the prior and held fixed (the reparameterisation: the noise is an argument). ``target(x) -> (log p*,
        d log p*/dx)`` (e.g. :mod:`npdgm.targets`). With log q(x_b) = log p_Z(z_b) - logdet_inv_b,

            L = (1/B) sum_b [log q(x_b) - log p*(x_b)]  ~  KL(q || p*/Z) - log Z,
            dL/dx_b = -(1/B) d log p*/dx (x_b),   dL/dlogdet_inv_b = -1/B   (log p_Z(z_b) holds no parameter),

        which :meth:`inverse_backward` carries through the sampling direction into ``grads``. Returns 0-d arrays
        {"loss": L, "logprior": mean log p_Z(z), "logdet": mean log|det df/dx| at x = -mean logdet_inv,
        "logtarget": mean log p*(x)}: loss = logprior + logdet - logtarget."""
        if zero_grad:
            self.zero_grad()
        x, logdet_inv = self.inverse(z, logdet=True)
        logp, dlogp = target(x)
        prior = self._prior_f(z)
        loss = (prior - logdet_inv - logp).mean()
        if self.checked != "off" and not math.isfinite(float(loss)):
            raise FloatingPointError(f"the reverse KL is {float(loss)}: the target's log-density at the flow's "
                                     f"samples is not finite (|x| up to {float(abs(x).max()):.4g})")
        xp = backend.array_module(z)
        b = z.shape[0]
        self.inverse_backward((dlogp * (-1.0 / b)).astype(z.dtype, copy=False),
                              xp.full(b, -1.0 / b, dtype=z.dtype))
        return {"loss": loss, "logprior": prior.mean(), "logdet": -logdet_inv.mean(), "logtarget": logp.mean()}

    def diagnose(self, x, context=None):
        """Replay ``x`` layer by layer and raise FloatingPointError at the first non-finite layer
        (ValueError when ``x`` itself is not finite). Returns None when everything is finite."""
        backend.check_finite("x", x)
        h = x
        for i, layer in enumerate(self.layers):
            y, ld = self._run(layer, "forward", h, context)
            self._check_layer(i, "forward", y, ld, h)
            h = y

    def sample(self, n, temperature=1.0, rng=None, noise=None, context=None):
        """n samples x = f^-1(T z), z ~ prior (host noise from ``rng``: a NumPy Generator or seed, or
        pass ``noise`` (n, D) directly). Returns an (n, D) array on the backend. A conditional flow samples
        p(x | c): ``context`` (n, context_dim), or one row (context_dim,) for all n samples.

        ``temperature`` T: a finite number >= 0 (0 gives f^-1(0), the image of the prior's mode);
        ValueError otherwise, and for non-finite ``noise``. A sample that overflows in a layer raises
        FloatingPointError naming the layer (see :meth:`inverse`; not with ``checked="off"``)."""
        temperature = check_float(temperature, "temperature", lo=0)
        if noise is None:
            n = check_int(n, "n", lo=1)
            noise = C.prior_noise(self.prior, as_rng(rng), (n, self.dim), np.float64)
        noise = np.asarray(backend.to_host(noise), dtype=np.float64)
        _check_input("noise", noise, self.dim)
        backend.check_finite("noise", noise)
        z = backend.to_device(noise * temperature, self._dtype())
        if context is not None and self.context_dim:
            context = np.asarray(backend.to_host(context), dtype=np.float64)
            if context.shape == (self.context_dim,):
                context = np.broadcast_to(context, (z.shape[0], self.context_dim))
            context = backend.to_device(context, self._dtype()) if context.ndim == 2 else context
        return self.inverse(z, context=context)

    def classify(self, x, log_prior=None, batch_size=1000):
        """Bayes' rule with a class-conditional flow (its context the one-hot e_y of C = context_dim classes):
        log p(y|x) (B, C), host float64, per row

            log p(y|x) = log p(x|e_y) + log p(y) - logsumexp_c [log p(x|e_c) + log p(c)],

        log p(x|e_y) exact (one flow pass per class), log p(y) = ``log_prior`` (C,) (default uniform).
        The predicted class is the argmax (:meth:`predict`)."""
        if not self.context_dim:
            raise ValueError("classify needs a class-conditional flow (built with context_dim = the number of "
                             "classes, trained on one-hot labels); this flow takes no context")
        self._validate("x", x)
        C = self.context_dim
        lp = np.full(C, -np.log(C)) if log_prior is None else np.asarray(log_prior, np.float64)
        if lp.shape != (C,) or not np.isfinite(lp).all():
            raise ValueError(f"log_prior must be {C} finite log-probabilities, got {lp!r:.80}")
        batch_size = check_int(batch_size, "batch_size", lo=1)
        xp, eye = backend.array_module(x), np.eye(C)
        rows = []
        for s in range(0, x.shape[0], batch_size):
            xb = x[s:s + batch_size]
            rows.append(np.stack([np.asarray(backend.to_host(self.log_prob(xb, xp.asarray(
                np.broadcast_to(eye[k], (xb.shape[0], C)), dtype=xb.dtype))), np.float64) for k in range(C)], 1))
        joint = np.concatenate(rows) + lp
        m = joint.max(axis=1, keepdims=True)
        return joint - (m + np.log(np.exp(joint - m).sum(axis=1, keepdims=True)))

    def predict(self, x, log_prior=None, batch_size=1000):
        """argmax_y p(y|x) of :meth:`classify`, (B,) host integers."""
        return self.classify(x, log_prior, batch_size).argmax(axis=1)

    def __repr__(self):
        return (f"Flow({len(self.layers)} layers: "
                f"{', '.join(type(layer).__name__ for layer in self.layers)}; prior={self.prior}; "
                f"{self.num_parameters()} parameters)")


# -- factories ---------------------------------------------------------------------------------------
def nice(dim=784, n_couplings=4, hidden=1000, n_hidden=5, prior="logistic", activation="relu", logit=False,
         seed=0, checked="loss"):
    """NICE (Dinh et al. 2014): ``n_couplings`` additive couplings, each m an MLP
    D/2 -> ``n_hidden`` x ``hidden`` (ReLU) -> D/2, half split alternating which half conditions,
    then a diagonal Scaling; logistic prior. Same model as ``npdgm.bench.torch_models.NICE``."""
    layers = [LogitTransform(dim)] if logit else []
    layers += [AdditiveCoupling(dim, "half", i % 2, [hidden] * n_hidden, activation, seed=seed * 1000 + i)
               for i in range(n_couplings)]
    layers.append(Scaling(dim))
    return Flow(layers, prior=prior, checked=checked)


def realnvp2d(n_couplings=8, hidden=(256, 256), scale="tanh", scale_bound=1.0, prior="gaussian",
              activation="relu", actnorm=False, seed=0, checked="loss", context_dim=0):
    """RealNVP on R^2: ``n_couplings`` affine couplings, coupling i conditions on coordinate i % 2;
    (raw, t) = MLP 1 -> hidden -> 2, s = clamp(raw) (tanh: s = tanh(raw) for bound 1). Gaussian prior.
    Same model as ``npdgm.bench.torch_models.RealNVP2d`` (without ``actnorm``). ``context_dim`` C > 0: p(x | c),
    every coupling net sees [x_a | c] (MLP 1 + C -> hidden -> 2)."""
    layers = []
    for i in range(n_couplings):
        if actnorm:
            layers.append(ActNorm(2))
        layers.append(AffineCoupling(2, "half", i % 2, hidden, activation, scale, scale_bound, seed=seed * 1000 + i,
                                     context_dim=context_dim))
    return Flow(layers, prior=prior, checked=checked)


def realnvp(dim=784, n_couplings=8, hidden=(512, 512), mask="checkerboard", image_shape=(28, 28), scale="tanh",
            scale_bound=2.0, actnorm=True, logit=True, alpha=0.05, prior="gaussian", activation="relu", seed=0,
            checked="loss", actnorm_eps=1.0, context_dim=0):
    """Affine-coupling flow for flattened images: [LogitTransform] then ``n_couplings`` x
    ([ActNorm] + AffineCoupling with ``mask`` alternating parity). MLP coupling nets (no convolutions).

    ``actnorm_eps`` floors the ActNorm init, log_scale = -log(std + eps): per-pixel ActNorm on MNIST sees
    border pixels that are (nearly) constant in the init batch; with a tiny eps they get scales ~60x per
    layer and the first batches where they light up give losses of 1e6-1e8 nats (measured); eps = 1 keeps
    the init close to Glow's on informative pixels (std ~ 2-3 in logit space) and stable elsewhere.
    ``context_dim`` C > 0: p(x | c) (e.g. c the one-hot class), every coupling net sees [x_a | c]."""
    layers = [LogitTransform(dim, alpha)] if logit else []
    for i in range(n_couplings):
        if actnorm:
            layers.append(ActNorm(dim, eps=actnorm_eps))
        shape = image_shape if mask in ("checkerboard", "channel") else None
        layers.append(AffineCoupling(dim, mask, i % 2, hidden, activation, scale, scale_bound, image_shape=shape,
                                     seed=seed * 1000 + i, context_dim=context_dim))
    return Flow(layers, prior=prior, checked=checked)


def maf2d(n_layers=8, hidden=(256, 256), scale="tanh", scale_bound=1.0, prior="gaussian", activation="relu", seed=0,
          checked="loss", context_dim=0):
    """MAF on R^2: ``n_layers`` MAF layers (MADE 2 -> hidden -> 4, z = (x - mu) e^-alpha, alpha = clamp(raw))
    with a reversing Permutation between consecutive layers. Gaussian prior. On R^2 each layer is an affine
    map of x_0 and an affine transform of x_1 conditioned on x_0 (MADE's hidden units all have degree 1)."""
    return maf(2, n_layers, hidden, "reverse", logit=False, scale=scale, scale_bound=scale_bound, prior=prior,
               activation=activation, seed=seed, checked=checked, context_dim=context_dim)


def maf(dim=784, n_layers=5, hidden=(512, 512), ordering="reverse", logit=True, alpha=0.05, scale="tanh",
        scale_bound=2.0, prior="gaussian", activation="relu", seed=0, checked="loss", actnorm=False, actnorm_eps=1.0,
        context_dim=0):
    """Masked autoregressive flow (Papamakarios et al. 2017): [LogitTransform] then ``n_layers`` MAF layers with
    a Permutation (``ordering`` "reverse" or "random", seeded per layer) between consecutive ones, and with
    ``actnorm`` an ActNorm before each MAF layer (the paper's batch norm between layers, as data-dependent init;
    ``actnorm_eps`` as in :func:`realnvp`). Density in one MADE pass per layer, sampling in D passes per layer.
    ``context_dim`` C > 0: p(x | c), every MADE sees [x | c]."""
    if ordering not in ("reverse", "random"):
        raise ValueError(f"unknown ordering {ordering!r}; expected 'reverse' or 'random'")
    layers = [LogitTransform(dim, alpha)] if logit else []
    for i in range(check_int(n_layers, "n_layers", lo=1)):
        if i:
            layers.append(Permutation(dim, ordering, seed=seed * 1000 + i))
        if actnorm:
            layers.append(ActNorm(dim, eps=actnorm_eps))
        layers.append(MAF(dim, hidden, activation, scale, scale_bound, seed=seed * 1000 + i, context_dim=context_dim))
    return Flow(layers, prior=prior, checked=checked)


def spline2d(n_couplings=8, hidden=(64, 64), bins=8, bound=5.0, prior="gaussian", activation="relu", seed=0,
             checked="loss", min_width=1e-3, min_height=1e-3, min_derivative=1e-3, identity_init=True, context_dim=0):
    """Rational-quadratic spline flow on R^2 (Durkan et al. 2019): ``n_couplings`` SplineCoupling layers,
    coupling i conditioning on coordinate i % 2, ``bins`` bins on [-bound, bound], identity tails;
    ``identity_init``: every coupling starts as the identity (last net layer 0). The bound must cover the data:
    a point beyond it stays in the identity tail through every layer (the toy sets reach |x| ~ 3.4)."""
    return Flow([SplineCoupling(2, "half", i % 2, hidden, activation, bins, bound, min_width, min_height,
                                min_derivative, seed=seed * 1000 + i, identity_init=identity_init,
                                context_dim=context_dim)
                 for i in range(n_couplings)], prior=prior, checked=checked)


def glow(image_shape=(1, 28, 28), levels=2, depth=4, hidden=64, logit=False, alpha=0.05, prior="gaussian", seed=0,
         checked="loss", actnorm_eps=1e-6):
    """Glow (Kingma & Dhariwal 2018) on flattened (C, H, W) images: [LogitTransform], then ``levels`` levels of
    Squeeze + ``depth`` steps of (ChannelActNorm, InvertibleConv1x1, ConvAffineCoupling with ``hidden`` channels),
    and after every level but the last a split: the next level works on the first half of the channels and the
    second half is factored out to the standard normal prior (layers of :mod:`npdgm.models.glow_layers`).

    MNIST (1, 28, 28) with 2 levels: (4, 14, 14) -> split -> (2, 14, 14) -> squeeze (8, 7, 7); 3 levels would
    need H and W divisible by 8 (pad to 32 first). ``actnorm_eps`` as ChannelActNorm's eps (openai/glow: 1e-6)."""
    C, H, W = (check_int(s, "image_shape entry", lo=1) for s in image_shape)
    levels, depth = check_int(levels, "levels", lo=1), check_int(depth, "depth", lo=1)
    if H % 2 ** levels or W % 2 ** levels:
        raise ValueError(f"glow with {levels} levels squeezes {levels} times: H and W must be divisible by "
                         f"{2 ** levels}, got {H}x{W}")
    dim = C * H * W
    layers = [LogitTransform(dim, alpha)] if logit else []
    shape = (C, H, W)
    for level in range(levels):
        squeeze = Squeeze(dim, shape)
        layers.append(squeeze)
        shape = squeeze.out_shape
        for k in range(depth):
            i = seed * 1000 + level * depth + k
            layers += [ChannelActNorm(dim, shape, eps=actnorm_eps), InvertibleConv1x1(dim, shape, seed=i),
                       ConvAffineCoupling(dim, shape, hidden, seed=i)]
        if level < levels - 1:  # split: the last C/2 channels leave for the prior
            shape = (shape[0] // 2, shape[1], shape[2])
    return Flow(layers, prior=prior, checked=checked)
