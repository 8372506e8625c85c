"""Every kernel backward against float64 central differences (the npdgm gradcheck registry, one check per
entry of the kernel table), the table covering every ``*_backward``, plus forward values against direct
formulas and the bad-input errors."""
import dataclasses
import importlib
import inspect
import math
import pkgutil

import numpy as np
import pytest

from npdgm import checks, gradcheck  # noqa: F401  (checks registers the kernel checks)
from npdgm import kernels as K
from npdgm.kernels.table import KERNELS, TABLE

KERNEL_AND_MODULE_CHECKS = [n for n in gradcheck.CHECKS if n.startswith(("kernel.", "module."))]


@pytest.mark.parametrize("name", KERNEL_AND_MODULE_CHECKS)
def test_gradient_matches_central_differences(name):
    rows = gradcheck.run_all([name], seed=3)
    assert rows, name
    for check_name, inp, abs_err, rel_err, ok in rows:
        assert rel_err < 1e-6, f"{check_name}:{inp} rel err {rel_err:.2e}"


def _backward_functions():
    """(module, name, function) of every ``*_backward`` function defined in npdgm.kernels and its submodules."""
    mods = [K] + [importlib.import_module(f"npdgm.kernels.{m.name}") for m in pkgutil.iter_modules(K.__path__)]
    for mod in mods:
        for name, fn in inspect.getmembers(mod, inspect.isfunction):
            if name.endswith("_backward") and fn.__module__ == mod.__name__:
                yield mod.__name__, name, fn


def _missing_from_table():
    backwards = {k.backward for k in TABLE}
    names = {k.backward.__name__ for k in TABLE}
    missing = []
    for mod, name, fn in _backward_functions():
        # fused.py holds GPU twins under the plain kernels' names (tested against them on a GPU)
        if not (name in names if mod == "npdgm.kernels.fused" else fn in backwards):
            missing.append(f"{mod}.{name}")
    return missing


def test_every_backward_is_in_the_kernel_table():
    found = list(_backward_functions())
    assert len(found) >= 30
    assert not _missing_from_table(), f"add these to npdgm/kernels/table.py (with an input maker): " \
                                      f"{_missing_from_table()}"
    for k in TABLE:  # the table drives gradcheck, and every derivative is written in a docstring
        assert k.check_name in gradcheck.CHECKS, k.name
        assert "=" in k.derivative and "=" in k.formula, k.name


def test_table_coverage_test_notices_a_new_kernel(monkeypatch):
    from npdgm.kernels import linear

    def scaled_backward(dy, x):
        """dx = 2 dy."""
        return 2 * dy

    scaled_backward.__module__ = linear.__name__
    monkeypatch.setattr(linear, "scaled_backward", scaled_backward, raising=False)
    assert _missing_from_table() == ["npdgm.kernels.linear.scaled_backward"]


def test_table_gradcheck_catches_a_wrong_backward():
    k = KERNELS["softmax_entropy"]

    def wrong(i):  # the entropy backward without its "+ H" term
        out, _ = k.run(i)
        q = np.exp(K.log_softmax_forward(i["logits"]))
        return out, {"logits": -i["dy"][:, None] * q * np.log(q)}

    inputs = k.make(np.random.default_rng(0), np.float64)
    assert gradcheck.check_kernel(k, inputs)["logits"][1] < 1e-6
    assert gradcheck.check_kernel(dataclasses.replace(k, run=wrong), inputs)["logits"][1] > 1e-3


def test_gradcheck_detects_a_wrong_backward(rng):
    x = rng.standard_normal((3, 4))
    dy = rng.standard_normal((3, 4))
    wrong = dy * (1 - np.tanh(x))  # missing the square
    rep = gradcheck.check(lambda: np.sum(np.tanh(x) * dy), {"x": x}, {"x": wrong})
    assert rep["x"][1] > 1e-3


def test_stable_forms_at_extreme_logits():
    l = np.array([[-800.0, -30.0, 0.0, 30.0, 800.0]])
    assert np.all(np.isfinite(K.sigmoid_forward(l)))
    np.testing.assert_allclose(K.softplus_forward(l), [[0, math.log1p(math.exp(-30)), math.log(2),
                                                         30 + math.log1p(math.exp(-30)), 800]], rtol=1e-12)
    x = np.array([[0.0, 1.0, 0.5, 1.0, 0.0]])
    nll = K.bernoulli_nll_forward(l, x)
    assert np.isfinite(nll).all()
    np.testing.assert_allclose(nll, [np.sum(np.logaddexp(0, l) - x * l)], rtol=1e-12)
    g = K.bernoulli_nll_backward(np.ones(1), l, x)
    np.testing.assert_allclose(g, [[0, 1 / (1 + math.exp(30)) - 1, 0, 1 / (1 + math.exp(-30)) - 1, 1]], atol=1e-12)


def test_gaussian_nll_matches_scipy():
    from scipy.stats import norm

    rng = np.random.default_rng(0)
    mu, x, lv = rng.standard_normal((3, 4)), rng.standard_normal((3, 4)), rng.standard_normal(4)
    want = -norm.logpdf(x, mu, np.exp(0.5 * lv)).sum(1)
    np.testing.assert_allclose(K.gaussian_nll_forward(mu, x, lv), want, rtol=1e-12)


def test_logsumexp_matches_scipy_and_handles_minus_inf():
    from scipy.special import logsumexp

    a = np.array([[1000.0, 999.0, -np.inf], [-np.inf, -np.inf, -np.inf]])
    with np.errstate(divide="ignore"):  # log(0) = -inf for the all -inf row is the right answer
        y = K.logsumexp_forward(a, axis=1)
    np.testing.assert_allclose(y[0], logsumexp(a[0]), rtol=1e-14)
    assert y[1] == -np.inf


def test_kl_matches_monte_carlo():
    rng = np.random.default_rng(0)
    mu, lv = np.array([[0.5, -1.0]]), np.array([[0.3, -0.7]])
    z = mu + np.exp(0.5 * lv) * rng.standard_normal((400_000, 2))
    logq = -0.5 * (((z - mu) ** 2) * np.exp(-lv) + lv + math.log(2 * math.pi)).sum(1)
    logp = -0.5 * (z ** 2 + math.log(2 * math.pi)).sum(1)
    mc = np.mean(logq - logp)
    assert abs(K.kl_std_normal_forward(mu, lv)[0] - mc) < 0.01


@pytest.mark.parametrize("call, match", [
    (lambda: K.linear_forward(np.zeros((2, 3)), np.zeros((4, 5)), np.zeros(5)), "x has 3 features but W expects 4"),
    (lambda: K.linear_forward(np.zeros(3), np.zeros((3, 5)), np.zeros(5)), "x must be a 2-D array"),
    (lambda: K.linear_forward(np.zeros((2, 3)), np.zeros((3, 5)), np.zeros(4)), r"b must have shape \(5,\)"),
    (lambda: K.linear_forward(np.zeros((2, 3), np.int64), np.zeros((3, 5)), np.zeros(5)), "x must be a float"),
    (lambda: K.linear_forward(np.zeros((2, 3), np.float32), np.zeros((3, 5)), np.zeros(5)), "x is float32 but W is float64"),
    (lambda: K.bernoulli_nll_forward(np.zeros((2, 3)), np.zeros((2, 4))), "logits has shape"),
    (lambda: K.relu_backward(np.zeros((2, 3)), np.zeros((3, 2))), "dy has shape"),
    (lambda: K.reparameterize_forward(np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((2, 4))), "eps must end with shape"),
    (lambda: K.get_activation("swish"), "unknown activation 'swish'"),
])
def test_bad_input_is_a_clear_error(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_numerical_jacobian_and_logdet_of_a_known_map(rng):
    """gradcheck's brute-force log-det (used on every flow layer) on x -> tanh(x) @ A: J_b = A^T diag(1 - tanh^2)."""
    from npdgm import gradcheck

    A, x = rng.standard_normal((3, 3)) + 3 * np.eye(3), rng.standard_normal((4, 3))
    J = gradcheck.numerical_jacobian(lambda v: np.tanh(v) @ A, x)
    np.testing.assert_allclose(J, A.T[None] * (1 - np.tanh(x) ** 2)[:, None, :], atol=1e-8)
    want = np.linalg.slogdet(A)[1] + np.log(1 - np.tanh(x) ** 2).sum(1)
    np.testing.assert_allclose(gradcheck.numerical_logdet(lambda v: np.tanh(v) @ A, x), want, atol=1e-8)
    with pytest.raises(FloatingPointError, match="singular"):
        gradcheck.numerical_logdet(lambda v: v * 0, x)
