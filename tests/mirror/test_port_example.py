"""examples/port_to_torch.py runs on a saved VAE: torch decodes the same z as npdgm and writes its PNG."""
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("torch")

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def test_port_to_torch_example(tmp_path):
    from npdgm.models.vae import VAE

    m = VAE(x_dim=784, hidden=[16], z_dim=2, seed=3)
    m.save(tmp_path / "vae.npz")
    out = tmp_path / "port.png"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "port_to_torch.py"), "--ckpt",
                        str(tmp_path / "vae.npz"), "--n", "20", "--out", str(out)], capture_output=True, text=True,
                       timeout=240, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    diff = float(re.search(r"max \|diff\| = ([0-9.e+-]+)", r.stdout).group(1))
    assert diff < 1e-5 and out.stat().st_size > 1000
