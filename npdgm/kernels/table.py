"""The kernel table: every forward/backward pair of npdgm.kernels, once, with an input maker.

    Kernel(name, forward, backward, make, run)

``make(rng, dtype) -> {name: host array}`` draws the inputs of one small case, including the upstream
gradient of every output: ``dy`` for a kernel with one output, ``d<output>`` for several (``dyb`` and
``dlogdet`` for ``(yb, logdet)``). ``run(inputs) -> (outputs, grads)`` calls the forward and then the
backward on those upstream gradients, so ``grads[name]`` is dL/d inputs[name] for

    L = sum_k sum(outputs[k] * inputs[upstream of k])

Inputs without a gradient (labels, noise, targets) are data. The math is in the kernels' docstrings:
:attr:`Kernel.derivative` is the backward's docstring, :attr:`Kernel.formula` the forward's first
paragraph plus that. This one table drives

* ``npdgm gradcheck``: check ``kernel.<name>`` (``kernel.<group>[<name>]`` for a grouped entry),
  float64 central differences of L (:mod:`npdgm.checks`),
* the kernel reference vectors: one ``export-reference`` case per entry (:mod:`npdgm.reference`),
* tests/test_torch_crosscheck.py: the same inputs through a PyTorch version of every entry.

tests/test_kernels.py fails when a ``*_backward`` of npdgm.kernels is missing here. The inputs are
host NumPy arrays (the checks run in float64 on the CPU); the makers of the first entries are frozen:
the committed reference vectors were drawn with them.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np

from . import activations as A
from . import categorical as Cat
from . import conv as Cv
from . import coupling as C
from . import gaussian as G
from . import linear as L
from . import losses as Lo
from . import masked as Ma
from . import spline as Sp


@dataclass(frozen=True)
class Kernel:
    name: str
    forward: object            # the forward function (its docstring states the map)
    backward: object           # the backward function (its docstring states the derivative)
    make: object               # make(rng, dtype) -> {input name: array}
    run: object                # run(inputs) -> (outputs, grads)
    note: str = ""             # what this case fixes (constants, shapes), appended to the formula
    group: str | None = None   # gradcheck name kernel.<group>[<name>] instead of kernel.<name>

    @property
    def derivative(self):
        """The backward's docstring (dedented): the derivative it computes."""
        return inspect.cleandoc(self.backward.__doc__ or "")

    @property
    def formula(self):
        """The forward's first docstring paragraph, then the backward's docstring (and the note): the
        text the reference manifest stores for this case."""
        fwd = inspect.cleandoc(self.forward.__doc__ or "").split("\n\n")[0]
        return f"{fwd}\n{self.derivative}" + (f"\n({self.note})" if self.note else "")

    @property
    def check_name(self):
        return f"kernel.{self.group}[{self.name}]" if self.group else f"kernel.{self.name}"

    def upstream(self, outputs):
        """{output name: input name of its upstream gradient}."""
        return {k: "dy" for k in outputs} if len(outputs) == 1 else {k: "d" + k for k in outputs}


def _std(rng, dt, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dt)


TABLE = []


def kernel(name, forward, backward, make, note="", group=None):
    """Decorator adding ``run`` to :data:`TABLE` as entry ``name``."""
    def deco(run):
        TABLE.append(Kernel(name, forward, backward, make, run, note, group))
        return run
    return deco


# -- linear ---------------------------------------------------------------------------------------
def _linear(rng, dt):
    return {"x": _std(rng, dt, 8, 5), "W": _std(rng, dt, 5, 3), "b": _std(rng, dt, 3), "dy": _std(rng, dt, 8, 3)}


@kernel("linear", L.linear_forward, L.linear_backward, _linear)
def _(i):
    dx, dW, db = L.linear_backward(i["dy"], i["x"], i["W"])
    return {"y": L.linear_forward(i["x"], i["W"], i["b"])}, {"x": dx, "W": dW, "b": db}


@kernel("linear_relu", L.linear_relu_forward, L.linear_relu_backward, _linear,
        "a Linear layer and its ReLU; fused: the bias add and the ReLU in one pass")
def _(i):
    y = L.linear_relu_forward(i["x"], i["W"], i["b"])
    dx, dW, db = L.linear_relu_backward(i["dy"], i["x"], i["W"], y)
    return {"y": y}, {"x": dx, "W": dW, "b": db}


# -- activations: the backward takes x or y, whichever A.ACTIVATIONS says ----------------------------
def _activation(rng, dt):
    return {"x": _std(rng, dt, 8, 6, scale=3.0), "dy": _std(rng, dt, 8, 6)}


def _activation_entry(name):
    f, df, needs = A.ACTIVATIONS[name]

    @kernel(name, f, df, _activation)
    def run(i):
        y = f(i["x"])
        return {"y": y}, {"x": df(i["dy"], y if needs == "y" else i["x"])}


for _name in ("relu", "leaky_relu", "tanh", "sigmoid", "softplus", "elu"):
    _activation_entry(_name)


# -- losses ----------------------------------------------------------------------------------------
def _bce(rng, dt):
    return {"logits": _std(rng, dt, 8, 10, scale=5.0), "x": rng.uniform(0, 1, (8, 10)).astype(dt),
            "dy": _std(rng, dt, 8)}


@kernel("bernoulli_nll", Lo.bernoulli_nll_forward, Lo.bernoulli_nll_backward, _bce)
def _bernoulli_run(i):
    return ({"loss": Lo.bernoulli_nll_forward(i["logits"], i["x"])},
            {"logits": Lo.bernoulli_nll_backward(i["dy"], i["logits"], i["x"])})


def _gauss(rng, dt):
    return {"mu": _std(rng, dt, 8, 6), "x": _std(rng, dt, 8, 6), "logvar": _std(rng, dt, 6, scale=0.5),
            "dy": _std(rng, dt, 8)}


@kernel("gaussian_nll", Lo.gaussian_nll_forward, Lo.gaussian_nll_backward, _gauss, "logvar per dimension (D,)")
def _gaussian_run(i):
    dmu, dlv = Lo.gaussian_nll_backward(i["dy"], i["mu"], i["x"], i["logvar"])
    return {"loss": Lo.gaussian_nll_forward(i["mu"], i["x"], i["logvar"])}, {"mu": dmu, "logvar": dlv}


def _mse(rng, dt):
    return {"pred": _std(rng, dt, 8, 6), "target": _std(rng, dt, 8, 6), "dy": np.asarray(1.0, dt)}


@kernel("mse", Lo.mse_forward, Lo.mse_backward, _mse)
def _(i):
    return ({"loss": Lo.mse_forward(i["pred"], i["target"])},
            {"pred": Lo.mse_backward(i["dy"], i["pred"], i["target"])})


def _lse(rng, dt):
    return {"a": _std(rng, dt, 8, 12, scale=10.0), "dy": _std(rng, dt, 8)}


@kernel("logsumexp", Lo.logsumexp_forward, Lo.logsumexp_backward, _lse, "axis 1")
def _(i):
    y = Lo.logsumexp_forward(i["a"], axis=1)
    return {"y": y}, {"a": Lo.logsumexp_backward(i["dy"], i["a"], y, axis=1)}


# -- Gaussian q(z|x) ---------------------------------------------------------------------------------
def _rep(rng, dt):
    return {"mu": _std(rng, dt, 8, 4), "logvar": _std(rng, dt, 8, 4), "eps": _std(rng, dt, 8, 4),
            "dy": _std(rng, dt, 8, 4)}


@kernel("reparameterize", G.reparameterize_forward, G.reparameterize_backward, _rep, "one sample: eps (B, Z)")
def _reparameterize_run(i):
    dmu, dlv = G.reparameterize_backward(i["dy"], i["logvar"], i["eps"])
    return {"z": G.reparameterize_forward(i["mu"], i["logvar"], i["eps"])}, {"mu": dmu, "logvar": dlv}


def _kl(rng, dt):
    return {"mu": _std(rng, dt, 8, 4), "logvar": _std(rng, dt, 8, 4), "dy": _std(rng, dt, 8)}


@kernel("kl_std_normal", G.kl_std_normal_forward, G.kl_std_normal_backward, _kl)
def _(i):
    dmu, dlv = G.kl_std_normal_backward(i["dy"], i["mu"], i["logvar"])
    return {"kl": G.kl_std_normal_forward(i["mu"], i["logvar"])}, {"mu": dmu, "logvar": dlv}


# -- flow priors and scale clamps (their reference vectors were first written to models-f64) ----------
def _prior_entry(name):
    f, b = C.prior_logprob(name)

    def make(rng, dt):
        return {"z": _std(rng, dt, 6, 4, scale=3.0), "dy": _std(rng, dt, 6)}

    @kernel(f"prior_{name}", f, b, make, group="flow_priors_clamps")
    def run(i):
        return {"logp": f(i["z"])}, {"z": b(i["dy"], i["z"])}


def _clamp_entry(kind, bound=1.7):
    def make(rng, dt):
        return {"raw": _std(rng, dt, 6, 4, scale=3.0), "dy": _std(rng, dt, 6, 4)}

    @kernel(f"scale_clamp_{kind}", C.scale_clamp_forward, C.scale_clamp_backward, make,
            f"kind={kind!r}, b = {bound}", group="flow_priors_clamps")
    def run(i):
        s = C.scale_clamp_forward(i["raw"], kind, bound)
        return {"s": s}, {"raw": C.scale_clamp_backward(i["dy"], i["raw"], s, kind, bound)}


_prior_entry("gaussian")
_prior_entry("logistic")
_clamp_entry("tanh")
_clamp_entry("atan")

# == entries added with the table (new reference cases; the makers above are frozen) ==================
_activation_entry("identity")


def _gauss_lv(lv_shape):
    def make(rng, dt):
        return {"mu": _std(rng, dt, 8, 6), "x": _std(rng, dt, 8, 6),
                "logvar": np.asarray(rng.standard_normal(lv_shape) * 0.5, dtype=dt), "dy": _std(rng, dt, 8)}
    return make


kernel("gaussian_nll_scalar", Lo.gaussian_nll_forward, Lo.gaussian_nll_backward, _gauss_lv(()),
       "logvar a scalar (fixed sigma)")(_gaussian_run)
kernel("gaussian_nll_per_elem", Lo.gaussian_nll_forward, Lo.gaussian_nll_backward, _gauss_lv((8, 6)),
       "logvar per element (B, D)")(_gaussian_run)


def _bce_saturated(rng, dt):
    logits = rng.standard_normal((6, 7)) * 2
    logits.ravel()[::5] *= 15                       # |l| ~ 30: sigmoid saturates, softplus is ~linear
    x = rng.uniform(0, 1, (6, 7))
    x[0], x[1] = 0.0, 1.0                           # hard targets
    return {"logits": logits.astype(dt), "x": x.astype(dt), "dy": _std(rng, dt, 6)}


kernel("bernoulli_nll_saturated", Lo.bernoulli_nll_forward, Lo.bernoulli_nll_backward, _bce_saturated,
       "logits up to |l| ~ 30, rows of hard 0 and 1 targets")(_bernoulli_run)


def _rep_samples(rng, dt):
    return {"mu": _std(rng, dt, 5, 3), "logvar": _std(rng, dt, 5, 3), "eps": _std(rng, dt, 4, 5, 3),
            "dy": _std(rng, dt, 4, 5, 3)}


kernel("reparameterize_samples", G.reparameterize_forward, G.reparameterize_backward, _rep_samples,
       "4 samples: eps (K, B, Z), dmu and dlogvar summed over K")(_reparameterize_run)


FREE_BITS = 0.3  # the kl_free_bits entry's L (nats per latent dimension)


def _kl_free_bits(rng, dt):
    """Columns of mean KL ~0.007, ~0.02, ~0.9, ~0.9 (seed 0): two under L = 0.3 (no gradient), two over, far from
    the kink at L (finite differences stay on one side)."""
    scale = np.array([0.1, 0.3, 1.5, 2.0])
    return {"mu": _std(rng, dt, 8, 4) * scale.astype(dt), "logvar": _std(rng, dt, 8, 4, scale=0.1),
            "dy": np.asarray(rng.standard_normal(), dtype=dt)}


@kernel("kl_free_bits", G.kl_free_bits_forward, G.kl_free_bits_backward, _kl_free_bits, f"L = {FREE_BITS}")
def _(i):
    dmu, dlv = G.kl_free_bits_backward(i["dy"], i["mu"], i["logvar"], FREE_BITS)
    return {"kl": G.kl_free_bits_forward(i["mu"], i["logvar"], FREE_BITS)}, {"mu": dmu, "logvar": dlv}


# -- categorical (softmax over the last axis) -------------------------------------------------------------
def _logits(rng, dt, *shape):
    s = rng.standard_normal(shape) * 3
    s.ravel()[::7] *= 10                            # a few large logits: the max-shift matters
    return s.astype(dt)


def _cat(rng, dt):
    return {"logits": _logits(rng, dt, 6, 5), "dy": _std(rng, dt, 6, 5)}


@kernel("softmax", Cat.softmax_forward, Cat.softmax_backward, _cat)
def _(i):
    q = Cat.softmax_forward(i["logits"])
    return {"q": q}, {"logits": Cat.softmax_backward(i["dy"], q)}


@kernel("log_softmax", Cat.log_softmax_forward, Cat.log_softmax_backward, _cat)
def _(i):
    y = Cat.log_softmax_forward(i["logits"])
    return {"y": y}, {"logits": Cat.log_softmax_backward(i["dy"], y)}


def _ce(rng, dt):
    return {"logits": _logits(rng, dt, 6, 5), "labels": rng.integers(0, 5, 6).astype(np.int64),
            "dy": _std(rng, dt, 6)}


@kernel("softmax_ce", Cat.softmax_ce_forward, Cat.softmax_ce_backward, _ce)
def _(i):
    return ({"loss": Cat.softmax_ce_forward(i["logits"], i["labels"])},
            {"logits": Cat.softmax_ce_backward(i["dy"], i["logits"], i["labels"])})


def _entropy(rng, dt):
    return {"logits": _logits(rng, dt, 6, 5), "dy": _std(rng, dt, 6)}


@kernel("softmax_entropy", Cat.softmax_entropy_forward, Cat.softmax_entropy_backward, _entropy)
def _(i):
    return ({"H": Cat.softmax_entropy_forward(i["logits"])},
            {"logits": Cat.softmax_entropy_backward(i["dy"], i["logits"])})


def _expectation(rng, dt):
    return {"logits": _logits(rng, dt, 6, 5), "v": _std(rng, dt, 6, 5, scale=10.0), "dy": _std(rng, dt, 6)}


@kernel("softmax_expectation", Cat.softmax_expectation_forward, Cat.softmax_expectation_backward, _expectation)
def _(i):
    ds, dv = Cat.softmax_expectation_backward(i["dy"], i["logits"], i["v"])
    return {"y": Cat.softmax_expectation_forward(i["logits"], i["v"])}, {"logits": ds, "v": dv}


# -- flow transforms: (output, log-det) pairs and their inverses ---------------------------------------
# (affine_coupling_half: the kernel on the transformed half; "affine_coupling" is the flow-layer reference case)
def _half(rng, dt, a="xb"):
    return {a: _std(rng, dt, 5, 3), "s": _std(rng, dt, 5, 3, scale=0.5), "t": _std(rng, dt, 5, 3)}


@kernel("affine_coupling_half", C.affine_coupling_forward, C.affine_coupling_backward,
        lambda rng, dt: {**_half(rng, dt), "dyb": _std(rng, dt, 5, 3), "dlogdet": _std(rng, dt, 5)}, group="flow")
def _(i):
    yb, ld = C.affine_coupling_forward(i["xb"], i["s"], i["t"])
    dxb, ds, dt = C.affine_coupling_backward(i["dyb"], i["dlogdet"], i["xb"], i["s"])
    return {"yb": yb, "logdet": ld}, {"xb": dxb, "s": ds, "t": dt}


@kernel("affine_coupling_half_inverse", C.affine_coupling_inverse, C.affine_coupling_inverse_backward,
        lambda rng, dt: {**_half(rng, dt, "yb"), "dxb": _std(rng, dt, 5, 3), "dlogdet_inv": _std(rng, dt, 5)},
        group="flow")
def _(i):
    xb, ld = C.affine_coupling_inverse(i["yb"], i["s"], i["t"])
    dyb, ds, dt = C.affine_coupling_inverse_backward(i["dxb"], i["dlogdet_inv"], xb, i["s"])
    return {"xb": xb, "logdet_inv": ld}, {"yb": dyb, "s": ds, "t": dt}


@kernel("diag_scale", C.diag_scale_forward, C.diag_scale_backward,
        lambda rng, dt: {"x": _std(rng, dt, 5, 4), "log_scale": _std(rng, dt, 4, scale=0.5),
                         "dy": _std(rng, dt, 5, 4), "dlogdet": _std(rng, dt, 5)}, group="flow")
def _(i):
    y, ld = C.diag_scale_forward(i["x"], i["log_scale"])
    dx, dls = C.diag_scale_backward(i["dy"], i["dlogdet"], i["x"], i["log_scale"])
    return {"y": y, "logdet": ld}, {"x": dx, "log_scale": dls}


@kernel("diag_scale_inverse", C.diag_scale_inverse, C.diag_scale_inverse_backward,
        lambda rng, dt: {"y": _std(rng, dt, 5, 4), "log_scale": _std(rng, dt, 4, scale=0.5),
                         "dx": _std(rng, dt, 5, 4), "dlogdet_inv": _std(rng, dt, 5)}, group="flow")
def _(i):
    x, ld = C.diag_scale_inverse(i["y"], i["log_scale"])
    dy, dls = C.diag_scale_inverse_backward(i["dx"], i["dlogdet_inv"], x, i["log_scale"])
    return {"x": x, "logdet_inv": ld}, {"y": dy, "log_scale": dls}


ALPHA = 0.05  # the logit entries' alpha (LogitTransform's default)


@kernel("logit", C.logit_forward, C.logit_backward,
        lambda rng, dt: {"x": rng.uniform(0.02, 0.98, (5, 4)).astype(dt), "dy": _std(rng, dt, 5, 4),
                         "dlogdet": _std(rng, dt, 5)}, f"alpha = {ALPHA}", group="flow")
def _(i):
    y, ld = C.logit_forward(i["x"], ALPHA)
    return {"y": y, "logdet": ld}, {"x": C.logit_backward(i["dy"], i["dlogdet"], i["x"], ALPHA)}


@kernel("logit_inverse", C.logit_inverse, C.logit_inverse_backward,
        lambda rng, dt: {"y": _std(rng, dt, 5, 4, scale=3.0), "dx": _std(rng, dt, 5, 4),
                         "dlogdet_inv": _std(rng, dt, 5)}, f"alpha = {ALPHA}", group="flow")
def _(i):
    x, ld = C.logit_inverse(i["y"], ALPHA)
    return {"x": x, "logdet_inv": ld}, {"y": C.logit_inverse_backward(i["dx"], i["dlogdet_inv"], i["y"], ALPHA)}


_clamp_entry("none")


# -- MADE masked linear, rational-quadratic splines ----------------------------------------------------
@kernel("masked_linear", Ma.masked_linear_forward, Ma.masked_linear_backward,
        lambda rng, dt: {"x": _std(rng, dt, 8, 5), "W": _std(rng, dt, 5, 4), "M": (rng.random((5, 4)) < 0.5).astype(dt),
                         "b": _std(rng, dt, 4), "dy": _std(rng, dt, 8, 4)}, "M a fixed 0/1 mask (data)")
def _(i):
    dx, dW, db = Ma.masked_linear_backward(i["dy"], i["x"], i["W"], i["M"])
    return {"y": Ma.masked_linear_forward(i["x"], i["W"], i["M"], i["b"])}, {"x": dx, "W": dW, "b": db}


SPLINE = dict(bound=2.0, min_width=0.05, min_height=0.05, min_derivative=1e-3)  # the spline entries' constants
_SPLINE_NOTE = "K = 4 bins on [-2, 2], min width = min height = 0.05, min derivative 1e-3"


def _u(rng, dt):
    return _std(rng, dt, 3, 2, 11, scale=1.5)


@kernel("rq_knots", Sp.rq_knots_forward, Sp.rq_knots_backward,
        lambda rng, dt: {"u": _u(rng, dt), **{k: _std(rng, dt, 3, 2, 5) for k in ("dxk", "dyk", "dd")}},
        _SPLINE_NOTE, group="spline")
def _(i):
    xk, yk, d = Sp.rq_knots_forward(i["u"], **SPLINE)
    return {"xk": xk, "yk": yk, "d": d}, {"u": Sp.rq_knots_backward(i["dxk"], i["dyk"], i["dd"], i["u"], **SPLINE)}


def _spline_case(a, up):
    """Knots of a random u (increasing, ends at -+2) and the points ``a`` (3, 2) in [-2.6, 2.6] (some in the
    identity tails), plus the two upstream gradients."""
    def make(rng, dt):
        xk, yk, d = Sp.rq_knots_forward(_u(rng, np.float64), **SPLINE)
        return {a: rng.uniform(-2.6, 2.6, (3, 2)).astype(dt), "xk": xk.astype(dt), "yk": yk.astype(dt),
                "d": d.astype(dt), **{u: _std(rng, dt, 3, 2) for u in up}}
    return make


@kernel("rq_spline", Sp.rq_spline_forward, Sp.rq_spline_backward, _spline_case("x", ("dy", "dlogg")), _SPLINE_NOTE,
        group="spline")
def _(i):
    y, logg = Sp.rq_spline_forward(i["x"], i["xk"], i["yk"], i["d"])
    dx, dxk, dyk, dd = Sp.rq_spline_backward(i["dy"], i["dlogg"], i["x"], i["xk"], i["yk"], i["d"])
    return {"y": y, "logg": logg}, {"x": dx, "xk": dxk, "yk": dyk, "d": dd}


@kernel("rq_spline_inverse", Sp.rq_spline_inverse, Sp.rq_spline_inverse_backward,
        _spline_case("y", ("dx", "dlogdet_inv")), _SPLINE_NOTE, group="spline")
def _(i):
    x, ldi = Sp.rq_spline_inverse(i["y"], i["xk"], i["yk"], i["d"])
    dy, dxk, dyk, dd = Sp.rq_spline_inverse_backward(i["dx"], i["dlogdet_inv"], x, i["xk"], i["yk"], i["d"])
    return {"x": x, "logdet_inv": ldi}, {"y": dy, "xk": dxk, "yk": dyk, "d": dd}


# -- convolutions (NCHW): odd sizes, a stride, padding and a dilation in one case ------------------------
CONV = dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2))   # the conv entries' geometry
_CONV_NOTE = "x (2, 3, 7, 6), W 3x3, stride (2, 1), padding (1, 2), dilation (1, 2)"


@kernel("conv2d", Cv.conv2d_forward, Cv.conv2d_backward,
        lambda rng, dt: {"x": _std(rng, dt, 2, 3, 7, 6), "W": _std(rng, dt, 4, 3, 3, 3), "b": _std(rng, dt, 4),
                         "dy": _std(rng, dt, 2, 4, 4, 6)}, _CONV_NOTE, group="conv")
def _(i):
    dx, dW, db = Cv.conv2d_backward(i["dy"], i["x"], i["W"], **CONV)
    return {"y": Cv.conv2d_forward(i["x"], i["W"], i["b"], **CONV)}, {"x": dx, "W": dW, "b": db}


@kernel("conv_transpose2d", Cv.conv_transpose2d_forward, Cv.conv_transpose2d_backward,
        lambda rng, dt: {"x": _std(rng, dt, 2, 4, 4, 6), "W": _std(rng, dt, 4, 3, 3, 3), "b": _std(rng, dt, 3),
                         "dy": _std(rng, dt, 2, 3, 7, 6)}, _CONV_NOTE + " (the adjoint: y (2, 3, 7, 6))",
        group="conv")
def _(i):
    dx, dW, db = Cv.conv_transpose2d_backward(i["dy"], i["x"], i["W"], **CONV)
    return {"y": Cv.conv_transpose2d_forward(i["x"], i["W"], i["b"], **CONV)}, {"x": dx, "W": dW, "b": db}


@kernel("squeeze", Cv.squeeze_forward, Cv.squeeze_backward,
        lambda rng, dt: {"x": _std(rng, dt, 2, 3, 4, 6), "dy": _std(rng, dt, 2, 12, 2, 3)}, "factor 2",
        group="conv")
def _(i):
    return {"y": Cv.squeeze_forward(i["x"])}, {"x": Cv.squeeze_backward(i["dy"])}


@kernel("unsqueeze", Cv.unsqueeze_forward, Cv.unsqueeze_backward,
        lambda rng, dt: {"x": _std(rng, dt, 2, 12, 2, 3), "dy": _std(rng, dt, 2, 3, 4, 6)}, "factor 2",
        group="conv")
def _(i):
    return {"y": Cv.unsqueeze_forward(i["x"])}, {"x": Cv.unsqueeze_backward(i["dy"])}


KERNELS = {k.name: k for k in TABLE}
if len(KERNELS) != len(TABLE):
    raise RuntimeError("two kernel table entries share a name")
