"""``npdgm sample RUNDIR`` (old name ``npdgm flow-sample``): draws from any trained run.

    npdgm sample runs/vae-full --n 100                      # image grid (E[x|z]; --draw for x ~ p(x|z))
    npdgm sample runs/cvae-full                             # column c: label c (cvae, m2)
    npdgm sample runs/nice-... --temperatures 0.5 0.8 1.0   # one row per temperature
    npdgm sample runs/flow2d-moons --n 3000                 # 2-D: a scatter panel per temperature
    npdgm sample runs/gmm-moons --npy pts.npy               # 2-D mixture: data and samples

The model kind comes from the checkpoint (vae, cvae, m2, flow, gmm, pca_gmm). Image runs give an image
grid, 2-D runs (flow2d, gmm on a toy set) a scatter PNG. ``--npy`` saves all n samples (flows: at the
last temperature), generated and written ``SAMPLE_CHUNK`` at a time, so memory stays bounded for any n.
"""
from __future__ import annotations

import itertools
import math
import os

import numpy as np

from .. import backend, train
from ..data import TOYS
from . import common
from .common import nonneg_int, positive_float, positive_int, setup_backend

SAMPLE_CHUNK = 1000                   # samples generated at a time (a few MB per chunk); a multiple of 10
GRID_MAX = 400                        # images drawn in the PNG
SCATTER_MAX = 50000                   # points per scatter panel of a 2-D run (--npy saves all n)
FLOW_TEMPERATURES = [0.5, 0.7, 0.85, 1.0]
KINDS = ("vae", "cvae", "m2", "flow", "gmm", "pca_gmm")


def register(commands, train_commands):
    s = commands.add_parser(
        "sample", aliases=["flow-sample"], help="samples from a trained run (any model; flow-sample is an alias)",
        description="Draw samples from the run in RUNDIR (or a checkpoint .npz): an image grid for MNIST models, a "
                    "scatter plot for 2-D ones (flow2d, gmm on a toy set); --npy saves them all.")
    s.add_argument("rundir", metavar="RUNDIR", help="run directory or checkpoint .npz")
    g = common.group(s, "sampling")
    g.add_argument("--n", type=positive_int, default=None,
                   help=f"number of samples (default 100 images; flows on MNIST: 12 per temperature; 2-D runs: 5000 "
                        f"points per panel); made {SAMPLE_CHUNK} at a time, the PNG shows at most {GRID_MAX} images "
                        f"or {SCATTER_MAX} points per panel (--npy saves all n)")
    g.add_argument("--draw", action="store_true", help="vae: draw x ~ p(x|z) instead of showing E[x|z] "
                                                       "(default: E[x|z])")
    g.add_argument("--temperatures", type=positive_float, nargs="+", default=None, metavar="T",
                   help="flows: prior temperatures, one grid row (MNIST) or scatter panel (2-D) each "
                        f"(default {' '.join(map(str, FLOW_TEMPERATURES))}; --npy uses the last)")
    o = common.group(s, "output")
    o.add_argument("--png", "--out", default=None, dest="out", metavar="PNG",
                   help="figure path (default RUNDIR/samples-seed<S>.png; flows: RUNDIR/flow-samples-seed<S>.png; "
                        "--out is its old name)")
    o.add_argument("--nrow", type=positive_int, default=10, help="images per grid row (default 10)")
    o.add_argument("--npy", default=None, help="also save the samples as a .npy array here (default: none)")
    r = common.group(s, "run")
    r.add_argument("--seed", type=nonneg_int, default=0, help="seed of the prior draws (default 0)")
    r.add_argument("--backend", choices=backend.BACKENDS, default=None,
                   help="array backend (default: $NPDGM_BACKEND or numpy)")
    s.set_defaults(func=cmd_sample)


def write_npy_chunks(path, shape, dtype, chunks):
    """Atomically write an ``.npy`` of ``shape`` from ``chunks`` (host arrays, rows in order) one by one,
    so memory holds one chunk whatever the size. A request the disk cannot hold is refused first."""
    import shutil

    from numpy.lib import format as npformat

    from ..io import atomic_write_bytes

    need = int(np.prod(shape, dtype=np.float64) * np.dtype(dtype).itemsize)
    d = os.path.dirname(os.path.abspath(path))
    free = shutil.disk_usage(d).free if os.path.isdir(d) else None
    if free is not None and need > free:
        raise ValueError(f"--npy {path} would need {need / 2**30:.1f} GiB but {d} has {free / 2**30:.1f} GiB free; "
                         f"lower --n")

    def write(f):
        npformat.write_array_header_1_0(f, {"descr": npformat.dtype_to_descr(np.dtype(dtype)),
                                            "fortran_order": False, "shape": tuple(shape)})
        for c in chunks:
            f.write(np.ascontiguousarray(c, dtype=dtype).tobytes())
    atomic_write_bytes(path, write)


def sampler(model, kind, draw=False, temperature=1.0):
    """f(n, rng) -> (n, D) host samples of ``model``: vae E[x|z] (``draw``: x ~ p(x|z)); cvae / m2
    E[x|z, y] with labels 0, 1, .. C-1 repeating; flows at ``temperature``; mixtures."""
    if kind == "vae":
        return lambda n, rng: backend.to_host(model.sample(n, rng=rng, mean=not draw))
    if kind in ("cvae", "m2"):
        def f(n, rng):
            z = backend.to_device(rng.standard_normal((n, model.z_dim), dtype=np.float32), model.dtype)
            return backend.to_host(model.decode(z, np.arange(n) % model.num_classes))
        return f
    if kind == "flow":
        return lambda n, rng: backend.to_host(model.sample(n, temperature=temperature, rng=rng))
    return lambda n, rng: backend.to_host(model.sample(n, rng=rng))


def chunks(f, n, seed, keep=0, kept=None):
    """f's n samples from Generator(seed), ``SAMPLE_CHUNK`` at a time (the same numbers as one draw of
    n); the first ``keep`` rows are also appended to ``kept``."""
    rng = np.random.default_rng(seed)
    for s in range(0, n, SAMPLE_CHUNK):
        x = f(min(SAMPLE_CHUNK, n - s), rng)
        if s < keep:
            kept.append(x[:keep - s])
        yield x


def save_npy(path, n, f, seed, keep=0, kept=None):
    """Write f's n samples (see :func:`chunks`) to the .npy ``path``, chunk by chunk."""
    it = chunks(f, n, seed, keep, kept)
    first = next(it)
    write_npy_chunks(path, (n,) + first.shape[1:], first.dtype, itertools.chain([first], it))


def image_shape_of(model, meta):
    """(C, H, W) of the images a stored model draws: a conv VAE's image_shape, a glow run's, else (1, 28, 28)."""
    shape = getattr(model, "config", {}).get("image_shape") or common.run_args(meta).get("image_shape")
    return tuple(shape or (1, 28, 28))


def _check_options(args, kind, dim, shape=(1, 28, 28)):
    if kind not in KINDS:
        raise ValueError(f"{args.rundir} holds a {kind!r} model; npdgm sample handles {', '.join(KINDS)} runs")
    if args.draw and kind != "vae":
        raise ValueError(f"--draw applies to vae runs; {args.rundir} holds a {kind} run")
    if args.temperatures is not None and kind != "flow":
        raise ValueError(f"--temperatures applies to flow runs (nice, realnvp, flow2d); {args.rundir} holds a "
                         f"{kind} run")
    if dim not in (2, math.prod(shape)):
        raise ValueError(f"{args.rundir} holds a {dim}-D {kind} model; npdgm sample draws 784-pixel images, "
                         f"32x32 colour images or 2-D points")


def cmd_sample(args):
    from ..io import load_arrays
    from ..models.registry import model_from_arrays

    setup_backend(args)
    for opt in ("out", "npy"):
        if getattr(args, opt):
            common.check_out_file(getattr(args, opt), "--" + opt)
    arrays, meta = load_arrays(args.rundir)
    kind = meta.get("kind")
    model = model_from_arrays(arrays, meta, os.fspath(args.rundir))
    dim = getattr(model, "x_dim", None) or getattr(model, "dim", None)
    shape = image_shape_of(model, meta)
    _check_options(args, kind, dim, shape)
    if getattr(model, "context_dim", 0):
        raise ValueError(f"{args.rundir} holds a conditional flow p(x | c) (context_dim={model.context_dim}); npdgm "
                         f"sample draws unconditional models: its run has density.png (p(x | c) per class or "
                         f"radius), and Flow.sample(n, context=c) draws from it")
    rundir = args.rundir if os.path.isdir(args.rundir) else os.path.dirname(os.path.abspath(args.rundir))
    out = args.out or os.path.join(rundir, f"{'flow-' if kind == 'flow' else ''}samples-seed{args.seed}.png")
    temps = args.temperatures or FLOW_TEMPERATURES
    f = sampler(model, kind, args.draw, temps[-1])
    if dim == 2:
        _scatter(model, kind, meta, args, f, temps, out)
    elif kind == "flow":
        from ..plots import flows as P
        from .flows import sampling_progress

        n = args.n or 12
        train.stage(f"sampling {n} images per temperature from the flow -> {out}")
        with sampling_progress(model, 1 + (math.ceil(n / SAMPLE_CHUNK) if args.npy else 0)):
            P.sample_grids(model, out, temperatures=temps, n_per_row=n, seed=args.seed, shape=shape)
            if args.npy:
                save_npy(args.npy, n, f, args.seed)
    else:
        _grid(kind, args, f, out, shape)
    print(out)
    return 0


def _grid(kind, args, f, out, shape=(28, 28)):
    """The PNG grid of the first GRID_MAX of n images (and all n in --npy)."""
    from ..plots import save_image_grid

    n = args.n or 100
    n_show, shown = min(n, GRID_MAX), []
    if args.npy:
        save_npy(args.npy, n, f, args.seed, n_show, shown)
    else:
        for _ in chunks(f, n_show, args.seed, n_show, shown):
            pass
    title = f"{n} samples" if n == n_show else f"the first {n_show} of {n} samples"
    title += {"vae": " (x ~ p(x|z))" if args.draw else " (E[x|z])", "cvae": " (column c: label c)",
              "m2": " (column c: label c)"}.get(kind, "")
    x = np.clip(np.asarray(np.concatenate(shown), np.float64), 0, 1)
    save_image_grid(x, out, nrow=args.nrow, title=title, shape=shape)


def _scatter(model, kind, meta, args, f, temps, out):
    """2-D runs: a scatter panel of the run's test points (toy sets), then one of n samples per
    temperature (mixtures: one); --npy gets the n samples (flows: at the last temperature)."""
    from ..plots import scatter_panels

    n = args.n or 5000
    n_show = min(n, SCATTER_MAX)  # the panels show the first n_show of the n samples, --npy gets all n
    if n_show < n:
        print(f"the PNG shows the first {n_show} of the {n} samples per panel"
              + ("" if args.npy else "; give --npy to save all of them"), flush=True)
    panels = []
    run = common.run_args(meta)
    if run.get("dataset") in TOYS:
        from . import flows, gmm

        panels.append((f"{run['dataset']} test data", (gmm if kind == "gmm" else flows).load_data(run)[1]))
    if kind == "flow":
        for t in temps:
            panels.append((f"samples, T={t:g}", np.concatenate(list(chunks(sampler(model, kind, temperature=t),
                                                                             n_show, args.seed)))))
    else:
        panels.append((f"samples of the {kind} model", np.concatenate(list(chunks(f, n_show, args.seed)))))
    shown = f"{n}" if n == n_show else f"the first {n_show} of {n}"
    scatter_panels(panels, out, title=f"{shown} samples per temperature (seed {args.seed})" if kind == "flow"
                   else f"{shown} samples (seed {args.seed})")
    if args.npy:
        save_npy(args.npy, n, f, args.seed)
