"""The VAE with an IAF posterior (Kingma et al. 2016): log q with the steps' log-dets, the loss and its backward,
IWAE, checkpoints and the CLI (train, resume, evaluate, sample)."""
import json
import os

import numpy as np
import pytest

import npdgm
from npdgm import backend, cli, gradcheck
from npdgm.models.elbo import log_weights, posterior_sample
from npdgm.models.iaf_posterior import parse_posterior
from npdgm.models.vae import VAE


def _model(**kw):
    with backend.use(dtype="float64"):
        m = VAE(**{"x_dim": 6, "hidden": (5,), "z_dim": 3, "posterior": "iaf:2", "iaf_hidden": (8,), "seed": 2, **kw})
    m.flat_params[...] += np.random.default_rng(5).standard_normal(m.flat_params.shape) * 0.3
    return m


def test_parse_posterior():
    assert parse_posterior("gaussian") == 0 and parse_posterior("iaf:3") == 3
    for bad in ("iaf:0", "iaf", "iaf:x", "maf:2", None):
        with pytest.raises(ValueError, match="posterior must be 'gaussian' or 'iaf:K'"):
            parse_posterior(bad)
    with pytest.raises(ValueError, match="needs z_dim >= 2"):
        VAE(x_dim=6, hidden=(5,), z_dim=1, posterior="iaf:1")


def test_log_q_is_the_density_of_z_change_of_variables_by_brute_force():
    """log q(z_K|x) = log N(eps) - log|det dz_K/d eps| with log|det| = 0.5 sum logvar + LD: LD checked against
    slogdet of a finite-difference Jacobian of the whole map eps -> z_K."""
    m = _model()
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (4, 6))
    mu, logvar = m.encode(x)
    eps = rng.standard_normal((1, 4, 3))
    z, ld = posterior_sample(m, mu, logvar, eps)
    brute = gradcheck.numerical_logdet(lambda e: posterior_sample(m, mu, logvar, e[None])[0][0], eps[0])
    np.testing.assert_allclose(0.5 * logvar.sum(1) + ld[0], brute, rtol=1e-7, atol=1e-8)
    assert np.abs(ld).max() > 0.05                       # the steps are not the identity here


def test_elbo_terms_and_log_weights_agree():
    """K = 1: the ELBO loss's -ELBO is -log w of the same noise (recon + Monte Carlo KL), batch-averaged."""
    m = _model()
    rng = np.random.default_rng(1)
    x, eps = rng.uniform(0, 1, (5, 6)), rng.standard_normal((1, 5, 3))
    _, t = m.loss(x, eps)
    mu, logvar = m.encode(x)
    logw = log_weights(m, x, mu, logvar, eps, m.decoder.forward)[0]
    np.testing.assert_allclose(float(t["nelbo"]), -logw.mean(), rtol=1e-12)


def _log_q_by_inversion(m, mu, logvar, z):
    """log q(z|x) the other way round: z_0 from z_K by the steps' D-pass ``forward`` (their inverses), then
    log N(z_0; mu, e^logvar) + sum_k log|det dz_{k-1}/dz_k|. mu, logvar (Z,), z (N, Z)."""
    total = 0.0
    for layer in reversed(m.flow.layers):
        z, ld = layer.forward(z)
        total = total + ld
    return (-0.5 * ((z - mu) ** 2 / np.exp(logvar) + logvar + np.log(2 * np.pi)).sum(1)) + total


def test_log_q_integrates_to_one_and_matches_the_sampling_route():
    """The density the ELBO and IWAE use, log N(eps) - 0.5 sum logvar - LD at a sampled z_K, equals the density
    obtained by inverting the steps; and that density integrates to 1 over a 2-D grid."""
    m = _model(z_dim=2, iaf_hidden=(6,))
    x = np.random.default_rng(3).uniform(0, 1, (2, 6))
    mu, logvar = m.encode(x)
    eps = np.random.default_rng(4).standard_normal((500, 2, 2))
    z, ld = posterior_sample(m, mu, logvar, eps)
    for b in range(2):
        route = -0.5 * (eps[:, b] ** 2 + np.log(2 * np.pi)).sum(1) - 0.5 * logvar[b].sum() - ld[:, b]
        np.testing.assert_allclose(_log_q_by_inversion(m, mu[b], logvar[b], z[:, b]), route, rtol=1e-9, atol=1e-9)
        lo, hi = z[:, b].min(0) - 4 * z[:, b].std(0), z[:, b].max(0) + 4 * z[:, b].std(0)
        g0, g1 = np.linspace(lo[0], hi[0], 500), np.linspace(lo[1], hi[1], 500)
        grid = np.stack(np.meshgrid(g0, g1, indexing="ij"), -1).reshape(-1, 2)
        mass = np.exp(_log_q_by_inversion(m, mu[b], logvar[b], grid)).sum() * (g0[1] - g0[0]) * (g1[1] - g1[0])
        assert abs(mass - 1) < 2e-3, mass
    assert np.abs(ld).max() > 0.05                       # the steps are not the identity here


def test_whole_loss_gradchecks_pass():
    """float64 central differences of the whole loss (encoder, IAF steps, decoder): ELBO and IWAE."""
    from npdgm import checks  # noqa: F401

    names = ["model.vae[bernoulli,relu,iaf:2,K=2]", "model.vae[gaussian,learned,tanh,iaf:1,beta=0.5]",
             "model.vae.iwae[bernoulli,tanh,iaf:2,k=4]"]
    rows = gradcheck.run_all(names)
    assert {r[0] for r in rows} == set(names)
    assert any(".made." in r[1] for r in rows) and all(r[-1] for r in rows), [r for r in rows if not r[-1]]


def test_checkpoint_round_trip_and_reconstruct(tmp_path):
    m = _model()
    p = str(tmp_path / "m.npz")
    m.save(p)
    with backend.use(dtype="float64"):
        back = npdgm.load(p)
    assert back.config["posterior"] == "iaf:2" and back.config["iaf_hidden"] == [8]
    x, eps = np.random.default_rng(4).uniform(0, 1, (3, 6)), np.random.default_rng(5).standard_normal((2, 3, 3))
    assert float(back.loss(x, eps)[0]) == float(m.loss(x, eps)[0])
    # reconstruct decodes the steps applied to the Gaussian's mean
    mu = m.encode(x)[0]
    assert not np.allclose(m.reconstruct(x), m.decode(mu))


TINY = ["--train-limit", "200", "--test-limit", "60", "--hidden", "16", "--batch-size", "50", "--z-dim", "4",
        "--iwae-n", "10", "--iwae-k", "3", "--impute-steps", "1", "--impute-k", "0", "--impute-n", "10",
        "--no-progress", "--no-plots"]


def test_cli_train_resume_evaluate_sample(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert cli.main(["train", "vae", *TINY, "--epochs", "1", "--posterior", "iaf:2", "--iaf-hidden", "12",
                     "--out", out]) == 0
    m = npdgm.load(out)
    assert m.config["posterior"] == "iaf:2" and any(n.startswith("flow.2.made") for n in m.params)
    assert cli.main(["train", "vae", "--resume", out, "--epochs", "2", "--no-progress", "--no-plots"]) == 0
    recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["epoch"] for r in recs] == [1, 2] and recs[1]["test_kl"] > 0
    capsys.readouterr()
    js = str(tmp_path / "ev.json")
    assert cli.main(["evaluate", out, "--method", "elbo", "iwae", "ais", "--n-images", "4", "--k", "20",
                     "--steps", "5", "--leapfrog", "2", "--chains", "2", "--json", js]) == 0
    r = json.load(open(js))["methods"]
    assert r["iwae"]["mean"] >= r["elbo"]["mean"] - 1.0 and all(np.isfinite(v["mean"]) for v in r.values())
    png = str(tmp_path / "s.png")
    assert cli.main(["sample", out, "--n", "4", "--out", png]) == 0 and os.path.exists(png)


def test_cli_bad_posterior_is_one_error_line(tmp_path, capsys):
    assert cli.main(["train", "vae", *TINY, "--posterior", "iaf:0", "--out", str(tmp_path / "r")]) == 2
    assert "posterior must be 'gaussian' or 'iaf:K'" in capsys.readouterr().err


def test_iaf_steps_are_separated_by_the_reversing_permutation():
    """Between two IAF steps sits a Permutation that reverses z (Kingma et al. 2016), so the composed Jacobian
    dz_K/dz_0 is dense; without it every step is lower-triangular in one order and so is their product."""
    from npdgm.models.autoregressive import IAF
    from npdgm.models.flow_layers import Permutation
    from npdgm.models.iaf_posterior import build_iaf_posterior, flow_forward
    with backend.use(dtype="float64"):
        flow = build_iaf_posterior(4, 3, hidden=(6,), activation="tanh", seed=1)
    kinds = [type(layer) for layer in flow.layers]
    assert kinds == [IAF, Permutation, IAF, Permutation, IAF]
    for perm in flow.layers[1::2]:
        np.testing.assert_array_equal(perm.perm, [3, 2, 1, 0])
    rng = np.random.default_rng(0)
    for p in flow.parameters():
        p.data[...] = rng.standard_normal(p.shape) * 0.5
    z0, h = rng.standard_normal((1, 4)), 1e-6
    J = np.stack([(flow_forward(flow, z0 + h * e)[0] - flow_forward(flow, z0 - h * e)[0])[0] / (2 * h)
                  for e in np.eye(4)], axis=1)                          # J[i, j] = dz_K,i / dz_0,j
    assert np.abs(np.triu(J, 1)).max() > 1e-3 and np.abs(np.tril(J, -1)).max() > 1e-3, J


# -- the steps fed the encoder's hidden state h (iaf_context=True, Kingma et al. 2016) --------------------------
def test_context_gradchecks_pass():
    """float64 central differences of the whole loss with h as every step's context: the encoder's layers below
    its last Linear get dh from every step's dc (ELBO with 1 and 2 hidden layers, IWAE)."""
    from npdgm import checks  # noqa: F401

    names = ["model.vae[bernoulli,relu,iaf:2,context,K=2]",
             "model.vae[gaussian,learned,tanh,iaf:1,context,2 hidden,beta=0.5]",
             "model.vae.iwae[bernoulli,tanh,iaf:2,context,k=4]"]
    rows = gradcheck.run_all(names)
    assert {r[0] for r in rows} == set(names)
    assert any(r[1] == "encoder.0.W" for r in rows) and all(r[-1] for r in rows), [r for r in rows if not r[-1]]


def test_context_is_the_last_hidden_layer_and_moves_q():
    """The steps' context is the input of the encoder's last Linear (its MADE's first weight has those H rows
    last); q(z|x) then depends on h: the same z_0 with another h gives another z_K."""
    m = _model(hidden=(5, 4), iaf_context=True)
    assert m.config["iaf_context"] is True and m.params["flow.0.made.0.W"].shape == (3 + 4, 8)
    x = np.random.default_rng(0).uniform(0, 1, (4, 6))
    mu, logvar, h = m.encode_posterior(x)
    act = np.maximum(np.maximum(x @ m.params["encoder.0.W"] + m.params["encoder.0.b"], 0) @ m.params["encoder.2.W"]
                     + m.params["encoder.2.b"], 0)
    np.testing.assert_allclose(h, act, rtol=1e-12)
    eps = np.random.default_rng(1).standard_normal((1, 4, 3))
    z, ld = posterior_sample(m, mu, logvar, eps, h)
    z2, ld2 = posterior_sample(m, mu, logvar, eps, h[::-1].copy())
    assert np.abs(z - z2).max() > 1e-3 and np.abs(ld - ld2).max() > 1e-3


def test_context_log_q_matches_brute_force_and_elbo_terms():
    """With a context, LD is still log|det dz_K/dz_0| (h fixed): slogdet of a finite-difference Jacobian; and
    the loss's -ELBO is -log w of the same noise and h."""
    m = _model(iaf_context=True)
    rng = np.random.default_rng(2)
    x, eps = rng.uniform(0, 1, (4, 6)), rng.standard_normal((1, 4, 3))
    mu, logvar, h = m.encode_posterior(x)
    z, ld = posterior_sample(m, mu, logvar, eps, h)
    brute = gradcheck.numerical_logdet(lambda e: posterior_sample(m, mu, logvar, e[None], h)[0][0], eps[0])
    np.testing.assert_allclose(0.5 * logvar.sum(1) + ld[0], brute, rtol=1e-7, atol=1e-8)
    logw = log_weights(m, x, mu, logvar, eps, m.decoder.forward, context=h)[0]
    np.testing.assert_allclose(float(m.loss(x, eps)[1]["nelbo"]), -logw.mean(), rtol=1e-12)


def test_context_option_checked():
    with pytest.raises(ValueError, match="iaf_context .* needs posterior='iaf:K'"):
        VAE(x_dim=6, hidden=(5,), z_dim=3, iaf_context=True)
    with pytest.raises(TypeError, match="iaf_context must be True or False"):
        _model(iaf_context="yes")
    assert "iaf_context" not in _model().config           # off: the config (and old checkpoints) unchanged


def test_context_checkpoint_round_trip(tmp_path):
    m = _model(iaf_context=True)
    p = str(tmp_path / "m.npz")
    m.save(p)
    with backend.use(dtype="float64"):
        back = npdgm.load(p)
    assert back.iaf_context and back.config["iaf_context"] is True
    x, eps = np.random.default_rng(4).uniform(0, 1, (3, 6)), np.random.default_rng(5).standard_normal((2, 3, 3))
    assert float(back.loss(x, eps)[0]) == float(m.loss(x, eps)[0])
    np.testing.assert_array_equal(back.log_likelihood(x, k=5, rng=1), m.log_likelihood(x, k=5, rng=1))
    np.testing.assert_array_equal(back.reconstruct(x), m.reconstruct(x))
    mask = np.zeros(x.shape, bool)
    mask[:, :3] = True
    cm = m.conditional_mean(x, mask, k=6, rng=2)                  # the importance weights use h too
    np.testing.assert_array_equal(cm, back.conditional_mean(x, mask, k=6, rng=2))
    assert np.isfinite(cm).all() and np.array_equal(cm[:, 3:], x[:, 3:])


def test_cli_iaf_context_train_resume_evaluate(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert cli.main(["train", "vae", *TINY, "--epochs", "1", "--posterior", "iaf:2", "--iaf-hidden", "12",
                     "--iaf-context", "--out", out]) == 0
    m = npdgm.load(out)
    assert m.config["iaf_context"] is True and m.params["flow.0.made.0.W"].shape == (4 + 16, 12)
    assert cli.main(["train", "vae", "--resume", out, "--epochs", "2", "--no-progress", "--no-plots"]) == 0
    capsys.readouterr()
    js = str(tmp_path / "ev.json")
    assert cli.main(["evaluate", out, "--method", "elbo", "iwae", "--n-images", "4", "--k", "20", "--json", js]) == 0
    r = json.load(open(js))["methods"]
    assert r["iwae"]["mean"] >= r["elbo"]["mean"] - 1.0 and all(np.isfinite(v["mean"]) for v in r.values())
    assert cli.main(["train", "vae", *TINY, "--iaf-context", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "needs posterior='iaf:K' (--posterior iaf:K)" in err and "Traceback" not in err
