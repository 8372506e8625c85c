"""The gradient checks behind ``npdgm gradcheck``: kernels, modules and whole models (VAE, CVAE, M2, flows).

Each check builds float64 inputs, including awkward ones (large |logits|, zeros, saturated
tanh, ReLU inputs kept away from the kink), and compares the hand-written backward with
central differences of  L = sum(forward(inputs) * dy)  for a random upstream gradient dy.
The kernel checks are one per entry of the kernel table (npdgm/kernels/table.py, its inputs
from the entry's maker): ``kernel.<name>``, and ``kernel.flow[...]`` / ``kernel.flow_priors_clamps[...]``
for the flow transforms, priors and scale clamps.
"""
import numpy as np

from .gradcheck import check, check_kernel, check_module_params, register
from .kernels.table import TABLE
from .nn import MLP, Linear


# -- every kernel: one check per entry of the kernel table (npdgm/kernels/table.py) ----------------
for _k in TABLE:
    register(_k.check_name)(lambda rng, _k=_k: check_kernel(_k, _k.make(rng, np.float64)))


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


# == whole-model checks (moved out of the model files: models never import gradcheck) ================
# Each perturbs a small float64 model off its initial values and compares loss_and_grad's gradient
# with central differences of the forward-only loss.
from .models.cvae import CVAE  # noqa: E402
from .models.elbo import iwae_forward  # noqa: E402
from .models.flows import (IAF, MAF, ActNorm, AdditiveCoupling, AffineCoupling, Flow,  # noqa: E402
                           InvertibleLinear, LogitTransform, Permutation, Scaling, SplineCoupling, glow)
from .models.m1 import softmax_regression_loss_and_grad  # noqa: E402
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
    ("bernoulli,relu,free_bits=0.3,K=2", dict(activation="relu", likelihood="bernoulli", free_bits=0.3, K=2)),
    ("bernoulli,relu,iaf:2,K=2", dict(activation="relu", likelihood="bernoulli", posterior="iaf:2", iaf_hidden=(8,),
                                      K=2)),
    ("gaussian,learned,tanh,iaf:1,beta=0.5", dict(activation="tanh", likelihood="gaussian", posterior="iaf:1",
                                                  iaf_hidden=(7, 6), beta=0.5)),
    ("bernoulli,relu,iaf:2,context,K=2", dict(activation="relu", likelihood="bernoulli", posterior="iaf:2",
                                              iaf_hidden=(8,), iaf_context=True, K=2)),
    ("gaussian,learned,tanh,iaf:1,context,2 hidden,beta=0.5", dict(activation="tanh", likelihood="gaussian",
                                                                   posterior="iaf:1", iaf_hidden=(7, 6),
                                                                   iaf_context=True, hidden=(6, 4), beta=0.5)),
    ("gaussian,learned-z,tanh,K=2", dict(activation="tanh", likelihood="gaussian", sigma="learned-z", K=2)),
    ("gaussian,learned-z,elu,2 hidden,beta=0.5", dict(activation="elu", likelihood="gaussian", sigma="learned-z",
                                                      hidden=(6, 5), beta=0.5)),
]:
    register(f"model.vae[{_tag}]")(lambda rng, _kw=_kw: _vae_check(rng, **_kw))


@register("model.vae.iwae[bernoulli,tanh,iaf:2,k=4]")
def _(rng):
    """The k-sample IWAE loss through an IAF posterior (the IAF log-dets enter log q, so log w)."""
    model = VAE(x_dim=7, hidden=(6,), z_dim=3, activation="tanh", posterior="iaf:2", iaf_hidden=(8,),
                seed=int(rng.integers(1 << 30)))
    model.flat_params[...] += rng.standard_normal(model.flat_params.shape) * 0.3
    x, eps = rng.uniform(0, 1, (5, 7)), rng.standard_normal((4, 5, 3))
    model.iwae_loss_and_grad(x, eps)
    analytic = {n: g.copy() for n, g in model.grads.items()}
    loss = lambda: -float(iwae_forward(model, x, model.encoder.forward(x), eps, model.decoder.forward)[0].mean())
    return check(loss, model.params, analytic)


@register("model.vae.iwae[bernoulli,tanh,iaf:2,context,k=4]")
def _(rng):
    """The k-sample IWAE loss through an IAF posterior whose steps see the encoder's last hidden layer h (dh from
    every step's dc joins the encoder's backward at its last Linear)."""
    model = VAE(x_dim=7, hidden=(6, 5), z_dim=3, activation="tanh", posterior="iaf:2", iaf_hidden=(8,),
                iaf_context=True, seed=int(rng.integers(1 << 30)))
    model.flat_params[...] += rng.standard_normal(model.flat_params.shape) * 0.3
    x, eps = rng.uniform(0, 1, (5, 7)), rng.standard_normal((4, 5, 3))
    model.iwae_loss_and_grad(x, eps)
    analytic = {n: g.copy() for n, g in model.grads.items()}

    def loss():
        h, ctx = model._encode_raw(x)
        return -float(iwae_forward(model, x, h, eps, model.decoder.forward, context=ctx)[0].mean())
    return check(loss, model.params, analytic)


@register("model.vae.iwae[gaussian,learned-z,tanh,k=3]")
def _(rng):
    """The k-sample IWAE loss with a decoder variance head sigma_theta(z) (both halves of [mean | raw] in log w)."""
    from .models.elbo import iwae_forward
    model = VAE(x_dim=7, hidden=(6,), z_dim=3, activation="tanh", likelihood="gaussian", sigma="learned-z",
                seed=int(rng.integers(1 << 30)))
    model.flat_params[...] += rng.standard_normal(model.flat_params.shape) * 0.3
    x, eps = rng.standard_normal((5, 7)), rng.standard_normal((3, 5, 3))
    model.iwae_loss_and_grad(x, eps)
    analytic = {n: g.copy() for n, g in model.grads.items()}
    loss = lambda: -float(iwae_forward(model, x, model.encoder.forward(x), eps, model.decoder.forward)[0].mean())
    return check(loss, model.params, analytic)


@register("model.vae.head_nll[learned-z]")
def _(rng):
    """The variance head's likelihood on its own: out = [mean | raw] (raw up to |7|, near the tanh bound)."""
    from .models.elbo import head_nll_backward, head_nll_forward
    out = np.concatenate([rng.standard_normal((6, 4)), rng.uniform(-12, 12, (6, 4))], axis=1)
    x, w = rng.standard_normal((6, 4)), rng.standard_normal(6)
    return check(lambda: float(np.sum(head_nll_forward(out, x) * w)), {"out": out},
                 {"out": head_nll_backward(w, out, x)})


# -- d/dz log p(x, z) (the samplers' gradient, npdgm.inference): every likelihood, one and several chains --
def _grad_z_check(rng, C=None, **kw):
    model = VAE(**{"x_dim": 7, "hidden": (6, 5), "z_dim": 3, **kw}, seed=int(rng.integers(1 << 30)))
    model.flat_params[...] += rng.standard_normal(model.flat_params.shape) * 0.3
    B = 4
    x = rng.uniform(0, 1, (B, 7)) if model.likelihood == "bernoulli" else rng.standard_normal((B, 7))
    z = rng.standard_normal((B, 3) if C is None else (C, B, 3)) * 1.5
    w = rng.standard_normal(z.shape[:-1])
    analytic = w[..., None] * model.log_joint_and_grad_z(x, z)[1]
    return check(lambda: float(np.sum(model.log_joint_and_grad_z(x, z)[0] * w)), {"z": z}, {"z": analytic})


for _tag, _kw in [
    ("bernoulli,tanh", dict(activation="tanh", likelihood="bernoulli")),
    ("bernoulli,softplus,3 chains", dict(activation="softplus", likelihood="bernoulli", C=3)),
    ("gaussian,sigma=0.7,elu", dict(activation="elu", likelihood="gaussian", sigma=0.7)),
    ("gaussian,learned,tanh,2 chains", dict(activation="tanh", likelihood="gaussian", C=2)),
    ("gaussian,learned-z,tanh,2 chains", dict(activation="tanh", likelihood="gaussian", sigma="learned-z", C=2)),
]:
    register(f"model.vae.grad_z[{_tag}]")(lambda rng, _kw=_kw: _grad_z_check(rng, **_kw))


# -- the notes' other models: a Gaussian-mixture prior VAE and the (denoising) autoencoder ------------------
def _gmvae_check(rng, K=1, **kw):
    from .models.gmvae import GMVAE
    model = GMVAE(**{"x_dim": 7, "hidden": (6,), "z_dim": 3, "components": 4, **kw}, n_samples=K,
                  seed=int(rng.integers(1 << 30)))
    model.flat_params[...] += rng.standard_normal(model.flat_params.shape) * 0.3
    x, eps = rng.uniform(0, 1, (5, 7)), rng.standard_normal((K, 5, 3))
    model.loss_and_grad(x, eps)
    analytic = {n: g.copy() for n, g in model.grads.items()}
    return check(lambda: float(model.loss(x, eps)[0]), model.params, analytic)


for _tag, _kw in [
    ("uniform weights,tanh", dict(activation="tanh")),
    ("learned weights,softplus,K=2,beta=0.7", dict(activation="softplus", weights="learned", K=2, beta=0.7)),
    ("learned weights,relu,2 hidden,1 component", dict(activation="relu", weights="learned", hidden=(6, 5),
                                                       components=1)),
]:
    register(f"model.gmvae[{_tag}]")(lambda rng, _kw=_kw: _gmvae_check(rng, **_kw))


def _ae_check(rng, denoise):
    from .models.autoencoder import Autoencoder
    model = Autoencoder(x_dim=7, hidden=(6, 5), z_dim=3, activation="tanh", denoise=denoise,
                        seed=int(rng.integers(1 << 30)))
    model.flat_params[...] += rng.standard_normal(model.flat_params.shape) * 0.3
    x = rng.uniform(0, 1, (5, 7))
    keep = rng.random(x.shape) >= denoise if denoise else None
    model.loss_and_grad(x, keep)
    analytic = {n: g.copy() for n, g in model.grads.items()}
    return check(lambda: float(model.loss(x, keep)[0]), model.params, analytic)


for _p in (0.0, 0.4):
    register(f"model.ae[denoise={_p:g}]")(lambda rng, _p=_p: _ae_check(rng, _p))


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
    if model.likelihood == "gaussian":   # real-valued features (M1+M2: M2 on M1's latent codes)
        x_l, x_u = 2 * rng.standard_normal((4, D)), 2 * rng.standard_normal((3, D))
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
    ("labelled+unlabelled,gaussian,learned sigma", dict(activation="softplus", likelihood="gaussian")),
    ("labelled+unlabelled,gaussian,sigma=0.6,tanh,beta=2", dict(activation="tanh", likelihood="gaussian", sigma=0.6,
                                                                 beta=2.0)),
]:
    register(f"model.m2[{_tag}]")(lambda rng, _kw=_kw: _m2_check(rng, **_kw))


# -- M1's classifier: L2 softmax regression (npdgm/models/m1.py) -----------------------------------
def _m1_check(rng, l2):
    f = softmax_regression_loss_and_grad
    X, y = rng.standard_normal((9, 5)) * 3, np.array([0, 1, 2, 3, 0, 1, 2, 3, 3])
    W, b = rng.standard_normal((5, 4)), rng.standard_normal(4)
    _, dW, db = f(W, b, X, y, l2)
    return check(lambda: f(W, b, X, y, l2)[0], {"W": W, "b": b}, {"W": dW, "b": db})


for _l2 in (0.0, 0.7):
    register(f"model.m1.softmax_regression[l2={_l2:g}]")(lambda rng, _l2=_l2: _m1_check(rng, _l2))


# -- flows: the loss and the inverse pass of small stacks, and the prior / scale-clamp kernels ---------
def _flow_grad_report(flow, x, rng):
    """Finite differences of loss_and_grad (every parameter and x) and of the inverse pass
    L = sum(f^-1(z) * w) + sum(logdet_inv * v) (every parameter and z); for a conditional flow also of the
    context c in both (rows "loss:c", "inverse:c")."""
    c = rng.standard_normal((x.shape[0], flow.context_dim)) if flow.context_dim else None
    flow.forward(x, c)  # ActNorm data-dependent init happens here, before the check
    for layer in flow.layers:  # move the parameters off their initial values
        for p in layer.parameters():
            if p.data.ndim == 1 and not isinstance(layer, (AdditiveCoupling, AffineCoupling, SplineCoupling)):
                p.data += 0.3 * rng.standard_normal(p.data.shape)
    flow.loss_and_grad(x, context=c)
    analytic = {n: g.copy() for n, g in flow.grads.items()}
    z, ld = flow.forward(x, c)
    dlp = np.full(x.shape[0], -1.0 / x.shape[0])
    flow.zero_grad()
    out = flow.backward(flow._prior_b(dlp, z), dlp)
    inputs = {**flow.params, "x": x}
    if c is None:
        analytic["x"] = out
    else:
        (analytic["x"], analytic["c"]), inputs["c"] = out, c
    rep = check(lambda: -flow.log_prob(x, c).mean(), inputs, analytic)
    rep = {f"loss:{k}": v for k, v in rep.items()}

    zz = rng.standard_normal(x.shape) * 0.8
    w, v = rng.standard_normal(x.shape), rng.standard_normal(x.shape[0])
    flow.zero_grad()
    flow.inverse(zz, logdet=True, context=c)
    out = flow.inverse_backward(w, v)
    analytic = {n: g.copy() for n, g in flow.grads.items()}
    inputs = {**flow.params, "z": zz}
    if c is None:
        analytic["z"] = out
    else:
        (analytic["z"], analytic["c"]), inputs["c"] = out, c

    def inv_loss():
        xx, ldi = flow.inverse(zz, logdet=True, context=c)
        return np.sum(xx * w) + np.sum(ldi * v)

    rep.update({f"inverse:{k}": val for k, val in check(inv_loss, inputs, analytic).items()})
    return rep


def _moved(flow, rng, shape):
    """``flow`` after its data-dependent init on a random batch of ``shape`` and with every parameter moved by
    N(0, 0.1^2) (zero-initialized layers would hide wrong gradients upstream of them; at 0.2 the inverse of a
    random z reaches 1e13 through the sigmoid scales and central differences lose their digits)."""
    flow.forward(rng.uniform(0, 1, shape))
    flow.flat_params[...] += 0.1 * rng.standard_normal(flow.flat_params.shape)
    return flow


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
        "invertible-linear": lambda rng: (Flow([InvertibleLinear(4, seed=1), ActNorm(4),
                                                AffineCoupling(4, "half", 1, [5], "tanh", seed=2),
                                                InvertibleLinear(4, seed=3)]), rng.standard_normal((5, 4))),
        "maf": lambda rng: (Flow([MAF(4, [7, 6], "tanh", "tanh", 1.5, seed=1), Permutation(4, "reverse"),
                                  MAF(4, [5], "softplus", "atan", 2.0, seed=2)]), rng.standard_normal((5, 4))),
        "iaf": lambda rng: (Flow([IAF(3, [6], "tanh", seed=3), Permutation(3, "random", 4),
                                  IAF(3, [5, 5], "elu", "tanh", 2.0, seed=5)]), rng.standard_normal((5, 3))),
        "spline": lambda rng: (Flow([SplineCoupling(4, "half", 0, [6], "tanh", bins=4, bound=2.0, seed=6),
                                     SplineCoupling(4, "alternate", 1, [5], "softplus", bins=3, bound=2.5, seed=7)]),
                               rng.standard_normal((6, 4)) * 1.5),
        # conditional layers: a context c (B, 2 or 3) concatenated into every conditioner, passed by the others
        "cond-couplings": lambda rng: (Flow([AffineCoupling(4, "half", 0, [6], "tanh", "tanh", 1.5, seed=3,
                                                            context_dim=3),
                                             ActNorm(4), Permutation(4, "random", 2),
                                             AdditiveCoupling(4, "alternate", 1, [5], "softplus", seed=4,
                                                              context_dim=3),
                                             InvertibleLinear(4, seed=5),
                                             AffineCoupling(4, "half", 1, [5], "elu", "atan", 2.0, seed=6,
                                                            context_dim=3)]), rng.standard_normal((5, 4))),
        "cond-maf": lambda rng: (Flow([MAF(4, [7, 6], "tanh", "tanh", 1.5, seed=1, context_dim=2),
                                       Permutation(4, "reverse"), MAF(4, [5], "softplus", "atan", 2.0, seed=2,
                                                                      context_dim=2)]),
                                 rng.standard_normal((5, 4))),
        "cond-iaf": lambda rng: (Flow([IAF(3, [6], "tanh", seed=3, context_dim=2), Permutation(3, "random", 4),
                                       IAF(3, [5, 5], "elu", "tanh", 2.0, seed=5, context_dim=2)]),
                                 rng.standard_normal((5, 3))),
        "cond-spline": lambda rng: (Flow([SplineCoupling(4, "half", 0, [6], "tanh", bins=4, bound=2.0, seed=6,
                                                         context_dim=2),
                                          SplineCoupling(4, "alternate", 1, [5], "softplus", bins=3, bound=2.5,
                                                         seed=7, context_dim=2)]),
                                    rng.standard_normal((6, 4)) * 1.5),
        # Glow on 2x4x4 images, 2 levels (squeeze, split), parameters moved off their (zero) init
        "glow": lambda rng: (_moved(glow((2, 4, 4), levels=2, depth=2, hidden=4, seed=1), rng, (5, 32)),
                             rng.uniform(0, 1, (5, 32))),
    }
    for tag, make in cases.items():
        def fn(rng, make=make):
            flow, x = make(rng)
            return _flow_grad_report(flow, x, rng)
        register(f"model.flow[{tag}]")(fn)


_register_flow_checks()
