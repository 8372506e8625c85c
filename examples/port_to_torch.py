"""Move a trained npdgm VAE into plain PyTorch and keep sampling there.

    python examples/port_to_torch.py                       # trains a tiny VAE first (1 epoch, bundled subset)
    python examples/port_to_torch.py --ckpt runs/vae-full  # a run directory or a checkpoint .npz
    python examples/port_to_torch.py --out runs/port.png --n 64 --seed 3

What happens:
  1. the checkpoint is read with ``numpy.load`` and its manifest only (``tests/mirror/layout.py``):
     every parameter is the slice [offset, offset + prod(shape)) of the flat buffer, W is (in, out);
     see docs/checkpoints.md;
  2. the decoder is the PyTorch mirror in ``npdgm/bench/torch_models.py`` (a function of that
     parameter dict: ``x @ W + b``, the activation, sigmoid of the logits);
  3. the same z ~ N(0, I) is decoded by npdgm and by torch (the max difference is printed), then
     torch draws new latents with its own generator and decodes them;
  4. one PNG: the first row npdgm's decode, the second torch's (identical), the rest new torch samples.
"""
import argparse
import os
import sys
import tempfile

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "mirror"))

try:
    import torch
except ImportError:
    sys.exit("port_to_torch.py needs PyTorch: pip install \"npdgm[torch]\" (on Linux the CPU build is smaller: "
             "pip install torch --index-url https://download.pytorch.org/whl/cpu)")

import npdgm  # noqa: E402
from npdgm.bench import torch_models  # noqa: E402
from layout import torch_parameters  # noqa: E402
from npdgm.plots import save_image_grid  # noqa: E402


def train_tiny(out):
    """1 epoch on the bundled 10k MNIST subset, a 784-200-8 VAE."""
    from npdgm import cli

    rc = cli.main(["train", "vae", "--epochs", "1", "--test-limit", "200", "--hidden", "200",
                   "--z-dim", "8", "--iwae-n", "0", "--impute-steps", "1", "--no-progress", "--no-plots",
                   "--out", out])
    if rc != 0:
        raise SystemExit(f"training the tiny VAE failed (exit {rc})")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="npdgm VAE run directory or checkpoint .npz (default: train one)")
    p.add_argument("--n", type=int, default=40, help="new torch samples (default 40)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join("runs", "port_to_torch.png"), help="PNG path")
    a = p.parse_args()

    ckpt = a.ckpt or train_tiny(tempfile.mkdtemp(prefix="npdgm-port-"))
    manifest, P = torch_parameters(ckpt, dtype=torch.float64)
    if manifest["kind"] != "vae":
        raise SystemExit(f"{ckpt} holds a {manifest['kind']!r} model; this example ports a VAE")
    cfg = manifest["config"]
    print(f"loaded {len(manifest['layout'])} tensors ({sum(int(np.prod(s)) for _, s, _ in manifest['layout'])} "
          f"parameters, stored {manifest['dtype']}) from {ckpt}: z_dim={cfg['z_dim']}, hidden={cfg['hidden']}, "
          f"likelihood={cfg['likelihood']}")
    for name, shape, off in manifest["layout"][:4]:
        print(f"  {name:<14} shape {tuple(shape)!s:<12} offset {off}")

    # the same latents through both implementations
    z = np.random.default_rng(a.seed).standard_normal((10, cfg["z_dim"]))
    model = npdgm.load(ckpt)
    ours = npdgm.backend.to_host(model.decode(z.astype(model.dtype))).astype(np.float64)
    with torch.no_grad():
        theirs = torch_models.vae_decode(P, cfg, torch.from_numpy(z)).numpy()
        print(f"npdgm vs torch decode of the same z: max |diff| = {np.abs(ours - theirs).max():.2e} "
              f"(npdgm in {model.dtype}, torch in float64)")
        # keep sampling in torch
        g = torch.Generator().manual_seed(a.seed)
        new = torch_models.vae_decode(P, cfg, torch.randn(a.n, cfg["z_dim"], generator=g, dtype=torch.float64))
    images = np.concatenate([ours, theirs, new.numpy()])
    if cfg["likelihood"] != "bernoulli":
        images = np.clip(images, 0, 1)
    save_image_grid(images, a.out, nrow=10, row_labels=["npdgm", "torch"] + ["torch"] * (-(-a.n // 10)))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
