"""The VAE against a plain-PyTorch autograd mirror that reads npdgm's checkpoint through its layout.

Same weights (via checkpoint.npz + manifest only), same batch, same noise: the loss terms and the gradient
of every parameter agree at relative 1e-8 in float64 (both likelihoods, K > 1 samples, beta != 1, the
IWAE bound). Skipped when PyTorch is not installed."""
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from npdgm.bench import torch_models as M  # noqa: E402
from layout import rel_err, torch_parameters  # noqa: E402

from npdgm.models.vae import VAE  # noqa: E402

REL = 1e-8


def _saved(tmp_path, rng, cfg):
    m = VAE(**cfg)
    m.flat_params[...] += rng.standard_normal(m.flat_params.shape) * 0.2
    path = tmp_path / "vae.npz"
    m.save(path)
    manifest, P = torch_parameters(path)
    assert manifest["kind"] == "vae" and manifest["config"] == m.config
    return m, manifest["config"], P


def _batch(rng, cfg, B):
    if cfg.get("likelihood", "bernoulli") == "bernoulli":
        x = rng.uniform(0, 1, (B, cfg["x_dim"]))
        x[0] = 0.0
        x[1, ::2] = 1.0
        return x
    return rng.standard_normal((B, cfg["x_dim"]))


CONFIGS = {
    "bernoulli,relu,K=1": dict(x_dim=12, hidden=[9], z_dim=3, activation="relu", likelihood="bernoulli"),
    "bernoulli,tanh,K=3,beta=0.5": dict(x_dim=12, hidden=[9, 7], z_dim=4, activation="tanh", n_samples=3,
                                        beta=0.5),
    "gaussian,learned,elu,K=2": dict(x_dim=10, hidden=[8], z_dim=3, activation="elu", likelihood="gaussian",
                                     n_samples=2),
    "gaussian,sigma=0.3,softplus": dict(x_dim=10, hidden=[8], z_dim=2, activation="softplus",
                                        likelihood="gaussian", sigma=0.3, beta=2.0),
    "bernoulli,leaky_relu,sigmoid": dict(x_dim=8, hidden=[6, 5], z_dim=2, activation="leaky_relu"),
    "conv,bernoulli,relu,K=2": dict(x_dim=64, hidden=[], z_dim=3, arch="conv", channels=[3, 4],
                                    image_shape=[1, 8, 8], n_samples=2),
    "conv,gaussian,learned,elu,2 channels": dict(x_dim=2 * 8 * 4, hidden=[], z_dim=2, arch="conv", channels=[3],
                                                 image_shape=[2, 8, 4], activation="elu", likelihood="gaussian"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_vae_loss_and_every_gradient_match_the_torch_mirror(tmp_path, f64, rng, name):
    cfg = CONFIGS[name]
    m, config, P = _saved(tmp_path, rng, cfg)
    B, K = 6, cfg.get("n_samples", 1)
    x, eps = _batch(rng, cfg, B), rng.standard_normal((K, B, cfg["z_dim"]))
    loss, terms = m.loss_and_grad(x, eps)
    t = M.vae_terms(P, config, torch.from_numpy(x), torch.from_numpy(eps))
    t["loss"].backward()
    for k in ("loss", "recon", "kl", "nelbo"):
        assert rel_err(terms[k], t[k].detach().numpy()) < REL, k
    assert set(P) == set(m.grads)
    for n, g in m.grads.items():
        assert rel_err(g, P[n].grad.numpy()) < REL, n


@pytest.mark.parametrize("name", ["bernoulli,tanh,K=3,beta=0.5", "gaussian,learned,elu,K=2"])
def test_iwae_bound_and_its_gradient_match_the_torch_mirror(tmp_path, f64, rng, name):
    from npdgm.reference.models import iwae_loss_and_grad

    cfg = CONFIGS[name]
    m, config, P = _saved(tmp_path, rng, cfg)
    B, K = 5, 7
    x, eps = _batch(rng, cfg, B), rng.standard_normal((K, B, cfg["z_dim"]))

    class Replay:  # hands VAE.log_likelihood exactly this noise
        def standard_normal(self, shape, dtype=None):
            assert tuple(shape) == eps.shape
            return eps

    ll = m.log_likelihood(x, k=K, rng=Replay())
    loss, iwae = iwae_loss_and_grad(m, x, eps)
    t = M.vae_iwae(P, config, torch.from_numpy(x), torch.from_numpy(eps))
    (-t.mean()).backward()
    assert rel_err(ll, t.detach().numpy()) < REL and rel_err(iwae, t.detach().numpy()) < REL
    for n, g in m.grads.items():
        assert rel_err(g, P[n].grad.numpy()) < REL, n


def test_decode_matches(tmp_path, f64, rng):
    m, config, P = _saved(tmp_path, rng, CONFIGS["bernoulli,relu,K=1"])
    z = rng.standard_normal((4, 3))
    assert rel_err(m.decode(z), M.vae_decode(P, config, torch.from_numpy(z)).detach().numpy()) < REL


def test_conv_vae_trains_like_its_torch_twin(tmp_path):
    """The conv VAE and its PyTorch twin (the same weights from the checkpoint, the same batches in the same
    order, the same noise, torch.optim.Adam) trained 2 epochs on 600 bundled MNIST digits in float32 end
    within 0.5 nats of each other on the test -ELBO (same test noise), far below the untrained value."""
    from npdgm.data import load_dataset
    from npdgm.optim import Adam

    x, _ = load_dataset("train", limit=600)
    xt, _ = load_dataset("test", limit=200)
    m = VAE(arch="conv", channels=(8, 16), z_dim=8, seed=0)
    m.save(tmp_path / "init.npz")
    manifest, P = torch_parameters(tmp_path / "init.npz", dtype=torch.float32)
    config = manifest["config"]
    ours, theirs = Adam(m, lr=1e-3), torch.optim.Adam(list(P.values()), lr=1e-3)
    rng = np.random.default_rng(0)
    eps_t = rng.standard_normal((1, len(xt), 8), dtype=np.float32)

    def test_nelbo():
        ours_v = float(m.loss(xt, eps_t)[1]["nelbo"])
        with torch.no_grad():
            theirs_v = float(M.vae_terms(P, config, torch.from_numpy(xt), torch.from_numpy(eps_t))["nelbo"])
        return ours_v, theirs_v

    start = test_nelbo()
    assert abs(start[0] - start[1]) < 1e-3, start
    for epoch in range(2):
        perm = rng.permutation(len(x))
        for s in range(0, len(x), 50):
            xb = x[perm[s:s + 50]]
            eps = rng.standard_normal((1, len(xb), 8), dtype=np.float32)
            m.zero_grad()
            m.loss_and_grad(xb, eps)
            ours.step()
            theirs.zero_grad()
            M.vae_terms(P, config, torch.from_numpy(xb), torch.from_numpy(eps))["loss"].backward()
            theirs.step()
    end = test_nelbo()
    print("test -ELBO before, after (npdgm, torch):", start, end)
    assert end[0] < start[0] - 50 and abs(end[0] - end[1]) < 0.5, (start, end)
