"""NICE and RealNVP (2-D and image) against the plain-PyTorch mirror, weights read through the checkpoint
layout: log-likelihood loss and every parameter gradient, and the inverse (sampling) pass with its
log-determinant and gradients, agree at relative 1e-8 in float64. Skipped without PyTorch."""
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from npdgm.bench import torch_models as M  # noqa: E402
from layout import rel_err, torch_parameters  # noqa: E402

from npdgm.models import flows as F  # noqa: E402

REL = 1e-8


def _unit(rng, n, d):
    return rng.uniform(0.02, 0.98, (n, d))


FLOWS = {
    "nice": (lambda: F.nice(dim=6, n_couplings=4, hidden=8, n_hidden=2, seed=1), lambda r: r.standard_normal((7, 6))),
    "nice,logit,gaussian": (lambda: F.nice(dim=6, n_couplings=3, hidden=7, n_hidden=1, prior="gaussian", logit=True,
                                           activation="tanh", seed=2), lambda r: _unit(r, 7, 6)),
    "realnvp2d": (lambda: F.realnvp2d(n_couplings=6, hidden=(8, 8), seed=3), lambda r: r.standard_normal((9, 2))),
    "realnvp2d,actnorm,atan": (lambda: F.realnvp2d(n_couplings=4, hidden=(7,), scale="atan", scale_bound=2.0,
                                                   actnorm=True, activation="elu", seed=4),
                               lambda r: r.standard_normal((9, 2)) * 2 + 1),
    "realnvp,image,checkerboard": (lambda: F.realnvp(dim=16, n_couplings=3, hidden=(10,), image_shape=(4, 4), seed=5),
                                   lambda r: _unit(r, 6, 16)),
    "realnvp,image,channel,logistic": (lambda: F.realnvp(dim=12, n_couplings=2, hidden=(9,), mask="channel",
                                                         image_shape=(2, 2, 3), prior="logistic", seed=6),
                                       lambda r: _unit(r, 6, 12)),
    "mixed,permutations": (lambda: F.Flow([F.AffineCoupling(5, "alternate", 0, [6], "softplus", "none", seed=7),
                                           F.Permutation(5, "random", 3), F.Scaling(5),
                                           F.AdditiveCoupling(5, [1, 0, 0, 1, 1], 1, [4], "leaky_relu", seed=8),
                                           F.Permutation(5, "reverse"), F.ActNorm(5)]),
                           lambda r: r.standard_normal((8, 5))),
    "lu,invertible linear": (lambda: F.Flow([F.InvertibleLinear(4, seed=1),
                                             F.AffineCoupling(4, "half", 0, [5], "tanh", seed=2),
                                             F.InvertibleLinear(4, seed=3)]),
                             lambda r: r.standard_normal((7, 4))),
    "maf,reverse and random orderings": (lambda: F.Flow([F.MAF(5, [8, 7], "tanh", "tanh", 1.5, seed=1),
                                                         F.Permutation(5, "random", 2),
                                                         F.MAF(5, [6], "elu", "atan", 2.0, seed=3),
                                                         F.Permutation(5, "reverse"), F.MAF(5, [9], seed=4)]),
                                         lambda r: r.standard_normal((7, 5))),
    "maf2d": (lambda: F.maf2d(n_layers=4, hidden=(8, 8), seed=5), lambda r: r.standard_normal((9, 2))),
    "maf,image,actnorm": (lambda: F.maf(dim=6, n_layers=2, hidden=(8,), actnorm=True, seed=7),  # npdgm train maf
                          lambda r: _unit(r, 7, 6)),
    "iaf,invertible linear": (lambda: F.Flow([F.IAF(4, [7], "softplus", seed=6), F.InvertibleLinear(4, seed=7),
                                              F.IAF(4, [6, 6], "tanh", "tanh", 2.0, seed=8)]),
                              lambda r: r.standard_normal((6, 4))),
    "spline couplings,tails": (lambda: F.Flow([F.SplineCoupling(4, "half", 0, [7], "tanh", bins=5, bound=2.0, seed=9),
                                               F.InvertibleLinear(4, seed=10),
                                               F.SplineCoupling(4, "alternate", 1, [6], bins=3, bound=1.5, seed=11)]),
                               lambda r: r.standard_normal((8, 4)) * 1.5),
    "spline2d": (lambda: F.spline2d(n_couplings=3, hidden=(8,), bins=4, seed=12), lambda r: r.standard_normal((9, 2))),
}


def _saved(tmp_path, rng, name):
    build, data = FLOWS[name]
    flow = build()
    x = data(rng)
    flow.forward(x)  # ActNorm's data-dependent init
    flow.flat_params[...] += rng.standard_normal(flow.flat_params.shape) * 0.2
    path = tmp_path / "flow.npz"
    flow.save(path)
    manifest, P = torch_parameters(path)
    assert manifest["kind"] == "flow" and manifest["config"] == flow.config
    return flow, manifest["config"], P, x


@pytest.mark.parametrize("name", list(FLOWS))
def test_flow_loss_and_every_gradient_match_the_torch_mirror(tmp_path, f64, rng, name):
    flow, config, P, x = _saved(tmp_path, rng, name)
    loss = flow.loss_and_grad(x)
    z, logdet = flow.forward(x)
    tx = torch.from_numpy(x)
    tz, tld = M.flow_forward(P, config, tx)
    tloss = -M.flow_log_prob(P, config, tx).mean()
    tloss.backward()
    assert rel_err(loss, tloss.item()) < REL
    assert rel_err(z, tz.detach().numpy()) < REL and rel_err(logdet, tld.detach().numpy()) < REL
    assert set(P) == set(flow.grads)
    for n, g in flow.grads.items():
        assert rel_err(g, P[n].grad.numpy()) < REL, n


@pytest.mark.parametrize("name", list(FLOWS))
def test_inverse_pass_and_its_backward_match_the_torch_mirror(tmp_path, f64, rng, name):
    """The sampling side: x = f^-1(z) and L = sum(x w) + sum(logdet_inv v), differentiated through the inverse."""
    flow, config, P, x = _saved(tmp_path, rng, name)
    zz = flow.forward(x)[0] + 0.1 * rng.standard_normal(x.shape)  # keeps logit layers inside their range
    w, v = rng.standard_normal(x.shape), rng.standard_normal(x.shape[0])
    flow.zero_grad()
    xs, ldi = flow.inverse(zz, logdet=True)
    dz = flow.inverse_backward(w, v)
    tz = torch.from_numpy(zz).requires_grad_(True)
    tx, tldi = M.flow_inverse(P, config, tz)
    ((tx * torch.from_numpy(w)).sum() + (tldi * torch.from_numpy(v)).sum()).backward()
    assert rel_err(xs, tx.detach().numpy()) < REL and rel_err(ldi, tldi.detach().numpy()) < REL
    assert rel_err(dz, tz.grad.numpy()) < REL
    for n, g in flow.grads.items():
        assert rel_err(g, P[n].grad.numpy()) < REL, n
