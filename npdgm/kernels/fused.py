"""Fused CuPy kernels behind the plain kernels' names, CUDA-graph capture of a step, TF32 opt-in.

On the GPU a small model is launch-bound: ``dy * (y > 0)`` is two kernels and a temporary, the
Bernoulli gradient ``dloss[:, None] * (sigmoid(l) - x)`` five. The kernels in ``npdgm.kernels``
call the one-kernel versions here when their arrays are CuPy arrays (and :func:`enabled`);
NumPy arrays never reach this module, so the CPU path is the plain array code.
Every fused kernel computes the same formula as its plain version (float32 tolerance; the tests
in ``tests/test_benchmarks.py`` compare them on CuPy and skip without a GPU).

    npdgm.kernels.fused.set_enabled(False)   # plain array code on CuPy too (for comparison)
    npdgm.kernels.fused.set_tf32(True)       # TF32 tensor-core matmuls (opt-in; ~1e-3 rel. error)
    step = CudaGraphStep(fn, (x, eps), optimizers=[opt])   # capture fn(x, eps) once, replay it

CuPy is imported lazily: importing this module never needs it.
"""
from __future__ import annotations

_state = {"enabled": True, "kernels": None}


def set_enabled(flag=True):
    """Use the fused CuPy kernels (default) or the plain array code on CuPy arrays."""
    _state["enabled"] = bool(flag)


def enabled():
    return _state["enabled"]


def on_gpu(*arrays):
    """True when fusion is enabled and every argument is a CuPy float array of one dtype (the kernels'
    dispatch test; anything else, NumPy arrays included, takes the plain array code)."""
    if not _state["enabled"] or not type(arrays[0]).__module__.startswith("cupy"):
        return False
    dt = arrays[0].dtype
    return dt.kind == "f" and all(type(a).__module__.startswith("cupy") and a.dtype == dt for a in arrays)


def set_tf32(flag):
    """Allow (True) or forbid (False, the default) TF32 tensor-core math in float32 CuPy matmuls.
    No-op without CuPy. TF32 keeps float32's range with a 10-bit mantissa: faster GEMMs on
    Ampere and newer, ~1e-3 relative error, so it is an explicit opt-in."""
    try:
        import numpy
        from cupy._core import _routines_linalg as L
    except ImportError:
        return False
    L.set_compute_type(numpy.float32, L.COMPUTE_TYPE_TF32 if flag else L.COMPUTE_TYPE_DEFAULT)
    return True


def _k():
    """Compile (once, lazily) and return the fused kernels."""
    if _state["kernels"] is None:
        import cupy

        E, R = cupy.ElementwiseKernel, cupy.ReductionKernel
        _state["kernels"] = {
            # activations: dx = dy * f'(.)
            "relu_bwd": E("T dy, T y", "T dx", "dx = y > (T)0 ? dy : (T)0", "npdgm_relu_bwd"),
            "tanh_bwd": E("T dy, T y", "T dx", "dx = dy * ((T)1 - y * y)", "npdgm_tanh_bwd"),
            "sigmoid_fwd": E("T x", "T y", "T e = exp(-fabs(x)); y = x >= (T)0 ? (T)1 / ((T)1 + e) : e / ((T)1 + e)",
                             "npdgm_sigmoid_fwd"),
            "sigmoid_bwd": E("T dy, T y", "T dx", "dx = dy * y * ((T)1 - y)", "npdgm_sigmoid_bwd"),
            "softplus_fwd": E("T x", "T y", "y = max(x, (T)0) + log1p(exp(-fabs(x)))", "npdgm_softplus_fwd"),
            "softplus_bwd": E("T dy, T x", "T dx",
                              "T e = exp(-fabs(x)); dx = dy * (x >= (T)0 ? (T)1 / ((T)1 + e) : e / ((T)1 + e))",
                              "npdgm_softplus_bwd"),
            # Bernoulli NLL from logits: per-row sum of softplus(l) - x l; gradient d (sigmoid(l) - x)
            "bce_rows": R("T l, T x", "T y", "max(l, (T)0) + log1p(exp(-fabs(l))) - x * l", "a + b", "y = a", "0",
                          "npdgm_bce_rows"),
            "bce_bwd": E("T d, T l, T x", "T dl",
                         "T e = exp(-fabs(l)); dl = d * ((l >= (T)0 ? (T)1 / ((T)1 + e) : e / ((T)1 + e)) - x)",
                         "npdgm_bce_bwd"),
            # Gaussian posterior: reparameterization and KL(N(mu, e^lv) || N(0, I))
            "reparam_fwd": E("T mu, T lv, T eps", "T z", "z = mu + exp((T)0.5 * lv) * eps", "npdgm_reparam_fwd"),
            "reparam_bwd": E("T dz, T lv, T eps", "T dlv", "dlv = dz * eps * (T)0.5 * exp((T)0.5 * lv)",
                             "npdgm_reparam_bwd"),
            "kl_rows": R("T mu, T lv", "T y", "mu * mu + exp(lv) - (T)1 - lv", "a + b", "y = (T)0.5 * a", "0",
                         "npdgm_kl_rows"),
            "kl_bwd": E("T d, T mu, T lv", "T dmu, T dlv", "dmu = d * mu; dlv = d * (T)0.5 * (exp(lv) - (T)1)",
                        "npdgm_kl_bwd"),
            # Adam: one pass over p, g, m, v. t is a device counter (so a captured CUDA graph replays
            # correct bias corrections); decoupled / L2 weight decay as in npdgm.optim.Adam.
            "adam": E("T g, float64 t, float64 lr, float64 b1, float64 b2, float64 eps, float64 wd, int32 decoupled",
                      "T p, T m, T v",
                      """
                      double bc1 = 1.0 - pow(b1, t), bc2 = 1.0 - pow(b2, t);
                      T gi = g;
                      if (decoupled) { p = p * (T)(1.0 - lr * wd); } else { gi = gi + (T)wd * p; }
                      m = (T)b1 * m + (T)(1.0 - b1) * gi;
                      v = (T)b2 * v + (T)(1.0 - b2) * gi * gi;
                      p = p - (T)(lr / bc1) * m / (sqrt(v) / (T)sqrt(bc2) + (T)eps);
                      """, "npdgm_adam"),
        }
    return _state["kernels"]


# -- the fused versions (called by the plain kernels for CuPy arrays) ----------------------------
def relu_backward(dy, y):
    return _k()["relu_bwd"](dy, y)


def tanh_backward(dy, y):
    return _k()["tanh_bwd"](dy, y)


def sigmoid_forward(x):
    return _k()["sigmoid_fwd"](x)


def sigmoid_backward(dy, y):
    return _k()["sigmoid_bwd"](dy, y)


def softplus_forward(x):
    return _k()["softplus_fwd"](x)


def softplus_backward(dy, x):
    return _k()["softplus_bwd"](dy, x)


def bernoulli_nll_forward(logits, x):
    return _k()["bce_rows"](logits, x, axis=1)


def bernoulli_nll_backward(dloss, logits, x):
    return _k()["bce_bwd"](dloss[:, None], logits, x)


def reparameterize_forward(mu, logvar, eps):
    return _k()["reparam_fwd"](mu, logvar, eps)


def reparameterize_backward(dz, logvar, eps):
    dlv = _k()["reparam_bwd"](dz, logvar, eps)
    extra = tuple(range(dz.ndim - logvar.ndim))
    if extra:
        dz, dlv = dz.sum(axis=extra), dlv.sum(axis=extra)
    return dz, dlv


def kl_std_normal_forward(mu, logvar):
    return _k()["kl_rows"](mu, logvar, axis=1)


def kl_std_normal_backward(dkl, mu, logvar):
    return _k()["kl_bwd"](dkl[:, None], mu, logvar)


def adam_step(p, g, m, v, t_dev, lr, b1, b2, eps, wd=0.0, decoupled=False):
    """In place: one Adam update of flat p, m, v from g; ``t_dev`` a 0-d float64 device step counter
    already incremented for this step."""
    _k()["adam"](g, t_dev, float(lr), float(b1), float(b2), float(eps), float(wd), int(bool(decoupled)), p, m, v)


# -- CUDA graphs --------------------------------------------------------------------------------
class CudaGraphStep:
    """Capture ``fn(*inputs)`` (a whole training step: forward, backward, optimizer) as a CUDA graph
    and replay it: one launch per step instead of hundreds.

    ``inputs`` are example arrays (host or device); the step runs on static device copies whose
    contents each call refreshes, so every buffer keeps its address. ``fn`` must not synchronize
    with the host (no ``float(loss)``; flows with ``checked="off"``, ``VAE.loss_and_grad(check=False)``).
    Temporaries come from a private memory pool that lives as long as the graph, so nothing else
    can reuse (and overwrite) them between replays. ``optimizers``: their host step counters are
    advanced on every replay (their device counters advance inside the graph).
    ``warmup`` eager calls run first (allocations settle, kernels compile); they are real steps.
    """

    def __init__(self, fn, inputs, optimizers=(), warmup=2):
        import cupy

        self.cupy = cupy
        self.optimizers = list(optimizers)
        self.pool = cupy.cuda.MemoryPool()
        self.stream = cupy.cuda.Stream(non_blocking=True)
        with cupy.cuda.using_allocator(self.pool.malloc), self.stream:
            self.static = [cupy.array(a) for a in inputs]
            for _ in range(max(1, int(warmup))):
                fn(*self.static)
            self.stream.synchronize()
            host_t = [o.t for o in self.optimizers]
            self.stream.begin_capture()
            try:
                self.out = fn(*self.static)     # recorded, not run: undo its host-side step count
            finally:
                self.graph = self.stream.end_capture()
            for o, t in zip(self.optimizers, host_t):
                o.t = t
        self.stream.synchronize()

    def __call__(self, *inputs):
        cp = self.cupy
        for s, a in zip(self.static, inputs):
            if type(a).__module__.startswith("cupy"):
                cp.copyto(s, a)
            else:
                s.set(a)
        self.graph.launch()  # on the current stream, after the copies above
        for o in self.optimizers:
            o.t += 1
        return self.out
