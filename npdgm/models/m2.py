"""Semi-supervised VAE "M2" (Kingma, Rezende, Mohamed & Welling 2014) with a hand-written backward.

Model, C classes, uniform prior p(y) = 1/C:

    q(y|x)    = softmax(s(x)),  s = classifier MLP x_dim -> classifier_hidden -> C
    q(z|x, y) = N(mu, diag exp(logvar)),  [mu | logvar] = encoder([x | e_y])   (a ConditionalMLP)
    p(x|y, z) = Bernoulli(sigmoid(decoder([z | e_y])))     (likelihood="bernoulli", images in [0, 1])
              = N(decoder([z | e_y]), diag sigma_x^2)        (likelihood="gaussian": real features such as
                                                              M1's latent codes, M1+M2; sigma fixed or a
                                                              learned per-dimension log-variance logvar_x)

Per-image losses (nats), one noise draw eps ~ N(0, I) per (image, class):

    L(x, y) = -ELBO(x, y) = -log p(x|y, z) + KL(q(z|x, y) || N(0, I)) - log p(y)       (-log p(y) = log C)
    U(x)    = sum_y q(y|x) L(x, y) - H(q(y|x))              (exact sum over all C classes: no sampling)

The objective of :meth:`M2.loss_and_grad` for a labelled batch (x_l, y_l) and an unlabelled batch x_u:

    loss = lambda_l * mean_l L(x_l, y_l) + alpha * mean_l CE(q(y|x_l), y_l) + mean_u U(x_u)

(either batch may be left out). With ``beta`` != 1 the KL term inside L (in both parts) is weighted
by beta (a beta-VAE form of M2: a larger beta makes class information in z dearer than in y);
:meth:`M2.nelbo` always reports the true bound (beta = 1). lambda_l (``labelled_weight``) = 1 weighs a
labelled image like an unlabelled one in each step; the paper's objective summed over the data set,
divided by N, is lambda_l = N_l / N with alpha = 0.1 (its alpha = 0.1 N on the mean cross-entropy).
U is evaluated for all classes at once: the encoder's x-part is computed once and every x is decoded
under each of the C labels ((C B, .) rows, class-major).

Backward of U (B rows, weight w = 1/B each), with q = softmax(s), Lmat[b, c] = L(x_b, c):

    dLmat[b, c] = w q_bc                                     -> the per-(b, c) ELBO backward
    ds          = w q (Lmat - E_q[Lmat])  +  w q (log q + H)   (expectation + minus-entropy terms)

and of the labelled part:  dL = lambda_l/B_l per row,  ds_l = alpha/B_l (softmax(s_l) - e_y).
"""
from __future__ import annotations

import math

import numpy as np

from .. import backend
from .registry import register_model
from ..kernels import (kl_std_normal_forward, reparameterize_forward, sigmoid_forward, softmax_ce_backward,
                       softmax_ce_forward, softmax_entropy_backward, softmax_entropy_forward,
                       softmax_expectation_backward, softmax_expectation_forward, softmax_forward)
from ..kernels.activations import get_activation
from ..nn import INITS, MLP
from .cvae import LabelConditioned
from ..validate import check_float, check_int
from .vae import check_likelihood
from .elbo import as_noise as _as_noise, draw as _draw, elbo_backward, generator as _generator, rec_rows

__all__ = ["M2"]


@register_model
class M2(LabelConditioned):
    """Semi-supervised VAE M2: classifier q(y|x), encoder q(z|x, y), Bernoulli or Gaussian decoder p(x|y, z).

    Parameters (kept in :attr:`config`): x_dim, num_classes, hidden (encoder sizes; the decoder uses
    them reversed), classifier_hidden (default: hidden), z_dim, activation, alpha (weight of the
    labelled cross-entropy; the paper's 0.1 N/N_labelled is chosen by ``npdgm train m2``),
    labelled_weight (lambda_l, weight of the labelled -ELBO), beta (KL weight inside L during training),
    likelihood ("bernoulli" | "gaussian"), sigma (Gaussian: fixed std, or None to learn a per-dimension
    ``logvar_x``), seed, init.
    Parameter names: ``classifier.*``, ``encoder.*`` (encoder.0.W is (x_dim + C, .)), ``decoder.*``
    (decoder.0.W is (z_dim + C, .)), [``logvar_x``].
    """

    kind = "m2"

    def __init__(self, x_dim=784, num_classes=10, hidden=(500,), z_dim=50, classifier_hidden=None,
                 activation="softplus", alpha=1.0, labelled_weight=1.0, beta=1.0, likelihood="bernoulli", sigma=None,
                 seed=0, init="torch"):
        x_dim = check_int(x_dim, "x_dim", lo=1)
        num_classes = check_int(num_classes, "num_classes", lo=1)
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        z_dim = check_int(z_dim, "z_dim", lo=1)
        if isinstance(hidden, (int, np.integer)):
            hidden = (hidden,)
        hidden = [check_int(h, "hidden size", lo=1) for h in hidden]
        if classifier_hidden is None:
            classifier_hidden = list(hidden)
        if isinstance(classifier_hidden, (int, np.integer)):
            classifier_hidden = (classifier_hidden,)
        classifier_hidden = [check_int(h, "classifier hidden size", lo=1) for h in classifier_hidden]
        get_activation(activation)
        alpha = check_float(alpha, "alpha", lo=0)
        labelled_weight = check_float(labelled_weight, "labelled_weight", lo=0)
        beta = check_float(beta, "beta", lo=0)
        sigma = check_likelihood(likelihood, sigma)
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; expected one of {INITS}")
        seed = check_int(seed, "seed", lo=0)
        super().__init__(x_dim=x_dim, num_classes=num_classes, hidden=list(hidden), z_dim=z_dim,
                         classifier_hidden=list(classifier_hidden), activation=activation, alpha=float(alpha),
                         labelled_weight=float(labelled_weight), beta=float(beta), likelihood=likelihood, sigma=sigma,
                         seed=seed, init=init)
        self.likelihood, self.sigma = likelihood, sigma
        self.x_dim, self.num_classes, self.z_dim, self.hidden = x_dim, num_classes, z_dim, hidden
        self.alpha, self.labelled_weight, self.beta = float(alpha), float(labelled_weight), float(beta)
        dtype = backend.get_dtype()
        host = np.random.default_rng(seed)
        self.classifier = MLP(x_dim, classifier_hidden, num_classes, activation=activation, init=init, rng=host,
                              dtype=dtype)
        object.__setattr__(self, "_noise", backend.rng(seed))
        self._build_nets(host, dtype, activation, init)      # the encoder and decoder draw after the classifier

    @property
    def log_prior_y(self):
        """log p(y) = -log C."""
        return -math.log(self.num_classes)

    # -- the two parts of the loss -------------------------------------------------------------
    def _elbo_rows(self, x, e, eps, beta=1.0):
        """L per row for inputs (N, x_dim) with class rows e (N, C) (e None: every class, class-major
        (C N) rows, the x-part of the encoder computed once); eps matching the rows; the KL term
        weighted by ``beta``. Returns (L rows, cache)."""
        xp, Z = self.xp, self.z_dim
        if e is None:
            C, B = self.num_classes, x.shape[0]
            h = self.encoder.forward_all(x)
            e = xp.asarray(np.repeat(np.eye(C, dtype=self.dtype), B, axis=0))
            xt = xp.broadcast_to(x, (C,) + x.shape).reshape(C * B, -1)
        else:
            h = self.encoder.forward(x, e)
            xt = x
        mu, logvar = h[:, :Z], h[:, Z:]
        z = reparameterize_forward(mu, logvar, eps)
        out = self.decoder.forward(z, e)
        rec = rec_rows(self, out, xt)
        kl = kl_std_normal_forward(mu, logvar)
        return rec + beta * kl - self.log_prior_y, (rec, kl, xt, mu, logvar, eps, out, beta)

    def _elbo_backward(self, d_rows, cache):
        """Backward of sum(d_rows * L rows): the shared ELBO backward (:func:`npdgm.models.elbo.elbo_backward`)
        with weight d_rows on each row's -log p(x|y, z) and d_rows * beta on its KL."""
        rec, kl, xt, mu, logvar, eps, out, beta = cache
        elbo_backward(self, d_rows, d_rows * beta, (xt, mu, logvar, eps, out))

    def _labelled(self, x, y, eps, backward):
        xp, B = self.xp, x.shape[0]
        L, cache = self._elbo_rows(x, self._onehot(y), eps, self.beta)
        yd = xp.asarray(y)
        s = self.classifier.forward(x)
        ce = softmax_ce_forward(s, yd)
        if backward:
            w = xp.full(B, 1.0 / B, dtype=self.dtype)
            self._elbo_backward(w * self.labelled_weight, cache)
            self.classifier.backward(softmax_ce_backward(w * self.alpha, s, yd), need_dx=False)
        rec, kl = cache[0], cache[1]
        acc = (s.argmax(axis=1) == yd).mean()
        return {"labelled": L.mean(), "ce": ce.mean(), "recon_l": rec.mean(), "kl_l": kl.mean(), "acc_l": acc}

    def _unlabelled(self, x, eps, backward):
        xp, B, C = self.xp, x.shape[0], self.num_classes
        L, cache = self._elbo_rows(x, None, eps.reshape(C * B, self.z_dim), self.beta)
        Lmat = L.reshape(C, B).T                                          # (B, C): L(x_b, c)
        s = self.classifier.forward(x)
        H = softmax_entropy_forward(s)
        U = softmax_expectation_forward(s, Lmat) - H
        if backward:
            w = xp.full(B, 1.0 / B, dtype=self.dtype)
            ds, dLmat = softmax_expectation_backward(w, s, Lmat)
            ds += softmax_entropy_backward(-w, s)
            self._elbo_backward(xp.ascontiguousarray(dLmat.T).reshape(C * B), cache)
            self.classifier.backward(ds, need_dx=False)
        return {"unlabelled": U.mean(), "entropy": H.mean()}

    def _inputs(self, x_l, y_l, x_u, eps_l, eps_u, rng, check):
        if x_l is None and x_u is None:
            raise ValueError("give a labelled batch (x_l, y_l), an unlabelled batch x_u, or both")
        if (x_l is None) != (y_l is None):
            raise ValueError("x_l and y_l go together: labelled images need their labels")
        C, Z = self.num_classes, self.z_dim
        if eps_l is None or eps_u is None:
            rng = _generator(self, rng)            # one stream: eps_l and eps_u must not share a seed
        if x_l is not None:
            x_l = self.check_x(x_l, "x_l") if check else x_l
            y_l = self.check_y(y_l, x_l.shape[0], "y_l")
            B = x_l.shape[0]
            eps_l = _draw(self, (B, Z), rng) if eps_l is None else _as_noise(self, eps_l, (B, Z), "eps_l", check)
        if x_u is not None:
            x_u = self.check_x(x_u, "x_u") if check else x_u
            B = x_u.shape[0]
            if eps_u is None:
                eps_u = _draw(self, (C, B, Z), rng)
            else:
                if getattr(eps_u, "shape", None) == (B, Z):       # the same draw for every class
                    eps_u = self.xp.broadcast_to(self.xp.asarray(eps_u), (C, B, Z))
                eps_u = _as_noise(self, eps_u, (C, B, Z), "eps_u", check)
        return x_l, y_l, x_u, eps_l, eps_u

    def _run(self, x_l, y_l, x_u, eps_l, eps_u, rng, check, backward):
        x_l, y_l, x_u, eps_l, eps_u = self._inputs(x_l, y_l, x_u, eps_l, eps_u, rng, check)
        terms, loss = {}, 0.0
        if x_l is not None:
            terms.update(self._labelled(x_l, y_l, eps_l, backward))
            loss = loss + self.labelled_weight * terms["labelled"] + self.alpha * terms["ce"]
        if x_u is not None:
            terms.update(self._unlabelled(x_u, eps_u, backward))
            loss = loss + terms["unlabelled"]
        terms["loss"] = loss
        return loss, terms

    def loss(self, x_l=None, y_l=None, x_u=None, eps_l=None, eps_u=None, rng=None):
        """Forward only: ``(loss, terms)`` as :meth:`loss_and_grad`."""
        return self._run(x_l, y_l, x_u, eps_l, eps_u, rng, True, False)

    def loss_and_grad(self, x_l=None, y_l=None, x_u=None, eps_l=None, eps_u=None, rng=None, *, zero_grad=True,
                      check=True):
        """``loss = labelled_weight mean L(x_l, y_l) + alpha mean CE(q(y|x_l), y_l) + mean U(x_u)`` and its
        gradient.

        x_l (B_l, x_dim), y_l (B_l,) integer labels; x_u (B_u, x_dim); either pair may be None.
        eps_l (B_l, z_dim) and eps_u (C, B_u, z_dim) (or (B_u, z_dim): one draw shared by every class)
        standard normal noise; None draws from ``rng`` (default the model's generator).
        Returns ``(loss, terms)``: terms "labelled" (mean L), "ce", "recon_l", "kl_l", "acc_l"
        (classifier accuracy on the labelled batch), "unlabelled" (mean U), "entropy" (mean H(q(y|x_u))),
        "loss". ``self.grads`` holds d loss / d param (zeroed first unless ``zero_grad=False``)."""
        if zero_grad:
            self.zero_grad()
        return self._run(x_l, y_l, x_u, eps_l, eps_u, rng, check, True)

    def train_step(self, x_l, y_l, x_u, rng):
        """One training step's gradient, added into ``grads`` (the loop zeroes them): noise eps_l (B_l, z_dim)
        and eps_u (C, B_u, z_dim), drawn in that order in float32 from the run's host Generator ``rng``,
        then :meth:`loss_and_grad` on the labelled (x_l, y_l) and unlabelled x_u batches (checked already).
        Returns the terms logged while training (0-d arrays)."""
        draw = lambda shape: backend.to_device(rng.standard_normal(shape, dtype=np.float32), self.dtype)
        eps_l = draw((x_l.shape[0], self.z_dim))
        eps_u = draw((self.num_classes, x_u.shape[0], self.z_dim))
        _, t = self.loss_and_grad(x_l, y_l, x_u, eps_l, eps_u, check=False, zero_grad=False)
        return {k: t[k] for k in ("loss", "labelled", "ce", "unlabelled", "entropy", "acc_l")}

    # -- using the model -----------------------------------------------------------------------
    def logits(self, x, batch=2000):
        """Classifier logits s(x), (B, C)."""
        x = self.check_x(x)
        return self.xp.concatenate([self.classifier.forward(x[i:i + batch]) for i in range(0, x.shape[0], batch)])

    def predict_proba(self, x):
        """q(y|x), (B, C)."""
        return softmax_forward(self.logits(x))

    def predict(self, x):
        """argmax_y q(y|x), (B,) integers on the model's backend."""
        return self.logits(x).argmax(axis=1)

    def error_rate(self, x, y):
        """Fraction of images whose predicted class differs from the label y."""
        y = self.check_y(y, len(x))
        return float((backend.to_host(self.predict(x)) != y).mean())

    def nelbo(self, x, y=None, eps=None, rng=None):
        """Per-image bound (B,): L(x, y) = -ELBO(x, y) when labels are given, else U(x) >= -log p(x)."""
        x = self.check_x(x)
        B, C, Z = x.shape[0], self.num_classes, self.z_dim
        if y is not None:
            y = self.check_y(y, B)
            eps = _draw(self, (B, Z), rng) if eps is None else _as_noise(self, eps, (B, Z))
            return self._elbo_rows(x, self._onehot(y), eps)[0]
        eps = _draw(self, (C, B, Z), rng) if eps is None else _as_noise(self, eps, (C, B, Z))
        L = self._elbo_rows(x, None, eps.reshape(C * B, Z))[0].reshape(C, B).T
        s = self.classifier.forward(x)
        return softmax_expectation_forward(s, L) - softmax_entropy_forward(s)

    def decode(self, z, y):
        """E[x|y, z] = sigmoid(decoder([z | e_y])) (Bernoulli) or decoder([z | e_y]) (Gaussian), (n, x_dim)."""
        out = self._decode_raw(z, y)
        return sigmoid_forward(out) if self.likelihood == "bernoulli" else out

    def class_grid(self, n_per_class=10, rng=0):
        """(C n, x_dim): row c = class c decoded from the same n prior draws (see CVAE.class_grid)."""
        n = check_int(n_per_class, "n_per_class", lo=1)
        z = _draw(self, (n, self.z_dim), rng)
        C = self.num_classes
        return self.decode(self.xp.broadcast_to(z, (C, n, self.z_dim)).reshape(C * n, self.z_dim),
                           np.repeat(np.arange(C), n))

    def style_transfer(self, x, y=None):
        """Encode x with its label (default: the classifier's prediction), decode under every label:
        (B, C, x_dim)."""
        x = self.check_x(x)
        y = backend.to_host(self.predict(x)) if y is None else y
        mu, _ = self.encode(x, y)
        B, C = mu.shape[0], self.num_classes
        zz = self.xp.broadcast_to(mu[:, None], (B, C, self.z_dim)).reshape(B * C, self.z_dim)
        return self.decode(zz, np.tile(np.arange(C), B)).reshape(B, C, self.x_dim)
