"""A VAE on the bundled MNIST subset with the public API: a hand-written training loop, the ELBO and the
IWAE estimate of log p(x), samples, imputation, save / load.

    python examples/vae_quickstart.py            # writes runs/vae-quickstart/*.png

The same model from the command line: ``npdgm train vae`` (see ``npdgm train vae -h``).
"""
import os

import numpy as np

import npdgm
from npdgm.data import load_mnist
from npdgm.plots import save_image_grid

OUT = os.path.join("runs", "vae-quickstart")     # runs/ is git-ignored

x_train, _ = load_mnist("train")            # (10000, 784) floats in [0, 1] (bundled subset)
x_test, _ = load_mnist("test", limit=500)

vae = npdgm.VAE(x_dim=784, hidden=(400,), z_dim=20, activation="relu", likelihood="bernoulli", seed=0)
opt = npdgm.optim.Adam(vae, lr=1e-3)       # updates vae.flat_params from vae.flat_grads
rng = np.random.default_rng(0)              # shuffling and the reparameterization noise eps

for epoch in range(1, 4):
    perm, total = rng.permutation(len(x_train)), 0.0
    for i in range(0, len(x_train), 128):
        xb = x_train[perm[i:i + 128]]
        eps = rng.standard_normal((1, len(xb), vae.z_dim), dtype=np.float32)   # (n_samples, B, z_dim)
        loss, terms = vae.loss_and_grad(xb, eps)     # -ELBO in nats per image; vae.grads filled
        opt.step()
        total += float(loss) * len(xb)
    _, t = vae.loss(x_test, rng=np.random.default_rng(1))
    print(f"epoch {epoch}: train -ELBO {total / len(x_train):.2f}   test -ELBO {float(t['nelbo']):.2f} "
          f"(recon {float(t['recon']):.2f} + KL {float(t['kl']):.2f}) nats/image")

logpx = vae.log_likelihood(x_test[:200], k=200, rng=np.random.default_rng(2))   # IWAE, (200,)
print(f"IWAE log p(x), k=200, 200 test images: {logpx.mean():.2f} nats")

os.makedirs(OUT, exist_ok=True)
save_image_grid(vae.sample(64, rng=3), os.path.join(OUT, "vae_samples.png"), nrow=8, title="samples")
mask = np.zeros(x_test[:10].shape, dtype=bool)
mask[:, 10 * 28:18 * 28] = True                  # hide image rows 10..17
filled = vae.impute(x_test[:10], mask, steps=50, fill=x_train.mean(axis=0))
save_image_grid(np.concatenate([x_test[:10], np.where(mask, 0.5, x_test[:10]), filled]),
                os.path.join(OUT, "vae_imputation.png"), nrow=10, row_labels=["original", "masked", "imputed"])

path = os.path.join(OUT, "vae.npz")
vae.save(path)
again = npdgm.load(path)
eps = np.random.default_rng(4).standard_normal((1, 100, vae.z_dim), dtype=np.float32)
assert float(again.loss(x_test[:100], eps)[0]) == float(vae.loss(x_test[:100], eps)[0])
print(f"saved and reloaded {path}; figures in {OUT}")
