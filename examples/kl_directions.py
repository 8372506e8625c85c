"""KL's two directions on a bimodal target: the same flow fitted by forward KL (maximum likelihood on the target's
samples: mass-covering) and by reverse KL (its own samples and the target's log-density: mode-seeking), drawn side
by side.

    python examples/kl_directions.py                         # bimodal, 1500 steps of 256 each, -> kl-directions.png
    python examples/kl_directions.py --target ring --steps 300 --out runs/ring.png

Each fit is one ``npdgm train flow2d --target NAME --objective ...`` run (in a temporary folder); the figure is
:func:`npdgm.plots.flows.kl_directions` on the two trained flows, titled with both KLs (nats, log Z by quadrature).
"""
import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import npdgm  # noqa: E402
from npdgm import cli  # noqa: E402
from npdgm.plots.flows import kl_directions  # noqa: E402
from npdgm.targets import TARGETS, get_target  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", choices=list(TARGETS), default="bimodal")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--couplings", type=int, default=6)
    p.add_argument("--out", default="kl-directions.png")
    a = p.parse_args(argv)
    fits = []
    with tempfile.TemporaryDirectory() as tmp:
        for objective in ("forward-kl", "reverse-kl"):
            run = os.path.join(tmp, objective)
            code = cli.main(["train", "flow2d", "--target", a.target, "--objective", objective, "--steps", str(a.steps),
                             "--batch-size", "256", "--train-limit", "10240", "--test-limit", "4000", "--couplings",
                             str(a.couplings), "--hidden", "64", "64", "--no-progress", "--no-plots", "--out", run])
            if code:
                return code
            with open(os.path.join(run, "summary.json")) as f:
                fits.append((objective, npdgm.load(run), json.load(f)))
        kl_directions(get_target(a.target), fits, a.out,
                      title=f"one flow ({a.couplings} affine couplings), two objectives, {a.steps} steps each")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
