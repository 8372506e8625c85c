import numpy as np
import pytest

from npdgm import backend
from npdgm.nn import MLP, Activation, Linear, Module, Parameter, Sequential, init_weight


def test_linear_init_and_layout(f64):
    lin = Linear(784, 400, rng=0)
    k = 1 / np.sqrt(784)
    assert lin.W.data.shape == (784, 400) and np.abs(lin.W.data).max() <= k
    assert abs(lin.W.data.std() - k / np.sqrt(3)) < 1e-3  # U(-k, k) has std k / sqrt 3
    assert lin.W.data.dtype == np.float64


@pytest.mark.parametrize("init, std", [("xavier_normal", np.sqrt(2 / 700)), ("kaiming_normal", np.sqrt(2 / 400)),
                                       ("xavier_uniform", np.sqrt(6 / 700) / np.sqrt(3))])
def test_named_inits_have_their_variance(init, std):
    W, b = init_weight(np.random.default_rng(0), 400, 300, init)
    assert abs(W.std() / std - 1) < 0.02 and not b.any()


def test_same_seed_same_weights_on_float32_default():
    a, b = MLP(5, [7], 3, rng=11), MLP(5, [7], 3, rng=11)
    for (n, x), (_, y) in zip(a.params.items(), b.params.items()):
        assert x.dtype == np.float32 and np.array_equal(x, y), n


def test_mlp_names_like_torch_and_flatten_keeps_values():
    m = MLP(4, [6, 5], 3, activation="tanh", rng=0)
    assert list(m.params) == ["0.W", "0.b", "2.W", "2.b", "4.W", "4.b"]
    before = {k: v.copy() for k, v in m.params.items()}
    m.flatten()
    assert m.flat_params.size == m.num_parameters() == 4 * 6 + 6 + 6 * 5 + 5 + 5 * 3 + 3
    for k, v in m.params.items():
        assert np.array_equal(v, before[k]) and np.shares_memory(v, m.flat_params)
    assert [(n, s) for n, s, _ in m.layout()] == [(k, v.shape) for k, v in before.items()]
    m.grads["2.W"][...] = 1
    m.zero_grad()
    assert not m.flat_grads.any()


def test_backward_accumulates(f64, rng):
    m = MLP(3, [4], 2, rng=0)
    x, dy = rng.standard_normal((5, 3)), rng.standard_normal((5, 2))
    m.forward(x)
    m.backward(dy)
    once = {k: v.copy() for k, v in m.grads.items()}
    m.forward(x)
    m.backward(dy)
    for k, v in m.grads.items():
        np.testing.assert_allclose(v, 2 * once[k])


@pytest.mark.parametrize("flat", [False, True])
def test_zero_grad_then_backwards_add_from_zero(f64, rng, flat):
    """zero_grad clears whatever the gradients held; later backwards add to them."""
    m = MLP(3, [4], 2, rng=0)
    if flat:
        m.flatten()
    x, dy = rng.standard_normal((5, 3)), rng.standard_normal((5, 2))
    m.forward(x)
    m.backward(dy)
    once = {k: v.copy() for k, v in m.grads.items()}
    for g in m.grads.values():
        g[...] = 7.0                        # old values a backward would add to
    m.zero_grad()
    m.forward(x)
    m.backward(dy)
    m.forward(x)
    m.backward(dy)
    for k, v in m.grads.items():
        np.testing.assert_allclose(v, 2 * once[k], rtol=1e-12)


def test_zero_grad_of_a_flat_module_zeroes_the_buffer_for_every_optimizer(f64, rng):
    """Flattened, zero_grad is one fill of the gradient buffer: a step after a backward that reached only
    the last layer leaves the first layer where it was (also for optimizers given the parameters one by
    one, as a generator)."""
    from npdgm.optim import SGD, Adam

    m = MLP(3, [4], 2, rng=0).flatten()
    x, dy = rng.standard_normal((5, 3)), rng.standard_normal((5, 2))
    m.forward(x)
    m.backward(dy)
    m.zero_grad()
    np.testing.assert_array_equal(m.flat_grads, 0.0)
    first = m.layers[0]
    for opt in (SGD(m, lr=0.1), Adam(m, lr=0.1), SGD(iter(m.parameters()), lr=0.1),
                Adam((p for p in m.parameters()), lr=0.1)):
        m.forward(x)
        m.backward(dy)
        m.zero_grad()
        m.layers[2].backward(dy)
        before = first.W.data.copy()
        opt.step()
        np.testing.assert_array_equal(first.W.data, before)
    m.zero_grad()
    first.W.accumulate(np.ones(4), 1)
    np.testing.assert_array_equal(first.W.grad, np.outer([0, 1, 0], np.ones(4)))


def test_grad_written_by_hand_after_zero_grad_is_kept(f64, rng):
    """A Linear backward adds to a hand-written term (e.g. a penalty gradient put in before the backward)."""
    m = MLP(3, [4], 2, rng=0).flatten()
    x, dy = rng.standard_normal((5, 3)), rng.standard_normal((5, 2))
    m.forward(x)
    m.backward(dy)
    once = {k: v.copy() for k, v in m.grads.items()}
    m.zero_grad()
    lin = m.layers[0]
    lin.W.grad += 0.5 * lin.W.data
    lin.b.accumulate(np.array([1.0, 2.0]), slice(0, 2))
    m.forward(x)
    m.backward(dy)
    np.testing.assert_allclose(lin.W.grad, once["0.W"] + 0.5 * lin.W.data, rtol=1e-12)
    np.testing.assert_allclose(lin.b.grad, once["0.b"] + [1.0, 2.0, 0.0, 0.0], rtol=1e-12)
    np.testing.assert_allclose(m.grads["2.W"], once["2.W"], rtol=1e-12)


def test_first_layer_can_skip_dx(f64, rng):
    m = MLP(3, [4], 2, rng=0)
    m.forward(rng.standard_normal((5, 3)))
    assert m.backward(rng.standard_normal((5, 2)), need_dx=False) is None


def test_state_dict_round_trip_and_checks():
    a, b = MLP(4, [6], 3, rng=0), MLP(4, [6], 3, rng=1)
    b.load_state_dict(a.state_dict())
    for k in a.params:
        assert np.array_equal(a.params[k], b.params[k])
    sd = a.state_dict()
    with pytest.raises(KeyError, match=r"missing \['2.b'\]"):
        b.load_state_dict({k: v for k, v in sd.items() if k != "2.b"})
    with pytest.raises(ValueError, match=r"'0.W' has shape \(3, 6\), model expects \(4, 6\)"):
        b.load_state_dict({**sd, "0.W": np.zeros((3, 6), np.float32)})
    with pytest.raises(TypeError, match="'0.W' has dtype float64, model expects float32"):
        b.load_state_dict({**sd, "0.W": sd["0.W"].astype(np.float64)})


def test_bad_module_input():
    lin = Linear(4, 3, rng=0)
    with pytest.raises(ValueError, match=r"Linear\(4, 3\) expects input of shape \(batch, 4\), got \(2, 5\)"):
        lin.forward(np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        MLP(4, [3], 2, activation="gelu")
    with pytest.raises(ValueError, match="unknown init 'he'"):
        Linear(4, 3, init="he")
    with pytest.raises(TypeError, match="Sequential item 1 is int"):
        Sequential(Activation("relu"), 3)


def test_module_subclass_must_call_super_init():
    class Bad(Module):
        def __init__(self):
            self.w = Parameter(np.zeros(2))

    with pytest.raises(RuntimeError, match="must call super"):
        Bad()


def test_float64_override():
    with backend.use(dtype="float64"):
        assert Linear(2, 2, rng=0).W.data.dtype == np.float64


def test_conditional_mlp_lives_in_nn_and_matches_the_concatenated_mlp(f64, rng):
    """nn.ConditionalMLP(D, C, ...) is MLP(D + C, ...) on [x | e] (same weights), forward and backward."""
    from npdgm.nn import ConditionalMLP
    from npdgm.models import cvae

    assert cvae.ConditionalMLP is ConditionalMLP           # the old import path still works
    cm = ConditionalMLP(3, 2, [4], 5, activation="tanh", rng=1).flatten()
    full = MLP(5, [4], 5, activation="tanh", rng=1).flatten()
    x, y = rng.standard_normal((6, 3)), rng.integers(0, 2, 6)
    e = np.eye(2)[y]
    dy = rng.standard_normal((6, 5))
    cm.zero_grad()
    full.zero_grad()
    np.testing.assert_allclose(cm.forward(x, e), full.forward(np.hstack([x, e])), rtol=1e-12)
    dx = cm.backward(dy)
    dxe = full.backward(dy)
    np.testing.assert_allclose(dx, dxe[:, :3], rtol=1e-12)
    for k in full.grads:
        np.testing.assert_allclose(cm.grads[k], full.grads[k], rtol=1e-12, atol=1e-15)


def _input_vjp_cases(rng):
    """(name, module, forward) with forward(module) -> output, for every module kind with an input_vjp."""
    from npdgm.models.autoregressive import MADE, MaskedLinear, made_masks
    from npdgm.nn import ConditionalMLP
    from npdgm.nn.conv import conv_decoder, conv_encoder

    x, e = rng.standard_normal((4, 6)), np.eye(3)[[0, 2, 1, 1]]
    img = rng.standard_normal((4, 16))
    return [("Linear", Linear(6, 5, rng=0), lambda m: m.forward(x)),
            ("MLP", MLP(6, [7, 5], 4, activation="tanh", rng=1), lambda m: m.forward(x)),
            ("ConditionalMLP", ConditionalMLP(6, 3, [5], 4, rng=2), lambda m: m.forward(x, e)),
            ("ConditionalMLP.forward_all", ConditionalMLP(6, 3, [5], 4, rng=2), lambda m: m.forward_all(x)),
            ("MaskedLinear", MaskedLinear(made_masks(6, [8], 2)[0], rng=3), lambda m: m.forward(x)),
            ("MADE", MADE(6, [8, 8], seed=4), lambda m: m.forward(x)),
            ("conv_decoder", conv_decoder(6, [2, 3], (1, 4, 4), rng=5), lambda m: m.forward(x)),
            ("conv_encoder", conv_encoder((1, 4, 4), [2, 3], 5, rng=6), lambda m: m.forward(img))]


def test_input_vjp_is_the_backward_dx_without_parameter_gradients(f64, rng):
    """One input-VJP on nn (Module.input_vjp): the dx of backward, and no parameter gradient is touched."""
    for name, m, forward in _input_vjp_cases(rng):
        y = forward(m)
        dy = rng.standard_normal(y.shape)
        m.zero_grad()
        dx = m.input_vjp(dy)
        assert not any(np.any(g) for g in m.grads.values()), name
        forward(m)
        np.testing.assert_allclose(dx, m.backward(dy), rtol=1e-12, atol=1e-12, err_msg=name)
        assert any(np.any(g) for g in m.grads.values()), name


def test_a_module_with_parameters_and_no_input_vjp_says_so():
    class Scale(Module):
        def __init__(self):
            super().__init__()
            self.s = Parameter(np.ones(3))
    with pytest.raises(NotImplementedError, match="Scale has parameters and no input_vjp"):
        Scale().input_vjp(np.ones((2, 3)))
    a = Activation("tanh")
    a.forward(np.zeros((2, 3)))
    np.testing.assert_array_equal(a.input_vjp(np.ones((2, 3))), np.ones((2, 3)))   # parameter-free: its backward


def test_conv_vae_posterior_gradient_matches_central_differences(f64, rng):
    """log_joint_and_grad_z of a conv VAE (the HMC/AIS target) went through dy @ W.T of every layer with a W,
    a conv kernel's included, and crashed; the decoder's input_vjp gives d/dz log p(x, z)."""
    from npdgm.models.vae import VAE

    m = VAE(x_dim=64, z_dim=3, channels=(2, 3), arch="conv", image_shape=(1, 8, 8), seed=0)
    x, z = (rng.random((2, 64)) < 0.5).astype(np.float64), rng.standard_normal((2, 3))
    g, h = m.log_joint_and_grad_z(x, z)[1], 1e-6
    for j in range(3):
        dz = np.zeros_like(z)
        dz[:, j] = h
        fd = (m.log_joint_and_grad_z(x, z + dz)[0] - m.log_joint_and_grad_z(x, z - dz)[0]) / (2 * h)
        np.testing.assert_allclose(g[:, j], fd, rtol=1e-6, atol=1e-7)
