"""Variational autoencoder (Kingma & Welling 2014) with its backward written out by hand.

Model
    q(z|x) = N(mu(x), diag exp(logvar(x)))      encoder MLP x_dim -> hidden -> 2*z_dim, ONE head whose
                                                 output row is [mu | logvar] (first z_dim columns: mu)
    p(z)   = N(0, I)
    p(x|z) = Bernoulli(sigmoid(f(z)))            likelihood="bernoulli": decoder outputs logits f(z)
           = N(f(z), sigma^2 I)                  likelihood="gaussian", sigma=<float> (fixed; the MSE form)
           = N(f(z), diag exp(logvar_x))         likelihood="gaussian", sigma=None (learned per-pixel
                                                 log-variance ``logvar_x``, shape (x_dim,), starts at 0)
           = N(m(z), diag exp(v(z)))             likelihood="gaussian", sigma="learned-z" (heteroscedastic: the
                                                 decoder outputs [m | raw], 2 x_dim columns, v = 7 tanh(raw / 7))
    decoder MLP z_dim -> reversed(hidden) -> x_dim, no output activation (logits / means).

Loss (what :meth:`VAE.loss_and_grad` returns), with K = n_samples and eps_k ~ N(0, I):

    z_k   = mu + exp(logvar / 2) * eps_k
    recon = mean_b  (1/K) sum_k  -log p(x_b | z_bk)       summed over the x_dim pixels
    kl    = mean_b  KL(q(z|x_b) || N(0, I))               summed over the z_dim latent dims
    loss  = recon + beta * kl

All three are in nats **per image**: summed over pixels / latent dimensions, averaged over the
batch (this is PyTorch's example ``BCE(reduction="sum") + KLD`` divided by the batch size).
With beta = 1, ``loss`` is the Monte-Carlo estimate of the negative ELBO; ``terms["nelbo"]`` is
always recon + kl (the -ELBO whatever beta is).

Backward (every line is a kernel from :mod:`npdgm.kernels`; shapes for batch B, K samples):

    dlogits = (1/(K B)) (sigmoid(logits) - x)                       Bernoulli      (K B, D)
    dmean   = (1/(K B)) (mean - x) exp(-logvar_x)                   Gaussian       (K B, D)
    dlogvar_x = (1/(K B)) sum 0.5 (1 - (x - mean)^2 exp(-logvar_x))  learned sigma  (D,)
    dz      = decoder.backward(dlogits)                                            (K, B, Z)
    dmu     = sum_k dz_k            + beta/B * mu                   reparam + KL   (B, Z)
    dlogvar = sum_k dz_k eps_k exp(logvar/2)/2 + beta/B * (exp(logvar) - 1)/2
    encoder.backward([dmu | dlogvar])

What a VAE is used for: ``sample(n)`` (generation), ``encode`` (a 2-D latent for
visualization), ``impute(x, mask, steps)`` (encode -> decode iterations on the missing pixels) and
``conditional_mean(x, mask, k)`` (importance-sampled E[x_missing | x_observed]),
``log_prob(x, k)`` = ``log_likelihood(x, k)`` (IWAE estimate of log p(x)), and
``iwae_loss_and_grad(x, eps)`` (the k-sample IWAE bound as a training objective). A VAE has no single
forward pass: ``vae(x)`` raises a TypeError that names these methods. The ELBO / IWAE backward that VAE,
CVAE and M2 share is in :mod:`npdgm.models.elbo`.

    >>> import npdgm, numpy as np
    >>> vae = npdgm.VAE(x_dim=784, hidden=(400,), z_dim=20)
    >>> x = np.random.default_rng(0).random((128, 784), dtype=np.float32)
    >>> loss, terms = vae.loss_and_grad(x)          # vae.grads now holds d loss / d param
    >>> terms["recon"], terms["kl"]
"""
from __future__ import annotations

import numpy as np

from .. import backend
from .registry import register_model
from ..kernels import kl_std_normal_forward, reparameterize_forward, sigmoid_forward
from ..kernels.coupling import gaussian_logprob_backward, gaussian_logprob_forward
from ..kernels.losses import (bernoulli_nll_backward, bernoulli_nll_forward, gaussian_nll_backward,
                              gaussian_nll_forward)
from ..kernels.activations import get_activation
from ..nn import INITS, MLP, Parameter
from ..nn.conv import conv_decoder, conv_encoder
from ..validate import check_float, check_int
from .base import Model
from .elbo import (SIGMA_HEAD, ELBOMixin, head_nll_backward, head_nll_forward, head_split, iwae_backward,
                   iwae_estimate, iwae_forward, log_weights, posterior_sample, variance_head)
from .iaf_posterior import build_iaf_posterior, context_width, encoder_forward, flow_forward, parse_posterior
from ..kernels.gaussian import kl_free_bits_forward
from .elbo import draw as _draw, generator as _generator

__all__ = ["VAE"]

LIKELIHOODS = ("bernoulli", "gaussian")


def check_likelihood(likelihood, sigma, head=False):
    """The decoder likelihood's name and its fixed sigma (None: learned per pixel, "learned-z": a variance head
    sigma_theta(z), only where ``head``; Gaussian only); returns sigma."""
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"unknown likelihood {likelihood!r}; expected one of {LIKELIHOODS}")
    if sigma is not None:
        if likelihood != "gaussian":
            raise ValueError("sigma applies to the Gaussian likelihood only (got likelihood='bernoulli')")
        if sigma == SIGMA_HEAD:
            if not head:
                raise ValueError(f"sigma={SIGMA_HEAD!r} (a decoder variance head) is available in the VAE only; "
                                 f"give a float or None (learned per pixel)")
            return sigma
        if isinstance(sigma, str):
            raise ValueError(f"sigma must be a float, None (learned per pixel) or {SIGMA_HEAD!r} (a variance head "
                             f"sigma_theta(z)), got {sigma!r}")
        sigma = check_float(sigma, "sigma (None: learned)", lo=0, strict_lo=True)
    return sigma


def check_vae_options(x_dim, hidden, z_dim, activation, likelihood, sigma, n_samples, beta, seed, init, head=False):
    """Validate the constructor options shared by VAE and CVAE; returns the normalised
    (x_dim, hidden list, z_dim, sigma, n_samples, beta, seed) or raises ValueError naming the option."""
    x_dim = check_int(x_dim, "x_dim", lo=1)
    z_dim = check_int(z_dim, "z_dim", lo=1)
    if isinstance(hidden, (int, np.integer)):
        hidden = (hidden,)
    hidden = [check_int(h, "hidden size", lo=1) for h in hidden]
    get_activation(activation)
    sigma = check_likelihood(likelihood, sigma, head)
    n_samples = check_int(n_samples, "n_samples", lo=1)
    beta = check_float(beta, "beta", lo=0)
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; expected one of {INITS}")
    return x_dim, hidden, z_dim, sigma, n_samples, beta, check_int(seed, "seed", lo=0)


def _check_x(model, x, name="x"):
    """Validate a batch for a VAE-family model and return it as a model-dtype array on the model's
    backend: ValueError unless x is 2-D (B, x_dim), non-empty, finite and (Bernoulli) in [0, 1]."""
    if not hasattr(x, "ndim"):
        x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (batch, {model.x_dim}), got shape {x.shape}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {x.shape}); need at least one row")
    if x.shape[1] != model.x_dim:
        raise ValueError(f"{name} has width {x.shape[1]} but this {type(model).__name__} has x_dim={model.x_dim} "
                         f"(shape {x.shape})")
    if x.dtype.kind not in "fiub":
        raise TypeError(f"{name} must be a real numeric array, got dtype {x.dtype}")
    xp = model.xp
    x = xp.asarray(x) if backend.array_module(x) is not xp else x
    x = x.astype(model.dtype, copy=False)
    backend.check_finite(name, x)
    if model.likelihood == "bernoulli":
        lo, hi = float(x.min()), float(x.max())
        if lo < 0 or hi > 1:
            raise ValueError(f"{name} must lie in [0, 1] for a Bernoulli decoder (found values in "
                             f"[{lo:g}, {hi:g}]); scale pixels to [0, 1]")
    return x


def _check_fill(model, fill, x_shape):
    """The initial value of missing pixels: a finite scalar, (x_dim,) or x-shaped array, as a model-dtype array."""
    xp = model.xp
    fill = xp.asarray(fill)
    if tuple(fill.shape) not in ((), (model.x_dim,), tuple(x_shape)):
        raise ValueError(f"fill must be a scalar, an ({model.x_dim},) array or the shape of x {tuple(x_shape)}, "
                         f"got shape {tuple(fill.shape)}")
    if fill.dtype.kind not in "fiub":
        raise TypeError(f"fill must be a real number or array, got dtype {fill.dtype}")
    fill = fill.astype(model.dtype, copy=False)
    backend.check_finite("fill", fill)
    return fill


@register_model
class VAE(ELBOMixin, Model):
    """Variational autoencoder with a Gaussian encoder and a Bernoulli or Gaussian decoder.

    Parameters (all kept in :attr:`config`, so ``npdgm.load`` rebuilds the model):
        x_dim       data width (784 for MNIST)
        hidden      hidden layer sizes of the encoder; the decoder uses them reversed
        z_dim       latent size
        activation  hidden activation: relu, tanh, leaky_relu, elu, softplus, sigmoid
        likelihood  "bernoulli" (pixels in [0, 1], logits decoder, BCE from logits) or "gaussian"
        sigma       Gaussian only: fixed standard deviation (float), None to learn a per-pixel
                    log-variance ``logvar_x`` of shape (x_dim,), or "learned-z": a variance head, the
                    decoder's last layer outputs [mean | raw] and v(z) = 7 tanh(raw / 7) per pixel (MLP only)
        n_samples   noise samples per data point in the training loss (K)
        beta        weight of the KL term (1 = the ELBO)
        seed        seed of the weight initialization (and of the default noise generator)
        init        weight init (see ``npdgm.nn.init_weight``; "torch" = PyTorch's Linear default)
        free_bits   L >= 0 nats per latent dimension (Kingma et al. 2016): the loss's KL term becomes
                    sum_j max(L, mean_batch KL_j), no gradient for a dimension under L (0 = off; the
                    reported ``kl`` and ``nelbo`` stay the true ones). Gaussian posterior only.
        posterior   "gaussian" (q(z|x) = N(mu, sigma^2)) or "iaf:K": that Gaussian, then K IAF steps
                    (:mod:`npdgm.models.iaf_posterior`; the KL is then a Monte Carlo estimate)
        iaf_hidden  hidden sizes of each IAF step's MADE (posterior "iaf:K" only)
        iaf_context posterior "iaf:K" only: feed the encoder's last hidden layer h (the input of its last Linear)
                    to every IAF step as its context (Kingma et al. 2016); stored in the config only when True

    Parameter names: ``encoder.{0,2,..}.W/b`` (W is (in, out)), ``decoder.{0,2,..}.W/b``, with a
    learned sigma ``logvar_x``, with an IAF posterior ``flow.<i>.made.<j>.W/b`` (i = 0, 2, ..: the steps,
    a reversing Permutation between two; with ``iaf_context`` each ``made.0.W`` has the H rows of h last);
    all are views into :attr:`flat_params`.
    """

    kind = "vae"

    def __init__(self, x_dim=784, hidden=(400,), z_dim=20, activation="relu", likelihood="bernoulli",
                 sigma=None, n_samples=1, beta=1.0, seed=0, init="torch", free_bits=0.0, posterior="gaussian",
                 iaf_hidden=(200, 200), arch="mlp", channels=(32, 64), image_shape=(1, 28, 28), iaf_context=False):
        if arch not in ("mlp", "conv"):
            raise ValueError(f"arch must be 'mlp' or 'conv', got {arch!r}")
        if arch == "conv":
            channels = [check_int(c, "channels entry", lo=1) for c in channels]
            image_shape = [check_int(a, "image_shape entry", lo=1) for a in image_shape]
            if not channels or len(image_shape) != 3 or int(np.prod(image_shape)) != x_dim:
                raise ValueError(f"arch='conv' needs >= 1 channels and image_shape (C, H, W) with C H W = x_dim "
                                 f"({x_dim}), got channels={channels}, image_shape={image_shape}")
            if np.atleast_1d(hidden).tolist() not in ([], [400]):
                raise ValueError(f"arch='conv' sizes its nets by channels={channels}, not hidden={hidden}")
            hidden = ()
        x_dim, hidden, z_dim, sigma, n_samples, beta, seed = check_vae_options(
            x_dim, hidden, z_dim, activation, likelihood, sigma, n_samples, beta, seed, init, head=True)
        if arch == "conv" and sigma == SIGMA_HEAD:
            raise ValueError(f"sigma={SIGMA_HEAD!r} (a decoder variance head) needs arch='mlp'; the conv decoder "
                             f"outputs the image only")
        free_bits = check_float(free_bits, "free_bits", lo=0)
        steps = parse_posterior(posterior)
        if isinstance(iaf_hidden, (int, np.integer)):
            iaf_hidden = (iaf_hidden,)
        iaf_hidden = [check_int(h, "iaf_hidden size", lo=1) for h in iaf_hidden]
        if free_bits and steps:
            raise ValueError(f"free_bits applies to the Gaussian posterior (its closed-form KL per latent "
                             f"dimension); with posterior={posterior!r} the KL is a Monte Carlo estimate of the "
                             f"whole vector")
        if not isinstance(iaf_context, (bool, np.bool_)):
            raise TypeError(f"iaf_context must be True or False, got {iaf_context!r}")
        if iaf_context and not steps:
            raise ValueError(f"iaf_context (--iaf-context) feeds the encoder's hidden state to the IAF steps: it "
                             f"needs posterior='iaf:K' (--posterior iaf:K), got posterior={posterior!r}")
        extra = {} if not free_bits else {"free_bits": float(free_bits)}
        if steps:
            extra.update(posterior=posterior, iaf_hidden=list(iaf_hidden))
        if iaf_context:
            extra.update(iaf_context=True)
        if arch == "conv":
            extra.update(arch=arch, channels=list(channels), image_shape=list(image_shape))
        super().__init__(x_dim=x_dim, hidden=list(hidden), z_dim=z_dim, activation=activation,
                         likelihood=likelihood, sigma=sigma, n_samples=n_samples, beta=float(beta), seed=seed,
                         init=init, **extra)
        self.free_bits, self.posterior = float(free_bits), posterior
        self.x_dim, self.z_dim, self.hidden = x_dim, z_dim, hidden
        self.likelihood, self.sigma, self.n_samples, self.beta = likelihood, sigma, n_samples, float(beta)
        dtype = backend.get_dtype()
        host = np.random.default_rng(seed)
        if arch == "conv":  # DCGAN-style nets on the (C, H, W) image; x stays a flat vector outside them
            self.encoder = conv_encoder(image_shape, channels, 2 * z_dim, activation, rng=host, dtype=dtype)
            self.decoder = conv_decoder(z_dim, channels, image_shape, activation, rng=host, dtype=dtype)
        else:
            self.encoder = MLP(x_dim, hidden, 2 * z_dim, activation=activation, init=init, rng=host, dtype=dtype)
            out_dim = 2 * x_dim if sigma == SIGMA_HEAD else x_dim          # a variance head: [mean | raw]
            self.decoder = MLP(z_dim, hidden[::-1], out_dim, activation=activation, init=init, rng=host, dtype=dtype)
        if likelihood == "gaussian" and sigma is None:
            self.logvar_x = Parameter(backend.to_device(np.zeros(x_dim), dtype))
        self.iaf_context = bool(iaf_context)
        width = context_width(self.encoder) if self.iaf_context else 0
        self.flow = build_iaf_posterior(z_dim, steps, iaf_hidden, activation, seed + 1, width) if steps else None
        object.__setattr__(self, "_noise", backend.rng(seed))
        self.flatten()

    # -- helpers ------------------------------------------------------------------------------
    def check_x(self, x, name="x"):
        """Validate a batch and return it as a model-dtype array on the model's backend.

        ValueError unless x is 2-D (B, x_dim), non-empty, finite and (Bernoulli) in [0, 1]."""
        return _check_x(self, x, name)

    # -- the loss and its gradient -------------------------------------------------------------
    def _forward(self, x, eps):
        """Forward pass; returns (loss, terms, cache). x validated, eps (K, B, Z)."""
        B, Z, K = x.shape[0], self.z_dim, eps.shape[0]
        h, ctx = encoder_forward(self.encoder, x, self.iaf_context)    # ctx: the last hidden layer, or None
        mu, logvar = h[:, :Z], h[:, Z:]
        if self.flow is None:
            z = reparameterize_forward(mu, logvar, eps)                # (K, B, Z)
        else:
            z, ld = posterior_sample(self, mu, logvar, eps, ctx)       # z_K of the IAF steps, LD (K, B)
        out = self.decoder.forward(z.reshape(K * B, Z))                 # (K B, D)
        xt = x if K == 1 else self.xp.broadcast_to(x, (K,) + x.shape).reshape(K * B, -1)
        recon = self._rec_rows(out, xt).mean()
        if self.flow is not None:                                       # Monte Carlo KL: log q(z_K|x) - log p(z_K)
            kl = (0.5 * (z * z - eps * eps - logvar).sum(axis=2) - ld).mean()
            kl_loss = kl
        else:
            kl = kl_std_normal_forward(mu, logvar).mean()
            kl_loss = kl_free_bits_forward(mu, logvar, self.free_bits) if self.free_bits else kl
        loss = recon + self.beta * kl_loss
        terms = {"loss": loss, "recon": recon, "kl": kl, "nelbo": recon + kl}
        cache = (xt, mu, logvar, eps, out) if self.flow is None else (xt, mu, logvar, eps, out, z)
        return loss, terms, cache

    def loss(self, x, eps=None, rng=None):
        """Forward only: ``(loss, terms)`` as :meth:`loss_and_grad`, no gradients touched."""
        x = self.check_x(x)
        eps = self._eps(eps, x.shape[0], rng)
        loss, terms, _ = self._forward(x, eps)
        return loss, terms

    def loss_and_grad(self, x, eps=None, rng=None, *, zero_grad=True, check=True):
        """Batch-mean loss and its gradient with respect to every parameter.

        x    (B, x_dim) data (Bernoulli: values in [0, 1]).
        eps  (S, B, z_dim) standard normal noise, S samples per image (a (B, z_dim) array means
             S = 1); when None, S = n_samples and it is drawn from ``rng`` (a NumPy/CuPy Generator;
             default: the model's own generator, seeded with ``seed``).
        Returns ``(loss, terms)``: ``loss`` = recon + beta * kl, a 0-d array in nats per image
        (summed over the pixels and latent dims, averaged over the batch; = the negative ELBO for
        beta = 1); ``terms`` = {"loss", "recon", "kl", "nelbo" (= recon + kl)} as 0-d arrays.
        Gradients: ``self.grads`` (views of ``flat_grads``) is zeroed first and then holds
        d loss / d param; pass ``zero_grad=False`` to add into it instead (gradient accumulation).
        ``check=False`` skips the data validation (the trainer validates the data set once).
        """
        if check:
            x = self.check_x(x)
        eps = self._eps(eps, x.shape[0], rng, check)
        loss, terms, cache = self._forward(x, eps)
        if zero_grad:
            self.zero_grad()
        self._elbo_grad(cache)
        return loss, terms

    def train_step(self, x, rng, shard=slice(None), objective="elbo", k=None):
        """One training step's gradient, added into ``grads`` (the loop zeroes them): noise for the whole
        batch x (B, x_dim) from the run's ``rng`` (:meth:`training_noise`: n_samples draws, or ``k`` for
        ``objective="iwae"``), then the rows ``shard`` of x and noise (one process's share of a data-parallel
        batch) through :meth:`loss_and_grad` (-ELBO) or :meth:`iwae_loss_and_grad` (the k-sample bound).
        x must be checked already (:meth:`check_x`). Returns the step's terms (0-d arrays)."""
        if objective not in ("elbo", "iwae"):
            raise ValueError(f"objective must be 'elbo' or 'iwae', got {objective!r}")
        k = (self.n_samples if k is None else k) if objective == "iwae" else self.n_samples
        eps = self.training_noise(rng, k, x.shape[0])
        x, eps = x[shard], eps[:, shard]
        if objective == "iwae":
            return {"loss": self.iwae_loss_and_grad(x, eps, check=False, zero_grad=False)[0]}
        _, t = self.loss_and_grad(x, eps, check=False, zero_grad=False)
        return {key: t[key] for key in ("loss", "nelbo", "recon", "kl")}

    def iwae_loss_and_grad(self, x, eps=None, k=None, rng=None, *, zero_grad=True, check=True):
        """The k-sample importance-weighted bound (Burda et al. 2016) and its gradient:

            log w_kb = log p(x_b|z_kb) + log N(z_kb; 0, I) - log q(z_kb|x_b),  z_kb = mu_b + sigma_b eps_kb
            iwae_b   = logsumexp_k log w_kb - log k       (the estimate :meth:`log_likelihood` returns)
            loss     = -mean_b iwae_b                      (nats per image; k = 1: the one-sample -ELBO)

        The gradient flows through the normalized importance weights a_kb = softmax_k log w_kb
        (:func:`npdgm.models.elbo.iwae_backward`), so it is also a training objective (IWAE).
        x (B, x_dim); eps (k, B, z_dim) noise, or None: ``k`` draws (default n_samples) from ``rng``
        (default: the model's generator). Returns ``(loss, iwae)``: a 0-d array and the per-row bound
        (B,). ``self.grads`` holds d loss / d param (zeroed first unless ``zero_grad=False``)."""
        if check:
            x = self.check_x(x)
        B = x.shape[0]
        if eps is None:
            k = self.n_samples if k is None else check_int(k, "k", lo=1)
            eps = _draw(self, (k, B, self.z_dim), rng)
        else:
            eps = self._eps(eps, B, None)
            if k is not None and check_int(k, "k", lo=1) != eps.shape[0]:
                raise ValueError(f"k={k} but eps holds {eps.shape[0]} samples; give one of them")
        h, ctx = self._encode_raw(x)
        iwae, cache = iwae_forward(self, x, h, eps, self.decoder.forward, context=ctx)
        loss = -iwae.mean()
        if zero_grad:
            self.zero_grad()
        iwae_backward(self, self.xp.full(B, 1.0 / B, dtype=self.dtype), cache)
        return loss, iwae

    def __call__(self, *args, **kwargs):
        raise TypeError(f"a {type(self).__name__} has no single forward: call loss(x, eps) or loss_and_grad(x, eps) "
                        f"for the training loss, log_prob(x, k) for log p(x), encode(x) / decode(z), or sample(n)")

    # -- what a VAE is used for ----------------------------------------------------------------
    def _encode_raw(self, x):
        """(encoder output [mu | logvar] (B, 2Z), the IAF steps' context h (B, H) or None) for a checked x."""
        return encoder_forward(self.encoder, x, self.iaf_context)

    def encode(self, x):
        """(mu, logvar) of q(z|x), each (B, z_dim); with an IAF posterior those of its Gaussian q(z_0|x)."""
        return self.encode_posterior(x)[:2]

    def encode_posterior(self, x):
        """Everything q(z|x) needs: (mu, logvar, h), h (B, H) the IAF steps' context (the encoder's last hidden
        layer) with ``iaf_context``, else None; hand h to :func:`npdgm.models.elbo.log_weights` as ``context``."""
        x = self.check_x(x)
        h, ctx = self._encode_raw(x)
        return h[:, :self.z_dim].copy(), h[:, self.z_dim:].copy(), (None if ctx is None else ctx.copy())

    def _decode_raw(self, z):
        return self.decoder.forward(self.check_z(z))

    def decode(self, z):
        """E[x|z]: Bernoulli probabilities sigmoid(logits), or the Gaussian mean; (n, x_dim)."""
        return self._mean(self._decode_raw(z))

    def _mean(self, out):
        """E[x|z] from the decoder output: sigmoid(logits), the Gaussian mean, or a variance head's mean half."""
        if self.likelihood == "bernoulli":
            return sigmoid_forward(out)
        return head_split(out)[0] if variance_head(self) else out

    def decode_std(self, z):
        """The decoder's standard deviation sigma(z) per pixel, (n, x_dim): exp(v(z) / 2) for a variance head
        (sigma="learned-z"), exp(logvar_x / 2) or the fixed sigma broadcast otherwise (Gaussian only)."""
        if self.likelihood != "gaussian":
            raise ValueError("decode_std: a Bernoulli decoder has no standard deviation (its variance is m (1 - m))")
        out = self._decode_raw(z)
        if variance_head(self):
            return self.xp.exp(0.5 * head_split(out)[1])
        return self.xp.broadcast_to(self.xp.exp(0.5 * self._logvar_x()), (out.shape[0], self.x_dim)).copy()

    def sample(self, n, rng=None, mean=True):
        """n images from the model: z ~ N(0, I), then E[x|z] (``mean=True``, what is usually shown)
        or a draw x ~ p(x|z) (``mean=False``). ``rng``: NumPy/CuPy Generator or int seed."""
        n = check_int(n, "n", lo=1)
        rng = _generator(self, rng)
        out = self._decode_raw(_draw(self, (n, self.z_dim), rng))
        m = self._mean(out)
        if mean:
            return m
        if self.likelihood == "bernoulli":
            u = self.xp.asarray(rng.random(m.shape, dtype=np.float32)).astype(self.dtype, copy=False)
            return (u < m).astype(self.dtype)
        lv = head_split(out)[1] if variance_head(self) else self._logvar_x()
        return m + self.xp.exp(0.5 * lv) * _draw(self, (n, self.x_dim), rng)

    def reconstruct(self, x):
        """E[x | z = mu(x)]: decode the posterior mean (deterministic); with an IAF posterior z = flow(mu(x)),
        the steps applied to the Gaussian's mean (a point of q, not its exact mean)."""
        mu, _, ctx = self.encode_posterior(x)
        return self.decode(mu if self.flow is None else flow_forward(self.flow, mu, ctx)[0])

    def log_joint_and_grad_z(self, x, z, check=True, observed=None):
        """log p(x, z) = log p(x|z) + log N(z; 0, I) per row and its gradient with respect to z, the
        whole input of the samplers in :mod:`npdgm.inference` (HMC, MALA, AIS):

            d/dz log p(x, z) = -J_f(z)^T dnll/dout - z         (out = f(z), the decoder output)
            dnll/dout = sigmoid(out) - x                         Bernoulli
                      = (out - x) exp(-logvar_x)                 Gaussian (fixed or learned logvar_x)

        J_f^T is the decoder's backward to its input (``decoder.input_vjp``: the dx lines of the layer
        backwards, no parameter gradient is touched). x (B, x_dim); z (B, z_dim) or (C, B, z_dim) (C chains
        per image). Returns (logp of shape z.shape[:-1], float64; dlogp/dz of z's shape, model dtype);
        the normalizing constants are included (log p(x, z) is a density, not up to a constant).
        ``observed`` (B, x_dim) bool: log p(x_o, z) of those pixels only (the others enter as out = x = 0, a
        constant in z, as in :func:`npdgm.models.elbo.log_weights`): the target of p(z | x_observed)."""
        xp, Z = self.xp, self.z_dim
        x = self.check_x(x) if check else x
        if z.shape[-1] != Z or z.shape[-2] != x.shape[0] or z.ndim not in (2, 3):
            raise ValueError(f"z must have shape ({x.shape[0]}, {Z}) or (chains, {x.shape[0]}, {Z}), "
                             f"got {tuple(z.shape)}")
        zz = xp.asarray(z).astype(self.dtype, copy=False).reshape(-1, Z)
        out = self.decoder.forward(zz)
        xt = xp.broadcast_to(x, (zz.shape[0] // x.shape[0],) + x.shape).reshape(out.shape[0], -1)
        ones = xp.ones(out.shape[0], dtype=self.dtype)
        if observed is not None:
            keep = xp.broadcast_to(xp.asarray(observed, dtype=bool), (zz.shape[0] // x.shape[0],) + x.shape)
            keep = keep.reshape(xt.shape)
            keep_out = keep if out.shape == keep.shape else xp.concatenate([keep, keep], axis=1)   # [mean | raw]
            out, xt = xp.where(keep_out, out, 0).astype(self.dtype, copy=False), xp.where(keep, xt, 0)
        if self.likelihood == "bernoulli":
            nll, dout = bernoulli_nll_forward(out, xt), bernoulli_nll_backward(ones, out, xt)
        elif variance_head(self):
            nll, dout = head_nll_forward(out, xt), head_nll_backward(ones, out, xt)
        else:
            lv = self._logvar_x()
            nll, dout = gaussian_nll_forward(out, xt, lv), gaussian_nll_backward(ones, out, xt, lv)[0]
        logp = gaussian_logprob_forward(zz).astype(np.float64) - nll.astype(np.float64)
        if observed is not None:
            dout = xp.where(keep_out, dout, 0)
        grad = gaussian_logprob_backward(ones, zz) - self.decoder.input_vjp(dout)
        return logp.reshape(z.shape[:-1]), grad.reshape(z.shape)

    def log_likelihood(self, x, k=1000, rng=None, chunk=1 << 15):
        """Importance-weighted estimate of log p(x) per row (B,), in nats (Burda et al. 2016):

            log p(x) ~= logsumexp_{i=1..k} [log p(x|z_i) + log p(z_i) - log q(z_i|x)] - log k,
            z_i ~ q(z|x).

        k = 1 gives a one-sample ELBO; the expected estimate increases with k towards log p(x).
        Samples are processed in blocks of at most ``chunk`` decoder rows (block of k times the
        batch), so k = 5000 fits in memory; the log-weights are reduced in float64.
        """
        x = self.check_x(x)
        k = check_int(k, "k", lo=1)
        chunk = check_int(chunk, "chunk", lo=1)
        mu, logvar, ctx = self.encode_posterior(x)
        return iwae_estimate(self, x, mu, logvar, k, rng, chunk, lambda z, c: self.decoder.forward(z), noise=_draw,
                             context=ctx)

    def log_prob(self, x, k=1000, rng=None, chunk=1 << 15):
        """log p(x) per row (B,), nats: the IWAE estimate with k importance samples. The same method as
        :meth:`log_likelihood` (``log_prob`` is the torch.distributions / flows name, ``log_likelihood``
        the original one; both stay)."""
        return self.log_likelihood(x, k=k, rng=rng, chunk=chunk)

    def impute(self, x, mask, steps=50, fill=0.0):
        """Fill the missing pixels of ``x`` (``mask`` True = missing) by iterating
        x_missing <- reconstruct(x)_missing, observed pixels kept fixed (the encode/decode iteration of
        the study notes; :meth:`conditional_mean` is the estimate to use for a mean squared error).

        fill  initial value of the missing pixels: a finite scalar, an (x_dim,) array (e.g. the mean
              image) or an array of x's shape.
        Returns the imputed (B, x_dim) array."""
        xp = self.xp
        mask, x_obs = self._prep_mask(x, mask)
        steps = check_int(steps, "steps", lo=0)
        fill = _check_fill(self, fill, x_obs.shape)
        cur = xp.where(mask, fill, x_obs).astype(self.dtype, copy=False)
        for s in range(steps):
            rec = self.reconstruct(cur)
            if not bool(xp.isfinite(rec).all()):  # the model's fault, not x's: say so before encode blames x
                raise FloatingPointError(
                    f"impute: the model's reconstruction became non-finite at step {s + 1} of {steps} "
                    f"({int(xp.isnan(rec).sum())} NaN, {int(xp.isinf(rec).sum())} inf values): its weights make "
                    f"the encode/decode iteration overflow; the input is finite")
            cur = xp.where(mask, rec, x_obs)
        return cur

    def _prep_mask(self, x, mask):
        xp = self.xp
        if getattr(mask, "shape", None) != getattr(x, "shape", None):
            raise ValueError(f"mask must have the shape of x {getattr(x, 'shape', None)}, "
                             f"got {getattr(mask, 'shape', None)}")
        if getattr(mask, "dtype", None) != bool:
            raise TypeError(f"mask must be a boolean array (True = missing), got dtype {getattr(mask, 'dtype', None)}")
        mask = xp.asarray(mask)
        return mask, self.check_x(xp.where(mask, 0, xp.asarray(x)), "x (observed pixels)")

    def conditional_mean(self, x, mask, k=500, fill=0.0, rng=None, chunk=1 << 15):
        """Self-normalized importance-sampling estimate of E[x_missing | x_observed] under the model:

            E[x_m | x_o] = int E[x_m | z] p(z | x_o) dz,   p(z | x_o) ~ p(x_o | z) p(z)
                        ~= sum_i w_i E[x_m | z_i],   w_i ~ p(x_o | z_i) p(z_i) / q(z_i | x~),

        z_i ~ q(z | x~) with x~ = x whose missing pixels are set to ``fill``. Unlike :meth:`impute`
        (which commits to one completion) this averages over completions, the estimate to use when
        the error is measured as a mean squared error. Observed pixels are returned unchanged.
        """
        xp = self.xp
        mask, x_obs = self._prep_mask(x, mask)
        k = check_int(k, "k", lo=1)
        chunk = check_int(chunk, "chunk", lo=1)
        rng = _generator(self, rng)                              # one stream for all chunks
        x_fill = xp.where(mask, _check_fill(self, fill, x_obs.shape), x_obs).astype(self.dtype, copy=False)
        mu, logvar, ctx = self.encode_posterior(x_fill)
        B, Z = x_obs.shape[0], self.z_dim
        per = max(1, chunk // B)
        m_run = xp.full(B, -np.inf)                              # running max of log w (float64)
        s_run = xp.zeros(B)                                      # sum_i exp(log w_i - m_run)
        acc = xp.zeros(x_obs.shape)                              # sum_i exp(log w_i - m_run) E[x | z_i]
        for s in range(0, k, per):
            c = min(per, k - s)
            eps = _draw(self, (c, B, Z), rng)
            # log p(x_o | z) + log p(z) - log q(z | x~), up to a per-row constant that the weights cancel
            logw, (_, out, _) = log_weights(self, x_obs, mu, logvar, eps, self.decoder.forward, observed=~mask,
                                            context=ctx)
            mean = self._mean(out).reshape(c, B, -1)                                        # E[x | z_i]
            logw = logw.astype(np.float64)                                                    # (c, B)
            m_new = xp.maximum(m_run, logw.max(axis=0))
            scale = xp.exp(m_run - m_new)
            w = xp.exp(logw - m_new)                                                          # (c, B) in [0, 1]
            s_run = s_run * scale + w.sum(axis=0)
            # sum_i w_ib mean_ibd as a batched (B, 1, c) @ (B, c, D) product
            wm = xp.matmul(w.T.astype(self.dtype)[:, None, :], mean.transpose(1, 0, 2))[:, 0]
            acc = acc * scale[:, None] + wm
            m_run = m_new
        est = (acc / s_run[:, None]).astype(self.dtype)
        return xp.where(mask, est, x_obs)
