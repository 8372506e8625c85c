"""A plain and a denoising autoencoder: the baselines the VAE is compared with.

Model (deterministic code, no prior):
    z     = g(x~)                     encoder MLP x_dim -> hidden -> z_dim (no output activation)
    x~    = x * m,  m_d ~ Bernoulli(1 - P)   masking noise (Vincent et al. 2008); P = ``denoise`` (0: plain AE, x~ = x)
    out   = f(z)                      decoder MLP z_dim -> reversed(hidden) -> x_dim, logits
    loss  = mean_b sum_d softplus(out_bd) - x_bd out_bd       BCE from logits of the CLEAN x, nats per image

The loss is the VAE's reconstruction term with q(z|x) collapsed onto a point and no KL: nothing ties the
codes to N(0, I), so decoding z ~ N(0, I) (:meth:`Autoencoder.sample`) lands where no training code lies;
``npdgm train ae`` draws that beside a VAE's samples (docs/autoencoders.md).

Backward (kernels of :mod:`npdgm.kernels`):
    dout = (1 / B) (sigmoid(out) - x)         bernoulli_nll_backward
    dz   = decoder.backward(dout)
    encoder.backward(dz)                      (the mask is data: x~ gets no gradient)
"""
from __future__ import annotations

import numpy as np

from .. import backend
from ..kernels import bernoulli_nll_backward, bernoulli_nll_forward, sigmoid_forward
from ..nn import INITS, MLP
from ..validate import check_float, check_int
from .base import Model
from .elbo import draw, generator
from .registry import register_model
from .vae import _check_x

__all__ = ["Autoencoder"]


@register_model
class Autoencoder(Model):
    """Deterministic autoencoder with a Bernoulli (BCE-from-logits) decoder; ``denoise`` = P > 0 makes it a
    denoising autoencoder (each input pixel zeroed with probability P during training).

    Parameters: x_dim, hidden (encoder sizes; the decoder uses them reversed), z_dim, activation, denoise,
    seed, init. Parameter names ``encoder.{0,2,..}.W/b``, ``decoder.{0,2,..}.W/b`` as in the VAE, whose
    encoder differs only by the second (log-variance) half of its last layer."""

    kind = "ae"
    likelihood = "bernoulli"

    def __init__(self, x_dim=784, hidden=(400,), z_dim=20, activation="relu", denoise=0.0, seed=0, init="torch"):
        x_dim, z_dim = check_int(x_dim, "x_dim", lo=1), check_int(z_dim, "z_dim", lo=1)
        if isinstance(hidden, (int, np.integer)):
            hidden = (hidden,)
        hidden = [check_int(h, "hidden size", lo=1) for h in hidden]
        denoise = check_float(denoise, "denoise", lo=0)
        if denoise >= 1:
            raise ValueError(f"denoise is the probability of zeroing an input pixel: need 0 <= P < 1, got {denoise}")
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; expected one of {INITS}")
        seed = check_int(seed, "seed", lo=0)
        super().__init__(x_dim=x_dim, hidden=hidden, z_dim=z_dim, activation=activation, denoise=float(denoise),
                         seed=seed, init=init)
        self.x_dim, self.z_dim, self.hidden, self.denoise = x_dim, z_dim, hidden, float(denoise)
        dtype, host = backend.get_dtype(), np.random.default_rng(seed)
        self.encoder = MLP(x_dim, hidden, z_dim, activation=activation, init=init, rng=host, dtype=dtype)
        self.decoder = MLP(z_dim, hidden[::-1], x_dim, activation=activation, init=init, rng=host, dtype=dtype)
        object.__setattr__(self, "_noise", backend.rng(seed))
        self.flatten()

    def check_x(self, x, name="x"):
        """x as a model-dtype (B, x_dim) array in [0, 1] (ValueError naming ``name`` otherwise)."""
        return _check_x(self, x, name)

    def corrupt_mask(self, rng, shape):
        """The masking noise of one batch: True = pixel kept, each with probability 1 - denoise (all True for a
        plain AE), drawn in float32 from the host Generator ``rng`` (same numbers on every backend)."""
        if not self.denoise:
            return None
        return backend.to_device(rng.random(shape, dtype=np.float32) >= self.denoise)

    def _forward(self, x, keep):
        x_in = x if keep is None else self.xp.where(keep, x, 0).astype(self.dtype, copy=False)
        out = self.decoder.forward(self.encoder.forward(x_in))
        recon = bernoulli_nll_forward(out, x).mean()
        return recon, out

    def loss(self, x, keep=None):
        """Forward only: ``(loss, terms)`` with terms {"loss", "recon"} (BCE of the clean x, nats per image)."""
        recon, _ = self._forward(self.check_x(x), keep)
        return recon, {"loss": recon, "recon": recon}

    def loss_and_grad(self, x, keep=None, *, zero_grad=True, check=True):
        """The batch-mean BCE of the clean x given the code of x * keep (``keep`` (B, x_dim) bool, None: x) and
        its gradient into ``grads`` (zeroed first unless ``zero_grad=False``). Returns ``(loss, terms)``."""
        x = self.check_x(x) if check else x
        recon, out = self._forward(x, keep)
        if zero_grad:
            self.zero_grad()
        dout = bernoulli_nll_backward(self.xp.full(x.shape[0], 1.0 / x.shape[0], dtype=self.dtype), out, x)
        self.encoder.backward(self.decoder.backward(dout), need_dx=False)
        return recon, {"loss": recon, "recon": recon}

    def train_step(self, x, rng, shard=slice(None)):
        """One step's gradient, added into ``grads``: the masking noise for the whole batch from the run's ``rng``,
        then the rows ``shard`` through :meth:`loss_and_grad`. Returns the step's terms."""
        keep = self.corrupt_mask(rng, x.shape)
        _, t = self.loss_and_grad(x[shard], None if keep is None else keep[shard], zero_grad=False, check=False)
        return t

    def encode(self, x):
        """The code z = g(x), (B, z_dim) (no noise: the clean input)."""
        return self.encoder.forward(self.check_x(x)).copy()

    def decode(self, z):
        """sigmoid(f(z)), (n, x_dim)."""
        return sigmoid_forward(self.decoder.forward(self.check_z(z)))

    def reconstruct(self, x, keep=None):
        """decode(g(x * keep)): the reconstruction (of a corrupted input, for a denoising AE's figure)."""
        x = self.check_x(x)
        x_in = x if keep is None else self.xp.where(keep, x, 0).astype(self.dtype, copy=False)
        return sigmoid_forward(self.decoder.forward(self.encoder.forward(x_in)))

    def sample(self, n, rng=None, mean=True):
        """decode(z), z ~ N(0, I): what sampling an autoencoder as if it were a VAE gives (nothing makes the codes
        N(0, I), so these are mostly not digits). ``mean`` is accepted for the VAE's signature."""
        return self.decode(draw(self, (check_int(n, "n", lo=1), self.z_dim), generator(self, rng)))
