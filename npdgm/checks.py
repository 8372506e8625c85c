"""The gradient checks behind ``npdgm gradcheck``: kernels, modules and whole models (VAE, CVAE, M2, flows).

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


# == whole-model checks (moved out of the model files: models never import gradcheck) ================
# Each perturbs a small float64 model off its initial values and compares loss_and_grad's gradient
# with central differences of the forward-only loss.
from .kernels import coupling as C  # noqa: E402
from .models.cvae import CVAE  # noqa: E402
from .models.flows import (ActNorm, AdditiveCoupling, AffineCoupling, Flow, LogitTransform,  # noqa: E402
                           Permutation, Scaling)
from .models.m2 import M2  # noqa: E402
from .models.vae import VAE  # noqa: E402


# -- finite-difference checks of the whole loss (npdgm gradcheck) ---------------------------------
def _vae_check(rng, K=1, **kw):
    model = VAE(**{"x_dim": 7, "hidden": (6,), "z_dim": 3, **kw}, n_samples=K, seed=int(rng.integers(1 << 30)))
    # perturb all parameters so biases / logvar_x are not trivially zero
    model.flat_params[...] += rng.standard_normal(model.flat_params.shape) * 0.3
    B = 5
    x = rng.uniform(0, 1, (B, 7)) if model.likelihood == "bernoulli" else rng.standard_normal((B, 7))
    if model.likelihood == "bernoulli":
        x[0] = 0.0
        x[1, :3] = 1.0
    eps = rng.standard_normal((K, B, 3))
    model.loss_and_grad(x, eps)
    analytic = {n: g.copy() for n, g in model.grads.items()}
    return check(lambda: float(model.loss(x, eps)[0]), model.params, analytic)


for _tag, _kw in [
    ("bernoulli,relu", dict(activation="relu", likelihood="bernoulli")),
    ("bernoulli,tanh,beta=0.5,K=3", dict(activation="tanh", likelihood="bernoulli", beta=0.5, K=3)),
    ("gaussian,sigma=0.7,elu,beta=2", dict(activation="elu", likelihood="gaussian", sigma=0.7, beta=2.0)),
    ("gaussian,learned,tanh,K=2", dict(activation="tanh", likelihood="gaussian", hidden=(6, 4), K=2)),
]:
    register(f"model.vae[{_tag}]")(lambda rng, _kw=_kw: _vae_check(rng, **_kw))


# -- finite-difference checks of the whole loss (npdgm gradcheck) ---------------------------------
def _cvae_check(rng, K=1, **kw):
    model = CVAE(**{"x_dim": 7, "num_classes": 3, "hidden": (6,), "z_dim": 3, **kw}, n_samples=K,
                 seed=int(rng.integers(1 << 30)))
    model.flat_params[...] += rng.standard_normal(model.flat_params.shape) * 0.3
    B = 5
    x = rng.uniform(0, 1, (B, 7)) if model.likelihood == "bernoulli" else rng.standard_normal((B, 7))
    y = np.array([0, 2, 1, 2, 0])
    eps = rng.standard_normal((K, B, 3))
    model.loss_and_grad(x, y, eps)
    analytic = {n: g.copy() for n, g in model.grads.items()}
    return check(lambda: float(model.loss(x, y, eps)[0]), model.params, analytic)


for _tag, _kw in [
    ("bernoulli,relu", dict(activation="relu")),
    ("bernoulli,softplus,beta=0.5,K=2", dict(activation="softplus", beta=0.5, K=2)),
    ("gaussian,learned,tanh", dict(activation="tanh", likelihood="gaussian", hidden=(6, 4))),
]:
    register(f"model.cvae[{_tag}]")(lambda rng, _kw=_kw: _cvae_check(rng, **_kw))


# -- finite-difference checks of the whole labelled + unlabelled loss (npdgm gradcheck) -----------
def _m2_check(rng, parts="both", shared_eps=False, **kw):
    C, Z, D = 3, 2, 6
    model = M2(**{"x_dim": D, "num_classes": C, "hidden": (5,), "z_dim": Z, "classifier_hidden": (4,), **kw},
               seed=int(rng.integers(1 << 30)))
    model.flat_params[...] += rng.standard_normal(model.flat_params.shape) * 0.3
    x_l, y_l = rng.uniform(0, 1, (4, D)), np.array([0, 2, 1, 2])
    x_u = rng.uniform(0, 1, (3, D))
    x_u[0] = 0.0
    eps_l = rng.standard_normal((4, Z))
    eps_u = rng.standard_normal((3, Z) if shared_eps else (C, 3, Z))
    args = dict(x_l=x_l, y_l=y_l, eps_l=eps_l) if parts != "unlabelled" else {}
    if parts != "labelled":
        args.update(x_u=x_u, eps_u=eps_u)
    model.loss_and_grad(**args)
    analytic = {n: g.copy() for n, g in model.grads.items()}
    return check(lambda: float(model.loss(**args)[0]), model.params, analytic)


for _tag, _kw in [
    ("labelled+unlabelled,softplus,alpha=2.5", dict(activation="softplus", alpha=2.5)),
    ("labelled+unlabelled,tanh,2 hidden,shared eps", dict(activation="tanh", hidden=(5, 4), shared_eps=True)),
    ("unlabelled only,relu", dict(activation="relu", parts="unlabelled")),
    ("labelled only,elu,alpha=0.7", dict(activation="elu", parts="labelled", alpha=0.7)),
    ("labelled+unlabelled,softplus,labelled_weight=0.3", dict(activation="softplus", labelled_weight=0.3)),
    ("labelled+unlabelled,softplus,beta=2.5", dict(activation="softplus", beta=2.5)),
]:
    register(f"model.m2[{_tag}]")(lambda rng, _kw=_kw: _m2_check(rng, **_kw))


# -- flows: the loss and the inverse pass of small stacks, and the prior / scale-clamp kernels ---------
def _flow_grad_report(flow, x, rng):
    """Finite differences of loss_and_grad (every parameter and x) and of the inverse pass
    L = sum(f^-1(z) * w) + sum(logdet_inv * v) (every parameter and z)."""
    flow.forward(x)  # ActNorm data-dependent init happens here, before the check
    for layer in flow.layers:  # move the parameters off their initial values
        for p in layer.parameters():
            if p.data.ndim == 1 and not isinstance(layer, (AdditiveCoupling, AffineCoupling)):
                p.data += 0.3 * rng.standard_normal(p.data.shape)
    flow.loss_and_grad(x)
    analytic = {n: g.copy() for n, g in flow.grads.items()}
    z, ld = flow.forward(x)
    dlp = np.full(x.shape[0], -1.0 / x.shape[0])
    flow.zero_grad()
    analytic["x"] = flow.backward(flow._prior_b(dlp, z), dlp)
    rep = check(lambda: -flow.log_prob(x).mean(), {**flow.params, "x": x}, analytic)
    rep = {f"loss:{k}": v for k, v in rep.items()}

    zz = rng.standard_normal(x.shape) * 0.8
    w, v = rng.standard_normal(x.shape), rng.standard_normal(x.shape[0])
    flow.zero_grad()
    flow.inverse(zz, logdet=True)
    dz = flow.inverse_backward(w, v)
    analytic = {n: g.copy() for n, g in flow.grads.items()}
    analytic["z"] = dz

    def inv_loss():
        xx, ldi = flow.inverse(zz, logdet=True)
        return np.sum(xx * w) + np.sum(ldi * v)

    rep.update({f"inverse:{k}": val for k, val in check(inv_loss, {**flow.params, "z": zz}, analytic).items()})
    return rep


def _register_flow_checks():
    def unit(rng, n, d):
        return rng.uniform(0.05, 0.95, (n, d))

    cases = {
        "additive": lambda rng: (Flow([AdditiveCoupling(4, "half", 0, [6], "tanh", seed=1),
                                       AdditiveCoupling(4, "half", 1, [5, 5], "softplus", seed=2), Scaling(4)],
                                      prior="logistic"), rng.standard_normal((5, 4))),
        "affine-tanh": lambda rng: (Flow([AffineCoupling(3, "half", 0, [6], "tanh", "tanh", 1.5, seed=3),
                                          AffineCoupling(3, "half", 1, [6], "elu", "tanh", 1.0, seed=4)]),
                                    rng.standard_normal((5, 3))),
        "affine-atan": lambda rng: (Flow([AffineCoupling(4, "alternate", 0, [6], "tanh", "atan", 2.0, seed=5)]),
                                    rng.standard_normal((4, 4))),
        "affine-none": lambda rng: (Flow([AffineCoupling(2, "half", 1, [5], "softplus", "none", seed=6)]),
                                    rng.standard_normal((4, 2))),
        "actnorm": lambda rng: (Flow([ActNorm(3), Permutation(3, "random", 1), ActNorm(3)]),
                                rng.standard_normal((6, 3)) * 2 + 1),
        "mixed": lambda rng: (Flow([LogitTransform(6, 0.05), ActNorm(6),
                                    AffineCoupling(6, "checkerboard", 0, [5], "tanh", image_shape=(2, 3), seed=7),
                                    Permutation(6, "reverse"),
                                    AdditiveCoupling(6, [1, 0, 0, 1, 1, 0], 0, [5], "tanh", seed=8),
                                    AffineCoupling(6, "channel", 1, [4], "softplus", image_shape=(2, 1, 3), seed=9),
                                    Scaling(6)], prior="logistic"), unit(rng, 4, 6)),
    }
    for tag, make in cases.items():
        def fn(rng, make=make):
            flow, x = make(rng)
            return _flow_grad_report(flow, x, rng)
        register(f"model.flow[{tag}]")(fn)

    def kernel_checks(rng):
        rep = {}
        z = rng.standard_normal((5, 4)) * 3
        dl = rng.standard_normal(5)
        for name in C.PRIORS:
            f, b = C.prior_logprob(name)
            rep.update({f"{name}:{k}": v for k, v in
                        check(lambda: np.sum(f(z) * dl), {"z": z}, {"z": b(dl, z)}).items()})
        raw = rng.standard_normal((5, 4)) * 3
        ds = rng.standard_normal((5, 4))
        for kind in C.SCALE_CLAMPS:
            s = C.scale_clamp_forward(raw, kind, 1.7)
            g = C.scale_clamp_backward(ds, raw, s, kind, 1.7)
            rep[f"clamp-{kind}:raw"] = check(lambda: np.sum(C.scale_clamp_forward(raw, kind, 1.7) * ds),
                                             {"raw": raw}, {"raw": g})["raw"]
        return rep

    register("kernel.flow_priors_clamps")(kernel_checks)


_register_flow_checks()
