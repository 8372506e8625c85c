"""Models: each defines loss_and_grad with its backward written out by hand.

Importing this package registers every model kind with ``npdgm.load``.
"""
from . import base, cvae, flows, gmm, m2, vae  # noqa: F401  (modules, listed in __all__)
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
           "base", "vae", "cvae", "m2", "flows", "gmm"]  # the modules too, so the API reference documents them
