"""PyTorch peers of the npdgm flows, for cross-checks and the quality comparison (torch is optional).

The models themselves are ``benchmarks/torch_models.NICE`` and ``RealNVP2d``; this file copies an
npdgm flow's weights into them and trains them on exactly the data, batches and dequantization
noise that ``npdgm train flow2d`` / ``npdgm train nice`` use (same seeds, same host NumPy Generator
for shuffling and noise), so the two test NLLs compare like with like.

    python tests/torch_flows.py flow2d --dataset moons --steps 3000            # the quality bar
    python tests/torch_flows.py nice --data ../shared/data/mnist --epochs 2
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from benchmarks.torch_models import NICE, RealNVP2d, linears, load_linear_stack  # noqa: E402,F401


def _linear_weights(net):
    """[(W, b)] host arrays of an npdgm MLP's Linear layers in order."""
    from npdgm.nn import Linear

    return [(np.asarray(m.W.data), np.asarray(m.b.data)) for m in net.layers if isinstance(m, Linear)]


def torch_realnvp2d_from(flow, dtype=torch.float64):
    """A RealNVP2d mirror holding ``flow``'s weights (flow = npdgm.models.flows.realnvp2d(...), no ActNorm)."""
    from npdgm.models.flows import AffineCoupling

    layers = flow.layers
    if not all(isinstance(layer, AffineCoupling) for layer in layers):
        raise ValueError("the torch RealNVP2d mirror has affine couplings only")
    if any(layer.scale != "tanh" or layer.scale_bound != 1.0 for layer in layers):
        raise ValueError("the torch RealNVP2d mirror uses s = tanh(raw) (scale='tanh', scale_bound=1)")
    hidden = layers[0].net.sizes[1:-1]
    m = RealNVP2d(len(layers), hidden[0], len(hidden)).to(dtype)
    for net, layer in zip(m.nets, layers):
        load_linear_stack(net, _linear_weights(layer.net))
    return m


def torch_nice_from(flow, dtype=torch.float64):
    """A NICE mirror holding ``flow``'s weights (flow = npdgm.models.flows.nice(..., logit=False))."""
    from npdgm.models.flows import AdditiveCoupling, Scaling

    *coup, scale = flow.layers
    if not isinstance(scale, Scaling) or not all(isinstance(c, AdditiveCoupling) for c in coup):
        raise ValueError("the torch NICE mirror is additive couplings then one Scaling")
    sizes = coup[0].net.sizes
    m = NICE(flow.dim, len(coup), sizes[1], len(sizes) - 2, flow.prior).to(dtype)
    for net, layer in zip(m.couplings, coup):
        load_linear_stack(net, _linear_weights(layer.net))
    with torch.no_grad():
        m.log_scale.copy_(torch.as_tensor(np.asarray(scale.log_scale.data)))
    return m


@torch.no_grad()
def test_nll(model, x, batch=1000):
    tot = 0.0
    for s in range(0, len(x), batch):
        tot += float(-model.log_prob(torch.as_tensor(x[s:s + batch])).sum())
    return tot / len(x)


def train(model, x_train, x_test, epochs, batch_size, lr, seed, dequant=False, log=print):
    """Adam, the npdgm.train.fit batching (host rng permutation per epoch; with ``dequant`` the same
    uniform noise as npdgm.data.dequantize drawn from the same rng). Returns per-epoch records."""
    from npdgm.data import dequantize

    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n, nb, recs = len(x_train), math.ceil(len(x_train) / batch_size), []
    for epoch in range(1, epochs + 1):
        t0, tot = time.perf_counter(), 0.0
        perm = rng.permutation(n)
        for i in range(nb):
            xb = x_train[perm[i * batch_size:(i + 1) * batch_size]]
            if dequant:
                xb = dequantize(xb, rng)
            loss = model.loss(torch.as_tensor(xb))
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot += float(loss.detach())
            if (i + 1) % 100 == 0:
                log(f"  epoch {epoch} step {i + 1}/{nb}  loss {tot / (i + 1):.3f}  {time.perf_counter() - t0:.0f} s")
        rec = {"epoch": epoch, "step": epoch * nb, "train_loss": tot / nb, "train_seconds": time.perf_counter() - t0,
               "test_nll": test_nll(model, x_test)}
        if dequant:
            rec["test_bpd"] = (rec["test_nll"] / x_test.shape[1] + math.log(256)) / math.log(2)
        recs.append(rec)
        log(json.dumps(rec))
    return recs


def main(argv=None):
    from npdgm.commands import flows as cmd

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("family", choices=["flow2d", "nice"])
    p.add_argument("--dataset", default="moons")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=None)
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--test-limit", type=int, default=None)
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--out", default=None, help="write the records as JSON here")
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    if a.family == "flow2d":
        run = dict(family="flow2d", dataset=a.dataset, couplings=8, hidden=[256, 256], scale="tanh", scale_bound=1.0,
                   actnorm=False, batch_size=a.batch_size or 512, n_train=51200, n_test=10000, seed=a.seed)
    else:
        run = dict(family="nice", dataset="mnist", couplings=4, hidden=a.hidden or 1000, n_hidden=5, prior="logistic",
                   logit=False, batch_size=a.batch_size or 64, data=a.data, train_limit=a.train_limit,
                   test_limit=a.test_limit, seed=a.seed)
    from npdgm import backend

    with backend.use("numpy", "float32"):
        x_tr, x_te = cmd.load_data(run)
        flow = cmd.build_model(run)  # same seeds -> the same initial weights as the npdgm run
    x_tr, x_te = x_tr.astype(np.float32), x_te.astype(np.float32)
    model = (torch_realnvp2d_from if a.family == "flow2d" else torch_nice_from)(flow, torch.float32)
    nb = math.ceil(len(x_tr) / run["batch_size"])
    epochs = a.epochs or (max(1, math.ceil(a.steps / nb)) if a.family == "flow2d" else 10)
    print(f"torch {torch.__version__} threads {torch.get_num_threads()}: {a.family} on {run['dataset']}, "
          f"{epochs} epochs x {nb} steps, batch {run['batch_size']}, Adam {a.lr}", flush=True)
    recs = train(model, x_tr, x_te, epochs, run["batch_size"], a.lr, a.seed, dequant=a.family == "nice",
                 log=lambda s: print(s, flush=True))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(recs, f, indent=1)


if __name__ == "__main__":
    main()
