"""Issue 12, silent wrong results in the models and optimizers: each test fails on the code before the fix.

- an int ``rng`` is converted to ONE Generator per call (chunks and eps_l/eps_u continue one stream);
- Adam/AdamW on lists of 2-D/3-D Parameters (against torch.optim and a textbook Adam);
- clip_grad_norm rejects max_norm <= 0, NaN, inf;
- flows: non-finite inverse input, NaN/inf/negative temperature, overflow with scale="none", empty nll;
- non-finite noise (eps, eps_l, eps_u) and fill are refused by name.
"""
import math

import numpy as np
import pytest

import npdgm
from npdgm import optim
from npdgm.models import flows as F
from npdgm.models import m2 as m2_module
from npdgm.models import vae as vae_module
from npdgm.nn import Parameter


def _vae(**kw):
    return npdgm.VAE(**{"x_dim": 6, "hidden": (5,), "z_dim": 2, "seed": 3, **kw})


def _record_draws(monkeypatch, module):
    """Patch ``module._draw`` to keep a copy of every noise block it returns."""
    seen, real = [], module._draw

    def draw(model, shape, rng):
        eps = real(model, shape, rng)
        seen.append(np.array(eps))
        return eps

    monkeypatch.setattr(module, "_draw", draw)
    return seen


# -- one RNG stream per call ---------------------------------------------------------------------------
def test_log_likelihood_int_rng_draws_fresh_noise_per_chunk(monkeypatch, rng):
    m, x = _vae(), rng.random((4, 6))
    seen = _record_draws(monkeypatch, vae_module)
    a = m.log_likelihood(x, k=30, rng=7, chunk=8)               # 2 samples per chunk: 15 chunks
    assert len(seen) == 15
    assert len({blk.tobytes() for blk in seen}) == 15           # before: one block repeated 15 times
    assert len(np.unique(np.concatenate(seen).ravel())) == 30 * 4 * 2
    b = m.log_likelihood(x, k=30, rng=np.random.default_rng(7), chunk=8)
    np.testing.assert_array_equal(a, b)
    # the chunking does not change the estimate's noise either: one chunk, same stream
    np.testing.assert_allclose(m.log_likelihood(x, k=30, rng=7, chunk=1 << 15), a, rtol=1e-5)


def test_conditional_mean_int_rng_draws_fresh_noise_per_chunk(monkeypatch, rng):
    m, x = _vae(), rng.random((4, 6))
    mask = np.zeros((4, 6), bool)
    mask[:, 3:] = True
    seen = _record_draws(monkeypatch, vae_module)
    a = m.conditional_mean(x, mask, k=12, rng=5, chunk=4)       # 1 sample per chunk: 12 chunks
    assert len({blk.tobytes() for blk in seen}) == 12
    b = m.conditional_mean(x, mask, k=12, rng=np.random.default_rng(5), chunk=4)
    np.testing.assert_array_equal(a, b)


def test_m2_int_rng_labelled_and_unlabelled_noise_are_independent(monkeypatch, rng):
    m = npdgm.M2(x_dim=6, num_classes=3, hidden=(5,), z_dim=2, seed=1)
    x_l, y_l, x_u = rng.random((4, 6)), np.array([0, 1, 2, 0]), rng.random((4, 6))
    seen = _record_draws(monkeypatch, m2_module)
    loss_int, _ = m.loss(x_l, y_l, x_u, rng=9)
    eps_l, eps_u = seen
    assert eps_l.shape == (4, 2) and eps_u.shape == (3, 4, 2)
    assert not np.array_equal(eps_l, eps_u[0])                  # before: eps_u[0] was a copy of eps_l
    loss_gen, _ = m.loss(x_l, y_l, x_u, rng=np.random.default_rng(9))
    assert float(loss_int) == float(loss_gen)


def test_vae_cvae_sample_int_rng_equals_generator():
    m = _vae()
    np.testing.assert_array_equal(m.sample(5, rng=4, mean=False), m.sample(5, rng=np.random.default_rng(4), mean=False))
    c = npdgm.CVAE(x_dim=6, num_classes=3, hidden=(5,), z_dim=2)
    np.testing.assert_array_equal(c.sample([0, 1, 2], rng=4), c.sample([0, 1, 2], rng=np.random.default_rng(4)))


# -- optimizers on N-D parameters ------------------------------------------------------------------------
SHAPES = [(3, 700), (4, 5, 6), (2, 3, 4, 5), (11,)]


def _textbook_adam(p, grads, lr, b1, b2, eps, wd, decoupled):
    m = v = np.zeros_like(p)
    for t, g in enumerate(grads, 1):
        if decoupled:
            p = p * (1 - lr * wd)
        else:
            g = g + wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    return p


@pytest.mark.parametrize("decoupled", [False, True])
def test_adam_on_nd_parameter_list_matches_textbook(decoupled, rng, f64):
    p0 = [rng.standard_normal(s) for s in SHAPES]
    grads = [[rng.standard_normal(s) for s in SHAPES] for _ in range(4)]
    params = [Parameter(p.copy()) for p in p0]
    opt = (optim.AdamW(params, lr=0.01, weight_decay=0.1) if decoupled
           else optim.Adam(params, lr=0.01, weight_decay=0.1))
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad[...] = g
        opt.step()
    for i, (p, p_init) in enumerate(zip(params, p0)):
        want = _textbook_adam(p_init, [gs[i] for gs in grads], 0.01, 0.9, 0.999, 1e-8, 0.1, decoupled)
        assert p.data.shape == SHAPES[i]
        np.testing.assert_allclose(p.data, want, rtol=1e-12, atol=1e-14)
    state = opt.state_dict()
    assert state["m.1"].shape == SHAPES[1]
    again = optim.Adam([Parameter(p.copy()) for p in p0], lr=0.01)
    again.load_state_dict(state)
    np.testing.assert_array_equal(again.v[2], opt.v[2])


def test_adam_strided_parameter_falls_back_to_textbook(rng, f64):
    p0, g = rng.standard_normal((5, 7)), rng.standard_normal((7, 5))
    p = Parameter(p0.copy())
    p.data = p.data.T                     # a transposed view: no flat view exists
    p.grad = np.zeros((7, 5))
    p.grad[...] = g
    opt = optim.Adam([p], lr=0.1)
    opt.step()
    np.testing.assert_allclose(p.data, _textbook_adam(p0.T.copy(), [g], 0.1, 0.9, 0.999, 1e-8, 0.0, False),
                               rtol=1e-12)


@pytest.mark.parametrize("kind", ["Adam", "AdamW", "SGD"])
def test_optimizers_on_nd_parameters_match_torch(kind, rng, f64):
    torch = pytest.importorskip("torch")
    p0 = [rng.standard_normal(s) for s in SHAPES]
    params = [Parameter(p.copy()) for p in p0]
    tparams = [torch.tensor(p.copy(), requires_grad=True) for p in p0]
    kw = dict(lr=0.01, weight_decay=0.05)
    if kind == "SGD":
        kw.update(momentum=0.9, nesterov=True)
    opt = getattr(optim, kind)(params, **kw)
    topt = getattr(torch.optim, kind)(tparams, **kw)
    for _ in range(3):
        for p, t in zip(params, tparams):
            g = rng.standard_normal(p.data.shape)
            p.grad[...] = g
            t.grad = torch.tensor(g)
        opt.step()
        topt.step()
    for p, t in zip(params, tparams):
        np.testing.assert_allclose(p.data, t.detach().numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, math.nan, math.inf, -math.inf, True])
def test_clip_grad_norm_rejects_non_positive_or_non_finite(bad):
    p = Parameter(np.zeros(2))
    p.grad[...] = [3.0, 4.0]
    with pytest.raises(ValueError, match="max_norm must be"):
        optim.clip_grad_norm([p], bad)
    np.testing.assert_array_equal(p.grad, [3.0, 4.0])          # untouched (before: -1 flipped the sign)
    assert optim.clip_grad_norm([p], np.float32(1.0)) == pytest.approx(5.0)


@pytest.mark.parametrize("bad", [math.inf, math.nan, 0.0, -1e-3])
def test_optimizer_rejects_non_finite_lr(bad):
    with pytest.raises(ValueError, match="lr must be"):
        optim.Adam([Parameter(np.zeros(2))], lr=bad)


# -- flows ------------------------------------------------------------------------------------------------
def _flow(scale="tanh", checked="loss"):
    return F.realnvp2d(n_couplings=3, hidden=(8,), scale=scale, seed=0, checked=checked)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_flow_inverse_rejects_non_finite_z(bad):
    f = _flow()
    z = np.zeros((3, 2), np.float32)
    z[1, 0] = bad
    with pytest.raises(ValueError, match="z contains non-finite values"):
        f.inverse(z)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -0.5, -math.inf])
def test_flow_sample_rejects_bad_temperature(bad):
    with pytest.raises(ValueError, match="temperature must be"):
        _flow().sample(4, temperature=bad, rng=0)


def test_flow_sample_temperature_zero_is_the_mode_and_noise_is_checked():
    f = _flow()
    x0 = f.sample(3, temperature=0, rng=0)
    np.testing.assert_array_equal(x0, f.inverse(np.zeros((3, 2), np.float32)))
    with pytest.raises(ValueError, match="noise contains non-finite values"):
        f.sample(2, noise=np.array([[0.0, np.nan], [1.0, 2.0]]))


def test_flow_unbounded_scale_overflow_names_the_layer():
    f = _flow(scale="none")
    with np.errstate(all="ignore"):
        f.flat_params[...] *= 30                         # exp(-s) overflows in the inverse
        with pytest.raises(FloatingPointError, match=r"flow layer \d \(AffineCoupling\).*inverse pass.*"
                                                     r"unbounded: exp\(s\) overflowed"):
            f.sample(5, rng=0)
        # checked="off" keeps its promise of no checks (and no host sync)
        g = _flow(scale="none", checked="off")
        g.flat_params[...] = f.flat_params
        assert not np.isfinite(g.sample(5, rng=0)).all()


def test_flow_nll_empty_and_non_finite_input():
    f = _flow()
    with pytest.raises(ValueError, match="x is empty"):
        f.nll(np.zeros((0, 2), np.float32))
    with pytest.raises(ValueError, match="x contains non-finite values"):
        f.nll(np.array([[0.0, np.nan]], np.float32))


def test_cli_flow_sample_nan_temperature_exits_2(tmp_path, capsys):
    from npdgm.cli import main

    run = tmp_path / "run"
    assert main(["train", "flow2d", "--n-train", "128", "--n-test", "32", "--couplings", "1", "--hidden", "4",
                 "--batch-size", "64", "--steps", "2", "--out", str(run), "--no-plots", "--no-progress"]) == 0
    capsys.readouterr()
    npy = tmp_path / "f.npy"
    rc = main(["flow-sample", str(run), "--n", "20", "--temperatures", "nan", "--npy", str(npy),
               "--out", str(tmp_path / "s.png")])
    err = capsys.readouterr().err
    assert rc == 2 and not npy.exists()
    last = err.strip().splitlines()[-1]                     # argparse may print its usage line first
    assert last.startswith("npdgm: error:") and "temperature" in last


# -- non-finite noise and fill ------------------------------------------------------------------------------
def test_vae_rejects_non_finite_eps_and_fill(rng):
    m, x = _vae(), rng.random((3, 6))
    with pytest.raises(ValueError, match="eps contains non-finite values"):
        m.loss(x, eps=np.full((3, 2), np.nan))
    with pytest.raises(ValueError, match="eps contains non-finite values"):
        m.loss_and_grad(x, eps=np.array([[[0.0, np.inf]] * 3]))
    mask = np.zeros((3, 6), bool)
    mask[:, :2] = True
    with pytest.raises(ValueError, match="fill contains non-finite values"):
        m.impute(x, mask, fill=np.nan)
    with pytest.raises(ValueError, match="fill contains non-finite values"):
        m.conditional_mean(x, mask, k=3, fill=np.full(6, np.inf))
    with pytest.raises(ValueError, match="fill must be a scalar"):
        m.impute(x, mask, fill=np.zeros(5))
    # valid fills keep working: scalar, (x_dim,), x-shaped
    for fill in (0.5, np.full(6, 0.25), np.full((3, 6), 0.75)):
        out = m.impute(x, mask, steps=0, fill=fill)
        np.testing.assert_array_equal(out[mask], np.broadcast_to(np.asarray(fill, np.float32), x.shape)[mask])


def test_vae_impute_overflow_blames_the_model_not_the_input(rng):
    """Issue 23: a Gaussian decoder with large (finite) weights makes the encode/decode iteration overflow; the
    error said "x contains non-finite values", the input being finite."""
    m, x = _vae(likelihood="gaussian"), rng.random((3, 6)).astype(np.float32)
    for v in m.params.values():
        v *= 1e4
    mask = np.zeros((3, 6), bool)
    mask[:, :3] = True
    with np.errstate(all="ignore"), pytest.raises(FloatingPointError, match=r"reconstruction became non-finite at "
                                                                            r"step \d+ of 50 .*the input is finite"):
        m.impute(x, mask, steps=50)


def test_cvae_and_m2_reject_non_finite_noise(rng):
    x, y = rng.random((3, 6)), np.array([0, 1, 2])
    c = npdgm.CVAE(x_dim=6, num_classes=3, hidden=(5,), z_dim=2)
    with pytest.raises(ValueError, match="eps contains non-finite values"):
        c.loss_and_grad(x, y, eps=np.full((3, 2), np.nan))
    m = npdgm.M2(x_dim=6, num_classes=3, hidden=(5,), z_dim=2)
    with pytest.raises(ValueError, match="eps_l contains non-finite values"):
        m.loss(x, y, eps_l=np.full((3, 2), np.inf))
    with pytest.raises(ValueError, match="eps_u contains non-finite values"):
        m.loss(x_u=x, eps_u=np.full((3, 2), np.nan))
    with pytest.raises(ValueError, match="eps contains non-finite values"):
        m.nelbo(x, eps=np.full((3, 3, 2), np.nan))


# -- one option check for every model and optimizer (npdgm.validate) ---------------------------------------
def _builders():
    return {
        "VAE": lambda **kw: npdgm.VAE(**{"x_dim": 6, "hidden": (5,), "z_dim": 2, **kw}),
        "CVAE": lambda **kw: npdgm.CVAE(**{"x_dim": 6, "num_classes": 3, "hidden": (5,), "z_dim": 2, **kw}),
        "M2": lambda **kw: npdgm.M2(**{"x_dim": 6, "num_classes": 3, "hidden": (5,), "z_dim": 2, **kw}),
        "GMM": lambda **kw: npdgm.models.gmm.GaussianMixture(2, **kw),
        "PCAGMM": lambda **kw: npdgm.models.gmm.PCAGaussianMixture(6, 2, **kw),
        "AffineCoupling": lambda **kw: F.AffineCoupling(2, hidden=(4,), **kw),
        "AdditiveCoupling": lambda **kw: F.AdditiveCoupling(2, hidden=(4,), **kw),
        "Permutation": lambda **kw: F.Permutation(3, "random", **kw),
    }


@pytest.mark.parametrize("name", list(_builders()))
@pytest.mark.parametrize("seed", [1.5, True, -1, "3"])
def test_bad_seed_is_rejected_not_coerced(name, seed):
    with pytest.raises(ValueError, match="seed must be"):
        _builders()[name](seed=seed)


@pytest.mark.parametrize("name", list(_builders()))
def test_numpy_integer_seed_is_accepted_and_stored_as_int(name):
    a, b = _builders()[name](seed=np.int64(4)), _builders()[name](seed=4)
    np.testing.assert_array_equal(np.asarray(a.flat_params if a.flat_params is not None else 0),
                                  np.asarray(b.flat_params if b.flat_params is not None else 0))
    if hasattr(a, "config"):
        assert type(a.config["seed"]) is int


def test_numpy_scalars_accepted_for_sizes_and_numbers():
    v = npdgm.VAE(x_dim=np.int64(6), hidden=(np.int32(5),), z_dim=np.int64(2), likelihood="gaussian",
                  sigma=np.float32(0.5), beta=np.float64(0.5), n_samples=np.int16(2))
    assert v.config["sigma"] == 0.5 and type(v.config["sigma"]) is float and type(v.config["x_dim"]) is int
    m = npdgm.M2(x_dim=6, num_classes=np.int64(3), hidden=(5,), z_dim=2, alpha=np.float32(0.25),
                 labelled_weight=np.float64(2.0))
    assert m.alpha == 0.25 and type(m.config["alpha"]) is float
    g = npdgm.models.gmm.GaussianMixture(np.int64(2), reg_covar=np.float32(1e-3), max_iter=np.int64(5))
    assert type(g.config["n_components"]) is int and type(g.config["reg_covar"]) is float
    f = F.AffineCoupling(2, hidden=(np.int64(4),), scale_bound=np.float32(2.0))
    assert f.spec()["hidden"] == [4] and f.scale_bound == 2.0
    p = Parameter(np.ones(3))
    opt = optim.Adam([p], lr=np.float32(0.5), betas=(np.float32(0.5), 0.9), weight_decay=np.float64(0.0))
    assert opt.lr == 0.5 and opt.b1 == 0.5
    x = np.random.default_rng(0).random((2, 6))
    assert v.sample(np.int64(3), rng=np.int64(1)).shape == (3, 6)
    assert v.log_likelihood(x, k=np.int32(3), rng=np.int64(2), chunk=np.int64(4)).shape == (2,)


@pytest.mark.parametrize("call, match", [
    (lambda v, x, m: v.sample(2.0), "n must be"),
    (lambda v, x, m: v.sample(True), "n must be"),
    (lambda v, x, m: v.sample(2, rng=1.5), "rng must be"),
    (lambda v, x, m: v.loss(x, rng=2.5), "rng must be"),
    (lambda v, x, m: v.log_likelihood(x, k=2.0), "k must be"),
    (lambda v, x, m: v.log_likelihood(x, k=2, chunk=0), "chunk must be"),
    (lambda v, x, m: v.impute(x, m, steps=1.5), "steps must be"),
    (lambda v, x, m: v.conditional_mean(x, m, k=3, rng=True), "rng must be"),
])
def test_vae_methods_reject_float_and_bool_counts_and_seeds(call, match):
    v, x = _vae(), np.random.default_rng(0).random((2, 6))
    with pytest.raises(ValueError, match=match):
        call(v, x, np.zeros((2, 6), bool))


@pytest.mark.parametrize("kw, match", [
    (dict(sigma=True, likelihood="gaussian"), "sigma"), (dict(beta="1"), "beta"), (dict(x_dim=6.0), "x_dim"),
    (dict(n_samples=False), "n_samples"),
])
def test_vae_options_reject_bools_strings_floats(kw, match):
    with pytest.raises(ValueError, match=match):
        _vae(**kw)


def test_flow_gmm_and_optim_reject_bad_numbers():
    f = _flow()
    with pytest.raises(ValueError, match="n must be"):
        f.sample(2.0)
    with pytest.raises(ValueError, match="rng must be"):
        f.sample(2, rng=0.5)
    with pytest.raises(ValueError, match="temperature must be"):
        f.sample(2, temperature="1")
    with pytest.raises(ValueError, match="batch_size must be"):
        f.nll(np.zeros((2, 2), np.float32), batch_size=0)
    g = npdgm.models.gmm.GaussianMixture(2).fit(np.random.default_rng(0).standard_normal((20, 2)))
    with pytest.raises(ValueError, match="rng must be"):
        g.sample(3, rng=1.5)
    with pytest.raises(ValueError, match="n must be"):
        g.sample(np.float64(3))
    p = Parameter(np.ones(2))
    for kw, match in [(dict(lr=True), "lr"), (dict(betas=(0.9, "0.9")), r"betas\[1\]"), (dict(eps=-1.0), "eps"),
                      (dict(weight_decay=math.nan), "weight_decay")]:
        with pytest.raises(ValueError, match=match):
            optim.Adam([p], **kw)
    with pytest.raises(ValueError, match="momentum"):
        optim.SGD([p], momentum=-0.5)


def test_models_do_not_import_gradcheck_and_checks_register_every_model():
    """Gradient-check registrations live in npdgm/checks.py (issue 14): no file under npdgm/models imports
    npdgm.gradcheck, and importing npdgm.checks registers the VAE, CVAE, M2 and flow checks."""
    import ast
    import pathlib

    root = pathlib.Path(npdgm.__file__).parent / "models"
    bad = []
    for p in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            names = [a.name for a in node.names] if isinstance(node, ast.ImportFrom) else []
            if any("gradcheck" in m or "checks" in m.split(".")[-1:] for m in mods) or "gradcheck" in names:
                bad.append(f"{p.name}:{node.lineno}")
    assert not bad, bad
    from npdgm import checks, gradcheck  # noqa: F401

    for kind in ("model.vae[", "model.cvae[", "model.m2[", "model.flow[", "kernel.flow_priors_clamps"):
        assert any(n.startswith(kind) for n in gradcheck.CHECKS), kind


def test_check_false_skips_the_noise_finiteness_read_as_it_skips_the_data_check(monkeypatch):
    """check=False (the trainer, the benchmark, a CUDA-graph capture) must not read the device to check the noise."""
    from npdgm import backend as B
    from npdgm.models.cvae import CVAE
    from npdgm.models.m2 import M2
    from npdgm.models.vae import VAE

    reads = []
    monkeypatch.setattr(B, "check_finite", lambda name, a: reads.append(name))
    x, y = np.full((3, 6), 0.5, np.float32), np.array([0, 1, 0])
    VAE(x_dim=6, hidden=(4,), z_dim=2).loss_and_grad(x, np.zeros((1, 3, 2), np.float32), check=False)
    CVAE(x_dim=6, num_classes=2, hidden=(4,), z_dim=2).loss_and_grad(x, y, np.zeros((1, 3, 2), np.float32), check=False)
    M2(x_dim=6, num_classes=2, hidden=(4,), z_dim=2).loss_and_grad(x, y, x, np.zeros((3, 2), np.float32),
                                                                   np.zeros((2, 3, 2), np.float32), check=False)
    assert reads == []
    VAE(x_dim=6, hidden=(4,), z_dim=2).loss_and_grad(x, np.zeros((1, 3, 2), np.float32))
    assert reads == ["x", "eps"]          # check=True: the data and the noise
