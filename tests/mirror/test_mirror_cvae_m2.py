"""CVAE and M2 against the plain-PyTorch mirror (weights through the checkpoint layout, same batch, labels
and noise): every loss term and every parameter gradient at relative 1e-8 in float64. Skipped without
PyTorch, and per model while its npdgm module does not exist."""
import importlib.util
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from npdgm.bench import torch_models as M  # noqa: E402
from layout import rel_err, torch_parameters  # noqa: E402

REL = 1e-8


def _need(mod):
    if importlib.util.find_spec(f"npdgm.models.{mod}") is None:
        pytest.skip(f"npdgm.models.{mod} is not there yet")
    return importlib.import_module(f"npdgm.models.{mod}")


def _saved(tmp_path, rng, model):
    model.flat_params[...] += rng.standard_normal(model.flat_params.shape) * 0.2
    model.save(tmp_path / "m.npz")
    manifest, P = torch_parameters(tmp_path / "m.npz")
    assert manifest["kind"] == model.kind and manifest["config"] == model.config and set(P) == set(model.grads)
    return manifest["config"], P


CVAES = {
    "bernoulli,relu,K=1": dict(x_dim=10, num_classes=4, hidden=[7], z_dim=3, activation="relu"),
    "bernoulli,tanh,K=3,beta=0.5": dict(x_dim=10, num_classes=3, hidden=[7, 6], z_dim=2, activation="tanh",
                                        n_samples=3, beta=0.5),
    "gaussian,learned,elu,K=2": dict(x_dim=8, num_classes=3, hidden=[6], z_dim=2, activation="elu",
                                     likelihood="gaussian", n_samples=2),
}


@pytest.mark.parametrize("name", list(CVAES))
def test_cvae_matches_the_torch_mirror(tmp_path, f64, rng, name):
    cfg = CVAES[name]
    m = _need("cvae").CVAE(**cfg)
    config, P = _saved(tmp_path, rng, m)
    B, K = 6, cfg.get("n_samples", 1)
    x = rng.uniform(0, 1, (B, cfg["x_dim"])) if cfg.get("likelihood", "bernoulli") == "bernoulli" \
        else rng.standard_normal((B, cfg["x_dim"]))
    y = rng.integers(0, cfg["num_classes"], B)
    eps = rng.standard_normal((K, B, cfg["z_dim"]))
    loss, terms = m.loss_and_grad(x, y, eps)
    t = M.cvae_terms(P, config, torch.from_numpy(x), y, torch.from_numpy(eps))
    t["loss"].backward()
    for k in ("loss", "recon", "kl", "nelbo"):
        assert rel_err(terms[k], t[k].detach().numpy()) < REL, k
    for n, g in m.grads.items():
        assert rel_err(g, P[n].grad.numpy()) < REL, n


M2S = {
    "softplus,alpha=2.5": dict(x_dim=8, num_classes=3, hidden=[6], z_dim=2, classifier_hidden=[5],
                               activation="softplus", alpha=2.5),
    "tanh,2 hidden,4 classes": dict(x_dim=8, num_classes=4, hidden=[6, 5], z_dim=3, classifier_hidden=[7],
                                    activation="tanh", alpha=0.3),
}


@pytest.mark.parametrize("name", list(M2S))
def test_m2_matches_the_torch_mirror(tmp_path, f64, rng, name):
    cfg = M2S[name]
    m = _need("m2").M2(**cfg)
    config, P = _saved(tmp_path, rng, m)
    C, Z, D = cfg["num_classes"], cfg["z_dim"], cfg["x_dim"]
    x_l, y_l = rng.uniform(0, 1, (5, D)), rng.integers(0, C, 5)
    x_u = rng.uniform(0, 1, (4, D))
    eps_l, eps_u = rng.standard_normal((5, Z)), rng.standard_normal((C, 4, Z))
    loss, terms = m.loss_and_grad(x_l, y_l, x_u, eps_l, eps_u)
    t = M.m2_terms(P, config, torch.from_numpy(x_l), y_l, torch.from_numpy(x_u), torch.from_numpy(eps_l),
                   torch.from_numpy(eps_u))
    t["loss"].backward()
    for k in ("loss", "labelled", "ce", "recon_l", "kl_l", "unlabelled", "entropy"):
        assert rel_err(terms[k], t[k].detach().numpy()) < REL, k
    for n, g in m.grads.items():
        assert rel_err(g, P[n].grad.numpy()) < REL, n
