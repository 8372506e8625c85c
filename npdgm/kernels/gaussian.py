"""Diagonal Gaussian q(z|x) = N(mu, exp(logvar)): reparameterization and KL to N(0, I)."""
from ..backend import array_module
from ._check import check_same_shape
from .dispatch import twinnable


@twinnable
def reparameterize_forward(mu, logvar, eps):
    """z = mu + exp(logvar / 2) * eps.   mu, logvar, eps: (B, Z) (eps may be (K, B, Z))."""
    check_same_shape("mu", mu, "logvar", logvar)
    if eps.shape[-mu.ndim:] != mu.shape:
        raise ValueError(f"eps must end with shape {mu.shape}, got {eps.shape}")
    return mu + array_module(mu).exp(0.5 * logvar) * eps


@twinnable
def reparameterize_backward(dz, logvar, eps):
    """dmu = dz,  dlogvar = dz * eps * exp(logvar / 2) / 2   (summed over leading sample axes).
    Returns (dmu, dlogvar)."""
    xp = array_module(dz)
    dlv = dz * eps * (0.5 * xp.exp(0.5 * logvar))
    extra = tuple(range(dz.ndim - logvar.ndim))
    if extra:
        dz, dlv = dz.sum(axis=extra), dlv.sum(axis=extra)
    return dz, dlv


@twinnable
def kl_std_normal_forward(mu, logvar):
    """KL(N(mu, exp(logvar)) || N(0, I)) per row = 0.5 * sum_j (mu^2 + exp(logvar) - 1 - logvar) -> (B,)."""
    check_same_shape("mu", mu, "logvar", logvar)
    xp = array_module(mu)
    return 0.5 * (mu * mu + xp.exp(logvar) - 1 - logvar).sum(axis=1)


@twinnable
def kl_std_normal_backward(dkl, mu, logvar):
    """dmu = dkl * mu,  dlogvar = dkl * (exp(logvar) - 1) / 2.  Returns (dmu, dlogvar)."""
    xp = array_module(mu)
    d = dkl[:, None]
    return d * mu, d * 0.5 * (xp.exp(logvar) - 1)


def kl_free_bits_forward(mu, logvar, free_bits):
    """The batch KL term with free bits L nats per latent dimension (Kingma et al. 2016, eq. 15):
    sum_j max(L, mean_b KL_bj),  KL_bj = 0.5 (mu_bj^2 + exp(logvar_bj) - 1 - logvar_bj).  mu, logvar (B, Z)
    -> 0-d; L = 0 gives mean_b KL(q(z|x_b) || N(0, I)), the plain batch-mean KL."""
    check_same_shape("mu", mu, "logvar", logvar)
    xp = array_module(mu)
    kl_j = (0.5 * (mu * mu + xp.exp(logvar) - 1 - logvar)).mean(axis=0)
    return xp.maximum(kl_j, free_bits).sum()


def kl_free_bits_backward(dkl, mu, logvar, free_bits):
    """a_j = [mean_b KL_bj > L] (a dimension under its free bits gets no gradient),
    dmu = dkl a_j mu / B,  dlogvar = dkl a_j (exp(logvar) - 1) / (2 B).  dkl 0-d.  Returns (dmu, dlogvar)."""
    xp = array_module(mu)
    e = xp.exp(logvar)
    active = (0.5 * (mu * mu + e - 1 - logvar)).mean(axis=0) > free_bits
    d = dkl * active.astype(mu.dtype) / mu.shape[0]
    return d * mu, d * 0.5 * (e - 1)
