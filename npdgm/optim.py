"""Optimizers updating parameters in place, with PyTorch's update formulas.

An optimizer is built from a Module (it uses the module's flat parameter/gradient buffers,
flattening the module if needed) or from a list of Parameters. Updates on NumPy are done in
cache-sized chunks with preallocated scratch, so each state array streams through memory once.
"""
from __future__ import annotations

import math
import os
import threading

from . import backend
from .nn.module import Module, Parameter, fill_stale
from .validate import check_float

CHUNK = 1 << 17  # elements per block: 512 KiB of float32 per array, 2.5 MiB for p, g, m, v + scratch
# (fits L2+L3; measured on a 2-core Zen 4: 1<<17 beat 1<<15 by ~15% on 0.6M and 19M parameters,
# fewer ufunc calls per step, see benchmarks/README.md)
# the fused (numba) update splits over threads from 2M parameters on (measured, see _fused_cpu_step)
NUMBA_THREADED_MIN = 1 << 21
_threads = {"n": None, "pool": None}
_pool_lock = threading.Lock()


def set_num_threads(n=None):
    """Threads for the chunked NumPy optimizer updates (NumPy's elementwise ufuncs are single-threaded
    but release the GIL, so disjoint chunks of the flat buffer can be updated in parallel).
    None: $NPDGM_NUM_THREADS, else $OMP_NUM_THREADS / $OPENBLAS_NUM_THREADS, else the CPU count."""
    if n is None:
        for k in ("NPDGM_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            if os.environ.get(k, "").strip().isdigit():
                n = int(os.environ[k])
                break
        else:
            n = os.cpu_count() or 1
    n = max(1, int(n))
    with _pool_lock:
        if _threads["pool"] is not None and n != _threads["n"]:
            _threads["pool"].shutdown(wait=True)
            _threads["pool"] = None
        _threads["n"] = n
    return n


def get_num_threads():
    return _threads["n"] if _threads["n"] is not None else set_num_threads()


def _parallel(fn, spans):
    """Run fn(span_index, span) for every span: the first in the calling thread, the others on the
    shared pool of (threads - 1) workers, so the update uses exactly ``threads`` threads."""
    futures = []
    if len(spans) > 1:
        with _pool_lock:
            if _threads["pool"] is None:
                from concurrent.futures import ThreadPoolExecutor

                _threads["pool"] = ThreadPoolExecutor(max_workers=max(1, get_num_threads() - 1),
                                                      thread_name_prefix="npdgm-optim")
            pool = _threads["pool"]
        futures = [pool.submit(fn, i, sp) for i, sp in enumerate(spans) if i > 0]
    fn(0, spans[0])
    for f in futures:
        f.result()


def _spans(n, chunk, parts):
    """Split [0, n) into at most ``parts`` contiguous spans of whole chunks (one per thread)."""
    nchunks = max(1, -(-n // chunk))  # an empty array: one empty span
    parts = max(1, min(parts, nchunks))
    per = -(-nchunks // parts)
    return [(s * chunk, min(n, (s + per) * chunk)) for s in range(0, nchunks, per)]


def _pairs(params):
    """[(value, grad)] arrays the optimizer updates."""
    if isinstance(params, Module):
        if params.flat_params is None:
            params.flatten()
        return [(params.flat_params, params.flat_grads)] if params.flat_params is not None else []
    params = list(params)
    for i, p in enumerate(params):
        if not isinstance(p, Parameter):
            raise TypeError(f"params[{i}] is {type(p).__name__}, expected a Parameter (or pass a Module)")
    return [(p.data, p.grad) for p in params]


def _flat(a):
    """A 1-D view of ``a`` (no copy), or None when ``a`` is not contiguous (reshape would copy and the
    in-place update would be lost)."""
    return a.reshape(-1) if a.flags.c_contiguous else None


def adam_update(p, g, m, v, t, lr, beta1, beta2, eps, weight_decay=0.0, decoupled=False):
    """The textbook Adam / AdamW step (Kingma & Ba 2015, Algorithm 1; Loshchilov & Hutter 2019) of one
    array of any shape, in place, written as in the paper with whole-array temporaries. The fast
    chunked, threaded twin is :meth:`Adam.step`; ``tests/test_optim.py`` holds the two together.

        g <- g + weight_decay p                      (Adam: L2 penalty in the gradient)
        p <- p (1 - lr weight_decay)                 (AdamW, decoupled=True: instead of the line above)
        m <- beta1 m + (1 - beta1) g                 first moment
        v <- beta2 v + (1 - beta2) g^2               second moment
        m_hat = m / (1 - beta1^t);  v_hat = v / (1 - beta2^t)        bias corrections, t = 1, 2, ...
        p <- p - lr m_hat / (sqrt(v_hat) + eps)

    (the last line computed as PyTorch does: lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)).
    p, g, m, v: arrays of one shape; m and v are updated in place, g is not written."""
    xp = backend.array_module(p)
    if weight_decay and decoupled:
        p *= 1 - lr * weight_decay
    elif weight_decay:
        g = g + weight_decay * p
    m *= beta1
    m += (1 - beta1) * g
    v *= beta2
    v += (g * g) * (1 - beta2)
    bias1, bias2 = 1 - beta1 ** t, 1 - beta2 ** t
    p -= lr / bias1 * m / (xp.sqrt(v) / math.sqrt(bias2) + eps)


def _chunks(n, chunk):
    for s in range(0, n, chunk):
        yield s, min(n, s + chunk)


class Optimizer:
    def __init__(self, params, lr):
        lr = check_float(lr, "lr")
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not isinstance(params, Module):
            params = list(params)           # read twice below: a generator would leave self._params empty
        self.pairs = _pairs(params)
        if not self.pairs:
            raise ValueError("optimizer got no parameters")
        # the Parameters behind the pairs: a gradient still stale after the backward (zero_grad marks
        # them, a backward that writes with out= clears the mark; nn.module.Parameter) is filled with
        # its zeros before a step reads it
        self._params = params.parameters() if isinstance(params, Module) else params
        self.lr = lr
        self.t = 0
        self._tmp = {}  # (pair index, thread index) -> scratch of one chunk, made on first use
        self._t_dev = None  # device step counter of the fused CuPy Adam (CUDA-graph safe)

    def state_dict(self):
        """Step count and state arrays (host copies), for checkpoints."""
        return {"t": self.t, **{f"{k}.{i}": backend.to_host(a).copy()
                                for k, arrs in self._state().items() for i, a in enumerate(arrs)}}

    def load_state_dict(self, state):
        self.t = int(state["t"])
        self._t_dev = None
        for k, arrs in self._state().items():
            for i, a in enumerate(arrs):
                v = state[f"{k}.{i}"]
                if tuple(v.shape) != tuple(a.shape):
                    raise ValueError(f"optimizer state {k}.{i} has shape {tuple(v.shape)}, expected {a.shape}")
                a[...] = backend.array_module(a).asarray(v)

    def _state(self):
        return {}


class SGD(Optimizer):
    """PyTorch SGD: g += wd * p;  buf = momentum * buf + (1 - dampening) * g (buf = g at step 1);
    p -= lr * (g + momentum * buf if nesterov else buf)."""

    def __init__(self, params, lr=1e-2, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
        super().__init__(params, lr)
        momentum, dampening = check_float(momentum, "momentum", lo=0), check_float(dampening, "dampening", lo=0)
        weight_decay = check_float(weight_decay, "weight_decay", lo=0)
        if nesterov and (not momentum or dampening):
            raise ValueError("nesterov needs momentum > 0 and dampening = 0 (as in PyTorch)")
        self.momentum, self.dampening, self.wd, self.nesterov = momentum, dampening, weight_decay, nesterov
        self.buf = [backend.array_module(p).zeros_like(p) for p, _ in self.pairs] if momentum else []

    def _state(self):
        return {"buf": self.buf}

    def step(self):
        fill_stale(self._params)
        self.t += 1
        for i, (p, g) in enumerate(self.pairs):
            d = g + self.wd * p if self.wd else g
            if self.momentum:
                b = self.buf[i]
                if self.t == 1:
                    b[...] = d
                else:
                    b *= self.momentum
                    b += (1 - self.dampening) * d
                d = d + self.momentum * b if self.nesterov else b
            p -= self.lr * d


class Adam(Optimizer):
    """PyTorch Adam (and AdamW with ``decoupled=True``).

    g  <- g + wd * p                 (Adam: L2 penalty in the gradient)
    p  <- p * (1 - lr * wd)          (AdamW: decoupled decay, instead of the line above)
    m  <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2
    p  <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled=False):
        super().__init__(params, lr)
        b1, b2 = (check_float(b, f"betas[{i}]") for i, b in enumerate(betas))
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        eps, weight_decay = check_float(eps, "eps", lo=0), check_float(weight_decay, "weight_decay", lo=0)
        self.b1, self.b2, self.eps, self.wd, self.decoupled = b1, b2, eps, weight_decay, decoupled
        xp = backend.array_module(self.pairs[0][0])
        self.m = [xp.zeros(p.shape, dtype=p.dtype) for p, _ in self.pairs]    # C-contiguous: flat views
        self.v = [xp.zeros(p.shape, dtype=p.dtype) for p, _ in self.pairs]

    def _state(self):
        return {"m": self.m, "v": self.v}

    def scratch(self, i, k, p, chunk):
        t = self._tmp.get((i, k))
        if t is None:
            t = self._tmp[(i, k)] = backend.array_module(p).empty(min(chunk, p.size), dtype=p.dtype)
        return t

    def step(self):
        """One update. On NumPy the flat buffer is walked in cache-sized chunks (each chunk's p, g, m,
        v and one scratch stay in L2 while all the operations below run on them, so every array
        streams through main memory once), split over :func:`get_num_threads` threads.

            m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2
            p <- p - a * m / (sqrt(v) + e),   a = lr sqrt(1 - b2^t) / (1 - b1^t),  e = eps sqrt(1 - b2^t)
        (PyTorch's  lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)  with the bias corrections
        folded into the two scalars.) On CuPy the whole update is one fused kernel
        (``npdgm.kernels.fused``) whose step counter lives on the device, so a captured CUDA graph
        of a training step replays with the right bias corrections. With the fused CPU path on
        (``fused.set_cpu_fused(True)``) the formula ``adam`` of ``npdgm.kernels.formulas`` updates
        p, m, v in one pass: one compiled numba loop over the flat buffer, or with numexpr one call
        per cache-sized chunk on each of the :func:`get_num_threads` threads."""
        from .kernels import fused

        fill_stale(self._params)
        self.t += 1
        if fused.on_gpu(self.pairs[0][0], self.pairs[0][1]):
            xp = backend.array_module(self.pairs[0][0])
            if self._t_dev is None:
                self._t_dev = xp.full((), self.t - 1, dtype=xp.float64)
            self._t_dev += 1
            for (p, g), m, v in zip(self.pairs, self.m, self.v):
                fused.adam_step(p, g, m, v, self._t_dev, self.lr, self.b1, self.b2, self.eps, self.wd,
                                self.decoupled)
            return
        if fused.on_cpu(self.pairs[0][0], self.pairs[0][1]) and self._fused_cpu_step():
            return
        b1, b2, lr, wd = self.b1, self.b2, self.lr, self.wd
        sqrt_bc2 = math.sqrt(1 - b2 ** self.t)
        step_size = lr * sqrt_bc2 / (1 - b1 ** self.t)
        eps = self.eps * sqrt_bc2
        for i, ((p, g), m, v) in enumerate(zip(self.pairs, self.m, self.v)):
            xp = backend.array_module(p)
            # the chunks walk one axis: work on 1-D views of (B, D, ...) parameters
            pf, gf, m, v = _flat(p), _flat(g), m.reshape(-1), v.reshape(-1)
            if pf is None or gf is None:                    # a strided Parameter: no flat view exists
                adam_update(p, g, self.m[i], self.v[i], self.t, lr, b1, b2, self.eps, wd, self.decoupled)
                continue
            p, g = pf, gf
            chunk = CHUNK if xp.__name__ == "numpy" else p.size  # GPU (fusion off): whole-array ops

            def span(k, se, p=p, g=g, m=m, v=v, i=i, xp=xp, chunk=chunk):
                t_full = self.scratch(i, k, p, chunk)
                for s, e in _chunks(se[1] - se[0], chunk):
                    s, e = s + se[0], e + se[0]
                    pc, gc, mc, vc, t = p[s:e], g[s:e], m[s:e], v[s:e], t_full[:e - s]
                    if wd and self.decoupled:
                        pc *= 1 - lr * wd
                    elif wd:
                        gc = gc + wd * pc
                    mc *= b1
                    xp.multiply(gc, 1 - b1, out=t)
                    mc += t
                    vc *= b2
                    xp.multiply(gc, gc, out=t)
                    t *= 1 - b2
                    vc += t
                    xp.sqrt(vc, out=t)
                    t += eps
                    xp.divide(mc, t, out=t)
                    t *= step_size
                    pc -= t

            threads = get_num_threads() if xp.__name__ == "numpy" and p.size >= 4 * CHUNK else 1
            _parallel(span, _spans(p.size, chunk, threads))


    def _fused_cpu_step(self):
        """The update through the fused formula (see :meth:`step`); False (nothing done) when a
        parameter has no flat view."""
        from .kernels import fused

        flats = [(_flat(p), _flat(g), m.reshape(-1), v.reshape(-1)) for (p, g), m, v in zip(self.pairs, self.m, self.v)]
        if any(p is None or g is None for p, g, _, _ in flats):
            return False
        args = (self.t, self.lr, self.b1, self.b2, self.eps, self.wd, self.decoupled)
        numba = fused.cpu_fused() == "numba"
        for p, g, m, v in flats:
            if numba:   # one compiled loop per thread's span (it releases the GIL), streaming p, g, m, v once

                def span(k, se, p=p, g=g, m=m, v=v):
                    s, e = se
                    fused.adam_step(p[s:e], g[s:e], m[s:e], v[s:e], *args)

                threads = get_num_threads() if p.size >= NUMBA_THREADED_MIN else 1
            else:       # numexpr: one call per cache-sized chunk

                def span(k, se, p=p, g=g, m=m, v=v):
                    for s, e in _chunks(se[1] - se[0], CHUNK):
                        s, e = s + se[0], e + se[0]
                        fused.adam_step(p[s:e], g[s:e], m[s:e], v[s:e], *args)

                threads = get_num_threads() if p.size >= 4 * CHUNK else 1
            _parallel(span, _spans(p.size, CHUNK, threads))
        return True


def AdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
    """Adam with decoupled weight decay (PyTorch's AdamW defaults)."""
    return Adam(params, lr, betas, eps, weight_decay, decoupled=True)


def clip_grad_norm(params, max_norm):
    """Scale gradients in place so their global L2 norm is at most ``max_norm`` (PyTorch's rule:
    coef = max_norm / (norm + 1e-6), applied when < 1). Returns the norm before clipping.
    ``max_norm`` must be a positive finite number: a negative one would flip the gradient's sign,
    0 or NaN would silently mean no clipping."""
    max_norm = check_float(max_norm, "max_norm", lo=0, strict_lo=True)
    grads = [g for _, g in _pairs(params)]
    xp = backend.array_module(grads[0])
    norm = math.sqrt(sum(float(xp.vdot(g.ravel(), g.ravel())) for g in grads))
    coef = max_norm / (norm + 1e-6)
    if coef < 1:
        for g in grads:
            g *= coef
    return norm
