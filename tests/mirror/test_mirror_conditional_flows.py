"""Conditional flows p(x | c) against the plain-PyTorch mirror (which reads the same layer specs, context_dim
included): the loss, every parameter gradient and the context gradient dc, forward and inverse, agree at
relative 1e-8 in float64. Skipped without PyTorch."""
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

FLOWS = {
    "couplings,actnorm,lu": lambda: F.Flow([F.AffineCoupling(4, "half", 0, [6], "tanh", seed=1, context_dim=3),
                                            F.ActNorm(4), F.Permutation(4, "random", 2),
                                            F.AdditiveCoupling(4, "alternate", 1, [5], "softplus", seed=3,
                                                               context_dim=3),
                                            F.InvertibleLinear(4, seed=4)]),
    "maf": lambda: F.Flow([F.MAF(4, [7, 6], "tanh", "tanh", 1.5, seed=1, context_dim=2), F.Permutation(4, "reverse"),
                           F.MAF(4, [5], "elu", "atan", 2.0, seed=2, context_dim=2)]),
    "iaf": lambda: F.Flow([F.IAF(3, [6], "softplus", seed=3, context_dim=2), F.InvertibleLinear(3, seed=4),
                           F.IAF(3, [5, 5], "tanh", seed=5, context_dim=2)]),
    "spline": lambda: F.Flow([F.SplineCoupling(4, "half", 0, [7], "tanh", bins=5, bound=2.0, seed=9, context_dim=2),
                              F.SplineCoupling(4, "alternate", 1, [6], bins=3, bound=1.5, seed=11, context_dim=2)]),
}


def _saved(tmp_path, rng, name):
    flow = FLOWS[name]()
    x, c = rng.standard_normal((7, flow.dim)), rng.standard_normal((7, flow.context_dim))
    flow.forward(x, c)  # ActNorm's data-dependent init
    flow.flat_params[...] += rng.standard_normal(flow.flat_params.shape) * 0.2
    path = tmp_path / "flow.npz"
    flow.save(path)
    manifest, P = torch_parameters(path)
    assert manifest["config"] == flow.config and manifest["config"]["layers"][0]["context_dim"] == flow.context_dim
    return flow, manifest["config"], P, x, c


@pytest.mark.parametrize("name", list(FLOWS))
def test_conditional_loss_and_context_gradient_match_the_torch_mirror(tmp_path, f64, rng, name):
    flow, config, P, x, c = _saved(tmp_path, rng, name)
    loss = flow.loss_and_grad(x, context=c)
    z, logdet = flow.forward(x, c)
    dlp = np.full(x.shape[0], -1.0 / x.shape[0])
    flow.zero_grad()
    _, dc = flow.backward(flow._prior_b(dlp, z), dlp)
    tc = torch.from_numpy(c).requires_grad_(True)
    tloss = -M.flow_log_prob(P, config, torch.from_numpy(x), tc).mean()
    tloss.backward()
    assert rel_err(loss, tloss.item()) < REL
    assert rel_err(dc, tc.grad.numpy()) < REL
    for n, g in flow.grads.items():
        assert rel_err(g, P[n].grad.numpy()) < REL, n


@pytest.mark.parametrize("name", list(FLOWS))
def test_conditional_inverse_and_its_context_gradient_match_the_torch_mirror(tmp_path, f64, rng, name):
    flow, config, P, x, c = _saved(tmp_path, rng, name)
    zz = rng.standard_normal(x.shape) * 0.8
    w, v = rng.standard_normal(x.shape), rng.standard_normal(x.shape[0])
    flow.zero_grad()
    xs, ldi = flow.inverse(zz, logdet=True, context=c)
    dz, dc = flow.inverse_backward(w, v)
    tz, tc = torch.from_numpy(zz).requires_grad_(True), torch.from_numpy(c).requires_grad_(True)
    tx, tldi = M.flow_inverse(P, config, tz, tc)
    ((tx * torch.from_numpy(w)).sum() + (tldi * torch.from_numpy(v)).sum()).backward()
    assert rel_err(xs, tx.detach().numpy()) < REL and rel_err(ldi, tldi.detach().numpy()) < REL
    assert rel_err(dz, tz.grad.numpy()) < REL and rel_err(dc, tc.grad.numpy()) < REL
    for n, g in flow.grads.items():
        assert rel_err(g, P[n].grad.numpy()) < REL, n
