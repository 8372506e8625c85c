"""Models: each defines loss_and_grad with its backward written out by hand.

Importing this package registers every model kind with ``npdgm.load`` (npdgm/models/registry.py).
"""
from . import (autoencoder, autoregressive, base, cvae, elbo, flow_layers, flows, glow_layers, gmm, gmvae,  # noqa
               iaf_posterior, kmeans, m1, m2, registry, vae)  # (in __all__)
from .autoencoder import Autoencoder
from .base import Model
from .cvae import CVAE
from .flows import (IAF, MAF, ActNorm, AdditiveCoupling, AffineCoupling, Flow, FlowLayer, InvertibleLinear,
                    LogitTransform, Permutation, Scaling, bits_per_dim, glow, maf, maf2d, make_mask, nice, realnvp,
                    realnvp2d)
from .gmm import GaussianMixture, PCAGaussianMixture
from .gmvae import GMVAE
from .m2 import M2
from .vae import VAE

__all__ = ["Model", "VAE", "CVAE", "M2", "Flow", "FlowLayer", "AdditiveCoupling", "AffineCoupling", "Permutation",
           "Scaling", "ActNorm", "LogitTransform", "InvertibleLinear", "MAF", "IAF", "make_mask", "nice", "realnvp",
           "realnvp2d", "maf", "maf2d", "glow", "bits_per_dim",
           "GaussianMixture", "PCAGaussianMixture", "GMVAE", "Autoencoder",
           # the modules too, so the API reference documents them
           "base", "elbo", "vae", "cvae", "m2", "flow_layers", "autoregressive", "flows", "glow_layers", "kmeans",
           "gmm", "registry", "iaf_posterior", "m1", "gmvae", "autoencoder"]
