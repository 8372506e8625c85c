"""Models: each defines loss_and_grad with its backward written out by hand.

Importing this package registers every model kind with ``npdgm.load`` (npdgm/models/registry.py).
"""
from . import base, cvae, elbo, flow_layers, flows, gmm, kmeans, m2, registry, vae  # noqa: F401  (in __all__)
from .base import Model
from .cvae import CVAE
from .flows import (ActNorm, AdditiveCoupling, AffineCoupling, Flow, FlowLayer, LogitTransform, Permutation,
                    Scaling, bits_per_dim, make_mask, nice, realnvp, realnvp2d)
from .gmm import GaussianMixture, PCAGaussianMixture
from .m2 import M2
from .vae import VAE

__all__ = ["Model", "VAE", "CVAE", "M2", "Flow", "FlowLayer", "AdditiveCoupling", "AffineCoupling", "Permutation",
           "Scaling", "ActNorm", "LogitTransform", "make_mask", "nice", "realnvp", "realnvp2d", "bits_per_dim",
           "GaussianMixture", "PCAGaussianMixture",
           # the modules too, so the API reference documents them
           "base", "elbo", "vae", "cvae", "m2", "flow_layers", "flows", "kmeans", "gmm", "registry"]
