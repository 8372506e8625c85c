"""Data-parallel training on an existing distributed engine: MPI (mpi4py, CPU) or NCCL (CuPy, GPU).

The parameters and gradients of a model live in two flat buffers, so data parallelism is one
collective per step. With a global batch of B examples split into shards of n_r examples
(sum_r n_r = B), rank r computes g_r = (1/n_r) sum_{i in shard r} grad l_i and

    g = (1/B) sum_i grad l_i = sum_r (n_r / B) g_r = (1/N) sum_r (N n_r / B) g_r

so each rank scales its gradient by N n_r / B (1 for even shards), and :meth:`allreduce_mean_`
(sum over ranks, then / N) leaves the full-batch gradient on every rank.

A communicator has ``rank``, ``size``, ``allreduce_mean_(buf)`` (in place), ``allreduce_sum(values)``
(a small host vector), ``bcast(obj)``, ``barrier()`` and ``check_same(buf, what)``. :func:`detect`
picks MPI when launched by ``mpiexec`` with more than one rank, else :class:`Single`.

Evaluation is split too: :func:`rows` is a rank's share of a batch, :func:`mean_over_rows` a mean over
rows computed by shards and all-reduced, and :class:`ImageStreams` gives every image its own random
stream, so a Monte Carlo estimate does not depend on which rank (or batch) computes it.
"""
from __future__ import annotations

import hashlib
import os
import time

import numpy as np

#: seconds a collective may wait for the other ranks before the job is aborted (env NPDGM_DIST_TIMEOUT)
DEFAULT_TIMEOUT = 120.0


class DistributedError(RuntimeError):
    """The ranks disagree (different parameters at start) or one of them stopped answering."""


def checksum(buf):
    """sha256 (hex, 16 digits) of the bytes of a (host or device) array."""
    from .backend import to_host

    return hashlib.sha256(np.ascontiguousarray(to_host(buf)).tobytes()).hexdigest()[:16]


def shard_bounds(b, rank, size):
    """[lo, hi) of rank's contiguous shard of a batch of b examples: lo = rank b // N, hi = (rank + 1) b // N
    (sizes differ by at most one; the concatenation over ranks is the batch in order)."""
    return rank * b // size, (rank + 1) * b // size


def rows(b, comm=None):
    """This rank's rows ``slice(lo, hi)`` of a batch of b rows (:func:`shard_bounds`; all of them in one process,
    ``comm`` None)."""
    comm = comm or Single()
    return slice(*shard_bounds(b, comm.rank, comm.size))


def mean_over_rows(n, f, comm=None):
    """The mean over n rows of a per-row quantity, given ``f(r)`` = its mean over the rows ``r`` (a slice):
    one process returns ``f(slice(0, n))``; under N ranks each evaluates its shard and the shard-size-weighted
    means are all-reduced, (1/n) sum_r n_r f(r_r). ``f`` returns a float or a dict of floats (the same keys on
    every rank; ``comm`` None: one process). Fewer rows than ranks: every rank evaluates them all."""
    comm = comm or Single()
    if comm.size == 1 or n < comm.size:
        return f(slice(0, n))
    lo, hi = shard_bounds(n, comm.rank, comm.size)
    v = f(slice(lo, hi))
    keys = list(v) if isinstance(v, dict) else None
    tot = comm.allreduce_sum([float(v[k]) * (hi - lo) for k in keys] if keys else [float(v) * (hi - lo)]) / n
    return {k: float(t) for k, t in zip(keys, tot)} if keys else float(tot[0])


class ImageStreams:
    """A look-alike of a NumPy Generator (``standard_normal``, ``random``) whose draws do not depend on which
    images share a batch, or which rank evaluates them: image i (its index in the whole evaluation set) has
    its own stream ``default_rng([*key, i])``. A draw of shape (S, B, ...) (the estimators' layout: samples
    first, then the B images) stacks along axis 1 image b's draw of shape (S, ...) from its own stream, so
    an image's estimate is the same in any batch, on any rank and for any number of ranks."""

    def __init__(self, key, index):
        self.key, self.streams = list(key), [np.random.default_rng([*key, int(i)]) for i in index]

    def _draw(self, draw, size):
        shape = tuple(size) if np.iterable(size) else (size,)
        if len(shape) < 2 or shape[1] != len(self.streams):
            raise ValueError(f"ImageStreams draws arrays of shape (samples, {len(self.streams)} images, ...); "
                             f"got {shape}")
        return np.stack([draw(g, shape[:1] + shape[2:]) for g in self.streams], axis=1)

    def standard_normal(self, size, dtype=np.float64):
        return self._draw(lambda g, s: g.standard_normal(s, dtype=dtype), size)

    def random(self, size, dtype=np.float64):
        return self._draw(lambda g, s: g.random(s, dtype=dtype), size)


class Single:
    """One process: every collective is the identity."""

    rank, size, name = 0, 1, "single"

    def allreduce_mean_(self, buf):
        return buf

    def allreduce_sum(self, values):
        return np.asarray(values, dtype=np.float64)

    def bcast(self, obj):
        return obj

    def barrier(self):
        pass

    def check_same(self, buf, what="parameters"):
        return checksum(buf)


class MPIComm(Single):
    """mpi4py on host buffers. Collectives are non-blocking (Iallreduce / Ibarrier) polled with ``Test``
    until ``timeout`` seconds pass; then the job is aborted (MPI_Abort) with a message naming the
    collective, so a dead rank stops the others instead of leaving them waiting forever."""

    name = "mpi"

    def __init__(self, comm=None, timeout=None):
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = comm or MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.timeout = float(os.environ.get("NPDGM_DIST_TIMEOUT", DEFAULT_TIMEOUT)) if timeout is None else timeout
        self.calls = 0
        # fault injection for tests: "RANK:CALL" -> that rank exits at its CALL-th gradient allreduce,
        # "RANK:CALL:hang" -> it stops answering there (sleeps)
        kill = os.environ.get("NPDGM_DIST_KILL", "").split(":")
        self.kill = (int(kill[0]), int(kill[1])) if len(kill) >= 2 else None
        self.hang = len(kill) == 3 and kill[2] == "hang"

    def _wait(self, req, what):
        deadline = time.monotonic() + self.timeout
        while not req.Test():
            if time.monotonic() > deadline:
                import sys
                print(f"npdgm: error: rank {self.rank}/{self.size}: {what} got no answer from the other ranks in "
                      f"{self.timeout:g} s (a rank died or hangs); aborting the job", file=sys.stderr, flush=True)
                time.sleep(0.5)  # let mpiexec forward that line: Abort may end the job before its stderr is read
                self.comm.Abort(1)
            time.sleep(0.0002)

    def allreduce_mean_(self, buf):
        """buf <- (sum over ranks of buf) / size, in place (host buffer)."""
        self.calls += 1
        if self.kill and self.kill == (self.rank, self.calls):
            if self.hang:
                time.sleep(3600)
            os._exit(3)
        self._wait(self.comm.Iallreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM), "gradient allreduce")
        buf /= self.size
        return buf

    def allreduce_sum(self, values):
        v = np.array(values, dtype=np.float64)
        self._wait(self.comm.Iallreduce(self.MPI.IN_PLACE, v, op=self.MPI.SUM), "allreduce of the loss terms")
        return v

    def bcast(self, obj):
        return self.comm.bcast(obj, root=0)

    def barrier(self):
        self._wait(self.comm.Ibarrier(), "barrier")

    def check_same(self, buf, what="parameters"):
        """Every rank's checksum of ``buf`` must equal rank 0's; else DistributedError on every rank."""
        mine = checksum(buf)
        self.barrier()  # with a timeout: a rank that failed before training (bad options, busy --out) stops the rest
        sums = self.comm.allgather(mine)
        if len(set(sums)) != 1:
            raise DistributedError(f"the ranks built different {what} (checksums {sums}); every rank must build "
                                   f"the model from the same seed and options")
        return mine


class NCCLComm(MPIComm):
    """NCCL through CuPy (``cupy.cuda.nccl``) on device buffers, one GPU per rank (device = rank mod the
    number of GPUs); MPI starts the processes and broadcasts the NCCL unique id. Not exercised by the
    CPU test suite (it needs CuPy and a GPU); NCCL has no timeout here, a dead rank is caught by MPI."""

    name = "nccl"

    def __init__(self, comm=None, timeout=None):
        super().__init__(comm, timeout)
        import cupy
        from cupy.cuda import nccl

        self.cupy, self.nccl = cupy, nccl
        cupy.cuda.Device(self.rank % cupy.cuda.runtime.getDeviceCount()).use()
        uid = self.comm.bcast(nccl.get_unique_id() if self.rank == 0 else None, root=0)
        self.nccl_comm = nccl.NcclCommunicator(self.size, uid, self.rank)

    def allreduce_mean_(self, buf):
        self.calls += 1
        kinds = {np.dtype(np.float32): self.nccl.NCCL_FLOAT32, np.dtype(np.float64): self.nccl.NCCL_FLOAT64}
        stream = self.cupy.cuda.get_current_stream()
        self.nccl_comm.allReduce(buf.data.ptr, buf.data.ptr, buf.size, kinds[np.dtype(buf.dtype)],
                                 self.nccl.NCCL_SUM, stream.ptr)
        buf /= self.size
        return buf


def launched_by_mpi():
    """True when an MPI launcher started this process with more than one rank (its environment says so)."""
    for key in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "PMIX_SIZE"):
        if int(os.environ.get(key, "1") or 1) > 1:
            return True
    return False


def detect(force=False, gpu=False):
    """The communicator of this process: MPI (NCCL when ``gpu``) under ``mpiexec -n N`` with N > 1 (or
    always when ``force``), else :class:`Single`. ``force`` without mpi4py is an error."""
    if not (force or launched_by_mpi()):
        return Single()
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        raise DistributedError("distributed training needs mpi4py: pip install 'npdgm[mpi]'") from None
    comm = NCCLComm() if gpu else MPIComm()
    return comm if comm.size > 1 or force else Single()


_WORLD = [Single()]


def init(force=False, gpu=False):
    """Set (and return) the process-wide communicator :func:`world` (see :func:`detect`)."""
    _WORLD[0] = detect(force, gpu)
    return _WORLD[0]


def world():
    """The communicator set by :func:`init` (Single until then)."""
    return _WORLD[0]
