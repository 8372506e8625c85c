"""An IAF posterior for the VAE (Kingma et al. 2016): q(z|x) = a Gaussian pushed through K IAF steps.

    z_0 = mu(x) + sigma(x) eps,   eps ~ N(0, I)                  (the encoder's Gaussian, as in the plain VAE)
    z_k = (z_{k-1} - m_k(z_{k-1}, h)) exp(-alpha_k(z_{k-1}, h))   k = 1..K, (alpha_k, m_k) = MADE_k, autoregressive
    log q(z_K|x) = log N(eps; 0, I) - sum_j log sigma_j - sum_k LD_k,   LD_k = log|det dz_k/dz_{k-1}| = -sum_j alpha_kj

Each step is :class:`npdgm.models.autoregressive.IAF` used in its one-pass (sampling) direction, ``inverse``:
one MADE pass, a triangular Jacobian, no iteration. A reversed order (:class:`Permutation`) sits between two
steps so that every coordinate gets conditioned on every other.

The context h (``context=True``, the paper's setup): the encoder's last hidden layer, i.e. the input of its last
Linear (the one that outputs [mu | logvar]), enters every step's MADE as its context (``IAF(context_dim=H)``:
the MADE's input is [z | h], docs/conditional-flows.md). Without it (the default) the steps see z only and the
x-dependence of q comes in through mu(x) and sigma(x) alone. LD_k stays -sum alpha_k: h moves the values of
alpha, not the triangular structure. The math of the loss and its backward: docs/iaf-posterior.md.

Backward: with dz_K (K B, Z) and dLD (K B,) = d L / d (sum_k LD_k), the steps in reverse order,
dz_{k-1} = step.inverse_backward(dz_k, dLD) (a Permutation just permutes back), the MADE gradients
accumulate on the way; dz_0 then goes through the reparameterization as for the plain VAE. With a context
each step also returns dc_k, and dh = sum_b-rows sum_k dc_k (the K samples of an image share its h).
The encoder's backward is split at its last Linear (:func:`encoder_backward`): the Linear's backward of
d[mu | logvar] gives d h through [mu | logvar], dh from the steps is added to it, and the layers below run
their backward on the sum. (The alternative, a second backward pass of dh through the lower layers, would
touch every lower layer twice and double their parameter-gradient work for the same sum.)
"""
from __future__ import annotations

from ..nn.layers import Linear, Sequential
from .autoregressive import IAF
from .flow_layers import Permutation

__all__ = ["POSTERIORS", "parse_posterior", "build_iaf_posterior", "flow_forward", "flow_backward",
           "context_width", "encoder_forward", "encoder_backward"]

POSTERIORS = ("gaussian", "iaf:K")


def parse_posterior(spec):
    """"gaussian" -> 0 IAF steps, "iaf:K" -> K (an int >= 1); anything else is a ValueError naming the forms."""
    if spec == "gaussian":
        return 0
    if isinstance(spec, str) and spec.startswith("iaf:"):
        k = spec[4:]
        if k.isdigit() and int(k) >= 1:
            return int(k)
    raise ValueError(f"posterior must be 'gaussian' or 'iaf:K' with K >= 1 IAF steps (e.g. 'iaf:2'), got {spec!r}")


def build_iaf_posterior(z_dim, steps, hidden, activation="relu", seed=0, context_dim=0):
    """Sequential [IAF, Permutation(reverse), IAF, ...] of ``steps`` IAF layers on z_dim >= 2 latents, each MADE
    with ``hidden`` units (seeds seed, seed + 1, ...); parameters "<index>.made.<layer>.W/b". ``context_dim``
    H > 0: every IAF step takes a context (N, H) (its first MADE weight is (Z + H, hidden[0]), the h rows last)."""
    if z_dim < 2:
        raise ValueError(f"an IAF posterior needs z_dim >= 2 (an autoregressive map of one variable is affine), "
                         f"got z_dim={z_dim}")
    layers = []
    for k in range(steps):
        if k:
            layers.append(Permutation(z_dim, "reverse"))
        layers.append(IAF(z_dim, hidden=tuple(hidden), activation=activation, seed=seed + k, context_dim=context_dim))
    return Sequential(*layers)


def _conditional(layer):
    return bool(getattr(layer, "context_dim", 0))


def flow_forward(flow, z0, context=None):
    """z_K and sum_k LD_k for z_0 (N, Z) (and the steps' context (N, H) when they take one): every step's one-pass
    ``inverse`` with its log-det. Returns (z_K, LD (N,))."""
    z, total = z0, 0
    for layer in flow.layers:
        z, ld = layer.inverse(z, logdet=True, **({"context": context} if _conditional(layer) else {}))
        total = total + ld
    return z, total


def flow_backward(flow, dz, dld):
    """(dz_0 (N, Z), dc) from dz_K (N, Z) and dLD (N,) = d L / d (sum_k LD_k), the steps in reverse; the MADE
    gradients accumulate (each step's last ``inverse`` call is the forward being differentiated). dc (N, H) =
    sum_k dc_k over the steps that take a context (h enters each of them), None when none does."""
    dc = None
    for layer in reversed(flow.layers):
        if _conditional(layer):
            dz, dck = layer.inverse_backward(dz, dld)
            dc = dck if dc is None else dc + dck
        else:
            dz = layer.inverse_backward(dz, dld)
    return dz, dc


def context_width(encoder):
    """H = the width of the encoder's last hidden layer: the input size of its last layer, a Linear."""
    last = encoder.layers[-1]
    if not isinstance(last, Linear):
        raise ValueError(f"an IAF posterior with context needs an encoder whose last layer is a Linear, got "
                         f"{type(last).__name__}")
    return last.in_features


def encoder_forward(encoder, x, context):
    """The encoder output [mu | logvar] (B, 2Z) and, with ``context``, h (B, H): the input of its last Linear
    (the layers below it run one by one, then the Linear); without, (encoder.forward(x), None)."""
    if not context:
        return encoder.forward(x), None
    h = x
    for layer in encoder.layers[:-1]:
        h = layer.forward(h)
    return encoder.layers[-1].forward(h), h


def encoder_backward(encoder, dout, dh=None):
    """Backward of the encoder for d[mu | logvar] = ``dout`` (B, 2Z), plus ``dh`` (B, H) on h, the input of
    its last Linear (the context path, or None: the plain backward). Split at that Linear: with
    out = h W + b,  d h_total = dout W^T + dh,  then the layers below get d h_total (no input gradient
    for x). An encoder that is one Linear has h = x: dh is then a data gradient and is dropped."""
    if dh is None:
        encoder.backward(dout, need_dx=False)
        return
    layers = encoder.layers
    d = layers[-1].backward(dout, need_dx=len(layers) > 1)
    if len(layers) == 1:
        return
    d = d + dh
    for i in range(len(layers) - 2, -1, -1):
        d = layers[i].backward(d, need_dx=i > 0)
