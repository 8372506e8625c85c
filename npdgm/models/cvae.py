"""Conditional VAE (Sohn et al. 2015: conditional generation, p(x|y)) with a hand-written backward.

Model, for a label y in {0..C-1} given as a one-hot row e_y concatenated to the inputs:

    q(z|x, y) = N(mu, diag exp(logvar)),  [mu | logvar] = encoder([x | e_y])    MLP x_dim + C -> hidden -> 2 z_dim
    p(z)      = N(0, I)
    p(x|z, y) = Bernoulli(sigmoid(f([z | e_y])))   (or Gaussian, as in :class:`npdgm.VAE`)
                                                  decoder MLP z_dim + C -> reversed(hidden) -> x_dim

Loss (:meth:`CVAE.loss_and_grad`), in nats per image like the VAE: summed over pixels and latent
dimensions, averaged over the batch, with K = n_samples noise draws eps_k ~ N(0, I):

    loss = mean_b [ (1/K) sum_k -log p(x_b | z_bk, y_b) ] + beta * mean_b KL(q(z|x_b, y_b) || N(0, I))

(= -ELBO of log p(x|y) for beta = 1). The backward is the VAE's (:mod:`npdgm.models.elbo`); the only new
piece is the first layer of each network, ``[x | s e_y] @ W + b = x @ W[:D] + s W[D + y] + b``
(:class:`npdgm.nn.ConditionalMLP`, whose docstring has its gradient), s = ``label_scale``.

Why a label scale s: with s = 1 the label adds one weight to a decoder unit's pre-activation while z adds
z_dim weights times N(0, 1) inputs, and Adam moves every weight by about lr a step, so the z path learns
~sqrt(z_dim) times faster. z then carries the digit's class, the label becomes redundant, and the KL term frees z
of it only slowly (at most log C nats per image). Measured with ``npdgm train cvae`` (z_dim 20, the 10k bundled
images) and softmax regression trained on real digits labelling 1000 class-conditional samples: s = 1, 5 epochs:
38 % get their own label (the rows of classes.png are the same digits); s = 5: 97.5 % (10 epochs: 93.4 %);
s = 10: 99.6 % (10 epochs: 96.4 %, test -ELBO 113.6 against s = 5's 113.8). s = 10 (about 2 sqrt(z_dim)) is
``npdgm train cvae --label-scale``'s default; s = 1 is the plain one-hot (the constructor's default).
"""
from __future__ import annotations

import numpy as np

from .. import backend
from .registry import register_model
from ..kernels import kl_std_normal_forward, reparameterize_forward, sigmoid_forward
from ..nn import ConditionalMLP, Parameter
from .base import Model
from ..validate import check_float, check_int
from .elbo import ELBOMixin, draw as _draw, generator as _generator, iwae_estimate
from .vae import _check_x, check_vae_options

__all__ = ["CVAE", "LabelConditioned", "ConditionalMLP", "check_labels", "one_hot"]


def check_labels(y, n, num_classes, name="y"):
    """Validate class labels and return them as an int64 host array of shape (n,).

    TypeError unless integer-valued (bool and non-integer floats are refused); ValueError when the
    count does not match the n images or a label lies outside [0, num_classes)."""
    y = backend.to_host(y) if hasattr(y, "dtype") else np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of class labels, got shape {y.shape}")
    if y.shape[0] != n:
        raise ValueError(f"{name} has {y.shape[0]} labels but there are {n} images; they must match")
    if y.dtype.kind == "b" or y.dtype.kind not in "iuf":
        raise TypeError(f"{name} must hold integer class labels, got dtype {y.dtype}")
    if y.dtype.kind == "f":
        if not (np.all(np.isfinite(y)) and np.all(y == np.round(y))):
            bad = y[~(np.isfinite(y) & (y == np.round(y)))][:3]
            raise TypeError(f"{name} must hold integer class labels, found non-integer values such as {bad.tolist()}")
    y = y.astype(np.int64)
    if n and (y.min() < 0 or y.max() >= num_classes):
        bad = y[(y < 0) | (y >= num_classes)][:3]
        raise ValueError(f"{name} must lie in [0, {num_classes}) (num_classes={num_classes}), found {bad.tolist()}")
    return y


def one_hot(y, num_classes, dtype, xp=np):
    """(n, C) rows e_y on the backend of ``xp`` (y: host int array)."""
    e = np.zeros((len(y), num_classes), dtype=dtype)
    e[np.arange(len(y)), y] = 1
    return xp.asarray(e)


class LabelConditioned(Model):
    """What CVAE and M2 share: a label-conditioned encoder/decoder pair (``self.encoder``,
    ``self.decoder``: ConditionalMLPs), input and label checks, and q(z|x, y)."""

    def _build_nets(self, host, dtype, activation, init):
        """The encoder [x | e_y] -> hidden -> [mu | logvar] and the decoder [z | e_y] -> reversed hidden ->
        x, drawn from the host generator ``host`` in that order; a learned per-pixel ``logvar_x`` for a
        Gaussian likelihood without a fixed sigma. Then the parameters are flattened."""
        C, hidden = self.num_classes, self.hidden
        self.encoder = ConditionalMLP(self.x_dim, C, hidden, 2 * self.z_dim, activation=activation, init=init,
                                      rng=host, dtype=dtype)
        self.decoder = ConditionalMLP(self.z_dim, C, hidden[::-1], self.x_dim, activation=activation, init=init,
                                      rng=host, dtype=dtype)
        if self.likelihood == "gaussian" and self.sigma is None:
            self.logvar_x = Parameter(backend.to_device(np.zeros(self.x_dim), dtype))
        self.flatten()

    def check_x(self, x, name="x"):
        return _check_x(self, x, name)

    def check_y(self, y, n, name="y"):
        return check_labels(y, n, self.num_classes, name)

    def _onehot(self, y):
        return one_hot(y, self.num_classes, self.dtype, self.xp)

    def encode(self, x, y):
        """(mu, logvar) of q(z|x, y), each (B, z_dim)."""
        x = self.check_x(x)
        h = self.encoder.forward(x, self._onehot(self.check_y(y, x.shape[0])))
        return h[:, :self.z_dim].copy(), h[:, self.z_dim:].copy()

    def _decode_raw(self, z, y):
        """Decoder output (logits / means) for latents z (n, z_dim) under labels y (n,)."""
        z = self.check_z(z)
        return self.decoder.forward(z, self._onehot(self.check_y(y, z.shape[0])))


@register_model
class CVAE(ELBOMixin, LabelConditioned):
    """Conditional VAE: encoder q(z|x, y), decoder p(x|z, y), y one-hot concatenated to the inputs.

    Parameters (kept in :attr:`config`): x_dim, num_classes, hidden (encoder sizes; the decoder uses
    them reversed), z_dim, activation, likelihood ("bernoulli" | "gaussian"), sigma (Gaussian: fixed
    std, or None to learn a per-pixel ``logvar_x``), n_samples (K), beta, seed, init, label_scale (s: the
    label enters as s e_y; module docstring).
    Parameter names: ``encoder.{0,2,..}.W/b`` (encoder.0.W is (x_dim + C, hidden[0]): rows x_dim..
    are the label rows), ``decoder.{0,2,..}.W/b`` (decoder.0.W is (z_dim + C, .)), [``logvar_x``].
    """

    kind = "cvae"

    def __init__(self, x_dim=784, num_classes=10, hidden=(400,), z_dim=20, activation="relu",
                 likelihood="bernoulli", sigma=None, n_samples=1, beta=1.0, seed=0, init="torch", label_scale=1.0):
        num_classes = check_int(num_classes, "num_classes", lo=1)
        label_scale = check_float(label_scale, "label_scale", lo=0, strict_lo=True)
        x_dim, hidden, z_dim, sigma, n_samples, beta, seed = check_vae_options(
            x_dim, hidden, z_dim, activation, likelihood, sigma, n_samples, beta, seed, init)
        super().__init__(x_dim=x_dim, num_classes=num_classes, hidden=list(hidden), z_dim=z_dim,
                         activation=activation, likelihood=likelihood, sigma=sigma, n_samples=n_samples,
                         beta=float(beta), seed=seed, init=init, label_scale=label_scale)
        self.x_dim, self.num_classes, self.z_dim, self.hidden = x_dim, num_classes, z_dim, hidden
        self.label_scale = label_scale
        self.likelihood, self.sigma, self.n_samples, self.beta = likelihood, sigma, n_samples, float(beta)
        object.__setattr__(self, "_noise", backend.rng(seed))
        self._build_nets(np.random.default_rng(seed), backend.get_dtype(), activation, init)

    @classmethod
    def from_config(cls, config):
        """A CVAE from a stored config; configs from before ``label_scale`` existed had the plain one-hot (1)."""
        return cls(**{"label_scale": 1.0, **config})

    def _onehot(self, y):
        """s e_y (n, C): the label rows, scaled by ``label_scale``."""
        e = super()._onehot(y)
        return e if self.label_scale == 1.0 else e * self.xp.asarray(self.label_scale, dtype=e.dtype)

    # -- the loss and its gradient -------------------------------------------------------------
    def _forward(self, x, e, eps):
        xp, B, Z, K = self.xp, x.shape[0], self.z_dim, eps.shape[0]
        h = self.encoder.forward(x, e)
        mu, logvar = h[:, :Z], h[:, Z:]
        z = reparameterize_forward(mu, logvar, eps)                          # (K, B, Z)
        ek = e if K == 1 else xp.broadcast_to(e, (K,) + e.shape).reshape(K * B, -1)
        out = self.decoder.forward(z.reshape(K * B, Z), ek)                  # (K B, D)
        xt = x if K == 1 else xp.broadcast_to(x, (K,) + x.shape).reshape(K * B, -1)
        recon, kl = self._rec_rows(out, xt).mean(), kl_std_normal_forward(mu, logvar).mean()
        loss = recon + self.beta * kl
        return loss, {"loss": loss, "recon": recon, "kl": kl, "nelbo": recon + kl}, (xt, mu, logvar, out)

    def loss(self, x, y, eps=None, rng=None):
        """Forward only: ``(loss, terms)`` as :meth:`loss_and_grad`."""
        x = self.check_x(x)
        y = self.check_y(y, x.shape[0])
        eps = self._eps(eps, x.shape[0], rng)
        loss, terms, _ = self._forward(x, self._onehot(y), eps)
        return loss, terms

    def loss_and_grad(self, x, y, eps=None, rng=None, *, zero_grad=True, check=True):
        """Batch-mean loss (nats per image) and its gradient w.r.t. every parameter.

        x (B, x_dim) images; y (B,) integer labels in [0, num_classes); eps (S, B, z_dim) noise
        (or (B, z_dim); None: n_samples draws from ``rng``, default the model's generator).
        Returns ``(loss, terms)`` with terms {"loss", "recon", "kl", "nelbo"} (0-d arrays);
        ``self.grads`` holds d loss / d param (zeroed first unless ``zero_grad=False``).
        ``check=False`` skips validating x (y is always checked: it is cheap and host-side)."""
        if check:
            x = self.check_x(x)
        y = self.check_y(y, x.shape[0])
        eps = self._eps(eps, x.shape[0], rng, check)
        loss, terms, (xt, mu, logvar, out) = self._forward(x, self._onehot(y), eps)
        if zero_grad:
            self.zero_grad()
        self._elbo_grad((xt, mu, logvar, eps, out))
        return loss, terms

    def train_step(self, x, y, rng):
        """One training step's gradient, added into ``grads`` (the loop zeroes them): n_samples noise draws
        for the labelled batch x (B, x_dim), y (B,) from the run's ``rng`` (:meth:`training_noise`), then
        :meth:`loss_and_grad`. x must be checked already. Returns the step's terms (0-d arrays)."""
        eps = self.training_noise(rng, self.n_samples, x.shape[0])
        _, t = self.loss_and_grad(x, y, eps, check=False, zero_grad=False)
        return {key: t[key] for key in ("loss", "nelbo", "recon", "kl")}

    def __call__(self, *args, **kwargs):
        raise TypeError(f"a {type(self).__name__} has no single forward: call loss(x, y, eps) or "
                        f"loss_and_grad(x, y, eps) for the training loss, log_prob(x, y, k) for log p(x|y), "
                        f"encode(x, y) / decode(z, y), or sample(y)")

    # -- evaluation ----------------------------------------------------------------------------
    def log_likelihood(self, x, y, k=1000, rng=None, chunk=1 << 15):
        """Importance-weighted estimate of log p(x|y) per row (B,), nats (Burda et al. 2016), as
        :meth:`npdgm.VAE.log_likelihood` with the label y (B,) on encoder and decoder:

            log p(x|y) ~= logsumexp_i [log p(x|z_i, y) + log p(z_i) - log q(z_i|x, y)] - log k,  z_i ~ q(z|x, y).

        k samples in blocks of at most ``chunk`` decoder rows; log-weights reduced in float64."""
        x = self.check_x(x)
        y = self.check_y(y, x.shape[0])
        k = check_int(k, "k", lo=1)
        chunk = check_int(chunk, "chunk", lo=1)
        e = self._onehot(y)
        h = self.encoder.forward(x, e)
        mu, logvar = h[:, :self.z_dim].copy(), h[:, self.z_dim:].copy()

        def decode(z, c):
            return self.decoder.forward(z, self.xp.broadcast_to(e, (c,) + e.shape).reshape(c * e.shape[0], -1))
        return iwae_estimate(self, x, mu, logvar, k, rng, chunk, decode, noise=_draw)

    def log_prob(self, x, y, k=1000, rng=None, chunk=1 << 15):
        """log p(x|y) per row (B,), nats: the IWAE estimate with k importance samples. The same method as
        :meth:`log_likelihood` (``log_prob`` is the torch.distributions / flows name; both stay)."""
        return self.log_likelihood(x, y, k=k, rng=rng, chunk=chunk)

    def classify(self, x, k=100, rng=None, log_prior=None, chunk=1 << 15):
        """The Bayes-rule classifier of the generative model: log p(y|x) (B, C), host float64, per row

            log p(y|x) = log p(x|y) + log p(y) - logsumexp_c [log p(x|c) + log p(c)],

        with log p(x|y) the IWAE estimate of :meth:`log_likelihood` (k importance samples from q(z|x, y)
        for each class y: C k decoder passes per image) and log p(y) = ``log_prior`` (C,) (default uniform,
        -log C). The predicted class is the argmax; an IWAE estimate is below log p(x|y) by a gap that
        shrinks with k, so a class whose posterior q(z|x, y) fits worse is penalized a little more."""
        x = self.check_x(x)
        C = self.num_classes
        lp = np.full(C, -np.log(C)) if log_prior is None else np.asarray(log_prior, np.float64)
        if lp.shape != (C,) or not np.isfinite(lp).all():
            raise ValueError(f"log_prior must be {C} finite log-probabilities, got {lp!r:.80}")
        rng = _generator(self, rng)                    # one stream across the classes
        logpx = np.stack([np.asarray(backend.to_host(self.log_likelihood(x, np.full(x.shape[0], c), k, rng, chunk)),
                                     np.float64) for c in range(C)], axis=1)
        joint = logpx + lp
        m = joint.max(axis=1, keepdims=True)
        return joint - (m + np.log(np.exp(joint - m).sum(axis=1, keepdims=True)))

    def predict(self, x, k=100, rng=None):
        """argmax_y p(y|x) of :meth:`classify` (uniform p(y)), (B,) host integers."""
        return self.classify(x, k, rng).argmax(axis=1)

    # -- conditional generation ----------------------------------------------------------------
    def decode(self, z, y):
        """E[x|z, y] (Bernoulli probabilities or the Gaussian mean), (n, x_dim)."""
        out = self._decode_raw(z, y)
        return sigmoid_forward(out) if self.likelihood == "bernoulli" else out

    def sample(self, y, rng=None):
        """E[x|z, y] for z ~ N(0, I), one image per label in ``y`` (n,)."""
        y = self.check_y(y, len(y))
        rng = _generator(self, rng)
        return self.decode(_draw(self, (len(y), self.z_dim), rng), y)

    def class_grid(self, n_per_class=10, rng=0):
        """(C * n, x_dim): row c holds n samples of class c, the same n prior draws z in every row
        (so a column shows one 'style' under every label)."""
        n = check_int(n_per_class, "n_per_class", lo=1)
        z = _draw(self, (n, self.z_dim), rng)
        C = self.num_classes
        zz = self.xp.broadcast_to(z, (C, n, self.z_dim)).reshape(C * n, self.z_dim)
        return self.decode(zz, np.repeat(np.arange(C), n))

    def style_transfer(self, x, y):
        """Encode each x with its label (z = mu(x, y)), decode under every label: (B, C, x_dim)."""
        mu, _ = self.encode(x, y)
        B, C = mu.shape[0], self.num_classes
        zz = self.xp.broadcast_to(mu[:, None], (B, C, self.z_dim)).reshape(B * C, self.z_dim)
        return self.decode(zz, np.tile(np.arange(C), B)).reshape(B, C, self.x_dim)
