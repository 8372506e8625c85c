"""Reference cases of whole models and flow layers (registered when :mod:`npdgm.reference` is imported).

Every case stores what a port needs to rebuild the computation without npdgm:

    input/model     uint8 bytes of a JSON object {"kind", "config", "layout"}: the model class
                    (``vae`` | ``flow`` | ``flow_layer`` | ...), its constructor config, and the
                    parameter layout [[name, shape, offset], ...] in the flat buffer (C order,
                    W of a Linear is (in, out)); decode with ``json.loads(a.tobytes())``
    input/params    the flat parameter vector (every parameter is a slice of it, see layout)
    input/x, ...    the batch; input/eps the standard-normal noise (samples, batch, z_dim)
    output/<term>   loss terms (batch means, nats) and per-row values
    grad/<name>     d loss / d parameter, one tensor per parameter name (same shape as the parameter)

Dimensions are small on purpose (a few KB per case). The float64 set is committed in
``tests/reference/models-f64`` and checked by ``tests/test_reference_models.py``.
"""
from __future__ import annotations

import json

import numpy as np

from .. import backend
from ..models.cvae import CVAE
from ..models.flows import build_layer, nice, realnvp2d
from ..models.m2 import M2
from ..models.registry import MODELS, check_config_size
from ..models.vae import VAE
from .cases import CASES, register

_BEFORE = set(CASES)


# -- helpers --------------------------------------------------------------------------------------
def _json_bytes(obj):
    return np.frombuffer(json.dumps(obj, sort_keys=True).encode(), dtype=np.uint8).copy()


def describe(kind, config, model):
    """The ``input/model`` array: JSON {kind, config, layout} as uint8 bytes."""
    layout = [[n, list(s), int(o)] for n, s, o in model.layout()]
    return _json_bytes({"kind": kind, "config": config, "layout": layout})


def _build(desc):
    """Rebuild the model an ``input/model`` array describes (in the current backend dtype)."""
    d = json.loads(np.asarray(desc, dtype=np.uint8).tobytes().decode())
    if not isinstance(d, dict) or not isinstance(d.get("config"), dict) or not isinstance(d.get("layout"), list):
        raise ValueError("input/model must be a JSON object with kind, config and layout")
    kind, config = d["kind"], d["config"]
    if not all(isinstance(e, list) and len(e) == 3 and isinstance(e[1], list) for e in d["layout"]):
        raise ValueError("input/model: layout must be a list of [name, shape, offset]")
    check_config_size(config, d["layout"], "input/model", kind)  # before building: no hidden=[10**12]
    if kind == "flow_layer":
        model = build_layer(config).flatten()
    else:
        if kind not in MODELS:
            raise ValueError(f"reference case needs model kind {kind!r}, which this npdgm does not have")
        model = MODELS[kind].from_config(config)
    got = [[n, list(s), int(o)] for n, s, o in model.layout()]
    if got != d["layout"]:
        raise ValueError(f"the {kind} rebuilt from the stored config has layout {got}, the reference stores "
                         f"{d['layout']}")
    return model


def _load_params(model, params):
    if model.flat_params.shape != np.shape(params):
        raise ValueError(f"params has shape {np.shape(params)}, the model's flat buffer {model.flat_params.shape}")
    model.flat_params[...] = backend.to_device(np.asarray(params), model.flat_params.dtype)
    if hasattr(model, "layers"):  # flows: stored parameters are already initialised (ActNorm)
        for layer in model.layers:
            if hasattr(layer, "initialized"):
                layer.initialized = True
    return model


def _grads(model):
    return {n: backend.to_host(g).copy() for n, g in model.grads.items()}


def _make_model(build, dt, rng, scale=0.3):
    """Build a model in dtype ``dt``, perturb its parameters (so biases and log-scales are not zero)."""
    with backend.use("numpy", np.dtype(dt).name):
        model = build()
    if model.flat_params is None:  # a layer without parameters
        return model, np.zeros(0, dtype=dt)
    p = backend.to_host(model.flat_params).astype(np.float64)
    p = p + rng.standard_normal(p.shape) * scale
    return model, p.astype(dt)


# -- VAE -----------------------------------------------------------------------------------------
VAE_FORMULA = ("h = encoder(x) (MLP, W (in,out)); mu, logvar = h[:, :Z], h[:, Z:];  z_k = mu + exp(logvar/2) eps_k; "
               "out = decoder(z_k);  recon = mean_b (1/K) sum_k NLL(x_b | out_bk) (summed over pixels);  "
               "kl = mean_b 0.5 sum_j (mu^2 + e^logvar - 1 - logvar);  loss = recon + beta kl;  nelbo = recon + kl; "
               "grad/<param> = d loss / d param")


def _vae_make(cfg, B=4, K=2):
    def make(rng, dt):
        model, p = _make_model(lambda: VAE(**cfg), dt, rng)
        xd = cfg["x_dim"]
        if cfg.get("likelihood", "bernoulli") == "bernoulli":
            x = rng.uniform(0, 1, (B, xd))
            x[0, :2] = (0.0, 1.0)
        else:
            x = rng.standard_normal((B, xd))
        return {"model": describe("vae", model.config, model), "params": p, "x": x.astype(dt),
                "eps": rng.standard_normal((K, B, cfg["z_dim"])).astype(dt)}
    return make


def _vae_run(i):
    model = _load_params(_build(i["model"]), i["params"])
    loss, terms = model.loss_and_grad(i["x"], i["eps"])
    return {k: backend.to_host(v) for k, v in terms.items()}, _grads(model)


VAE_BERNOULLI = dict(x_dim=6, hidden=[5], z_dim=3, activation="tanh", likelihood="bernoulli", beta=1.0, seed=1)
VAE_GAUSSIAN = dict(x_dim=6, hidden=[5, 4], z_dim=2, activation="elu", likelihood="gaussian", sigma=None,
                    beta=1.0, seed=2)
register("vae_bernoulli", VAE_FORMULA + ";  NLL = sum_d softplus(out) - x out (Bernoulli logits)",
         _vae_make(VAE_BERNOULLI))(_vae_run)
register("vae_gaussian_learned", VAE_FORMULA + ";  NLL = 0.5 sum_d (x - out)^2 e^-logvar_x + logvar_x + log 2pi "
         "(logvar_x a learned (x_dim,) parameter)", _vae_make(VAE_GAUSSIAN))(_vae_run)


# -- IWAE --------------------------------------------------------------------------------------------
def iwae_loss_and_grad(model, x, eps):
    """The k-sample importance-weighted bound of a VAE and its gradient: ``model.iwae_loss_and_grad(x, eps)``
    (:meth:`npdgm.VAE.iwae_loss_and_grad`, where the formulas are). x (B, D), eps (K, B, Z).
    Fills ``model.grads``; returns (loss, iwae (B,))."""
    return model.iwae_loss_and_grad(x, eps)


def _iwae_run(i):
    model = _load_params(_build(i["model"]), i["params"])
    loss, iwae = iwae_loss_and_grad(model, i["x"], i["eps"])
    return {"loss": backend.to_host(loss), "iwae": backend.to_host(iwae)}, _grads(model)


register("vae_iwae", "log w_kb = log p(x_b|z_kb) + log N(z_kb; 0, I) - log q(z_kb|x_b), z_kb = mu_b + e^(logvar_b/2) "
         "eps_kb;  iwae_b = logsumexp_k log w_kb - log K (= VAE.log_likelihood with this noise);  "
         "loss = -mean_b iwae_b;  grad/<param> = d loss / d param",
         _vae_make(dict(VAE_BERNOULLI, seed=3), B=3, K=5))(_iwae_run)


# -- flows ---------------------------------------------------------------------------------------------
FLOW_FORMULA = ("z, logdet = f(x) through the layers in order (config.layers specs);  "
                "loss = -mean_b [log p_Z(z_b) + logdet_b];  grad/<param> = d loss / d param")


def _flow_make(build, make_x):
    def make(rng, dt):
        model, p = _make_model(build, dt, rng)
        return {"model": describe("flow", model.config, model), "params": p, "x": make_x(rng).astype(dt)}
    return make


def _flow_run(i):
    model = _load_params(_build(i["model"]), i["params"])
    loss = model.loss_and_grad(i["x"])
    grads = _grads(model)
    z, logdet = model.forward(i["x"])
    return {"loss": backend.to_host(loss), "z": backend.to_host(z), "logdet": backend.to_host(logdet)}, grads


def _nice():
    return nice(dim=4, n_couplings=3, hidden=5, n_hidden=2, prior="logistic", seed=4)


def _realnvp2d():
    return realnvp2d(n_couplings=4, hidden=(6, 6), seed=5)


register("nice", FLOW_FORMULA + ";  NICE: additive couplings y_b = x_b + m(x_a), final diagonal Scaling, "
         "logistic prior", _flow_make(_nice, lambda rng: rng.standard_normal((5, 4))))(_flow_run)
register("realnvp2d", FLOW_FORMULA + ";  RealNVP-2d: affine couplings y_b = x_b e^s + t, s = tanh(raw), "
         "Gaussian prior", _flow_make(_realnvp2d, lambda rng: rng.standard_normal((6, 2))))(_flow_run)


# -- single flow layers, forward and inverse ----------------------------------------------------------------
def _layer_make(spec, direction, B=5):
    def make(rng, dt):
        model, p = _make_model(lambda: build_layer(spec).flatten(), dt, rng)
        D = spec["dim"]
        a = rng.uniform(0.05, 0.95, (B, D)) if spec["type"] == "LogitTransform" and direction == "forward" \
            else rng.standard_normal((B, D))
        name = "x" if direction == "forward" else "y"
        up = "dy" if direction == "forward" else "dx"
        out = {"model": describe("flow_layer", model.spec(), model), name: a.astype(dt),
               up: rng.standard_normal((B, D)).astype(dt), "dlogdet": rng.standard_normal(B).astype(dt)}
        if spec.get("context_dim"):  # a conditional layer: its context c (B, C), and grad/c = dL/dc
            out["c"] = rng.standard_normal((B, spec["context_dim"])).astype(dt)
        if p.size:
            out["params"] = p
        return out
    return make


def _layer_forward_run(i):
    layer = _build(i["model"])
    if "params" in i:
        _load_params(layer, i["params"])
    ctx = {"context": i["c"]} if "c" in i else {}
    y, ld = layer.forward(i["x"], **ctx)
    layer.zero_grad()
    dx = layer.backward(i["dy"], i["dlogdet"])
    dx = dict(zip(("x", "c"), dx)) if ctx else {"x": dx}
    return {"y": y, "logdet": ld}, {**dx, **_grads(layer)}


def _layer_inverse_run(i):
    layer = _build(i["model"])
    if "params" in i:
        _load_params(layer, i["params"])
    ctx = {"context": i["c"]} if "c" in i else {}
    x, ld = layer.inverse(i["y"], logdet=True, **ctx)
    layer.zero_grad()
    dy = layer.inverse_backward(i["dx"], i["dlogdet"])
    dy = dict(zip(("y", "c"), dy)) if ctx else {"y": dy}
    return {"x": x, "logdet_inv": ld}, {**dy, **_grads(layer)}


LAYERS = {
    "affine_coupling": (dict(type="AffineCoupling", dim=4, mask="half", parity=0, hidden=[5], activation="tanh",
                             scale="tanh", scale_bound=1.5, image_shape=None, init="torch", seed=6),
                        "(raw, t) = net(x_a); s = b tanh(raw / b); y_a = x_a; y_b = x_b e^s + t; logdet = sum s",
                        "x_a = y_a; x_b = (y_b - t) e^-s; logdet_inv = -sum s"),
    "affine_coupling_atan": (dict(type="AffineCoupling", dim=4, mask="alternate", parity=1, hidden=[5],
                                  activation="softplus", scale="atan", scale_bound=2.0, image_shape=None,
                                  init="torch", seed=7),
                             "(raw, t) = net(x_a); s = (2b/pi) atan(raw / b); y_b = x_b e^s + t; logdet = sum s",
                             "x_b = (y_b - t) e^-s; logdet_inv = -sum s"),
    "additive_coupling": (dict(type="AdditiveCoupling", dim=4, mask="half", parity=1, hidden=[5],
                               activation="tanh", image_shape=None, init="torch", seed=8),
                          "y_a = x_a; y_b = x_b + m(x_a); logdet = 0", "x_b = y_b - m(y_a); logdet_inv = 0"),
    "scaling": (dict(type="Scaling", dim=4), "y = x e^log_scale; logdet = sum log_scale",
                "x = y e^-log_scale; logdet_inv = -sum log_scale"),
    "logit_transform": (dict(type="LogitTransform", dim=4, alpha=0.05),
                        "p = a + (1 - 2a) x; y = log p - log(1 - p); logdet = sum log(1 - 2a) - log p - log(1 - p)",
                        "x = (sigmoid(y) - a) / (1 - 2a); logdet_inv = -logdet(x)"),
    "invertible_linear": (dict(type="InvertibleLinear", dim=4, seed=3, perm=[2, 0, 3, 1], sign=[1, -1, -1, 1]),
                          "W = P L1 U1, P_ij = [i = perm_j], L1 = tril(L, -1) + I, U1 = triu(U, 1) + "
                          "diag(sign e^log_s); y = x W; logdet = sum log_s",
                          "x = y W^-1 (two triangular solves); logdet_inv = -sum log_s"),
    "maf": (dict(type="MAF", dim=4, hidden=[6, 5], activation="tanh", scale="tanh", scale_bound=1.5, init="torch",
                 seed=9),
            "(raw, mu) = MADE(x) (masked MLP, W * mask); alpha = b tanh(raw / b); y = (x - mu) e^-alpha; "
            "logdet = -sum alpha",
            "x = y e^alpha(x) + mu(x) (D passes); logdet_inv = sum alpha(x)"),
    "iaf": (dict(type="IAF", dim=3, hidden=[5], activation="softplus", scale="atan", scale_bound=2.0, init="torch",
                 seed=10),
            "y solves x = (y - mu(y)) e^-alpha(y) (D passes), alpha = (2b/pi) atan(raw / b); logdet = sum alpha(y)",
            "(raw, mu) = MADE(y); x = (y - mu) e^-alpha; logdet_inv = -sum alpha"),
    "spline_coupling": (dict(type="SplineCoupling", dim=4, mask="half", parity=1, hidden=[5], activation="tanh",
                             bins=4, bound=1.5, min_width=1e-3, min_height=1e-3, min_derivative=1e-3,
                             image_shape=None, init="torch", seed=11),
                        "u = net(x_a) (B, nb, 3K-1): widths, heights softmax, interior derivatives softplus; "
                        "y_b = rational-quadratic spline on [-bound, bound], identity outside; logdet = sum log g'",
                        "x_b = g^-1(y_b) (stable root of the bin's quadratic); logdet_inv = -sum log g'(x_b)"),
    # conditional layers (context_dim C): the conditioner's input is [x_a | c] (MADE: [x | c], the c rows of the
    # first mask all ones); input/c (B, C), grad/c = dL/dc
    "affine_coupling_context": (dict(type="AffineCoupling", dim=4, mask="half", parity=1, hidden=[5],
                                     activation="tanh", scale="tanh", scale_bound=1.5, image_shape=None, init="torch",
                                     seed=12, context_dim=2),
                                "(raw, t) = net([x_a | c]); s = b tanh(raw / b); y_b = x_b e^s + t; logdet = sum s",
                                "x_b = (y_b - t) e^-s, (raw, t) = net([y_a | c]); logdet_inv = -sum s"),
    "maf_context": (dict(type="MAF", dim=3, hidden=[6], activation="tanh", scale="tanh", scale_bound=1.5,
                         init="torch", seed=13, context_dim=2),
                    "(raw, mu) = MADE([x | c]); alpha = b tanh(raw / b); y = (x - mu) e^-alpha; logdet = -sum alpha",
                    "x = y e^alpha + mu of MADE([x | c]) (D passes); logdet_inv = sum alpha(x)"),
    "spline_coupling_context": (dict(type="SplineCoupling", dim=3, mask="half", parity=0, hidden=[5],
                                     activation="tanh", bins=3, bound=2.0, min_width=1e-3, min_height=1e-3,
                                     min_derivative=1e-3, image_shape=None, init="torch", seed=14, context_dim=2),
                                "u = net([x_a | c]); y_b = rational-quadratic spline; logdet = sum log g'",
                                "x_b = g^-1(y_b), knots from net([y_a | c]); logdet_inv = -sum log g'(x_b)"),
}
for _name, (_spec, _fwd, _inv) in LAYERS.items():
    register(_name, _fwd + ";  upstream dy, dlogdet;  grad/x = dL/dx, grad/<param> = dL/dparam for "
             "L = sum(y dy) + sum(logdet dlogdet)", _layer_make(_spec, "forward"))(_layer_forward_run)
    register(_name + "_inverse", _inv + ";  upstream dx, dlogdet;  grad/y = dL/dy, grad/<param> = dL/dparam for "
             "L = sum(x dx) + sum(logdet_inv dlogdet)", _layer_make(_spec, "inverse"))(_layer_inverse_run)


# -- CVAE and M2 ------------------------------------------------------------------------------------
CVAE_CFG = dict(x_dim=6, num_classes=3, hidden=[5], z_dim=2, activation="tanh", likelihood="bernoulli", beta=1.0,
                seed=9)
M2_CFG = dict(x_dim=6, num_classes=3, hidden=[5], z_dim=2, classifier_hidden=[4], activation="softplus", alpha=2.5,
              seed=10)


def _cvae_make(rng, dt):
    model, p = _make_model(lambda: CVAE(**CVAE_CFG), dt, rng)
    B, K = 4, 2
    return {"model": describe("cvae", model.config, model), "params": p,
            "x": rng.uniform(0, 1, (B, CVAE_CFG["x_dim"])).astype(dt), "y": np.array([0, 2, 1, 2], dtype=np.int64),
            "eps": rng.standard_normal((K, B, CVAE_CFG["z_dim"])).astype(dt)}


def _cvae_run(i):
    model = _load_params(_build(i["model"]), i["params"])
    loss, terms = model.loss_and_grad(i["x"], i["y"], i["eps"])
    return {k: backend.to_host(v) for k, v in terms.items()}, _grads(model)


def _m2_make(rng, dt):
    model, p = _make_model(lambda: M2(**M2_CFG), dt, rng)
    C, Z, D = M2_CFG["num_classes"], M2_CFG["z_dim"], M2_CFG["x_dim"]
    return {"model": describe("m2", model.config, model), "params": p,
            "x_l": rng.uniform(0, 1, (4, D)).astype(dt), "y_l": np.array([0, 2, 1, 2], dtype=np.int64),
            "x_u": rng.uniform(0, 1, (3, D)).astype(dt), "eps_l": rng.standard_normal((4, Z)).astype(dt),
            "eps_u": rng.standard_normal((C, 3, Z)).astype(dt)}


def _m2_run(i):
    model = _load_params(_build(i["model"]), i["params"])
    loss, terms = model.loss_and_grad(i["x_l"], i["y_l"], i["x_u"], i["eps_l"], i["eps_u"])
    return {k: backend.to_host(v) for k, v in terms.items()}, _grads(model)


register("cvae", VAE_FORMULA.replace("encoder(x)", "encoder([x | onehot(y)])").replace(
    "decoder(z_k)", "decoder([z_k | onehot(y)])") + ";  NLL = sum_d softplus(out) - x out", _cvae_make)(_cvae_run)
register("m2", "L(x, y) = NLL(x | decoder([z | e_y])) + KL(q(z|x, y) || N(0, I)) + log C, z = mu + e^(lv/2) eps, "
         "[mu | lv] = encoder([x | e_y]);  q(y|x) = softmax(classifier(x));  "
         "U(x) = sum_c q(c|x) L(x, c) - H(q(.|x)) with eps_u[c] for class c;  "
         "loss = mean_l L(x_l, y_l) + alpha mean_l CE(q(.|x_l), y_l) + mean_u U(x_u);  "
         "grad/<param> = d loss / d param", _m2_make)(_m2_run)


# The set tests/reference/models-f64: the cases this module adds, and four kernel cases (priors, scale
# clamps; now kernel table entries, see npdgm/reference/kernels.py) it stored before the table had them.
MODEL_CASES = sorted((set(CASES) - _BEFORE) | {"prior_gaussian", "prior_logistic", "scale_clamp_tanh",
                                                "scale_clamp_atan"})
CASE_NAMES = MODEL_CASES
