"""Data-parallel training on an existing distributed engine: MPI (mpi4py, CPU) or NCCL (CuPy, GPU).

The parameters and gradients of a model live in two flat buffers, so data parallelism is one
collective per step. With a global batch of B examples split into shards of n_r examples
(sum_r n_r = B), rank r computes g_r = (1/n_r) sum_{i in shard r} grad l_i and

    g = (1/B) sum_i grad l_i = sum_r (n_r / B) g_r = (1/N) sum_r (N n_r / B) g_r

so each rank scales its gradient by N n_r / B (1 for even shards), and :meth:`allreduce_mean_`
(sum over ranks, then / N) leaves the full-batch gradient on every rank.

A communicator has ``rank``, ``size``, ``allreduce_mean_(buf)`` (in place), ``allreduce_sum(values)``
(a small host vector), ``bcast(obj)``, ``barrier()``, ``check_same(buf, what)`` and
``share(model, optimizer)``. :func:`detect` picks MPI when launched by ``mpiexec`` with more than one
rank, else :class:`Single`.

On one node, :meth:`MPIComm.share` moves a model's flat gradient buffer into an MPI-3 shared-memory
window (:class:`SharedGrads`): the backward then writes every rank's gradient where all ranks can read it,
and the all-reduce is one pass over memory (each rank sums its 1/N shard over the ranks and writes the
result into every rank's buffer) between two barriers, instead of MPICH's copies through its
shared-memory cells. Given the optimizer too, it keeps one copy per node of the parameters and the
optimizer state (:class:`SharedStep`) and each rank steps only its 1/N of them (the update is elementwise,
so the shards give the bits of the whole step), then a barrier: N ranks no longer each run the full
optimizer pass. Ranks on several nodes (or ``NPDGM_DIST_SHM=0``) keep ``Iallreduce`` and the
replicated step; ``NPDGM_DIST_SHM=grads`` shares the gradients only.

Evaluation is split too: :func:`rows` is a rank's share of a batch, :func:`mean_over_rows` a mean over
rows computed by shards and all-reduced, and :class:`ImageStreams` gives every image its own random
stream, so a Monte Carlo estimate does not depend on which rank (or batch) computes it.
"""
from __future__ import annotations

import copy
import hashlib
import math
import os
import time

import numpy as np

from .backend import to_host

#: seconds a collective may wait for the other ranks before the job is aborted (env NPDGM_DIST_TIMEOUT)
DEFAULT_TIMEOUT = 120.0
#: elements per chunk of the shared-memory reduction: N input chunks and the sum stay in L2 (256 KB in float32)
SHM_CHUNK = 1 << 16


#: seconds between two looks for another rank's interrupt notice while a collective waits
NOTICE_POLL = 0.01


class DistributedError(RuntimeError):
    """The ranks disagree (different parameters at start) or one of them stopped answering."""


class RankInterrupted(KeyboardInterrupt):
    """Another rank was interrupted (Ctrl-C) and told this one (:meth:`MPIComm.interrupt`): this rank stops
    as if it had been interrupted itself; ``rank`` is the one that was."""

    def __init__(self, rank):
        self.rank = rank
        super().__init__(f"rank {rank} was interrupted")


def timeout_from_env(environ=None):
    """Seconds a collective may wait (:data:`DEFAULT_TIMEOUT`, or $NPDGM_DIST_TIMEOUT: a positive number);
    ValueError naming the variable otherwise."""
    raw = (os.environ if environ is None else environ).get("NPDGM_DIST_TIMEOUT", "")
    if not raw.strip():
        return DEFAULT_TIMEOUT
    try:
        v = float(raw)
    except ValueError:
        v = math.nan
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"NPDGM_DIST_TIMEOUT must be a positive number of seconds (how long a collective waits "
                         f"for the other ranks), got {raw!r}")
    return v


def checksum(buf):
    """sha256 (hex, 16 digits) of the bytes of a (host or device) array."""
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

    def share(self, model, optimizer=None):
        """Nothing to share in one process; returns "" (see :meth:`MPIComm.share`)."""
        return ""


def move_grads(model, buf, optimizer=None):
    """Make ``buf`` (1-D, the size and dtype of ``model.flat_grads``) the model's gradient buffer: its values
    are copied in, every parameter's ``grad`` becomes a view of it at the same offsets (:meth:`Module.views`),
    and ``optimizer``'s (value, gradient) pair that held the old buffer holds ``buf``."""
    old = model.flat_grads
    if buf.shape != old.shape or buf.dtype != old.dtype:
        raise ValueError(f"gradient buffer {buf.shape} {buf.dtype} does not match {old.shape} {old.dtype}")
    buf[...] = old
    for p, view in zip(model.parameters(), model.views(buf)):
        p.grad = view
    model.flat_grads = buf
    if optimizer is not None:
        optimizer.pairs = [(p, buf if g is old else g) for p, g in optimizer.pairs]
    return buf


class SharedGrads:
    """The flat gradient buffers of all N ranks of one node in one MPI-3 shared-memory window
    (``MPI.Win.Allocate_shared`` on ``comm``, locked for the window's life with ``Lock_all``): ``bufs[q]`` is
    rank q's buffer as this process sees it, ``mine`` is this rank's.

    :meth:`reduce_mean_` (collective): after a barrier (every backward has written its buffer) rank r takes
    its shard [lo, hi) = :func:`shard_bounds` (n, r, N) and, chunk by chunk (:data:`SHM_CHUNK` elements, in
    L2), computes

        s = ((b_0 + b_1) + b_2 + ... + b_{N-1}) / N          (always in rank order)

    and writes s into every rank's buffer; a second barrier, and every buffer holds the mean. One sum
    computed once, so every rank gets the same bits, whatever the rank count; the memory traffic is N reads
    and N writes of a shard per rank (for N = 2: the buffer read once and written once per rank)."""

    def __init__(self, comm, n, dtype):
        from mpi4py import MPI

        self.MPI, self.comm, self.n, self.dtype = MPI, comm, int(n), np.dtype(dtype)
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.win = MPI.Win.Allocate_shared(self.n * self.dtype.itemsize, self.dtype.itemsize, comm=comm)
        self.win.Lock_all(MPI.MODE_NOCHECK)
        self.bufs = [np.frombuffer(self.win.Shared_query(q)[0], self.dtype, self.n) for q in range(self.size)]
        self.mine = self.bufs[self.rank]
        self.tmp = np.empty(min(SHM_CHUNK, max(1, self.n)), self.dtype)

    def reduce_mean_(self, fence):
        """bufs[q] <- (sum over ranks of bufs) / N for every q (see the class); ``fence(what)`` is the
        barrier with a timeout of the communicator."""
        self.win.Sync()
        fence("gradient allreduce")  # every rank's backward has written its buffer
        self.win.Sync()
        lo, hi = shard_bounds(self.n, self.rank, self.size)
        bufs, size = self.bufs, self.size
        for s in range(lo, hi, SHM_CHUNK):
            e = min(hi, s + SHM_CHUNK)
            t = self.tmp[:e - s]
            np.add(bufs[0][s:e], bufs[1][s:e], out=t)
            for q in range(2, size):
                np.add(t, bufs[q][s:e], out=t)
            t /= size
            for b in bufs:
                b[s:e] = t
        self.win.Sync()
        fence("gradient allreduce")  # every shard has been written into every buffer
        self.win.Sync()
        return self.mine


class SharedStep:
    """One copy per node of a model's flat parameters and of its optimizer's state arrays (Adam's m, v;
    SGD's momentum buffer), in an MPI-3 shared-memory window allocated by rank 0 of ``comm``, and the
    sharded optimizer step: :meth:`step` (it replaces ``optimizer.step`` on this rank) runs the optimizer's
    own update on the views [lo, hi) = :func:`shard_bounds` (n, rank, N) of the parameters, this rank's
    (all-reduced) gradient and the state, then waits at a barrier, after which every rank reads the whole
    updated parameter vector. The update of every optimizer here is elementwise, so the N shards give the
    bits of one whole-buffer step; each rank streams 1/N of the optimizer's memory traffic.

    Preconditions (else :meth:`supported` is False and nothing is shared): the optimizer has one (value,
    gradient) pair, ``(model.flat_params, model.flat_grads)``, and its state arrays are flat of that size.
    While shared, a write into the parameters outside the optimizer (``flat_params[...] = ...``) reaches
    every rank at once; checkpoints (``model.state_dict``, ``optimizer.state_dict``) read the full copy."""

    def __init__(self, comm, model, optimizer, fence):
        from mpi4py import MPI

        self.opt, self.fence = optimizer, fence
        rank, size = comm.Get_rank(), comm.Get_size()
        p = model.flat_params
        state = [(k, i, a) for k, arrs in optimizer._state().items() for i, a in enumerate(arrs)]
        n, dt = p.size, p.dtype
        self.win = MPI.Win.Allocate_shared((1 + len(state)) * n * dt.itemsize if rank == 0 else 0, dt.itemsize,
                                           comm=comm)
        self.win.Lock_all(MPI.MODE_NOCHECK)
        mem = np.frombuffer(self.win.Shared_query(0)[0], dt, (1 + len(state)) * n).reshape(1 + len(state), n)
        if rank == 0:
            mem[0] = p
            for j, (_, _, a) in enumerate(state):
                mem[1 + j] = a
        self.win.Sync()
        fence("sharing the parameters")
        self.win.Sync()
        p, g = mem[0], model.flat_grads
        for q, view in zip(model.parameters(), model.views(p)):
            q.data = view
        model.flat_params = p
        optimizer.pairs = [(p, g)]
        for j, (k, i, _) in enumerate(state):
            getattr(optimizer, k)[i] = mem[1 + j]
        lo, hi = shard_bounds(n, rank, size)
        self.sub = copy.copy(optimizer)  # the same optimizer on this rank's views [lo, hi)
        self.sub.pairs, self.sub._tmp = [(p[lo:hi], g[lo:hi])], {}
        for k in {k for k, _, _ in state}:
            setattr(self.sub, k, [a[lo:hi] for a in getattr(optimizer, k)])
        self.own = {"pairs", "_tmp", "step", *(k for k, _, _ in state)}
        optimizer.step = self.step

    @staticmethod
    def supported(model, optimizer, size):
        """True when the optimizer steps exactly the model's flat buffers with flat state (see the class) and
        there are at least ``size`` (number of ranks) parameters, so that no rank's shard is empty."""
        p, g = model.flat_params, model.flat_grads
        pairs = getattr(optimizer, "pairs", None)
        if not isinstance(p, np.ndarray) or p.size < size or not pairs or len(pairs) != 1 or pairs[0][0] is not p \
                or pairs[0][1] is not g or not hasattr(optimizer, "_state") or "step" in vars(optimizer):
            return False
        return all(getattr(optimizer, k, None) is arrs and all(isinstance(a, np.ndarray) and a.shape == p.shape
                                                                 for a in arrs)
                   for k, arrs in optimizer._state().items())

    def step(self):
        """The optimizer's step on this rank's shard (hyperparameters and the step count taken from the
        optimizer, the new count handed back), then a barrier with the communicator's timeout."""
        opt, sub = self.opt, self.sub
        sub.__dict__.update({k: v for k, v in vars(opt).items() if k not in self.own})
        type(opt).step(sub)
        opt.__dict__.update({k: v for k, v in vars(sub).items() if k not in self.own})
        self.win.Sync()
        self.fence("optimizer step")  # every shard of the parameters is updated before anyone reads them
        self.win.Sync()


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
        self.timeout = timeout_from_env() if timeout is None else timeout
        self.notes = self.comm.Dup()  # interrupt notices (:meth:`interrupt`), apart from the collectives
        self.sent = []
        self.calls = 0
        # fault injection for tests: "RANK:CALL" -> that rank exits at its CALL-th gradient allreduce,
        # "RANK:CALL:hang" -> it stops answering there (sleeps), "RANK:CALL:int" -> it gets SIGINT (Ctrl-C) there
        kill = os.environ.get("NPDGM_DIST_KILL", "").split(":")
        self.kill = (int(kill[0]), int(kill[1])) if len(kill) >= 2 else None
        self.fault = kill[2] if len(kill) == 3 else "exit"
        self.shared = []  # SharedGrads windows made by share (their buffers are all-reduced through them)
        self.steps = []   # SharedStep of the optimizers that share replaced the step of

    #: the tag of an interrupt notice on ``self.notes``
    NOTICE = 1

    def interrupt(self):
        """Tell every other rank that this one was interrupted (Ctrl-C): each raises :class:`RankInterrupted`
        at its next wait for a collective (within :data:`NOTICE_POLL` s), instead of waiting for the timeout."""
        self.sent += [self.notes.isend(self.rank, dest=q, tag=self.NOTICE) for q in range(self.size) if q != self.rank]

    def part(self, seconds=10.0):
        """After an interrupt, wait (at most ``seconds``) until every rank has stopped as well: the first rank
        to exit ends the job, and rank 0 must have said what the run directory holds by then."""
        req, deadline = self.notes.Ibarrier(), time.monotonic() + seconds
        while not req.Test() and time.monotonic() < deadline:
            time.sleep(0.001)

    def _check_notices(self):
        status = self.MPI.Status()
        if self.notes.Iprobe(source=self.MPI.ANY_SOURCE, tag=self.NOTICE, status=status):
            raise RankInterrupted(self.notes.recv(source=status.Get_source(), tag=self.NOTICE))

    def _wait(self, req, what):
        start = time.monotonic()
        deadline, look = start + self.timeout, start + NOTICE_POLL
        while not req.Test():
            now = time.monotonic()
            if now > look:  # another rank may have been interrupted: it will not join this collective
                self._check_notices()
                look = now + NOTICE_POLL
            if now > deadline:
                import sys
                print(f"npdgm: error: rank {self.rank}/{self.size}: {what} got no answer from the other ranks in "
                      f"{self.timeout:g} s (a rank died or hangs); aborting the job", file=sys.stderr, flush=True)
                time.sleep(0.5)  # let mpiexec forward that line: Abort may end the job before its stderr is read
                self.comm.Abort(1)
            time.sleep(0.0002)

    def allreduce_mean_(self, buf):
        """buf <- (sum over ranks of buf) / size, in place (host buffer): through the shared-memory window
        when ``buf`` is a buffer of :meth:`share`, else ``Iallreduce``."""
        self.calls += 1
        if self.kill and self.kill == (self.rank, self.calls):
            if self.fault == "int":
                import signal
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)  # the handler raises KeyboardInterrupt here
            if self.fault == "hang":
                time.sleep(3600)
            os._exit(3)
        for w in self.shared:
            if w.mine is buf:
                return w.reduce_mean_(self._fence)
        self._wait(self.comm.Iallreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM), "gradient allreduce")
        buf /= self.size
        return buf

    def _fence(self, what):
        self._wait(self.comm.Ibarrier(), what)

    def share(self, model, optimizer=None):
        """Collective, once before training (``train.fit`` calls it): on one node, move ``model.flat_grads``
        into a shared-memory window (:class:`SharedGrads`, :func:`move_grads`; ``optimizer``'s pair follows),
        so that :meth:`allreduce_mean_` of it is the one-pass shared-memory reduction; with ``optimizer``,
        also keep one copy per node of the parameters and the optimizer state and replace
        ``optimizer.step`` by the sharded step (:class:`SharedStep`). Returns what is shared: "grads+step",
        "grads" (``NPDGM_DIST_SHM=grads``, or an optimizer that :meth:`SharedStep.supported` refuses), or ""
        (nothing touched: the all-reduce stays ``Iallreduce``) when the ranks span several nodes,
        ``NPDGM_DIST_SHM=0``, or a window cannot be made. Calling it again for the same model and optimizer
        changes nothing."""
        mode = os.environ.get("NPDGM_DIST_SHM", "1")
        buf = model.flat_grads
        if self.size == 1 or mode == "0" or buf is None or not isinstance(buf, np.ndarray):
            return ""
        if not any(w.mine is buf for w in self.shared):
            node = self.comm.Split_type(self.MPI.COMM_TYPE_SHARED)
            one_node = node.Get_size() == self.size  # several nodes: the same answer on every rank
            node.Free()
            if not one_node or not self._agree(lambda: self.shared.append(SharedGrads(self.comm, buf.size,
                                                                                      buf.dtype))):
                return ""
            move_grads(model, self.shared[-1].mine, optimizer)
        if optimizer is None or mode == "grads":
            return "grads"
        if getattr(optimizer.step, "__self__", None) in self.steps:
            return "grads+step"
        if not self._agree(lambda: SharedStep.supported(model, optimizer, self.size)):
            return "grads"
        self.steps.append(SharedStep(self.comm, model, optimizer, self._fence))
        return "grads+step"

    def _agree(self, f):
        """Run ``f()`` on every rank; True when on none it raised or returned False (a collective decision)."""
        try:
            ok = 0 if f() is False else 1
        except Exception:  # e.g. an MPI without shared windows
            ok = 0
        return min(self.comm.allgather(ok)) == 1

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

        if not getattr(nccl, "available", False):   # the module imports without libnccl (pip wheels lack it)
            raise DistributedError("NCCL is not available to CuPy (cupy.cuda.nccl.available is False): install "
                                   "it (pip install nvidia-nccl-cu12, or -cu11 for CUDA 11) or run on one GPU")
        self.cupy, self.nccl = cupy, nccl
        cupy.cuda.Device(self.rank % cupy.cuda.runtime.getDeviceCount()).use()   # before any model array
        uid = self.comm.bcast(nccl.get_unique_id() if self.rank == 0 else None, root=0)
        self.nccl_comm = nccl.NcclCommunicator(self.size, uid, self.rank)

    def share(self, model, optimizer=None):
        """Device buffers: NCCL moves them, nothing to share on the host; returns ""."""
        return ""

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
