"""``npdgm study ...``: the study notes' worked identities, computed with npdgm's own models and drawn.

    npdgm study change-of-variables   # x = 2z + 1 and a 2-D linear map as npdgm flows against the formula
    npdgm study elbo-gap              # log p(x) - ELBO = KL(q(z|x) || p(z|x)), closed form and quadrature

Each prints the identity's numbers and writes one labelled figure (``--png``). The computations are
:mod:`npdgm.study`; the tests hold them to float64 precision (tests/test_study.py).
"""
from __future__ import annotations

import numpy as np

from .. import study
from ..plots import study as plots
from .common import check_out_file, group


def register(commands, train_commands):
    p = commands.add_parser("study", help="the study notes' worked identities: numbers and a figure",
                            description="Worked identities of the study notes, with npdgm's own models.")
    sub = p.add_subparsers(dest="study_command", required=True, metavar="TOPIC")
    for name, func, about in (
            ("change-of-variables", _cmd_change_of_variables,
             "x = 2z + 1 and a 2-D linear map as npdgm flows: density, integral, formula"),
            ("elbo-gap", _cmd_elbo_gap,
             "log p(x) - ELBO = KL(q || posterior): a linear-Gaussian VAE and a 1-D latent VAE")):
        s = sub.add_parser(name, help=about, description=about)
        group(s, "output").add_argument("--png", default=f"study-{name}.png", help=f"the figure to write (default study-{name}.png)")
        s.set_defaults(func=func)


def _cmd_change_of_variables(args):
    check_out_file(args.png, "--png")
    f1 = study.affine_flow_1d(2.0, 1.0)
    f2, W = study.linear_flow_2d()
    x = np.linspace(-25, 27, 200_001)[:, None]
    g = np.linspace(-12, 12, 1201)
    X = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    lp2 = f2.log_prob(X)
    print(f"1-D x = 2z + 1: integral of p_X = {np.trapezoid(np.exp(f1.log_prob(x)), x[:, 0]):.12f}; "
          f"p_X(1) = {np.exp(f1.log_prob(np.ones((1, 1))))[0]:.6f} = p_Z(0) / 2")
    err = np.abs(lp2 - study.gaussian_logpdf(X, np.zeros(2), np.linalg.inv(W @ W.T))).max()
    print(f"2-D x = z W^-1: |det W| = {abs(np.linalg.det(W)):.4f}, integral of p_X = "
          f"{np.exp(lp2).sum() * (g[1] - g[0]) ** 2:.10f}, max |log p_X - log N(0, (W W^T)^-1)| = {err:.1e}")
    print(f"wrote {plots.change_of_variables(f1, f2, W, args.png)}")


def _cmd_elbo_gap(args):
    from .. import backend
    from ..models.vae import VAE

    check_out_file(args.png, "--png")
    lin = study.linear_gaussian_vae()
    closed = study.linear_gaussian_terms(lin, np.random.default_rng(0).standard_normal((20, lin.x_dim)))
    with backend.use(dtype="float64"):
        m = VAE(x_dim=6, hidden=(5,), z_dim=1, activation="tanh", seed=1)
    m.flat_params[...] += np.random.default_rng(0).standard_normal(m.flat_params.shape) * 0.5
    quad = study.quadrature_terms(m, (np.random.default_rng(1).random((20, 6)) < 0.4).astype(np.float64))
    for name, t in (("linear-Gaussian VAE, closed form", closed), ("1-D latent VAE, quadrature", quad)):
        print(f"{name}: gap log p(x) - ELBO from {t['gap'].min():.4f} to {t['gap'].max():.4f} nats; "
              f"max |gap - KL(q || p(z|x))| = {np.abs(t['gap'] - t['kl_posterior']).max():.1e}")
    print(f"wrote {plots.elbo_gap(closed, quad, args.png)}")
