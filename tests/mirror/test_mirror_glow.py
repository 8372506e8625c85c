"""Glow against a plain-PyTorch twin (F.pixel_unshuffle, F.conv2d, autograd) holding the same weights: the mean
NLL and every parameter gradient agree at relative 1e-8 in float64. Skipped without PyTorch."""
import numpy as np
import pytest

from npdgm.models import flows as NF

torch = pytest.importorskip("torch")
from npdgm.bench import torch_models as T  # noqa: E402  (imports torch)


def _torch_glow_logprob(flow, P, x):
    """log p(x) (B,) of ``flow`` from its config, in the one PyTorch twin (npdgm.bench.torch_models)."""
    return T.flow_log_prob(P, flow.config, x)


CASES = [((1, 8, 8), 2, 2, 6), ((3, 4, 4), 1, 2, 5), ((2, 4, 4), 2, 1, 4)]


@pytest.mark.parametrize("shape,levels,depth,hidden", CASES)
def test_glow_loss_and_every_gradient_match_pytorch(f64, rng, shape, levels, depth, hidden):
    fl = NF.glow(shape, levels=levels, depth=depth, hidden=hidden, seed=3)
    d = int(np.prod(shape))
    fl.forward(rng.uniform(0, 1, (16, d)))   # the ActNorm init
    fl.flat_params[...] += 0.1 * rng.standard_normal(fl.flat_params.shape)
    x = rng.uniform(0, 1, (7, d))
    loss = float(fl.loss_and_grad(x))
    P = {n: torch.tensor(np.array(p), requires_grad=True) for n, p in fl.params.items()}
    tloss = -_torch_glow_logprob(fl, P, torch.tensor(x)).mean()
    tloss.backward()
    assert abs(loss - tloss.item()) <= 1e-10 * max(1.0, abs(loss))
    for n, g in fl.grads.items():
        tg = P[n].grad.numpy()
        err = np.max(np.abs(g - tg)) / max(1e-12, np.max(np.abs(tg)))
        assert err < 1e-8, (n, err)
    assert any(np.abs(g).max() > 1e-3 for n, g in fl.grads.items() if n.endswith("net.0.W"))


def test_glow_inverse_matches_pytorch(f64, rng):
    """The twin's inverse (pixel_shuffle, the inverse 1x1 weight, x_b = y_b / s - t) is npdgm's, log-det included."""
    fl = NF.glow((2, 8, 8), levels=2, depth=2, hidden=5, seed=1)
    fl.forward(rng.uniform(0, 1, (16, 128)))
    fl.flat_params[...] += 0.1 * rng.standard_normal(fl.flat_params.shape)
    z = rng.standard_normal((5, 128))
    x, ld = fl.inverse(z, logdet=True)
    P = {n: torch.tensor(np.array(p)) for n, p in fl.params.items()}
    tx, tld = T.flow_inverse(P, fl.config, torch.tensor(z))
    np.testing.assert_allclose(tx.numpy(), x, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(tld.numpy(), ld, rtol=1e-9, atol=1e-9)


@pytest.fixture
def one_torch_thread():
    """Small convolutions: one torch thread (as the suite's one BLAS thread for NumPy); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _train_beside_torch(depth, hidden, steps, batch):
    """Glow (1x28x28, 2 levels) and its PyTorch twin from the same weights (ActNorm initialised by npdgm on the first
    batch, then copied), trained in float32 with Adam 1e-3 (npdgm.optim.Adam / torch.optim.Adam) on the same
    dequantised batches (noise drawn once in NumPy, fed to both) for ``steps`` steps. Returns the test bits/dim
    (500 bundled test digits, dequantised once) before and after: ((npdgm, torch), (npdgm, torch))."""
    from npdgm.data import dequantize, load_mnist
    from npdgm.models.flows import bits_per_dim
    from npdgm.optim import Adam

    rng = np.random.default_rng(0)
    x, _ = load_mnist("train", limit=steps * batch)
    xt, _ = load_mnist("test", limit=500)
    batches = [dequantize(x[i * batch:(i + 1) * batch], rng).astype(np.float32) for i in range(steps)]
    xt = dequantize(xt, rng).astype(np.float32)
    fl = NF.glow((1, 28, 28), levels=2, depth=depth, hidden=hidden, seed=0)
    fl.log_prob(batches[0])                       # ActNorm's data-dependent init, in npdgm
    tm = T.Glow(fl.config).load(fl.params)        # the same weights (float32)
    ours, theirs = Adam(fl, lr=1e-3), torch.optim.Adam(tm.parameters(), lr=1e-3)

    def test_bpd():
        with torch.no_grad():
            return bits_per_dim(float(fl.nll(xt)), 784), bits_per_dim(float(tm.loss(torch.from_numpy(xt))), 784)

    start = test_bpd()
    for xb in batches:
        fl.loss_and_grad(xb)
        ours.step()
        theirs.zero_grad()
        tm.loss(torch.from_numpy(xb)).backward()
        theirs.step()
    return start, test_bpd()


def test_glow_trains_like_its_torch_twin_short(one_torch_thread):
    """50 steps (depth 1, 8 channels, batch 32): the test bits/dim of npdgm and the twin agree within 0.02 and both
    improved (measured: 8.276 -> 7.923 in both, difference 1.5e-5)."""
    start, end = _train_beside_torch(depth=1, hidden=8, steps=50, batch=32)
    print("test bits/dim before, after (npdgm, torch):", start, end)
    assert abs(start[0] - start[1]) < 1e-4, start
    assert abs(end[0] - end[1]) < 0.02 and max(end) < min(start) - 0.2, (start, end)


@pytest.mark.slow
def test_glow_trains_like_its_torch_twin(one_torch_thread):
    """300 steps (depth 2, 16 channels, batch 32; ~20 s CPU): within 0.02 bits/dim of the twin after a drop of
    about 2 bits/dim (measured: 8.046 -> 6.020 in both, difference 2.5e-5)."""
    start, end = _train_beside_torch(depth=2, hidden=16, steps=300, batch=32)
    print("test bits/dim before, after (npdgm, torch):", start, end)
    assert abs(end[0] - end[1]) < 0.02 and max(end) < min(start) - 1.5, (start, end)
