"""ONNX graphs of a trained model, built with the ``onnx`` library's helpers from the model's layers (no torch).

    npdgm export runs/vae --format onnx vae_onnx/      # encode.onnx, decode.onnx, elbo.onnx, manifest.json

One ``.onnx`` file per graph, opset :data:`OPSET`, float32, the batch dimension symbolic ("batch"), every
parameter an initializer under its documented name (``encoder.0.W``, (in, out); a MADE weight as
``<name>.masked`` = W * mask). Randomness is an input, as in npdgm itself. The graphs (docs/export.md):

    VAE         encode(x) -> mu, logvar;  decode(z) -> logits, probs (Bernoulli) | mean (Gaussian);
                elbo(x, eps (B, Z)) -> nelbo, recon, kl per row (one noise draw; with an IAF posterior
                the KL is the one-sample Monte Carlo estimate, as in training)
    CVAE, M2    the same with a label input y (int64 (B,), one-hot inside the graph); M2 also
                classify(x) -> logits, probs = q(y|x), and its nelbo is -ELBO(x, y) + log C (the -log p(y) term)
                A variance head (sigma="learned-z"): decode -> mean, logvar, std per pixel; the elbo uses them
    GMVAE       encode, decode, elbo (KL = log q(z|x) - log p(z), the one-sample estimate to the mixture);
                cluster(x) -> probs = p(c | z = mu(x)), component (its argmax)
    AE          encode(x) -> z;  decode(z) -> logits, probs;  recon(x) -> the BCE per row
    GMM         log_prob(x) -> log p(x);  proba(x) -> p(k | x) (PCA-GMM: on (x - m) V, plus the residual)
    Flow        log_prob(x) -> log_prob, logdet;  sample(z) -> x, logdet (log|det dx/dz|), z the base noise
                (scale it by a temperature outside); MAF's sampling and IAF's density are an ONNX Loop of D
                MADE passes; InvertibleLinear's inverse uses W^-1 computed on the host in float64; a spline
                coupling's bin lookup is a comparison count and one-hot gathers (elementwise ops only); Glow's
                image layers reshape rows to NCHW (squeeze as Reshape/Transpose: SpaceToDepth's channel order
                is not pixel_unshuffle's); a conditional flow's graphs take context (B, context_dim) too

:func:`onnx_graphs` returns the ``onnx.ModelProto`` of each graph, :func:`export_onnx` writes them and
``manifest.json`` (inputs, outputs, shapes, opset). A model or layer without graphs raises :class:`ExportError`.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np

from . import backend
from .io import atomic_write_bytes
from .models.elbo import LOGVAR_BOUND, variance_head

__all__ = ["OPSET", "IR_VERSION", "ExportError", "onnx_graphs", "export_onnx"]

OPSET = 17
IR_VERSION = 8          # what onnxruntime >= 1.17 reads (the onnx library would stamp its newest)
BATCH = "batch"
LOG_2PI = math.log(2 * math.pi)


class ExportError(ValueError):
    """A model, layer or option that has no ONNX graph (one line naming it)."""


def _onnx():
    try:
        import onnx
    except ImportError:
        raise ExportError("npdgm export --format onnx needs the onnx package: pip install 'npdgm[export]'") from None
    return onnx


# -- the graph builder -------------------------------------------------------------------------------------
class _Builder:
    """Nodes and initializers of one graph; every op returns the name of its output."""

    def __init__(self, onnx, names):
        self.onnx, self.h = onnx, onnx.helper
        self.names = names                       # id(Parameter) -> documented name
        self.nodes, self.inits, self._n = [], {}, 0

    def _fresh(self, stem):
        self._n += 1
        return f"{stem}_{self._n}"

    def init(self, name, array, dtype=np.float32):
        """An initializer ``name`` holding ``array`` (once per name)."""
        if name not in self.inits:
            a = np.asarray(array, dtype=dtype)
            self.inits[name] = self.onnx.numpy_helper.from_array(a, name)
        return name

    def const(self, value, dtype=np.float32):
        return self.init(self._fresh("const"), value, dtype)

    def ints(self, values):
        return self.const(np.asarray(values, dtype=np.int64), np.int64)

    def param(self, p, suffix="", value=None):
        """The initializer of Parameter ``p`` under its documented name (float32 on the host)."""
        name = self.names[id(p)] + suffix
        return self.init(name, backend.to_host(p.data) if value is None else value)

    def op(self, op_type, *inputs, outputs=1, **attrs):
        outs = [self._fresh(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(self.h.make_node(op_type, list(inputs), outs, **attrs))
        return outs[0] if outputs == 1 else outs

    def rename(self, value, name):
        """Give the graph output ``name`` to ``value`` (an Identity node)."""
        self.nodes.append(self.h.make_node("Identity", [value], [name]))
        return name

    # small vocabulary ---------------------------------------------------------------------------------
    def add(self, a, b):
        return self.op("Add", a, b)

    def sub(self, a, b):
        return self.op("Sub", a, b)

    def mul(self, a, b):
        return self.op("Mul", a, b)

    def div(self, a, b):
        return self.op("Div", a, b)

    def scale(self, a, c):
        return self.mul(a, self.const(c))

    def exp(self, a):
        return self.op("Exp", a)

    def log(self, a):
        return self.op("Log", a)

    def cols(self, x, start, stop, axis=1):
        """x[:, start:stop] (on ``axis``)."""
        return self.op("Slice", x, self.ints([start]), self.ints([stop]), self.ints([axis]))

    def take(self, x, idx, axis=1):
        """x[:, idx] (on ``axis``) for a host index array."""
        return self.op("Gather", x, self.ints(np.asarray(idx, dtype=np.int64)), axis=axis)

    def every_other(self, x, start, stop, axis=1):
        """x[:, start:stop:2] (on ``axis``)."""
        return self.op("Slice", x, self.ints([start]), self.ints([stop]), self.ints([axis]), self.ints([2]))

    def rowsum(self, a, axis=1):
        """Sum over ``axis`` (an int or a list of axes), dropping it."""
        return self.op("ReduceSum", a, self.ints(np.atleast_1d(axis)), keepdims=0)

    def per_row(self, scalar, like):
        """A (B,) vector holding the 0-d ``scalar``, B = like's batch size."""
        return self.op("Expand", scalar, self.op("Shape", like, start=0, end=1))

    def graph(self, name, inputs, outputs, doc):
        """The ModelProto: inputs/outputs as [(name, shape, elem type)]."""
        h, T = self.h, self.onnx.TensorProto
        vi = [h.make_tensor_value_info(n, getattr(T, t), s) for n, s, t in inputs]
        vo = [h.make_tensor_value_info(n, getattr(T, t), s) for n, s, t in outputs]
        g = h.make_graph(self.nodes, name, vi, vo, initializer=list(self.inits.values()), doc_string=doc)
        m = h.make_model(g, opset_imports=[h.make_opsetid("", OPSET)], producer_name="npdgm",
                         doc_string=doc)
        m.ir_version = IR_VERSION
        return m


# -- layers of npdgm.nn ------------------------------------------------------------------------------------
def _pair(v):
    return (int(v), int(v)) if np.ndim(v) == 0 else tuple(int(a) for a in v)


def _activation(b, x, name):
    """The activations of npdgm.kernels.activations (leaky_relu slope 0.01, elu alpha 1)."""
    if name == "relu":
        return b.op("Relu", x)
    if name == "leaky_relu":
        return b.op("LeakyRelu", x, alpha=0.01)
    if name == "tanh":
        return b.op("Tanh", x)
    if name == "sigmoid":
        return b.op("Sigmoid", x)
    if name == "softplus":
        return b.op("Softplus", x)
    if name == "elu":
        return b.op("Elu", x, alpha=1.0)
    if name == "identity":
        return b.op("Identity", x)
    raise ExportError(f"activation {name!r} has no ONNX form here")


def _conv(b, m, x, transposed):
    kh, kw = m.kernel_size
    (sh, sw), (ph, pw), (dh, dw) = _pair(m.stride), _pair(m.padding), _pair(m.dilation)
    attrs = dict(kernel_shape=[kh, kw], strides=[sh, sw], pads=[ph, pw, ph, pw], dilations=[dh, dw])
    if transposed:
        attrs["output_padding"] = list(_pair(m.output_padding))
        return b.op("ConvTranspose", x, b.param(m.W), b.param(m.b), **attrs)
    return b.op("Conv", x, b.param(m.W), b.param(m.b), **attrs)


def _module(b, m, x):
    """The forward of an npdgm.nn module (Sequential / MLP / MADE, Linear, MaskedLinear, Activation,
    Conv2d, ConvTranspose2d, Reshape) applied to the graph value x."""
    from .models.autoregressive import MaskedLinear
    from .nn.conv import Conv2d, ConvTranspose2d, Reshape
    from .nn.layers import Activation, Linear, Sequential

    if isinstance(m, Sequential):
        for layer in m.layers:
            x = _module(b, layer, x)
        return x
    if isinstance(m, Linear):
        return b.add(b.op("MatMul", x, b.param(m.W)), b.param(m.b))
    if isinstance(m, MaskedLinear):
        masked = backend.to_host(m.W.data) * backend.to_host(m.mask)
        return b.add(b.op("MatMul", x, b.param(m.W, ".masked", masked)), b.param(m.b))
    if isinstance(m, Activation):
        return _activation(b, x, m.name)
    if isinstance(m, Reshape):
        return b.op("Reshape", x, b.ints([0, *m.shape]))     # 0: keep the batch dimension
    if isinstance(m, (Conv2d, ConvTranspose2d)):
        return _conv(b, m, x, isinstance(m, ConvTranspose2d))
    raise ExportError(f"{type(m).__name__} has no ONNX export")


# -- the VAE family ----------------------------------------------------------------------------------------
def _vec(n):
    return [BATCH, int(n)]


def _labelled(b, model, a):
    """[a | e_y] for the label input "y" (int64 (B,)): OneHot inside the graph."""
    e = b.op("OneHot", "y", b.const(model.num_classes, np.int64), b.const([0.0, 1.0]), axis=-1)
    return b.op("Concat", a, e, axis=1)


def _encoder(b, model, x, label):
    h = _module(b, model.encoder, _labelled(b, model, x) if label else x)
    Z = model.z_dim
    return b.cols(h, 0, Z), b.cols(h, Z, 2 * Z)


def _decoder(b, model, z, label):
    return _module(b, model.decoder, _labelled(b, model, z) if label else z)


def _head_split(b, model, out):
    """A variance head's output [mean | raw] (B, 2D) -> mean, v = b tanh(raw / b) (npdgm.models.elbo.head_split)."""
    D = model.x_dim
    return b.cols(out, 0, D), b.scale(b.op("Tanh", b.scale(b.cols(out, D, 2 * D), 1.0 / LOGVAR_BOUND)), LOGVAR_BOUND)


def _nll_rows(b, model, out, x):
    """-log p(x|z) per row: Bernoulli sum softplus(l) - x l;  Gaussian 0.5 sum (x - m)^2 e^-lv + lv + log 2 pi
    with lv the fixed 2 log sigma, the learned logvar_x, or a variance head's per-pixel v(z)."""
    if model.likelihood == "bernoulli":
        return b.rowsum(b.sub(b.op("Softplus", out), b.mul(x, out)))
    if variance_head(model):
        out, lv = _head_split(b, model, out)
    elif model.sigma is None:
        lv = b.param(model.logvar_x)
    else:
        lv = b.const(2 * math.log(model.sigma))
    r = b.sub(x, out)
    terms = b.add(b.add(b.mul(b.mul(r, r), b.exp(b.op("Neg", lv))), lv), b.const(LOG_2PI))
    return b.scale(b.rowsum(b.op("Expand", terms, b.op("Shape", out))), 0.5)


def _elbo_graph(b, model, label, prior_term=0.0):
    """nelbo, recon, kl per row for x, eps (B, Z) (and y): z = mu + e^(logvar/2) eps [-> IAF steps]."""
    mu, logvar = _encoder(b, model, "x", label)
    z = b.add(mu, b.mul(b.exp(b.scale(logvar, 0.5)), "eps"))
    flow = getattr(model, "flow", None)
    if model.kind == "gmvae":   # one-sample KL to the mixture: log q(z|x) - log p(z)
        log_q = b.scale(b.rowsum(b.add(b.add(b.mul("eps", "eps"), logvar), b.const(LOG_2PI))), -0.5)
        kl = b.sub(log_q, _logsumexp_rows(b, _mixture_terms(b, model, z)))
    elif flow is None:
        kl = b.scale(b.rowsum(b.sub(b.sub(b.add(b.mul(mu, mu), b.exp(logvar)), b.const(1.0)), logvar)), 0.5)
    else:   # one-sample KL: log q(z_K|x) - log N(z_K) = 0.5 sum (z_K^2 - eps^2 - logvar) - LD
        ld = None
        for layer in flow.layers:
            z, ldi = _layer_inverse(b, layer, z)
            ld = ldi if ld is None else (ld if ldi is None else b.add(ld, ldi))
        q = b.scale(b.rowsum(b.sub(b.sub(b.mul(z, z), b.mul("eps", "eps")), logvar)), 0.5)
        kl = q if ld is None else b.sub(q, ld)
    recon = _nll_rows(b, model, _decoder(b, model, z, label), "x")
    nelbo = b.add(recon, kl)
    if prior_term:
        nelbo = b.add(nelbo, b.const(prior_term))
    return b.rename(nelbo, "nelbo"), b.rename(recon, "recon"), b.rename(kl, "kl")


def _logsumexp_rows(b, a):
    """logsumexp over axis 1 with the row max taken out first: m + log sum exp(a - m), finite for any a."""
    m = b.op("ReduceMax", a, axes=[1], keepdims=1)
    return b.add(b.log(b.rowsum(b.exp(b.sub(a, m)))), b.op("Squeeze", m, b.ints([1])))


def _mixture_terms(b, model, z):
    """a (B, C) = log pi_c - 0.5 sum_j ((z_j - m_cj)^2 e^-s_cj + s_cj + log 2 pi): the GMVAE's prior terms,
    log p(z) = logsumexp_c a_c, p(c|z) = softmax_c a_c (npdgm.models.gmvae._component_terms)."""
    C = model.components
    if model.weights == "learned":
        log_pi = b.op("LogSoftmax", b.param(model.prior_logits), axis=0)
    else:
        log_pi = b.const(np.full(C, -math.log(C)))
    m, s = b.param(model.prior_mean), b.param(model.prior_logvar)
    r = b.sub(b.op("Unsqueeze", z, b.ints([1])), m)                          # (B, C, Z)
    nll = b.scale(b.rowsum(b.add(b.add(b.mul(b.mul(r, r), b.exp(b.op("Neg", s))), s), b.const(LOG_2PI)), 2), 0.5)
    return b.sub(log_pi, nll)


def _vae_family(onnx, model, names):
    """encode / decode / elbo (+ classify for M2) of a VAE, CVAE or M2."""
    label = model.kind in ("cvae", "m2")
    D, Z = model.x_dim, model.z_dim
    y_in = [("y", [BATCH], "INT64")] if label else []
    ys = ", y" if label else ""
    graphs = {}

    b = _Builder(onnx, names)
    mu, logvar = _encoder(b, model, "x", label)
    b.rename(mu, "mu"), b.rename(logvar, "logvar")
    graphs["encode"] = b.graph("encode", [("x", _vec(D), "FLOAT")] + y_in,
                               [("mu", _vec(Z), "FLOAT"), ("logvar", _vec(Z), "FLOAT")],
                               f"q(z|x{ys}) = N(mu, exp(logvar))")

    b = _Builder(onnx, names)
    out = _decoder(b, model, "z", label)
    if model.likelihood == "bernoulli":
        b.rename(out, "logits")
        b.rename(b.op("Sigmoid", out), "probs")
        outs, doc = [("logits", _vec(D), "FLOAT"), ("probs", _vec(D), "FLOAT")], "p(x|z) = Bernoulli(sigmoid(logits))"
    elif variance_head(model):
        mean, v = _head_split(b, model, out)
        b.rename(mean, "mean"), b.rename(v, "logvar"), b.rename(b.exp(b.scale(v, 0.5)), "std")
        outs = [(n, _vec(D), "FLOAT") for n in ("mean", "logvar", "std")]
        doc = "p(x|z) = N(mean, diag exp(logvar)), std = exp(logvar / 2) per pixel (a variance head)"
    else:
        b.rename(out, "mean")
        outs, doc = [("mean", _vec(D), "FLOAT")], "p(x|z) = N(mean, sigma^2)"
    graphs["decode"] = b.graph("decode", [("z", _vec(Z), "FLOAT")] + y_in, outs, doc)

    b = _Builder(onnx, names)
    prior = math.log(model.num_classes) if model.kind == "m2" else 0.0
    _elbo_graph(b, model, label, prior)
    graphs["elbo"] = b.graph("elbo", [("x", _vec(D), "FLOAT")] + y_in + [("eps", _vec(Z), "FLOAT")],
                             [(n, [BATCH], "FLOAT") for n in ("nelbo", "recon", "kl")],
                             f"-ELBO(x{ys}) per row for the noise eps: nelbo = recon + kl"
                             + (" + log C" if prior else ""))

    if model.kind == "gmvae":
        b = _Builder(onnx, names)
        a = _mixture_terms(b, model, _encoder(b, model, "x", False)[0])
        b.rename(b.op("Softmax", a, axis=1), "probs")
        b.rename(b.op("ArgMax", a, axis=1, keepdims=0), "component")
        C = model.components
        graphs["cluster"] = b.graph("cluster", [("x", _vec(D), "FLOAT")],
                                    [("probs", _vec(C), "FLOAT"), ("component", [BATCH], "INT64")],
                                    "p(c | z = mu(x)) per mixture component and its argmax (VaDE's q(c|x))")
    if model.kind == "m2":
        b = _Builder(onnx, names)
        s = _module(b, model.classifier, "x")
        b.rename(s, "logits")
        b.rename(b.op("Softmax", s, axis=1), "probs")
        C = model.num_classes
        graphs["classify"] = b.graph("classify", [("x", _vec(D), "FLOAT")],
                                     [("logits", _vec(C), "FLOAT"), ("probs", _vec(C), "FLOAT")],
                                     "q(y|x) = softmax(logits)")
    return graphs


def _autoencoder(onnx, model, names):
    """encode(x) -> z;  decode(z) -> logits, probs;  recon(x) -> recon, the BCE of x given its code (the
    training loss per row; a denoising autoencoder's masking noise belongs to training only)."""
    D, Z = model.x_dim, model.z_dim
    graphs = {}
    b = _Builder(onnx, names)
    b.rename(_module(b, model.encoder, "x"), "z")
    graphs["encode"] = b.graph("encode", [("x", _vec(D), "FLOAT")], [("z", _vec(Z), "FLOAT")], "the code z = g(x)")
    b = _Builder(onnx, names)
    out = _module(b, model.decoder, "z")
    b.rename(out, "logits"), b.rename(b.op("Sigmoid", out), "probs")
    graphs["decode"] = b.graph("decode", [("z", _vec(Z), "FLOAT")],
                               [("logits", _vec(D), "FLOAT"), ("probs", _vec(D), "FLOAT")],
                               "x = sigmoid(logits), logits = f(z)")
    b = _Builder(onnx, names)
    b.rename(_nll_rows(b, model, _module(b, model.decoder, _module(b, model.encoder, "x")), "x"), "recon")
    graphs["recon"] = b.graph("recon", [("x", _vec(D), "FLOAT")], [("recon", [BATCH], "FLOAT")],
                              "sum_d softplus(l_d) - x_d l_d per row, l = f(g(x))")
    return graphs


# -- Gaussian mixtures -------------------------------------------------------------------------------------
def _mixture_joint(b, gmm, x):
    """(B, K) log pi_k + log N(x; mu_k, Sigma_k) = log pi_k - 1/2 [D log 2 pi + |(x - mu_k) P_k^T|^2] + half_logdet_k
    (P_k = L_k^-1 for full covariances, diag(1 / sigma_k) otherwise), as one product with the K maps side by
    side: Y = x A - c, A = [P_1^T | ... | P_K^T] (D, K D), c = [mu_1 P_1^T | ...], computed on the host in float64."""
    K, D = gmm.n_components, gmm.dim
    f = gmm._factor()
    mu = np.asarray(backend.to_host(gmm.means.data), dtype=np.float64)
    if gmm.covariance_type == "full":
        PT = np.asarray(backend.to_host(f["P"]), dtype=np.float64).transpose(0, 2, 1)
    else:
        prec = np.asarray(backend.to_host(f["prec"]), dtype=np.float64)
        PT = np.stack([np.eye(D) * np.sqrt(np.broadcast_to(prec[k], (D,))) for k in range(K)])
    A = np.concatenate(list(PT), axis=1)                                    # (D, K D)
    c = np.concatenate([mu[k] @ PT[k] for k in range(K)])                   # (K D,)
    with np.errstate(divide="ignore"):
        logw = np.log(np.asarray(backend.to_host(gmm.weights.data), dtype=np.float64))
    const = logw + np.asarray(backend.to_host(f["half_logdet"]), dtype=np.float64) - 0.5 * D * math.log(2 * math.pi)
    y = b.op("Reshape", b.sub(b.op("MatMul", x, b.const(A)), b.const(c)), b.ints([0, K, D]))
    return b.add(b.scale(b.rowsum(b.mul(y, y), 2), -0.5), b.const(const))


def _gmm_graphs(b_new, model):
    """log_prob(x) -> log_prob (B,) and proba(x) -> proba (B, K) = p(k | x), the E-step's responsibilities; for a
    PCA mixture the mixture acts on z = (x - m) V and log_prob adds the residual Gaussian on the discarded
    directions (npdgm.models.gmm.PCAGaussianMixture)."""
    gmm = model.gmm if model.kind == "pca_gmm" else model
    D, K = model.dim, gmm.n_components
    graphs = {}
    for name in ("log_prob", "proba"):
        b = b_new()
        x = z = "x"
        if model.kind == "pca_gmm":
            x = b.sub("x", b.const(backend.to_host(model.mean.data)))
            z = b.op("MatMul", x, b.const(backend.to_host(model.components.data)))
        joint = _mixture_joint(b, gmm, z)
        if name == "proba":
            b.rename(b.op("Softmax", joint, axis=1), "proba")
            graphs[name] = b.graph(name, [("x", _vec(D), "FLOAT")], [("proba", _vec(K), "FLOAT")],
                                   "p(k | x) = softmax_k(log pi_k + log N(z; mu_k, Sigma_k))")
            continue
        lp = _logsumexp_rows(b, joint)
        if model.kind == "pca_gmm":
            lp = b.add(lp, _pca_residual(b, model, x))
        b.rename(lp, "log_prob")
        graphs[name] = b.graph(name, [("x", _vec(D), "FLOAT")], [("log_prob", [BATCH], "FLOAT")],
                               "log p(x) = logsumexp_k(log pi_k + log N(z; mu_k, Sigma_k)) [+ the residual Gaussian]")
    return graphs


def _pca_residual(b, model, xc):
    """log p_res of the centred x: "full" -1/2 [k log 2 pi + sum log lambda + sum_j c_j^2 / lambda_j], c = xc U;
    "isotropic" -k/2 (log 2 pi + log s2) - |xc - xc V V^T|^2 / (2 s2)."""
    k = model.dim - model.pca_dim
    if k == 0:
        return b.scale(b.rowsum(xc), 0.0)
    lam = np.asarray(backend.to_host(model.residual_var.data), dtype=np.float64)
    if model.residual == "full":
        c = b.op("MatMul", xc, b.const(backend.to_host(model.complement.data)))
        q = b.rowsum(b.div(b.mul(c, c), b.const(lam)))
        return b.add(b.scale(q, -0.5), b.const(-0.5 * (k * math.log(2 * math.pi) + np.log(lam).sum())))
    V = np.asarray(backend.to_host(model.components.data), dtype=np.float64)
    r = b.sub(xc, b.op("MatMul", b.op("MatMul", xc, b.const(V)), b.const(V.T)))
    q = b.rowsum(b.mul(r, r))
    return b.add(b.scale(q, -0.5 / lam[0]), b.const(-0.5 * k * (math.log(2 * math.pi) + math.log(lam[0]))))


# -- flows -------------------------------------------------------------------------------------------------
def _clamp(b, raw, kind, bound):
    """s = b tanh(raw / b) | (2 b / pi) atan(raw / b) | raw (npdgm.kernels.coupling.scale_clamp_forward)."""
    if kind == "tanh":
        return b.scale(b.op("Tanh", b.scale(raw, 1.0 / bound)), bound)
    if kind == "atan":
        return b.scale(b.op("Atan", b.scale(raw, 1.0 / bound)), 2 * bound / math.pi)
    return raw


def _split(b, layer, x):
    return b.take(x, np.flatnonzero(layer.mask_bool)), b.take(x, np.flatnonzero(~layer.mask_bool))


def _merge(b, layer, a, c):
    order = np.concatenate([np.flatnonzero(layer.mask_bool), np.flatnonzero(~layer.mask_bool)])
    return b.take(b.op("Concat", a, c, axis=1), np.argsort(order))


def _with_context(b, layer, a):
    """[a | c] for a conditional layer (c the graph input "context" (B, context_dim)), a otherwise."""
    return b.op("Concat", a, "context", axis=1) if layer.context_dim else a


def _coupling(b, layer, x, inverse):
    """Additive (y_b = x_b + m(x_a)) and affine (y_b = x_b e^s + t, logdet sum s) couplings and inverses
    (a conditional one's net sees [x_a | c])."""
    from .models.flow_layers import AdditiveCoupling

    xa, xb = _split(b, layer, x)
    h = _module(b, layer.net, _with_context(b, layer, xa))
    if isinstance(layer, AdditiveCoupling):
        return _merge(b, layer, xa, b.sub(xb, h) if inverse else b.add(xb, h)), None
    nb = layer.nb
    s = _clamp(b, b.cols(h, 0, nb), layer.scale, layer.scale_bound)
    t = b.cols(h, nb, 2 * nb)
    if inverse:
        yb, ld = b.mul(b.sub(xb, t), b.exp(b.op("Neg", s))), b.op("Neg", b.rowsum(s))
    else:
        yb, ld = b.add(b.mul(xb, b.exp(s)), t), b.rowsum(s)
    return _merge(b, layer, xa, yb), ld


def _made(b, layer, x):
    """(alpha, mu) = (clamp(raw), mu) of the layer's MADE at x (at [x | c] for a conditional layer; inside the
    sampling Loop's body "context" is an outer-scope value)."""
    h = _module(b, layer.made, _with_context(b, layer, x))
    D = layer.dim
    return _clamp(b, b.cols(h, 0, D), layer.scale, layer.scale_bound), b.cols(h, D, 2 * D)


def _one_pass(b, layer, x):
    """z = (x - mu(x)) e^-alpha(x), logdet = -sum alpha: MAF's density pass, IAF's sampling pass."""
    alpha, mu = _made(b, layer, x)
    return b.mul(b.sub(x, mu), b.exp(b.op("Neg", alpha))), b.op("Neg", b.rowsum(alpha))


def _d_pass(b, layer, z):
    """x = F^-1(z): D iterations of x <- z e^alpha(x) + mu(x) from x = 0, an ONNX Loop whose body is one MADE
    pass; logdet = +sum alpha(x) at the final x."""
    h = b.h
    T = b.onnx.TensorProto
    outer, b.nodes = b.nodes, []
    it, cond, xin = b._fresh("iter"), b._fresh("cond"), b._fresh("x_in")
    alpha, mu = _made(b, layer, xin)
    xout = b.add(b.mul(z, b.exp(alpha)), mu)
    cout = b.op("Identity", cond)
    body = h.make_graph(b.nodes, b._fresh("maf_pass"),
                        [h.make_tensor_value_info(it, T.INT64, []), h.make_tensor_value_info(cond, T.BOOL, []),
                         h.make_tensor_value_info(xin, T.FLOAT, None)],
                        [h.make_tensor_value_info(cout, T.BOOL, []), h.make_tensor_value_info(xout, T.FLOAT, None)])
    b.nodes = outer
    x0 = b.op("Mul", z, b.const(0.0))
    x = b.op("Loop", b.const(layer.dim, np.int64), b.const(True, np.bool_), x0, body=body)
    alpha, _ = _made(b, layer, x)
    return x, b.rowsum(alpha)


def _scaled(b, x, ls, inverse):
    """x e^ls (inverse: x e^-ls) and logdet sum ls (inverse: -sum ls) per row."""
    total = b.op("ReduceSum", ls, keepdims=0)
    if inverse:
        return b.mul(x, b.exp(b.op("Neg", ls))), b.per_row(b.op("Neg", total), x)
    return b.mul(x, b.exp(ls)), b.per_row(total, x)


def _logit(b, layer, x, inverse):
    """p = a + (1 - 2a) x, y = log p - log(1 - p), logdet = sum log(1 - 2a) - log p - log(1 - p); the inverse
    x = (sigmoid(y) - a) / (1 - 2a), logdet = sum -softplus(-y) - softplus(y) - log(1 - 2a)."""
    a = layer.alpha
    c = math.log(1 - 2 * a)
    if inverse:
        x_out = b.scale(b.sub(b.op("Sigmoid", x), b.const(a)), 1.0 / (1 - 2 * a))
        t = b.add(b.op("Softplus", b.op("Neg", x)), b.op("Softplus", x))
        return x_out, b.sub(b.op("Neg", b.rowsum(t)), b.scale(b.per_row(b.const(1.0), x), c * layer.dim))
    p = b.add(b.const(a), b.scale(x, 1 - 2 * a))
    lp, l1p = b.log(p), b.log(b.sub(b.const(1.0), p))
    ld = b.sub(b.scale(b.per_row(b.const(1.0), x), c * layer.dim), b.rowsum(b.add(lp, l1p)))
    return b.sub(lp, l1p), ld


def _invertible_linear(b, layer, x, inverse, copies=1):
    """y = x[..., perm] L1 U1 on the last axis (L1 = tril(L, -1) + I, U1 = triu(U, 1) + diag(sign e^log_s)),
    logdet = copies sum log_s per row (``copies`` = H W pixels for Glow's 1x1 convolution); the inverse
    x = (y W^-1)[..., perm^-1] with W^-1 = (L1 U1)^-1 from the host in float64."""
    L = backend.to_host(layer.L.data).astype(np.float64)
    U = backend.to_host(layer.U.data).astype(np.float64)
    ls = backend.to_host(layer.log_s.data).astype(np.float64)
    n = layer.dim
    total = b.scale(b.op("ReduceSum", b.param(layer.log_s), keepdims=0), float(copies))
    if inverse:
        W = (np.tril(L, -1) + np.eye(n)) @ (np.triu(U, 1) + np.diag(layer.sign_host * np.exp(ls)))
        y = b.op("MatMul", x, b.const(np.linalg.inv(W)))
        return b.take(y, layer.inv, axis=-1), b.per_row(b.op("Neg", total), x)
    lo, up = b.const(np.tril(np.ones((n, n)), -1)), b.const(np.triu(np.ones((n, n)), 1))
    eye = b.const(np.eye(n))
    L1 = b.add(b.mul(b.param(layer.L), lo), eye)
    s = b.mul(b.const(layer.sign_host), b.exp(b.param(layer.log_s)))
    U1 = b.add(b.mul(b.param(layer.U), up), b.mul(s, eye))
    y = b.op("MatMul", b.op("MatMul", b.take(x, layer.perm, axis=-1), L1), U1)
    return y, b.per_row(total, x)


# -- Glow's image layers (npdgm.models.glow_layers) --------------------------------------------------------
def _on_image(b, layer, x, shape_in, shape_out, f):
    """Apply f: image (B, C, H, W) -> (image, logdet) to x[:, :n] viewed in NCHW order as ``shape_in``; the
    features n.. pass through. Returns rows (B, D) (image flattened, then the pass-through part) and logdet."""
    n, D = layer.n, layer.dim
    img = b.op("Reshape", x if n == D else b.cols(x, 0, n), b.ints([0, *shape_in]))
    img, ld = f(img)
    flat = b.op("Reshape", img, b.ints([0, n]))
    return (flat if n == D else b.op("Concat", flat, b.cols(x, n, D), axis=1)), ld


def _squeeze(b, layer, x, inverse):
    """Space to depth in pixel_unshuffle order, y[c 4 + 2 i + j, h, w] = x[c, 2 h + i, 2 w + j]: Reshape to
    (C, H/2, 2, W/2, 2), Transpose (0, 1, 3, 5, 2, 4), Reshape (ONNX's SpaceToDepth orders the channels
    (i, j, c), not (c, i, j)); its inverse is DepthToSpace in CRD mode, which is pixel_shuffle. log|det| = 0."""
    C, H, W = layer.image_shape
    if inverse:
        return _on_image(b, layer, x, layer.out_shape, layer.out_shape,
                         lambda img: (b.op("DepthToSpace", img, blocksize=2, mode="CRD"), None))

    def space_to_depth(img):
        six = b.op("Reshape", img, b.ints([0, C, H // 2, 2, W // 2, 2]))
        return b.op("Reshape", b.op("Transpose", six, perm=[0, 1, 3, 5, 2, 4]), b.ints([0, *layer.out_shape])), None
    return _on_image(b, layer, x, layer.image_shape, layer.out_shape, space_to_depth)


def _channel_actnorm(b, layer, x, inverse):
    """y = (x + loc_c) e^ls_c per channel, logdet = H W sum ls (inverse: x = y e^-ls - loc, -H W sum ls)."""
    if not layer.initialized:
        raise ExportError("a ChannelActNorm layer was never initialized (its first forward pass sets loc and "
                          "log_scale from the data): train the flow or run log_prob on data before exporting")
    chan = b.ints([-1, 1, 1])
    loc = b.op("Reshape", b.param(layer.loc), chan)
    ls = b.param(layer.log_scale)
    total = b.scale(b.op("ReduceSum", ls, keepdims=0), float(layer.hw))
    ls = b.op("Reshape", ls, chan)

    def f(img):
        if inverse:
            return b.sub(b.mul(img, b.exp(b.op("Neg", ls))), loc), b.per_row(b.op("Neg", total), img)
        return b.mul(b.add(img, loc), b.exp(ls)), b.per_row(total, img)
    return _on_image(b, layer, x, layer.image_shape, layer.image_shape, f)


def _invertible_conv1x1(b, layer, x, inverse):
    """InvertibleLinear's map on the channels of every pixel (NHWC rows), logdet H W sum log_s."""
    def f(img):
        y, ld = _invertible_linear(b, layer.lin, b.op("Transpose", img, perm=[0, 2, 3, 1]), inverse, layer.hw)
        return b.op("Transpose", y, perm=[0, 3, 1, 2]), ld
    return _on_image(b, layer, x, layer.image_shape, layer.image_shape, f)


def _conv_affine_coupling(b, layer, x, inverse):
    """h = NN(x_a), t = h[:, 0::2], s = sigmoid(h[:, 1::2] + 2): y_b = (x_b + t) s, logdet = sum log s with
    log s = -softplus(-(r + 2)) (inverse: x_b = y_b / s - t, -sum log s)."""
    ca, cb = layer.ca, layer.cb

    def f(img):
        xa, xb = b.cols(img, 0, ca), b.cols(img, ca, ca + cb)
        h = _module(b, layer.net, xa)
        t, r2 = b.every_other(h, 0, 2 * cb), b.add(b.every_other(h, 1, 2 * cb), b.const(2.0))
        s, logs = b.op("Sigmoid", r2), b.op("Neg", b.op("Softplus", b.op("Neg", r2)))
        total = b.rowsum(logs, [1, 2, 3])
        if inverse:
            return b.op("Concat", xa, b.sub(b.div(xb, s), t), axis=1), b.op("Neg", total)
        return b.op("Concat", xa, b.mul(b.add(xb, t), s), axis=1), total
    return _on_image(b, layer, x, layer.image_shape, layer.image_shape, f)


def _layer_forward(b, layer, x):
    """(y, logdet or None for 0) of one flow layer in the density direction."""
    return _flow_layer(b, layer, x, False)


def _layer_inverse(b, layer, y):
    """(x, logdet_inv or None for 0) of one flow layer in the sampling direction."""
    return _flow_layer(b, layer, y, True)


def _flow_layer(b, layer, x, inverse):
    from .models import flow_layers as F
    from .models import glow_layers as G
    from .models.autoregressive import IAF, MAF

    if isinstance(layer, (F.AdditiveCoupling, F.AffineCoupling)):
        return _coupling(b, layer, x, inverse)
    if isinstance(layer, F.SplineCoupling):
        return _spline_coupling(b, layer, x, inverse)
    if isinstance(layer, F.Permutation):
        return b.take(x, layer.inv if inverse else layer.perm), None
    if isinstance(layer, F.Scaling):
        return _scaled(b, x, b.param(layer.log_scale), inverse)
    if isinstance(layer, F.ActNorm):
        if not layer.initialized:
            raise ExportError("an ActNorm layer was never initialized (its first forward pass sets loc and "
                              "log_scale from the data): train the flow or run log_prob on data before exporting")
        if inverse:
            u, ld = _scaled(b, x, b.param(layer.log_scale), True)
            return b.sub(u, b.param(layer.loc)), ld
        return _scaled(b, b.add(x, b.param(layer.loc)), b.param(layer.log_scale), False)
    if isinstance(layer, F.LogitTransform):
        return _logit(b, layer, x, inverse)
    if isinstance(layer, F.InvertibleLinear):
        return _invertible_linear(b, layer, x, inverse)
    if isinstance(layer, G.Squeeze):
        return _squeeze(b, layer, x, inverse)
    if isinstance(layer, G.ChannelActNorm):
        return _channel_actnorm(b, layer, x, inverse)
    if isinstance(layer, G.InvertibleConv1x1):
        return _invertible_conv1x1(b, layer, x, inverse)
    if isinstance(layer, G.ConvAffineCoupling):
        return _conv_affine_coupling(b, layer, x, inverse)
    if isinstance(layer, (MAF, IAF)):
        one_pass = isinstance(layer, MAF) != inverse
        return _one_pass(b, layer, x) if one_pass else _d_pass(b, layer, x)
    raise ExportError(f"flow layer {type(layer).__name__} has no ONNX export yet")


def _flow_graphs(onnx, model, names):
    """log_prob(x[, context]) and sample(z[, context]) of a Flow (a conditional one takes context (B, C))."""
    from .kernels.coupling import PRIORS

    if model.prior not in PRIORS:
        raise ExportError(f"prior {model.prior!r} has no ONNX export")
    D, C = model.dim, model.context_dim
    ctx_in = [("context", _vec(C), "FLOAT")] if C else []
    given = " | context" if C else ""
    graphs = {}
    for direction in ("log_prob", "sample"):
        b = _Builder(onnx, names)
        inverse = direction == "sample"
        h, total = ("z" if inverse else "x"), None
        order = reversed(model.layers) if inverse else model.layers
        for layer in order:
            h, ld = _flow_layer(b, layer, h, inverse)
            total = ld if total is None else (total if ld is None else b.add(total, ld))
        if total is None:
            total = b.per_row(b.const(0.0), h)
        if inverse:
            b.rename(h, "x"), b.rename(total, "logdet")
            graphs["sample"] = b.graph(
                "sample", [("z", _vec(D), "FLOAT")] + ctx_in,
                [("x", _vec(D), "FLOAT"), ("logdet", [BATCH], "FLOAT")],
                f"x = f^-1(z{given}) for base noise z; logdet = log|det dx/dz| per row")
            continue
        b.rename(b.add(_prior_logprob(b, model.prior, h, D), total), "log_prob")
        b.rename(total, "logdet")
        graphs["log_prob"] = b.graph(
            "log_prob", [("x", _vec(D), "FLOAT")] + ctx_in,
            [("log_prob", [BATCH], "FLOAT"), ("logdet", [BATCH], "FLOAT")],
            f"log p(x{given}) = log p_Z(f(x)) + logdet per row ({model.prior} prior); logdet = log|det df/dx|")
    return graphs


def _prior_logprob(b, prior, z, dim):
    """gaussian -0.5 sum z^2 - 0.5 D log 2 pi;  logistic -sum (|z| + 2 softplus(-|z|))."""
    if prior == "gaussian":
        return b.sub(b.scale(b.rowsum(b.mul(z, z)), -0.5), b.const(0.5 * LOG_2PI * dim))
    a = b.op("Abs", z)
    return b.op("Neg", b.rowsum(b.add(a, b.scale(b.op("Softplus", b.op("Neg", a)), 2.0))))


# -- spline coupling (npdgm.kernels.spline) ----------------------------------------------------------------
def _knots(b, u, K, bound, lo):
    """Knot positions -bound + [0, cumsum size], size = 2 bound (lo + (1 - K lo) softmax(u)), (B, nb, K + 1)."""
    size = b.scale(b.add(b.const(lo), b.scale(b.op("Softmax", u, axis=-1), 1 - K * lo)), 2 * bound)
    zero = b.scale(b.cols(size, 0, 1, axis=2), 0.0)
    cum = b.op("CumSum", size, b.const(2, np.int64))
    return b.sub(b.op("Concat", zero, cum, axis=2), b.const(bound))


def _bin(b, v, edges, knots, K):
    """(x_k, w, y_k, h, d0, d1), each (B, nb, 1), of the bin k = #{interior edges <= v} (rq_search), gathered
    by one-hot rows (the kernel's _gather)."""
    xk, yk, d = knots
    k = b.op("ReduceSum", b.op("Cast", b.op("GreaterOrEqual", v, b.cols(edges, 1, K, axis=2)), to=1),
             b.ints([2]), keepdims=1)
    r = b.const(np.arange(K + 1))
    o0 = b.op("Cast", b.op("Equal", k, r), to=1)
    o1 = b.op("Cast", b.op("Equal", b.add(k, b.const(1.0)), r), to=1)

    def pick(a, o):
        return b.op("ReduceSum", b.mul(a, o), b.ints([2]), keepdims=1)

    x0, y0 = pick(xk, o0), pick(yk, o0)
    return x0, b.sub(pick(xk, o1), x0), y0, b.sub(pick(yk, o1), y0), pick(d, o0), pick(d, o1)


def _bin_eval(b, xv, bn):
    """y = y_k + h (s xi^2 + d0 th) / D and log g' = 2 log s + log M - 2 log D (the kernel's _bin_eval)."""
    x0, w, y0, h, d0, d1 = bn
    xi = b.div(b.sub(xv, x0), w)
    s = b.div(h, w)
    one_m = b.sub(b.const(1.0), xi)
    th = b.mul(xi, one_m)
    Dn = b.add(s, b.mul(b.sub(b.add(d1, d0), b.scale(s, 2.0)), th))
    num = b.add(b.mul(s, b.mul(xi, xi)), b.mul(d0, th))
    M = b.add(b.add(b.mul(d1, b.mul(xi, xi)), b.scale(b.mul(s, th), 2.0)), b.mul(d0, b.mul(one_m, one_m)))
    logg = b.sub(b.add(b.scale(b.log(s), 2.0), b.log(M)), b.scale(b.log(Dn), 2.0))
    return b.add(y0, b.div(b.mul(h, num), Dn)), logg


def _spline_coupling(b, layer, x, inverse):
    """y_b = g(x_b; net(x_a)) (inverse: the quadratic's stable root), identity outside [-bound, bound];
    logdet = sum log g' (inverse: -sum log g'(x_b)). Elementwise on (B, nb, 1) against knots (B, nb, K + 1)."""
    from .kernels.spline import derivative_shift

    K, nb, bound = layer.bins, layer.nb, layer.bound
    xa, xb = _split(b, layer, x)
    u = b.op("Reshape", _module(b, layer.net, _with_context(b, layer, xa)), b.ints([0, nb, 3 * K - 1]))
    xk = _knots(b, b.cols(u, 0, K, axis=2), K, bound, layer.min_width)
    yk = _knots(b, b.cols(u, K, 2 * K, axis=2), K, bound, layer.min_height)
    one = b.add(b.scale(b.cols(u, 0, 1, axis=2), 0.0), b.const(1.0))
    shift = b.const(derivative_shift(layer.min_derivative))
    inner = b.op("Softplus", b.add(b.cols(u, 2 * K, 3 * K - 1, axis=2), shift))
    d = b.op("Concat", one, b.add(b.const(layer.min_derivative), inner), one, axis=2)
    v = b.op("Unsqueeze", xb, b.ints([2]))
    edges = yk if inverse else xk
    lo, hi = b.cols(edges, 0, 1, axis=2), b.cols(edges, K, K + 1, axis=2)
    inside = b.op("And", b.op("GreaterOrEqual", v, lo), b.op("LessOrEqual", v, hi))
    vc = b.op("Max", b.op("Min", v, hi), lo)
    bn = _bin(b, vc, edges, (xk, yk, d), K)
    if inverse:   # xi = 2c / (-b - sqrt(b^2 - 4ac)), clipped to [0, 1]
        x0, w, y0, h, d0, d1 = bn
        s, dy = b.div(h, w), b.sub(vc, y0)
        c2 = b.sub(b.add(d1, d0), b.scale(s, 2.0))
        qa = b.add(b.mul(h, b.sub(s, d0)), b.mul(dy, c2))
        qb = b.sub(b.mul(h, d0), b.mul(dy, c2))
        qc = b.op("Neg", b.mul(s, dy))
        disc = b.op("Sqrt", b.op("Max", b.sub(b.mul(qb, qb), b.scale(b.mul(qa, qc), 4.0)), b.const(0.0)))
        xi = b.div(b.scale(qc, 2.0), b.sub(b.op("Neg", qb), disc))
        xi = b.op("Max", b.op("Min", xi, b.const(1.0)), b.const(0.0))
        out = b.add(x0, b.mul(xi, w))
        logg = b.op("Neg", _bin_eval(b, out, bn)[1])
    else:
        out, logg = _bin_eval(b, vc, bn)
    out = b.op("Where", inside, out, v)
    logg = b.op("Where", inside, logg, b.const(0.0))
    yb = b.op("Squeeze", out, b.ints([2]))
    return _merge(b, layer, xa, yb), b.rowsum(b.op("Squeeze", logg, b.ints([2])))


# -- entry points ------------------------------------------------------------------------------------------
def onnx_graphs(model):
    """{graph name: onnx.ModelProto} of a VAE, CVAE, M2, GMVAE, autoencoder or Flow (module docstring);
    ExportError otherwise."""
    onnx = _onnx()
    names = {id(p): n for n, p in model.named_parameters()}
    kind = getattr(model, "kind", type(model).__name__)
    if kind in ("vae", "cvae", "m2", "gmvae"):
        if model.config.get("iaf_context"):
            raise ExportError("a VAE whose IAF posterior takes the encoder's hidden state as context (iaf_context) "
                              "has no ONNX export yet")
        return _vae_family(onnx, model, names)
    if kind == "ae":
        return _autoencoder(onnx, model, names)
    if kind == "flow":
        return _flow_graphs(onnx, model, names)
    if kind in ("gmm", "pca_gmm"):
        if not getattr(model, "fitted", True) or (kind == "pca_gmm" and not getattr(model.gmm, "fitted", True)):
            raise ExportError(f"this {kind} was never fitted: fit it (npdgm train gmm) before exporting")
        return _gmm_graphs(lambda: _Builder(onnx, names), model)
    raise ExportError(f"a {kind} model has no ONNX graphs (supported: vae, cvae, m2, gmvae, ae, flow, gmm, pca_gmm)")


def _io(values):
    return [{"name": v.name, "dtype": "int64" if v.type.tensor_type.elem_type == 7 else "float32",
             "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]} for v in values]


def export_onnx(model, out_dir):
    """Write ``<graph>.onnx`` for every graph of :func:`onnx_graphs` and ``manifest.json`` into ``out_dir``
    (created if needed); returns the manifest dict."""
    graphs = onnx_graphs(model)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ExportError(f"OUT {out_dir} is a file; --format onnx writes a directory of .onnx files")
    manifest = {"format": "npdgm-onnx", "kind": model.kind, "opset": OPSET, "ir_version": IR_VERSION,
                "dtype": "float32", "config": model.config, "graphs": {}}
    for name, m in graphs.items():
        data = m.SerializeToString()
        atomic_write_bytes(os.path.join(out_dir, f"{name}.onnx"), lambda f, d=data: f.write(d))
        manifest["graphs"][name] = {"file": f"{name}.onnx", "doc": m.doc_string,
                                    "inputs": _io(m.graph.input), "outputs": _io(m.graph.output)}
    text = json.dumps(manifest, indent=1) + "\n"
    atomic_write_bytes(os.path.join(out_dir, "manifest.json"), lambda f: f.write(text.encode()))
    return manifest
