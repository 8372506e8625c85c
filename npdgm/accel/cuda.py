"""GPU-only speedups: TF32 tensor-core matmuls (opt-in) and the capture of a whole training step as a
CUDA graph. CuPy is imported lazily: importing this module needs none of it."""
from __future__ import annotations

from ..kernels import dispatch
from ..optim import Adam


def twin_registered():
    """True when the wing's Adam twin is registered (its step counter lives on the device)."""
    return Adam.step.twin_name in dispatch.twins()


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
    Every value computed on the host is frozen into the graph at capture: the learning rate (a schedule
    has no effect on the replays) and, with the fast wing off, Adam's bias corrections, so capture
    refuses that case.
    """

    def __init__(self, fn, inputs, optimizers=(), warmup=2):
        if not twin_registered():
            raise RuntimeError("a CUDA graph step needs the fast wing (npdgm.accel.enable()): without its Adam "
                               "twin the bias corrections are host values that the graph would replay unchanged")
        import cupy

        self.cupy = cupy
        self.optimizers = list(optimizers)
        self.pool = cupy.cuda.MemoryPool()
        self.stream = cupy.cuda.Stream(non_blocking=True)
        # the non-blocking stream does not wait for the current one: let the copies and fills queued there
        # (the model's parameters, the optimizer's zeros) finish before it reads them
        cupy.cuda.get_current_stream().synchronize()
        with cupy.cuda.using_allocator(self.pool.malloc), self.stream:
            self.static = [cupy.array(a) for a in inputs]
            for _ in range(max(1, int(warmup))):
                fn(*self.static)
            self.stream.synchronize()
            host_t = [o.t for o in self.optimizers]
            self.stream.begin_capture()
            try:
                self.out = fn(*self.static)     # recorded, not run: undo its host-side step count
            except BaseException:
                try:                            # end the capture, but report fn's error, not end_capture's
                    self.stream.end_capture()
                except Exception:
                    pass
                raise
            finally:
                for o, t in zip(self.optimizers, host_t):
                    o.t = t
            self.graph = self.stream.end_capture()
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
