"""The convolution twins (npdgm/accel/conv.py) against their reference kernels (npdgm/kernels/conv.py): the
kernel table's conv entries and odd sizes, strides, paddings, dilations and 1x1 kernels, float64 and float32,
channel-major views in as they come out of a twin, and ``accel off`` giving the reference bits again."""
import numpy as np
import pytest

from npdgm import accel
from npdgm.accel import conv as twin
from npdgm.kernels import conv as ref
from npdgm.kernels import dispatch, table

# (x shape, W shape, stride, padding, dilation): the table's geometry, the conv VAE's and Glow's, odd ones
GEOMETRIES = [
    ((2, 3, 7, 6), (4, 3, 3, 3), (2, 1), (1, 2), (1, 2)),       # the kernel table's conv entry
    ((3, 1, 8, 8), (5, 1, 4, 4), 2, 1, 1),                      # the conv VAE's layers (4x4, stride 2, pad 1)
    ((2, 4, 5, 5), (6, 4, 3, 3), 1, 1, 1),                      # Glow's coupling 3x3, padding 1
    ((2, 6, 5, 3), (5, 6, 1, 1), 1, 0, 1),                      # 1x1: the plain product
    ((1, 2, 9, 11), (3, 2, 2, 5), (3, 2), (0, 2), (2, 1)),      # odd: non-square kernel, stride 3, dilation
    ((2, 3, 6, 7), (2, 3, 1, 1), 2, 1, 1),                      # 1x1 with a stride and padding (im2col path)
    ((1, 2, 4, 4), (3, 2, 4, 4), 1, 0, 1),                      # the kernel covers the whole image
]


def _close(b, a, eps, what, ulps=16):
    """|b - a| <= ulps * eps * (|a| + max |a|): a few ulps of the values' own scale (the twin sums the same
    products in another order)."""
    assert b.dtype == a.dtype and b.shape == a.shape, what
    scale = np.abs(a) + np.abs(a).max()
    assert np.all(np.abs(b - a) <= ulps * eps * scale), (what, np.abs(b - a).max() / scale.max())


def _std(rng, dtype, *shape):
    return rng.standard_normal(shape).astype(dtype)


def _pairs(geometry, dtype, transposed, rng):
    """Inputs of the forward and backward: conv2d, or its adjoint (W (C, O, kh, kw) and x the conv's output)."""
    xs, ws, s, p, d = geometry
    g = dict(stride=s, padding=p, dilation=d)
    x, W = _std(rng, dtype, *xs), _std(rng, dtype, *ws)
    y = ref.conv2d_forward.reference(x, W, None, **g)
    if transposed:                          # the adjoint maps the conv's output space back to its input
        return y.copy(), W, _std(rng, dtype, ws[1]), _std(rng, dtype, *xs), g
    return x, W, _std(rng, dtype, ws[0]), _std(rng, dtype, *y.shape), g


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("transposed", [False, True], ids=["conv2d", "conv_transpose2d"])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=[str(g[0]) + "*" + str(g[1]) for g in GEOMETRIES])
def test_conv_twins_match_their_references(geometry, transposed, dtype):
    """Forward, dx, dW and db of every twin within 16 ulps of the values' scale of the reference's, float64
    and float32, on every geometry above."""
    x, W, b, dy, g = _pairs(geometry, dtype, transposed, np.random.default_rng(3))
    fwd, bwd = ("conv_transpose2d_forward", "conv_transpose2d_backward") if transposed else \
        ("conv2d_forward", "conv2d_backward")
    eps = np.finfo(dtype).eps
    _close(getattr(twin, fwd)(x, W, b, **g), getattr(ref, fwd).reference(x, W, b, **g), eps, fwd)
    for name, got, want in zip(("dx", "dW", "db"), getattr(twin, bwd)(dy, x, W, **g),
                               getattr(ref, bwd).reference(dy, x, W, **g)):
        _close(got, want, eps, f"{bwd} {name}")


def test_transposed_twin_with_output_padding_and_no_bias():
    rng = np.random.default_rng(4)
    x, W = _std(rng, np.float64, 2, 3, 4, 5), _std(rng, np.float64, 3, 2, 3, 3)
    for b in (None, _std(rng, np.float64, 2)):
        want = ref.conv_transpose2d_forward.reference(x, W, b, 2, 1, 1, (1, 0))
        _close(twin.conv_transpose2d_forward(x, W, b, 2, 1, 1, (1, 0)), want, np.finfo(np.float64).eps, "y")


def test_twin_outputs_fed_back_as_inputs_give_the_same_bits_as_contiguous_copies():
    """A twin hands out (B, C, H, W) views of (C, H, W, B) memory; the next twin reads such a view in place,
    with the bits it gets from a contiguous copy of it."""
    rng = np.random.default_rng(5)
    x, W1, W2 = _std(rng, np.float32, 4, 3, 8, 8), _std(rng, np.float32, 6, 3, 4, 4), _std(rng, np.float32, 5, 6, 3, 3)
    h = twin.conv2d_forward(x, W1, None, 2, 1)
    assert not h.flags.c_contiguous
    hc = np.ascontiguousarray(h)
    np.testing.assert_array_equal(twin.conv2d_forward(h, W2, None, 1, 1), twin.conv2d_forward(hc, W2, None, 1, 1))
    dy = twin.conv2d_forward(h, W2, None, 1, 1)
    dyc = np.ascontiguousarray(dy)
    for a, c in zip(twin.conv2d_backward(dy, h, W2, 1, 1), twin.conv2d_backward(dyc, hc, W2, 1, 1)):
        np.testing.assert_array_equal(a, c)


def test_twins_leave_other_arrays_to_the_reference_and_its_errors():
    """Mixed dtypes, integers and wrong shapes: the twin says NotImplemented or raises the reference's
    one-line error (the dispatch then runs the reference, whose error the user sees)."""
    x32, W64 = np.ones((1, 2, 5, 5), np.float32), np.ones((3, 2, 3, 3))
    assert twin.conv2d_forward(x32, W64, None) is NotImplemented
    assert twin.conv2d_forward(x32.astype(int), W64.astype(int), None) is NotImplemented
    assert twin.conv2d_backward(np.ones((1, 3, 2, 2)), x32.astype(np.float64), W64) is NotImplemented
    with pytest.raises(ValueError, match="x has 2 channels but W expects 4"):
        twin.conv2d_forward(np.ones((1, 2, 5, 5)), np.ones((3, 4, 3, 3)), None)
    with pytest.raises(ValueError, match="does not fit"):
        twin.conv2d_forward(np.ones((1, 2, 2, 2)), np.ones((3, 2, 3, 3)), None)
    try:
        accel.enable("numpy")
        with pytest.raises(ValueError, match="output_padding must be >= 0 and smaller than the stride"):
            ref.conv_transpose2d_forward(np.ones((1, 2, 3, 3)), np.ones((2, 3, 3, 3)), None, 1, 0, 1, 1)
    finally:
        accel.disable()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_table_conv_entries_through_the_switch_and_accel_off_gives_the_reference_bits(dtype):
    """The kernel table's conv entries run with the wing on (the twins: within 16 ulps of the values' scale)
    and off again (the reference's bits: switching off leaves nothing behind)."""
    called = []
    for entry in (e for e in table.TABLE if e.name in ("conv2d", "conv_transpose2d")):
        inputs = entry.make(np.random.default_rng(11), dtype)
        ref_out = entry.run(inputs)
        try:
            accel.enable("numpy", min_size=0)
            saved = dispatch.twins()
            dispatch.set_twins({k: (lambda f: lambda *a, **k: called.append(f.__name__) or f(*a, **k))(t)
                                for k, t in saved.items()})
            fast = entry.run(inputs)
        finally:
            accel.disable()
        again = entry.run(inputs)
        for part in (0, 1):
            for k, a in ref_out[part].items():
                _close(np.asarray(fast[part][k]), np.asarray(a), np.finfo(dtype).eps, f"{entry.name} {k}")
                np.testing.assert_array_equal(again[part][k], a)
    assert set(called) == {f.__name__ for _, f in twin.TWINS}


def test_conv_vae_step_with_the_wing_on_and_off_again():
    """A conv VAE's loss and gradients with the twins match the reference's (float64, rel 1e-10), and
    switching off gives the reference bits again."""
    from npdgm import VAE, backend

    rng = np.random.default_rng(8)
    x = (rng.random((6, 64)) > 0.5).astype(np.float64)
    eps = rng.standard_normal((6, 3))

    def grads():
        with backend.use(dtype="float64"):
            m = VAE(x_dim=64, z_dim=3, arch="conv", channels=(4, 6), image_shape=(1, 8, 8), seed=0)
            loss, _ = m.loss_and_grad(x, eps)
        return float(loss), m.flat_grads.copy()

    want = grads()
    try:
        accel.enable("numpy")
        fast = grads()
    finally:
        accel.disable()
    again = grads()
    assert fast[0] == pytest.approx(want[0], rel=1e-12)
    np.testing.assert_allclose(fast[1], want[1], rtol=1e-10, atol=1e-12)
    assert again[0] == want[0] and np.array_equal(again[1], want[1])


@pytest.mark.skipif(not accel.engine_available("numba"), reason="numba absent")
def test_numba_loops_walk_a_conv_twins_channel_major_views_flat_and_keep_their_layout(monkeypatch):
    """The ReLU between two convolutions gets the (B, C, H, W) view of (C, H, W, B) memory: the numba loop
    walks that memory flat (not the NumPy fallback) with the fallback's bits, and its output keeps the layout
    so the next convolution reads it without a copy."""
    from npdgm.accel import formulas as F

    rng = np.random.default_rng(9)
    y, dy = (rng.standard_normal((5, 7, 6, 4)).astype(np.float32).transpose(3, 0, 1, 2) for _ in range(2))
    f = F.FORMULAS["relu_backward"]
    want = f.numpy(dy=dy, y=y)["dx"]
    monkeypatch.setattr(f, "numpy", lambda **v: pytest.fail("the NumPy fallback ran"))
    got = f.numba(dy=dy, y=y)["dx"]
    np.testing.assert_array_equal(got, want)
    assert got.strides == y.strides
    assert F._dense_order([y, dy], y.shape) == (1, 2, 3, 0)
    assert F._dense_order([y, np.ascontiguousarray(dy)], y.shape) is None     # mixed layouts: the fallback


def test_glow_loss_and_gradients_with_the_conv_twins(f64):
    """Glow's coupling nets (3x3, 1x1, 3x3 convolutions, then t = h[:, 0::2], r = h[:, 1::2] of a twin's view)
    with the wing on: the loss and every gradient of the reference within float64 round-off."""
    from npdgm import checks
    from npdgm.models import flows

    rng = np.random.default_rng(10)
    x = rng.uniform(0, 1, (5, 2 * 8 * 8))

    def grads():
        fl = checks._moved(flows.glow((2, 8, 8), levels=2, depth=2, hidden=6, seed=2), np.random.default_rng(3),
                           (6, 128))
        loss = fl.loss_and_grad(x)
        return float(loss[0] if isinstance(loss, tuple) else loss), fl.flat_grads.copy()

    want = grads()
    try:
        accel.enable("numpy")
        fast = grads()
    finally:
        accel.disable()
    assert fast[0] == pytest.approx(want[0], rel=1e-12)
    np.testing.assert_allclose(fast[1], want[1], rtol=1e-9, atol=1e-11)
