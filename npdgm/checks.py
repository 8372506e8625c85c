"""The kernel and module gradient checks behind ``npdgm gradcheck`` (models register their own).

Each check builds float64 inputs, including awkward ones (large |logits|, zeros, saturated
tanh, ReLU inputs kept away from the kink), and compares the hand-written backward with
central differences of  L = sum(forward(inputs) * dy)  for a random upstream gradient dy.
"""
import numpy as np

from . import kernels as K
from .gradcheck import check, check_module_params, register
from .nn import MLP, Linear


def _away_from_zero(rng, shape, gap=0.05):
    """Random normals with |x| >= gap, so kinked activations are differentiable at every entry."""
    x = rng.standard_normal(shape) * 2
    return np.where(np.abs(x) < gap, np.sign(x + 1e-12) * gap * 2, x)


def _awkward(rng, shape):
    """Normals with some large-magnitude entries (|x| ~ 30) mixed in."""
    x = rng.standard_normal(shape) * 2
    x.ravel()[::5] *= 15
    return x


def kernel_check(fwd, bwd, inputs, rng, **kw):
    """Check ``bwd(dy, *inputs) -> grads`` (a tuple in ``inputs`` order, or one array) against ``fwd``."""
    names = list(inputs)
    y = fwd(*inputs.values(), **kw)
    dy = rng.standard_normal(np.shape(y))
    grads = bwd(dy, *inputs.values(), **kw)
    grads = grads if isinstance(grads, tuple) else (grads,)
    analytic = dict(zip(names, grads))
    return check(lambda: np.sum(fwd(*inputs.values(), **kw) * dy), {n: inputs[n] for n in analytic}, analytic)


@register("kernel.linear")
def _(rng):
    x, W, b = rng.standard_normal((5, 4)), rng.standard_normal((4, 3)), rng.standard_normal(3)
    y = K.linear_forward(x, W, b)
    dy = rng.standard_normal(y.shape)
    dx, dW, db = K.linear_backward(dy, x, W)
    return check(lambda: np.sum(K.linear_forward(x, W, b) * dy), {"x": x, "W": W, "b": b},
                 {"x": dx, "W": dW, "b": db})


def _act(name, make_x):
    f, df, needs = K.get_activation(name)

    @register(f"kernel.{name}")
    def _(rng):
        x = make_x(rng, (6, 5))
        y = f(x)
        dy = rng.standard_normal(y.shape)
        dx = df(dy, y if needs == "y" else x)
        return check(lambda: np.sum(f(x) * dy), {"x": x}, {"x": dx})


_act("relu", _away_from_zero)
_act("leaky_relu", _away_from_zero)
_act("elu", _away_from_zero)
_act("tanh", lambda rng, s: rng.standard_normal(s) * 3)  # several entries deep in saturation
_act("sigmoid", _awkward)
_act("softplus", _awkward)


@register("kernel.bernoulli_nll")
def _(rng):
    logits = _awkward(rng, (6, 7))
    x = rng.uniform(0, 1, (6, 7))
    x[0] = 0.0
    x[1] = 1.0
    return kernel_check(K.bernoulli_nll_forward, lambda d, l, t: (K.bernoulli_nll_backward(d, l, t),),
                        {"logits": logits, "x": x}, rng)


@register("kernel.gaussian_nll")
def _(rng):
    mu, x = rng.standard_normal((5, 4)), rng.standard_normal((5, 4))
    dloss = rng.standard_normal(5)
    rep = {}
    for tag, lv in [("scalar", np.array(0.3)), ("per_dim", rng.standard_normal(4) * 0.5),
                    ("per_elem", rng.standard_normal((5, 4)) * 0.5)]:
        dmu, dlv = K.gaussian_nll_backward(dloss, mu, x, lv)
        r = check(lambda: np.sum(K.gaussian_nll_forward(mu, x, lv) * dloss), {"mu": mu, "logvar": lv},
                  {"mu": dmu, "logvar": dlv})
        rep.update({f"{k}[{tag}]": v for k, v in r.items()})
    return rep


@register("kernel.mse")
def _(rng):
    p, t = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    return kernel_check(K.mse_forward, lambda d, a, b: (K.mse_backward(d, a, b),), {"pred": p, "target": t}, rng)


@register("kernel.logsumexp")
def _(rng):
    a = _awkward(rng, (4, 6))
    y = K.logsumexp_forward(a, axis=1)
    dy = rng.standard_normal(y.shape)
    da = K.logsumexp_backward(dy, a, y, axis=1)
    return check(lambda: np.sum(K.logsumexp_forward(a, axis=1) * dy), {"a": a}, {"a": da})


@register("kernel.reparameterize")
def _(rng):
    mu, lv = rng.standard_normal((5, 3)), rng.standard_normal((5, 3))
    rep = {}
    for tag, eps in [("1 sample", rng.standard_normal((5, 3))), ("4 samples", rng.standard_normal((4, 5, 3)))]:
        z = K.reparameterize_forward(mu, lv, eps)
        dz = rng.standard_normal(z.shape)
        dmu, dlv = K.reparameterize_backward(dz, lv, eps)
        r = check(lambda: np.sum(K.reparameterize_forward(mu, lv, eps) * dz), {"mu": mu, "logvar": lv},
                  {"mu": dmu, "logvar": dlv})
        rep.update({f"{k}[{tag}]": v for k, v in r.items()})
    return rep


@register("kernel.kl_std_normal")
def _(rng):
    mu, lv = rng.standard_normal((5, 3)) * 2, rng.standard_normal((5, 3)) * 2
    return kernel_check(K.kl_std_normal_forward, K.kl_std_normal_backward, {"mu": mu, "logvar": lv}, rng)


def _module_check(module, x, rng):
    module.flatten()
    y = module.forward(x)
    dy = rng.standard_normal(y.shape)
    module.zero_grad()
    dx = module.backward(dy)
    loss = lambda: np.sum(module.forward(x) * dy)
    rep = check_module_params(module, loss)
    rep.update(check(loss, {"x": x}, {"x": dx}))
    return rep


@register("module.Linear")
def _(rng):
    return _module_check(Linear(4, 3, rng=rng), rng.standard_normal((5, 4)), rng)


for _name in ("relu", "tanh", "elu", "softplus"):
    def _mlp(rng, _name=_name):
        return _module_check(MLP(4, [6, 5], 3, activation=_name, rng=rng), rng.standard_normal((7, 4)), rng)
    register(f"module.MLP[{_name}]")(_mlp)


# -- categorical kernels (log-softmax, cross-entropy, entropy, expectation under softmax) ----------
@register("kernel.softmax")
def _(rng):
    s = _awkward(rng, (5, 4))
    dq = rng.standard_normal(s.shape)
    ds = K.softmax_backward(dq, K.softmax_forward(s))
    return check(lambda: np.sum(K.softmax_forward(s) * dq), {"logits": s}, {"logits": ds})


@register("kernel.log_softmax")
def _(rng):
    s = _awkward(rng, (5, 4))
    dy = rng.standard_normal(s.shape)
    ds = K.log_softmax_backward(dy, K.log_softmax_forward(s))
    return check(lambda: np.sum(K.log_softmax_forward(s) * dy), {"logits": s}, {"logits": ds})


@register("kernel.softmax_ce")
def _(rng):
    s = _awkward(rng, (6, 5))
    labels = rng.integers(0, 5, 6)
    return kernel_check(lambda a: K.softmax_ce_forward(a, labels), lambda d, a: K.softmax_ce_backward(d, a, labels),
                        {"logits": s}, rng)


@register("kernel.softmax_entropy")
def _(rng):
    s = rng.standard_normal((6, 5)) * 3
    return kernel_check(K.softmax_entropy_forward, K.softmax_entropy_backward, {"logits": s}, rng)


@register("kernel.softmax_expectation")
def _(rng):
    s, v = rng.standard_normal((6, 5)) * 3, rng.standard_normal((6, 5)) * 10
    return kernel_check(K.softmax_expectation_forward, K.softmax_expectation_backward, {"logits": s, "v": v}, rng)
