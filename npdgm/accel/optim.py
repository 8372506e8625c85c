"""The fast twin of ``optim.Adam.step``: the same update, in one of three forms.

* CuPy: one fused kernel (formula ``adam``) per buffer, with the step counter on the device, so a captured
  CUDA graph of a training step (:class:`npdgm.accel.cuda.CudaGraphStep`) replays with the right bias
  corrections.
* NumPy with a CPU engine on (numba / numexpr): the formula ``adam`` updates p, m, v in one pass: one
  compiled numba loop over the flat buffer (split over threads from :data:`NUMBA_THREADED_MIN` parameters),
  or with numexpr one call per cache-sized chunk on each of the :func:`get_num_threads` threads.
* NumPy without an engine: the flat buffer walked in cache-sized chunks (each chunk's p, g, m, v and one
  scratch stay in L2 while all the operations run on them, so every array streams through main memory
  once), split over :func:`get_num_threads` threads (NumPy's ufuncs release the GIL).

Every form folds the bias corrections into two scalars,

    p <- p - a * m / (sqrt(v) + e),   a = lr sqrt(1 - b2^t) / (1 - b1^t),  e = eps sqrt(1 - b2^t)

(PyTorch's lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)): m and v are the reference's bits,
p within a few ulps (tests/test_optim.py, tests/test_accel.py). A parameter without a flat view (strided)
takes the reference update.
"""
from __future__ import annotations

import math
import os
import threading

from numpy import ndarray as _ndarray

from .. import backend
from . import engines

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
        threads = get_num_threads()         # before taking the lock: the first call sets it under the lock
        with _pool_lock:
            if _threads["pool"] is None:
                from concurrent.futures import ThreadPoolExecutor

                _threads["pool"] = ThreadPoolExecutor(max_workers=max(1, threads - 1),
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


FILL_THREADED_MIN = 1 << 22     # a zero fill splits over threads from 16 MB of float32 on (see fill_zero)


def fill_zero(buf):
    """buf[...] = 0 for a 1-D NumPy buffer, split over :func:`get_num_threads` threads from
    :data:`FILL_THREADED_MIN` elements on (measured, 2 cores: a 77 MB fill 5.1-8.1 -> 1.9-2.4 ms, the NICE
    step -4 %; below, the hand-off to the pool costs more than it saves: vae, realnvp2d steps +2..3 %)."""
    threads = get_num_threads() if buf.size >= FILL_THREADED_MIN else 1
    _parallel(lambda k, se: buf[se[0]:se[1]].fill(0), _spans(buf.size, CHUNK, threads))


def _flat(a):
    """A 1-D view of ``a`` (no copy), or None when ``a`` is not contiguous (reshape would copy and the
    in-place update would be lost)."""
    return a.reshape(-1) if a.flags.c_contiguous else None


def _chunks(n, chunk):
    for s in range(0, n, chunk):
        yield s, min(n, s + chunk)


def _scratch(opt, i, k, p, chunk):
    """The chunk scratch of pair i on thread k (made on first use, kept on the optimizer)."""
    tmp = opt.__dict__.setdefault("_accel_tmp", {})
    t = tmp.get((i, k))
    if t is None:
        t = tmp[(i, k)] = backend.array_module(p).empty(min(chunk, p.size), dtype=p.dtype)
    return t


def _device_step(opt, xp):
    """The 0-d float64 device copy of the step count (kept on the optimizer), advanced by one on the
    device; set from ``opt.t`` (in place: a captured graph keeps its address) when the host count moved
    without it (a loaded state dict, graph replays)."""
    t_dev = opt.__dict__.get("_accel_t_dev")
    if t_dev is None:
        t_dev = opt._accel_t_dev = xp.full((), opt.t - 1, dtype=xp.float64)
    elif opt.__dict__.get("_accel_t_seen") != opt.t - 1:
        t_dev.fill(opt.t - 1)
    t_dev += 1
    opt._accel_t_seen = opt.t
    return t_dev


def adam_step(opt):
    """Twin of ``optim.Adam.step`` (see the module docstring); NotImplemented for arrays it does not
    handle (neither NumPy nor CuPy floats, or no flat view of a parameter)."""
    p0, g0 = opt.pairs[0]
    flats = [(_flat(p), _flat(g), m.reshape(-1), v.reshape(-1)) for (p, g), m, v in zip(opt.pairs, opt.m, opt.v)]
    if any(p is None or g is None for p, g, _, _ in flats):
        return NotImplemented
    if engines.on_gpu(p0, g0):
        opt.t += 1
        t_dev = _device_step(opt, backend.array_module(p0))
        for p, g, m, v in flats:
            engines.adam_step(p, g, m, v, t_dev, opt.lr, opt.b1, opt.b2, opt.eps, opt.wd, opt.decoupled)
        return None
    if type(p0) is not _ndarray or p0.dtype.kind != "f":
        return NotImplemented
    opt.t += 1
    if engines.on_cpu(p0, g0):
        _fused_cpu_step(opt, flats)
    else:
        _chunked_step(opt, flats)
    return None


def _fused_cpu_step(opt, flats):
    """The update through the fused formula ``adam``: numba's loop per thread's span (it releases the GIL),
    or numexpr per cache-sized chunk."""
    args = (opt.t, opt.lr, opt.b1, opt.b2, opt.eps, opt.wd, opt.decoupled)
    numba = engines.cpu_engine() == "numba"
    for p, g, m, v in flats:
        if numba:

            def span(k, se, p=p, g=g, m=m, v=v):
                s, e = se
                engines.adam_step(p[s:e], g[s:e], m[s:e], v[s:e], *args)

            threads = get_num_threads() if p.size >= NUMBA_THREADED_MIN else 1
        else:

            def span(k, se, p=p, g=g, m=m, v=v):
                for s, e in _chunks(se[1] - se[0], CHUNK):
                    s, e = s + se[0], e + se[0]
                    engines.adam_step(p[s:e], g[s:e], m[s:e], v[s:e], *args)

            threads = get_num_threads() if p.size >= 4 * CHUNK else 1
        _parallel(span, _spans(p.size, CHUNK, threads))


def _chunked_step(opt, flats):
    """The NumPy update, chunk by chunk in L2, over threads (bias corrections folded into two scalars)."""
    b1, b2, lr, wd, decoupled = opt.b1, opt.b2, opt.lr, opt.wd, opt.decoupled
    sqrt_bc2 = math.sqrt(1 - b2 ** opt.t)
    step_size = lr * sqrt_bc2 / (1 - b1 ** opt.t)
    eps = opt.eps * sqrt_bc2
    xp = backend.array_module(flats[0][0])
    for i, (p, g, m, v) in enumerate(flats):

        def span(k, se, p=p, g=g, m=m, v=v, i=i):
            t_full = _scratch(opt, i, k, p, CHUNK)
            for s, e in _chunks(se[1] - se[0], CHUNK):
                s, e = s + se[0], e + se[0]
                pc, gc, mc, vc, t = p[s:e], g[s:e], m[s:e], v[s:e], t_full[:e - s]
                if wd and decoupled:
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

        threads = get_num_threads() if p.size >= 4 * CHUNK else 1
        _parallel(span, _spans(p.size, CHUNK, threads))
