"""Optimizers against a direct transcription of the published updates, and against torch.optim."""
import math

import numpy as np
import pytest

from npdgm import accel, optim
from npdgm.accel import engines
from npdgm.accel import optim as fast_optim
from npdgm.nn import MLP, Parameter


@pytest.fixture
def threaded_adam():
    """The fast wing with no CPU engine: Adam.step is the chunked threaded twin (switched off after)."""
    assert accel.enable("threads") == "threads"
    yield
    accel.disable()


def _quadratic_grads(p, target):
    return p - target  # gradient of 0.5 * ||p - target||^2


def adam_reference(p, grads, lr, b1, b2, eps, wd=0.0, decoupled=False):
    """Kingma & Ba (2015), Algorithm 1, with PyTorch's eps placement and weight decay."""
    m, v = np.zeros_like(p), np.zeros_like(p)
    out = []
    for t, g in enumerate(grads, 1):
        if decoupled:
            p = p * (1 - lr * wd)
        elif wd:
            g = g + wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        mhat, vhat = m / (1 - b1 ** t), v / (1 - b2 ** t)
        p = p - lr * mhat / (np.sqrt(vhat) + eps)
        out.append(p.copy())
    return out


@pytest.mark.parametrize("wd, decoupled", [(0.0, False), (0.1, False), (0.1, True)])
def test_adam_matches_transcription(wd, decoupled, rng):
    p0 = rng.standard_normal(50_000)  # more than one cache chunk
    grads = [rng.standard_normal(50_000) for _ in range(4)]
    param = Parameter(p0.copy())
    opt = optim.Adam([param], lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=wd, decoupled=decoupled)
    ref = adam_reference(p0, grads, 0.01, 0.8, 0.95, 1e-6, wd, decoupled)
    for g, want in zip(grads, ref):
        param.grad[...] = g
        opt.step()
        np.testing.assert_allclose(param.data, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dampening", [0.0, 0.3])
def test_sgd_momentum_matches_transcription(rng, dampening):
    p0 = rng.standard_normal(10)
    grads = [rng.standard_normal(10) for _ in range(4)]
    param = Parameter(p0.copy())
    opt = optim.SGD([param], lr=0.1, momentum=0.9, dampening=dampening, weight_decay=0.01)
    p, buf = p0.copy(), None
    for g in grads:
        d = g + 0.01 * p
        buf = d.copy() if buf is None else 0.9 * buf + (1 - dampening) * d
        p = p - 0.1 * buf
        param.grad[...] = g
        opt.step()
        np.testing.assert_allclose(param.data, p, rtol=1e-13)


def test_clip_grad_norm():
    p = Parameter(np.zeros(4))
    p.grad[...] = [3.0, 4.0, 0.0, 0.0]
    assert optim.clip_grad_norm([p], 1.0) == pytest.approx(5.0)
    np.testing.assert_allclose(p.grad, [0.6, 0.8, 0, 0], rtol=1e-5)
    assert optim.clip_grad_norm([p], 10.0) == pytest.approx(1.0, rel=1e-5)


def test_optimizer_on_module_uses_flat_buffer_and_state_round_trip():
    m = MLP(3, [4], 2, rng=0)
    opt = optim.Adam(m)
    assert m.flat_params is not None and opt.pairs[0][0] is m.flat_params
    m.flat_grads[...] = 1
    opt.step()
    opt2 = optim.Adam(m)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.t == 1 and np.array_equal(opt2.m[0], opt.m[0]) and np.array_equal(opt2.v[0], opt.v[0])


def test_optimizer_bad_arguments():
    with pytest.raises(ValueError, match="lr must be positive"):
        optim.Adam([Parameter(np.zeros(2))], lr=0)
    with pytest.raises(TypeError, match=r"params\[0\] is ndarray"):
        optim.SGD([np.zeros(2)])
    with pytest.raises(ValueError, match="betas"):
        optim.Adam([Parameter(np.zeros(2))], betas=(1.0, 0.9))


@pytest.mark.parametrize("kind", ["sgd", "sgd-dampening", "adam", "adamw"])
def test_matches_torch_optim(kind, rng):
    torch = pytest.importorskip("torch")
    p0 = rng.standard_normal(1000)
    grads = [rng.standard_normal(1000) for _ in range(5)]
    param = Parameter(p0.copy())
    tp = torch.tensor(p0.copy(), requires_grad=True)
    if kind == "sgd":
        ours, theirs = optim.SGD([param], 0.05, momentum=0.9, weight_decay=0.01, nesterov=True), \
            torch.optim.SGD([tp], 0.05, momentum=0.9, weight_decay=0.01, nesterov=True)
    elif kind == "sgd-dampening":
        ours, theirs = optim.SGD([param], 0.05, momentum=0.9, dampening=0.3, weight_decay=0.01), \
            torch.optim.SGD([tp], 0.05, momentum=0.9, dampening=0.3, weight_decay=0.01)
    elif kind == "adam":
        ours, theirs = optim.Adam([param], 0.01, weight_decay=0.01), torch.optim.Adam([tp], 0.01, weight_decay=0.01)
    else:
        ours, theirs = optim.AdamW([param], 0.01, weight_decay=0.1), torch.optim.AdamW([tp], 0.01, weight_decay=0.1)
    for g in grads:
        param.grad[...] = g
        ours.step()
        tp.grad = torch.tensor(g)
        theirs.step()
        np.testing.assert_allclose(param.data, tp.detach().numpy(), rtol=1e-10, atol=1e-12)


def test_adam_trains_a_small_regression():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 3)).astype(np.float32)
    y = (x @ np.array([[1.0], [-2.0], [0.5]], np.float32) + 0.3).astype(np.float32)
    m = MLP(3, [16], 1, activation="tanh", rng=0)
    opt = optim.Adam(m, lr=0.01)
    from npdgm.kernels import mse_backward, mse_forward

    first = None
    for _ in range(300):
        m.zero_grad()
        pred = m.forward(x)
        loss = float(mse_forward(pred, y))
        first = first if first is not None else loss
        m.backward(mse_backward(1.0, pred, y), need_dx=False)
        opt.step()
    assert loss < 0.02 * first, (first, loss)
    assert math.isfinite(loss)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("wd, decoupled", [(0.0, False), (0.05, False), (0.05, True)])
def test_textbook_adam_update_against_the_fast_chunked_step(dtype, wd, decoupled, rng, threaded_adam):
    """optim.adam_update (the paper's lines, whole arrays) beside the wing's Adam.step (chunked over 4 threads, bias
    corrections folded into two scalars: a = lr sqrt(1-b2^t)/(1-b1^t), e = eps sqrt(1-b2^t)).

    m and v take the same operations in the same order: bit-for-bit equal. The parameter update is the
    same formula with the bias corrections folded differently (4-5 roundings in another order), so p is
    NOT bit-for-bit: ~1-2% of the entries differ, each by at most a few ulps of max(|p_old|, |p_new|)
    (measured: <= 6; they are the last bits of the step where |p| is about the size of the step). The
    check restarts the textbook from the fast p every step so the ulps cannot add up."""
    n = 3 * fast_optim.CHUNK + 123                            # several chunks, a partial one, threads used
    p_fast = (rng.standard_normal(n) * 0.5).astype(dtype)
    p_book = p_fast.copy()
    param = Parameter(p_fast)
    old = fast_optim.get_num_threads()
    fast_optim.set_num_threads(4)
    try:
        opt = optim.Adam([param], lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=wd, decoupled=decoupled)
        m, v = np.zeros(n, dtype), np.zeros(n, dtype)
        for t in range(1, 6):
            g = rng.standard_normal(n).astype(dtype) * (10.0 ** (t - 3))   # gradients across scales
            param.grad[...] = g
            p_book[...] = param.data
            p_old = p_book.copy()
            g_in = g.copy()
            opt.step()
            optim.adam_update(p_book, g, m, v, t, 3e-3, 0.8, 0.99, 1e-6, wd, decoupled)
            np.testing.assert_array_equal(g, g_in)                        # the textbook does not write g
            np.testing.assert_array_equal(opt.m[0], m)
            np.testing.assert_array_equal(opt.v[0], v)
            ulps = np.abs(param.data - p_book) / np.spacing(np.maximum(np.abs(p_old), np.abs(p_book)))
            assert ulps.max() <= 8, (t, ulps.max())
            assert (param.data != p_book).mean() < 0.05                   # mostly identical bits
    finally:
        fast_optim.set_num_threads(old)


def test_reference_adam_step_is_the_textbook_update_bit_for_bit(rng):
    """With the wing off, Adam.step is optim.adam_update on every parameter array: the same bits."""
    n = 1000
    param = Parameter(rng.standard_normal(n).astype(np.float32))
    p, m, v = param.data.copy(), np.zeros(n, np.float32), np.zeros(n, np.float32)
    opt = optim.Adam([param], lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05)
    for t in range(1, 4):
        g = rng.standard_normal(n).astype(np.float32)
        param.grad[...] = g
        opt.step()
        optim.adam_update(p, g, m, v, t, 3e-3, 0.8, 0.99, 1e-6, 0.05)
        np.testing.assert_array_equal(param.data, p)
        np.testing.assert_array_equal(opt.m[0], m)


def test_optimizer_has_no_zero_grad():
    """Gradients are zeroed by the model (Module.zero_grad: one fill of flat_grads), not the optimizer."""
    assert not hasattr(optim.Optimizer, "zero_grad")


def _adam_steps(p0, grads):
    """The parameters after one Adam (lr 1e-2, weight decay 0.01) step per gradient in ``grads``, from p0."""
    p = Parameter(p0.copy())
    opt = optim.Adam([p], lr=1e-2, weight_decay=0.01)
    for g in grads:
        p.grad[...] = g
        opt.step()
    return p.data.copy()


def test_threaded_chunked_adam_is_bitwise_the_single_thread_update(threaded_adam):
    rng = np.random.default_rng(0)
    n = 5 * fast_optim.CHUNK + 123                       # several chunks, a ragged tail
    p0 = rng.standard_normal(n).astype(np.float32)
    grads = [rng.standard_normal(n).astype(np.float32) for _ in range(3)]
    out = []
    old = fast_optim.get_num_threads()
    try:
        for threads in (1, 3):
            fast_optim.set_num_threads(threads)
            out.append(_adam_steps(p0, grads))
    finally:
        fast_optim.set_num_threads(old)
    np.testing.assert_array_equal(out[0], out[1])
    spans = fast_optim._spans(n, fast_optim.CHUNK, 3)
    assert spans[0][0] == 0 and spans[-1][1] == n and len(spans) == 3
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


def _engines():
    return [pytest.param(e, marks=pytest.mark.skipif(not engines.engine_available(e), reason=f"{e} absent"))
            for e in engines.ENGINES]


@pytest.mark.parametrize("engine", _engines())
@pytest.mark.parametrize("wd, decoupled", [(0.0, False), (0.05, False), (0.05, True)])
def test_fused_cpu_adam_against_the_textbook_update(engine, wd, decoupled):
    """With a CPU engine on, the wing's Adam.step runs the formula ``adam`` (one pass over p, g, m, v: numba's
    loop, or numexpr / the NumPy reference per chunk on 2 threads). Against optim.adam_update: m and v
    within 2 ulps (numba and numexpr may contract a*b + c differently), p within 8 ulps of
    max(|p_old|, |p_new|) per step (the textbook folds the bias corrections differently); against the
    chunked threaded step the NumPy evaluation is bit-for-bit (same operations in the same order)."""
    rng = np.random.default_rng(3)
    n = 4 * fast_optim.CHUNK + 77                                # threads and a partial chunk
    p0 = (rng.standard_normal(n) * 0.5).astype(np.float32)
    fast, plain = Parameter(p0.copy()), Parameter(p0.copy())
    kw = dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=wd, decoupled=decoupled)
    opt_fast, opt_plain = optim.Adam([fast], **kw), optim.Adam([plain], **kw)
    old = fast_optim.get_num_threads()
    fast_optim.set_num_threads(2)
    try:
        for t in range(1, 5):
            g = rng.standard_normal(n).astype(np.float32) * (10.0 ** (t - 2))
            fast.grad[...] = g
            plain.grad[...] = g
            book, m, v = fast.data.copy(), opt_fast.m[0].copy(), opt_fast.v[0].copy()   # all start alike
            plain.data[...], opt_plain.m[0][...], opt_plain.v[0][...] = book, m, v
            p_old = book.copy()
            assert accel.enable(engine, min_size=0) == engine
            opt_fast.step()
            accel.enable("threads")
            opt_plain.step()
            optim.adam_update(book, g, m, v, t, 3e-3, 0.8, 0.99, 1e-6, wd, decoupled)
            for a, b in ((opt_fast.m[0], m), (opt_fast.v[0], v)):
                assert (np.abs(a - b) <= 2 * np.spacing(np.abs(b))).all(), (t, np.abs(a - b).max())
            ulps = np.abs(fast.data - book) / np.spacing(np.maximum(np.abs(p_old), np.abs(book)))
            assert ulps.max() <= 8, (t, ulps.max())
            if engine == "numpy":
                np.testing.assert_array_equal(fast.data, plain.data)
    finally:
        accel.disable()
        fast_optim.set_num_threads(old)


def test_fused_numba_adam_split_over_threads_is_bitwise_one_loop(monkeypatch):
    """The numba Adam (one compiled loop that releases the GIL) split over the optimizer's threads from
    NUMBA_THREADED_MIN parameters on: the same bits as one loop over the whole buffer."""
    if not engines.engine_available("numba"):
        pytest.skip("numba absent")
    rng = np.random.default_rng(5)
    n = 3 * fast_optim.CHUNK + 11
    p0 = rng.standard_normal(n).astype(np.float32)
    grads = [rng.standard_normal(n).astype(np.float32) for _ in range(3)]
    out, spans = [], []
    real_spans = fast_optim._spans
    monkeypatch.setattr(fast_optim, "_spans", lambda *a: spans.append(real_spans(*a)) or spans[-1])
    old = fast_optim.get_num_threads()
    fast_optim.set_num_threads(2)
    try:
        accel.enable("numba", min_size=0)
        for threshold in (1 << 40, 0):
            monkeypatch.setattr(fast_optim, "NUMBA_THREADED_MIN", threshold)
            out.append(_adam_steps(p0, grads))
    finally:
        accel.disable()
        fast_optim.set_num_threads(old)
    np.testing.assert_array_equal(out[0], out[1])
    assert len(spans[0]) == 1 and len(spans[-1]) == 2


@pytest.mark.parametrize("make", [lambda ps: optim.Adam(ps, lr=1e-2), lambda ps: optim.Adam(ps, lr=1e-2, weight_decay=0.1,
                                  decoupled=True), lambda ps: optim.SGD(ps, lr=1e-2, momentum=0.9)])
@pytest.mark.parametrize("wing", ["off", "threads"])
def test_a_step_with_an_empty_parameter_leaves_the_others_right(make, wing):
    """A 0-element parameter beside a real one: the step must not fail (the chunk split once divided by
    zero chunks) and the real one moves as it does alone."""
    g = np.linspace(-1, 1, 5)
    alone, both = Parameter(np.ones(5)), [Parameter(np.zeros(0)), Parameter(np.ones(5))]
    accel.enable(wing)
    try:
        for ps in ([alone], both):
            opt = make(ps)
            for p in ps:
                p.grad[...] = g[:p.data.size]
            opt.step()
    finally:
        accel.disable()
    assert both[0].data.shape == (0,) and np.array_equal(both[1].data, alone.data)
