"""Monte-Carlo EM against ELBO training: the same small VAE (784-200-z, Bernoulli decoder) trained on the bundled
MNIST subset either by the ELBO (encoder and decoder, the usual VAE) or by Monte-Carlo EM (the decoder alone, on
HMC samples of p(z|x) from persistent chains started at the untrained encoder's mean: npdgm.inference.mcem_fit),
each scored after every epoch by AIS log p(x) on the same test images.

    python examples/mcem_vs_elbo.py                                  # z_dim 2, 2000 images, 8 epochs
    python examples/mcem_vs_elbo.py --z-dim 5 --epochs 4 --out runs/mcem.png
"""
import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from npdgm.data import load_mnist  # noqa: E402
from npdgm.inference import ais, mcem_fit  # noqa: E402
from npdgm.models.vae import VAE  # noqa: E402
from npdgm.optim import Adam  # noqa: E402
from npdgm.plots.inference import mcem_vs_elbo  # noqa: E402


def score(model, x_test, ais_steps):
    """Mean AIS log p(x) (nats per image) on x_test, a fixed seed so both methods meet the same chains."""
    return float(ais(model, x_test, steps=ais_steps, chains=4, rng=123)["est"].mean())


def elbo_epoch(model, opt, x, batch_size, rng):
    """One epoch of the usual VAE training: -ELBO gradients of encoder and decoder, Adam."""
    perm = rng.permutation(len(x))
    for s in range(0, len(x), batch_size):
        model.zero_grad()
        model.train_step(x[perm[s:s + batch_size]], rng)
        opt.step()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--z-dim", type=int, default=2)
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--test", type=int, default=100)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--hmc-steps", type=int, default=3)
    p.add_argument("--leapfrog", type=int, default=5)
    p.add_argument("--ais-steps", type=int, default=300)
    p.add_argument("--out", default="mcem-vs-elbo.png")
    a = p.parse_args(argv)
    x_tr = load_mnist("train", "bundled", limit=a.train)[0]
    x_te = load_mnist("test", "bundled", limit=a.test)[0]
    make = lambda: VAE(x_dim=784, hidden=(200,), z_dim=a.z_dim, seed=0)  # noqa: E731
    records, seconds = {"ELBO (q trained with the decoder)": [], f"MC-EM (HMC {a.hmc_steps}x{a.leapfrog})": []}, {}
    elbo_model, rng = make(), np.random.default_rng(0)
    opt, t = Adam(elbo_model, lr=1e-3), 0.0
    for epoch in range(1, a.epochs + 1):
        t0 = time.perf_counter()
        elbo_epoch(elbo_model, opt, x_tr, 100, rng)
        t += time.perf_counter() - t0
        elbo = -float(elbo_model.loss(x_te, rng=np.random.default_rng(1))[1]["nelbo"])
        records["ELBO (q trained with the decoder)"].append(
            {"epoch": epoch, "ais_test": score(elbo_model, x_te, a.ais_steps), "elbo_test": elbo})
        print("elbo", records["ELBO (q trained with the decoder)"][-1], flush=True)
    seconds["elbo"] = t
    mc_model, name = make(), f"MC-EM (HMC {a.hmc_steps}x{a.leapfrog})"

    def after_epoch(h):  # mcem_fit's log: score the decoder (its epoch time is h["seconds"])
        records[name].append({**h, "ais_test": score(mc_model, x_te, a.ais_steps)})
        print("mcem", records[name][-1], flush=True)
    mcem_fit(mc_model, x_tr, epochs=a.epochs, batch_size=100, lr=1e-3, hmc_steps=a.hmc_steps, leapfrog=a.leapfrog,
             rng=0, log=after_epoch)
    t = sum(r["seconds"] for r in records[name])
    seconds["mcem"] = t
    mcem_vs_elbo(records, a.out, title=f"MNIST subset ({a.train} images), z_dim {a.z_dim}: AIS on {a.test} test images")
    print(json.dumps({"seconds": seconds, "final": {k: v[-1] for k, v in records.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
