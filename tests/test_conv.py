"""npdgm.kernels.conv: conv2d and its transposed twin (forward, backward by float64 central differences, the
adjoint identity, PyTorch's conv2d / conv_transpose2d on odd sizes, padding, strides, dilation) and
squeeze / unsqueeze (a permutation: inverse, adjoint, pixel_unshuffle)."""
import numpy as np
import pytest

from npdgm.gradcheck import check
from npdgm.kernels import conv as K

CASES = [  # (B, C, H, W, O, kh, kw, stride, padding, dilation)
    (2, 3, 5, 6, 4, 3, 3, 1, 0, 1),
    (2, 2, 7, 5, 3, 3, 2, 2, 1, 1),
    (1, 3, 9, 8, 2, 3, 3, (2, 1), (1, 2), 2),
    (3, 1, 4, 4, 2, 1, 1, 1, 0, 1),
]


def _axis(a, i):
    """stride / padding / dilation of axis i (0: height, 1: width)."""
    return a if isinstance(a, int) else a[i]


def _case(rng, B, C, H, W, O, kh, kw):
    return rng.standard_normal((B, C, H, W)), rng.standard_normal((O, C, kh, kw)), rng.standard_normal(O)


@pytest.mark.parametrize("case", CASES)
def test_conv2d_backward_matches_central_differences(case, rng):
    B, C, H, W, O, kh, kw, s, p, d = case
    x, Wt, b = _case(rng, B, C, H, W, O, kh, kw)
    y = K.conv2d_forward(x, Wt, b, s, p, d)
    assert y.shape == (B, O, K.conv_output_size(H, kh, *(_axis(a, 0) for a in (s, p, d))),
                       K.conv_output_size(W, kw, *(_axis(a, 1) for a in (s, p, d))))
    dy = rng.standard_normal(y.shape)
    dx, dW, db = K.conv2d_backward(dy, x, Wt, s, p, d)
    rep = check(lambda: (K.conv2d_forward(x, Wt, b, s, p, d) * dy).sum(), {"x": x, "W": Wt, "b": b},
                {"x": dx, "W": dW, "b": db})
    assert all(r < 1e-7 for _, r in rep.values()), rep


@pytest.mark.parametrize("case", CASES)
def test_conv_transpose2d_is_the_adjoint_and_its_backward(case, rng):
    B, C, H, W, O, kh, kw, s, p, d = case
    x, Wt, _ = _case(rng, B, C, H, W, O, kh, kw)
    y = K.conv2d_forward(x, Wt, None, s, p, d)
    u = rng.standard_normal(y.shape)
    # <conv(x), u> = <x, conv^T(u)>: conv^T reads the same weights as (in=O, out=C); the output padding
    # gives back the rows and columns a strided convolution skipped
    op = tuple(n - K.conv_transpose2d_output_size(m, k, *(_axis(a, i) for a in (s, p, d)))
               for i, (n, m, k) in enumerate(((H, y.shape[2], kh), (W, y.shape[3], kw))))
    xt = K.conv_transpose2d_forward(u, Wt, None, s, p, d, output_padding=op)
    assert xt.shape == x.shape
    np.testing.assert_allclose((y * u).sum(), (x * xt).sum(), rtol=1e-12)
    b = rng.standard_normal(C)
    z = K.conv_transpose2d_forward(u, Wt, b, s, p, d)
    dz = rng.standard_normal(z.shape)
    du, dW, db = K.conv_transpose2d_backward(dz, u, Wt, s, p, d)
    rep = check(lambda: (K.conv_transpose2d_forward(u, Wt, b, s, p, d) * dz).sum(), {"x": u, "W": Wt, "b": b},
                {"x": du, "W": dW, "b": db})
    assert all(r < 1e-7 for _, r in rep.values()), rep


@pytest.mark.parametrize("case", CASES)
def test_conv_matches_torch(case, rng):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    B, C, H, W, O, kh, kw, s, p, d = case
    x, Wt, b = _case(rng, B, C, H, W, O, kh, kw)
    tx, tW, tb = (torch.tensor(a, requires_grad=True) for a in (x, Wt, b))
    ty = F.conv2d(tx, tW, tb, stride=s, padding=p, dilation=d)
    y = K.conv2d_forward(x, Wt, b, s, p, d)
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal(y.shape)
    ty.backward(torch.tensor(dy))
    for ours, theirs in zip(K.conv2d_backward(dy, x, Wt, s, p, d), (tx, tW, tb)):
        np.testing.assert_allclose(ours, theirs.grad.numpy(), rtol=1e-11, atol=1e-11)
    # the transposed convolution, with an output padding where the stride allows one
    op = tuple(_axis(s, i) - 1 for i in (0, 1))
    u, bt = rng.standard_normal(y.shape), rng.standard_normal(C)
    tu, tWt, tbt = (torch.tensor(a, requires_grad=True) for a in (u, Wt, bt))
    tz = F.conv_transpose2d(tu, tWt, tbt, stride=s, padding=p, dilation=d, output_padding=op)
    z = K.conv_transpose2d_forward(u, Wt, bt, s, p, d, op)
    np.testing.assert_allclose(z, tz.detach().numpy(), rtol=1e-12, atol=1e-12)
    dz = rng.standard_normal(z.shape)
    tz.backward(torch.tensor(dz))
    for ours, theirs in zip(K.conv_transpose2d_backward(dz, u, Wt, s, p, d), (tu, tWt, tbt)):
        np.testing.assert_allclose(ours, theirs.grad.numpy(), rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("k,p,d", [(3, 1, 1), (3, 0, 1), (2, 0, 1), (3, 2, 2), (1, 0, 1)])
def test_conv2d_dx_is_the_correlation_of_dy_with_the_flipped_kernel(k, p, d, rng):
    """docs/convolution.md: for stride 1, dx = conv2d(dy, W flipped in both spatial axes with in/out channels
    swapped, padding d (k - 1) - p, same dilation) -- the full correlation when p = 0 -- and col2im(D W_m) is it."""
    x = rng.standard_normal((2, 3, 7, 6))
    W = rng.standard_normal((4, 3, k, k))
    y = K.conv2d_forward(x, W, None, padding=p, dilation=d)
    dy = rng.standard_normal(y.shape)
    dx, _, _ = K.conv2d_backward(dy, x, W, padding=p, dilation=d)
    flipped = W[:, :, ::-1, ::-1].transpose(1, 0, 2, 3).copy()          # W'[c, o, i, j] = W[o, c, k-1-i, k-1-j]
    np.testing.assert_allclose(K.conv2d_forward(dy, flipped, None, padding=d * (k - 1) - p, dilation=d), dx,
                               rtol=1e-12, atol=1e-12)


def test_squeeze_is_a_permutation_with_its_inverse_and_pixel_unshuffle(rng):
    x = rng.standard_normal((2, 3, 4, 6))
    y = K.squeeze_forward(x)
    assert y.shape == (2, 12, 2, 3)
    assert y[1, 2 * 4 + 1 * 2 + 1, 1, 2] == x[1, 2, 1 * 2 + 1, 2 * 2 + 1]
    np.testing.assert_array_equal(K.unsqueeze_forward(y), x)
    np.testing.assert_array_equal(np.sort(y.ravel()), np.sort(x.ravel()))
    dy = rng.standard_normal(y.shape)
    np.testing.assert_allclose((y * dy).sum(), (x * K.squeeze_backward(dy)).sum(), rtol=1e-13)
    dx = rng.standard_normal(x.shape)
    np.testing.assert_allclose((K.unsqueeze_forward(y) * dx).sum(), (y * K.unsqueeze_backward(dx)).sum(), rtol=1e-13)
    torch = pytest.importorskip("torch")
    np.testing.assert_array_equal(y, torch.nn.functional.pixel_unshuffle(torch.tensor(x), 2).numpy())


def test_bad_arguments_are_clear_errors(rng):
    x, W, b = _case(rng, 1, 2, 4, 4, 3, 3, 3)
    with pytest.raises(ValueError, match="x has 3 channels but W expects 2"):
        K.conv2d_forward(rng.standard_normal((1, 3, 4, 4)), W, b)
    with pytest.raises(ValueError, match="does not fit a 4x4 input"):
        K.conv2d_forward(x, rng.standard_normal((3, 2, 5, 5)), b)
    with pytest.raises(ValueError, match="b must have shape"):
        K.conv2d_forward(x, W, np.zeros(2))
    with pytest.raises(ValueError, match="stride and dilation must be >= 1"):
        K.conv2d_forward(x, W, b, stride=0)
    with pytest.raises(ValueError, match="output_padding"):
        K.conv_transpose2d_forward(rng.standard_normal((1, 3, 2, 2)), W, None, stride=1, output_padding=1)
    with pytest.raises(ValueError, match="divisible by 2"):
        K.squeeze_forward(rng.standard_normal((1, 1, 3, 4)))


# -- the convolutional VAE (VAE(arch="conv")) -----------------------------------------------------------------
def _conv_vae(**kw):
    from npdgm import backend
    from npdgm.models.vae import VAE

    with backend.use(dtype="float64"):
        return VAE(**{"x_dim": 64, "z_dim": 3, "arch": "conv", "channels": (3, 4), "image_shape": (1, 8, 8),
                      "seed": 0, **kw})


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_conv_vae_loss_gradient_matches_central_differences(likelihood, rng):
    from npdgm.gradcheck import compare, numerical_grad

    m = _conv_vae(likelihood=likelihood)
    x, eps = rng.random((4, 64)), rng.standard_normal((1, 4, 3))
    m.loss_and_grad(x, eps)
    err, rel = compare(m.flat_grads.copy(), numerical_grad(lambda: float(m.loss(x, eps)[0]), m.flat_params))
    assert rel < 1e-6, (err, rel)
    names = [n for n, *_ in m.layout()]
    assert "encoder.1.W" in names and m.params["encoder.1.W"].shape == (3, 1, 4, 4)      # Conv2d (out, in, k, k)
    assert m.params["decoder.3.W"].shape == (4, 3, 4, 4)                                 # ConvTranspose2d (in, out)


def test_conv_vae_saves_loads_and_refuses_bad_shapes(tmp_path, rng):
    import npdgm
    from npdgm.models.vae import VAE

    m = _conv_vae()
    m.save(tmp_path / "c.npz")
    back = npdgm.load(tmp_path / "c.npz")
    assert back.config == m.config and back.config["arch"] == "conv"
    x, eps = rng.random((3, 64)), rng.standard_normal((1, 3, 3))
    np.testing.assert_array_equal(back.loss(x, eps)[0], m.loss(x, eps)[0])
    with pytest.raises(ValueError, match="image_shape .* C H W = x_dim"):
        VAE(x_dim=784, arch="conv", image_shape=(1, 28, 27))
    with pytest.raises(ValueError, match="divisible by 4"):
        VAE(x_dim=30 * 30, arch="conv", image_shape=(1, 30, 30))
    with pytest.raises(ValueError, match="not hidden"):
        VAE(arch="conv", hidden=(100,))
    with pytest.raises(ValueError, match="arch must be"):
        VAE(arch="resnet")
    assert "arch" not in VAE(x_dim=6, hidden=(4,), z_dim=2).config      # MLP checkpoints keep their config


def test_train_vae_arch_conv_runs_records_and_resumes(tmp_path, run_cli):
    import npdgm

    out = tmp_path / "r"
    argv = ["train", "vae", "--arch", "conv", "--channels", "4", "8", "--z-dim", "4", "--train-limit", "64",
            "--test-limit", "32", "--batch-size", "32", "--iwae-n", "0", "--impute-k", "0", "--no-plots",
            "--no-progress", "--out", out]
    code, _, err = run_cli(*argv, "--epochs", "1")
    assert code == 0, err
    m = npdgm.load(out)
    assert m.config["arch"] == "conv" and m.config["channels"] == [4, 8] and m.params["encoder.1.W"].shape == (4, 1, 4, 4)
    code, _, err = run_cli("train", "vae", "--resume", out, "--epochs", "2", "--no-plots", "--no-progress")
    assert code == 0, err
    code, _, err = run_cli("train", "vae", "--resume", out, "--epochs", "3", "--channels", "4", "16")
    assert code == 2 and "--channels" in err
