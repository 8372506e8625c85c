"""An IAF posterior for the VAE (Kingma et al. 2016): q(z|x) = a Gaussian pushed through K IAF steps.

    z_0 = mu(x) + sigma(x) eps,   eps ~ N(0, I)                  (the encoder's Gaussian, as in the plain VAE)
    z_k = (z_{k-1} - m_k(z_{k-1})) exp(-alpha_k(z_{k-1}))     k = 1..K, (alpha_k, m_k) = MADE_k, autoregressive
    log q(z_K|x) = log N(eps; 0, I) - sum_j log sigma_j - sum_k LD_k,   LD_k = log|det dz_k/dz_{k-1}| = -sum_j alpha_kj

Each step is :class:`npdgm.models.autoregressive.IAF` used in its one-pass (sampling) direction, ``inverse``:
one MADE pass, a triangular Jacobian, no iteration. A reversed order (:class:`Permutation`) sits between two
steps so that every coordinate gets conditioned on every other. The steps see z only, no encoder context h
(the paper feeds h into every MADE): the x-dependence of q comes in through mu(x) and sigma(x), the steps
are one shared nonlinear reshaping of the Gaussian, and the IAF layer stays the gradchecked layer as it is.
The math of the loss and its backward: docs/iaf-posterior.md.

Backward: with dz_K (K B, Z) and dLD (K B,) = d L / d (sum_k LD_k), the steps in reverse order,
dz_{k-1} = step.inverse_backward(dz_k, dLD) (a Permutation just permutes back), the MADE gradients
accumulate on the way; dz_0 then goes through the reparameterization as for the plain VAE.
"""
from __future__ import annotations

from ..nn.layers import Sequential
from .autoregressive import IAF
from .flow_layers import Permutation

__all__ = ["POSTERIORS", "parse_posterior", "build_iaf_posterior", "flow_forward", "flow_backward"]

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


def build_iaf_posterior(z_dim, steps, hidden, activation="relu", seed=0):
    """Sequential [IAF, Permutation(reverse), IAF, ...] of ``steps`` IAF layers on z_dim >= 2 latents, each MADE
    with ``hidden`` units (seeds seed, seed + 1, ...); parameters "<index>.made.<layer>.W/b"."""
    if z_dim < 2:
        raise ValueError(f"an IAF posterior needs z_dim >= 2 (an autoregressive map of one variable is affine), "
                         f"got z_dim={z_dim}")
    layers = []
    for k in range(steps):
        if k:
            layers.append(Permutation(z_dim, "reverse"))
        layers.append(IAF(z_dim, hidden=tuple(hidden), activation=activation, seed=seed + k))
    return Sequential(*layers)


def flow_forward(flow, z0):
    """z_K and sum_k LD_k for z_0 (N, Z): every step's one-pass ``inverse`` with its log-det. Returns (z_K, LD (N,))."""
    z, total = z0, 0
    for layer in flow.layers:
        z, ld = layer.inverse(z, logdet=True)
        total = total + ld
    return z, total


def flow_backward(flow, dz, dld):
    """dz_0 (N, Z) from dz_K (N, Z) and dLD (N,) = d L / d (sum_k LD_k), the steps in reverse; the MADE
    gradients accumulate (each step's last ``inverse`` call is the forward being differentiated)."""
    for layer in reversed(flow.layers):
        dz = layer.inverse_backward(dz, dld)
    return dz
