"""Issue 29 item 4: KL's two directions. Named unnormalised 2-D targets with hand-written d log p*/dx
(npdgm.targets), a flow fitted to them by reverse KL through its sampling direction (Flow.reverse_kl_and_grad)
and by forward KL (maximum likelihood on the target's samples): `npdgm train flow2d --target NAME --objective`."""
import json
import math

import numpy as np
import pytest

from npdgm import backend, cli
from npdgm.gradcheck import check_module_params, compare, numerical_grad
from npdgm.models import flows as F
from npdgm.optim import Adam
from npdgm.targets import TARGETS, get_target


@pytest.mark.parametrize("name", list(TARGETS))
def test_target_log_density_gradient_by_central_differences(name):
    t = get_target(name)
    x = np.random.default_rng(1).uniform(-3, 3, (40, 2))
    x[0] = [0.0, 1.5]  # two-moons: on the fold a = |x_1| = 0 (smooth there)
    _, grad = t(x)
    num = numerical_grad(lambda: t.log_prob(x).sum(), x)
    assert compare(grad, num)[1] < 1e-6


@pytest.mark.parametrize("name", list(TARGETS))
def test_target_samples_follow_its_density(name):
    """E_p[log p*] from the sampler (the mixture directly, the others by rejection) against quadrature."""
    t = get_target(name)
    xs = np.linspace(-t.box, t.box, 801)
    gx, gy = np.meshgrid(xs, xs)
    lp = t.log_prob(np.stack([gx.ravel(), gy.ravel()], 1))
    w = np.exp(lp - t.log_z) * (xs[1] - xs[0]) ** 2
    assert abs(w.sum() - 1) < 1e-6
    expected = float((w * lp).sum())
    s = t.log_prob(t.sample(20000, np.random.default_rng(2)))
    assert abs(s.mean() - expected) < 4 * s.std() / math.sqrt(len(s)) + 1e-3


def test_bimodal_is_normalised():
    assert abs(get_target("bimodal").log_z) < 1e-5


def test_unknown_target_names_the_choices():
    with pytest.raises(ValueError, match="bimodal, ring, two-moons"):
        get_target("banana")


@pytest.mark.parametrize("kind", ["realnvp", "maf", "spline"])
def test_reverse_kl_gradient_by_float64_central_differences(kind):
    """The gradient through the sampling direction, its log-det included, with the base noise held fixed."""
    with backend.use("numpy", "float64"):
        make = {"realnvp": lambda: F.realnvp2d(n_couplings=2, hidden=(6,), seed=3),
                "maf": lambda: F.maf2d(n_layers=2, hidden=(6,), seed=3),
                "spline": lambda: F.spline2d(n_couplings=2, hidden=(6,), bins=4, seed=3, identity_init=False)}
        flow = make[kind]()
        rng = np.random.default_rng(4)
        flow.flat_params[:] += 0.3 * rng.standard_normal(flow.flat_params.shape)  # off the initial values
        z = rng.standard_normal((16, 2))
        target = get_target("bimodal")
        flow.reverse_kl_and_grad(z, target)
        report = check_module_params(flow, lambda: float(flow.reverse_kl_and_grad(z, target, zero_grad=False)["loss"]))
        worst = max(rel for _, rel in report.values())
        assert worst < 1e-6, report


def test_reverse_kl_terms_add_up():
    flow = F.realnvp2d(n_couplings=2, hidden=(8,), seed=0)
    z = np.random.default_rng(0).standard_normal((64, 2)).astype(np.float32)
    t = flow.reverse_kl_and_grad(z, get_target("ring"))
    assert math.isclose(float(t["loss"]), float(t["logprior"] + t["logdet"] - t["logtarget"]), rel_tol=1e-5)


def test_a_short_reverse_kl_fit_reduces_the_reverse_kl():
    target = get_target("ring")
    flow = F.realnvp2d(n_couplings=4, hidden=(16,), seed=0)
    opt = Adam(flow, lr=3e-3)
    held = np.random.default_rng(9).standard_normal((2000, 2)).astype(np.float32)

    def kl():
        x, ld_inv = flow.inverse(held, logdet=True)
        logq = -0.5 * (held.astype(np.float64) ** 2).sum(1) - math.log(2 * math.pi) - ld_inv
        return float(np.mean(logq - target.log_prob(x.astype(np.float64)))) + target.log_z

    before, rng = kl(), np.random.default_rng(0)
    for _ in range(150):
        flow.reverse_kl_and_grad(rng.standard_normal((128, 2)).astype(np.float32), target)
        opt.step()
    after = kl()
    assert after >= -0.05 and after < 0.6 * before, (before, after)


SMALL = ["--couplings", "2", "--hidden", "8", "--train-limit", "256", "--test-limit", "200", "--batch-size", "64",
         "--steps", "8", "--no-progress"]


@pytest.mark.parametrize("objective", ["reverse-kl", "forward-kl"])
def test_cli_fits_a_target_by_either_kl(objective, tmp_path, capsys):
    out = tmp_path / objective
    argv = ["train", "flow2d", "--target", "bimodal", "--objective", objective, *SMALL, "--out", str(out)]
    assert cli.main(argv) == 0
    assert capsys.readouterr().err == ""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert len(records) == 2 and summary["target"] == "bimodal" and summary["objective"] == objective
    for r in records:
        assert r["test_kl_reverse"] > 0 and r["test_kl_forward"] > 0
        if objective == "reverse-kl":  # the step's terms: loss = logprior + logdet - logtarget
            assert math.isclose(r["train_loss"], r["train_logprior"] + r["train_logdet"] - r["train_logtarget"],
                                rel_tol=1e-5, abs_tol=1e-4)
    # KL(p || q) = NLL - H(p), the mixture's entropy ~ a component's 1 + log(2 pi s^2) plus log 2 (the modes are
    # 10 sd apart); E_p log p* is a mean over the 200 test samples, hence the tolerance
    entropy = 1.0 + math.log(2 * math.pi * 0.25) + math.log(2)
    assert math.isclose(summary["test_kl_forward"], summary["test_nll"] - entropy, abs_tol=0.3)
    assert (out / "fit.png").stat().st_size > 0 and (out / "terms.png").stat().st_size > 0


def test_cli_reverse_kl_needs_a_target_and_target_excludes_dataset(tmp_path, capsys):
    assert cli.main(["train", "flow2d", "--objective", "reverse-kl", *SMALL, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--objective reverse-kl needs --target" in err and len(err.splitlines()) == 1
    assert cli.main(["train", "flow2d", "--target", "ring", "--dataset", "moons", *SMALL,
                     "--out", str(tmp_path / "b")]) == 2
    assert "give one" in capsys.readouterr().err


def test_kl_directions_figure_puts_both_fits_beside_the_target(monkeypatch, tmp_path):
    from npdgm.plots import flows as PF

    seen = []
    monkeypatch.setattr(PF, "_save", lambda fig, path: seen.append(fig))
    fits = [(o, F.realnvp2d(n_couplings=2, hidden=(8,), seed=0), {"test_kl_reverse": 0.7, "test_kl_forward": 4.9})
            for o in ("forward-kl", "reverse-kl")]
    PF.kl_directions(get_target("bimodal"), fits, tmp_path / "k.png", n_samples=50)
    fig, = seen
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0].startswith("target p(x)") and "mass-covering" in titles[1] and "mode-seeking" in titles[2]
    assert "KL(q || p) = 0.700" in titles[2]
