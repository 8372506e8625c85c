"""InvertibleLinear (LU-parameterized, Glow's 1x1 convolution for vectors): exact inverse, log-det against a
finite-difference Jacobian, W = P L1 U1, hand-written gradients of both passes, spec round trip."""
import numpy as np
import pytest

from npdgm import checks, gradcheck  # noqa: F401  (checks registers the model gradchecks)
from npdgm.models import flows as F


def _layer(d, rng, seed=2):
    layer = F.InvertibleLinear(d, seed=seed).flatten()
    layer.flat_params[...] += 0.3 * rng.standard_normal(layer.flat_params.shape)
    return layer


def _weight(layer):
    L1, U1, s, _, _ = layer._tri()
    P = np.zeros((layer.dim, layer.dim))
    P[layer.perm, np.arange(layer.dim)] = 1.0
    return P, L1, U1, s


@pytest.mark.parametrize("d", [1, 2, 3, 5, 8])
def test_round_trip_and_logdet_match_slogdet(f64, rng, d):
    layer = _layer(d, rng)
    x = rng.standard_normal((6, d)) * 1.5
    y, ld = layer.forward(x)
    xx, ldi = layer.inverse(y, logdet=True)
    assert np.max(np.abs(xx - x)) < 1e-10
    np.testing.assert_allclose(ld, gradcheck.numerical_logdet(lambda a: layer.forward(a)[0], x), rtol=1e-7, atol=1e-8)
    np.testing.assert_allclose(ldi, -ld, rtol=1e-12)
    np.testing.assert_allclose(ldi, gradcheck.numerical_logdet(lambda a: layer.inverse(a), y), rtol=1e-7, atol=1e-8)


def test_weight_is_p_l_u_and_starts_orthogonal(f64, rng):
    layer = F.InvertibleLinear(6, seed=4)
    P, L1, U1, s = _weight(layer)
    W = P @ L1 @ U1
    np.testing.assert_allclose(W.T @ W, np.eye(6), atol=1e-12)  # the LU of a random rotation
    assert np.allclose(np.diag(L1), 1) and np.allclose(np.triu(L1, 1), 0) and np.allclose(np.tril(U1, -1), 0)
    x = rng.standard_normal((3, 6))
    np.testing.assert_allclose(layer.forward(x)[0], x @ W, atol=1e-12)
    np.testing.assert_allclose(np.log(abs(np.linalg.det(W))), layer.log_s.data.sum(), atol=1e-12)
    assert set(np.sign(s)) <= {-1.0, 1.0} and np.array_equal(np.sign(s), layer.sign_host)


def test_only_the_triangles_are_parameters(f64, rng):
    """Entries of L on/above the diagonal and of U on/below it change nothing and get zero gradient."""
    layer = _layer(4, rng)
    x = rng.standard_normal((5, 4))
    y0 = layer.forward(x)[0]
    layer.zero_grad()
    layer.backward(rng.standard_normal((5, 4)), rng.standard_normal(5))
    assert np.all(np.triu(layer.L.grad) == 0) and np.all(np.tril(layer.U.grad) == 0)
    assert np.any(np.tril(layer.L.grad, -1) != 0) and np.any(np.triu(layer.U.grad, 1) != 0)
    layer.L.data[...] += 5 * np.triu(np.ones((4, 4)))
    layer.U.data[...] += 5 * np.tril(np.ones((4, 4)))
    np.testing.assert_array_equal(layer.forward(x)[0], y0)


@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_backward_of_both_passes_matches_central_differences(f64, rng, direction):
    layer = _layer(5, rng)
    a = rng.standard_normal((4, 5))
    rep = gradcheck.check_flow_layer(layer, a, rng, direction)
    assert max(r for _, r in rep.values()) < 1e-7, rep


def test_gradcheck_is_registered():
    """model.flow[invertible-linear] (run with every model.flow check by tests/test_flows.py)."""
    assert "model.flow[invertible-linear]" in gradcheck.CHECKS


def test_spec_rebuilds_the_layer_and_a_flow_round_trips(f64, rng, tmp_path):
    fl = F.Flow([F.InvertibleLinear(3, seed=1), F.AffineCoupling(3, "half", 0, [4], seed=2),
                 F.InvertibleLinear(3, seed=5)])
    fl.flat_params[...] += 0.2 * rng.standard_normal(fl.flat_params.shape)
    fl.save(tmp_path / "f.npz")
    import npdgm

    back = npdgm.load(tmp_path / "f.npz")
    assert back.config == fl.config and back.layers[0].spec()["perm"] == fl.layers[0].spec()["perm"]
    x = rng.standard_normal((4, 3))
    np.testing.assert_allclose(back.log_prob(x), fl.log_prob(x), rtol=1e-12)
    z = fl.forward(x)[0]
    assert np.max(np.abs(fl.inverse(z) - x)) < 1e-10


def test_bad_perm_or_sign_is_reported():
    with pytest.raises(ValueError, match="perm must be a permutation of 0..2"):
        F.InvertibleLinear(3, perm=[0, 0, 1])
    with pytest.raises(ValueError, match="sign must be 3 values of \\+1 or -1"):
        F.InvertibleLinear(3, sign=[1, 0, 1])
