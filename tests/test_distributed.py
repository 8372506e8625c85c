"""Data-parallel training (npdgm.distributed): 2 MPI ranks with global batch B give the losses and
parameters of 1 process with batch B; a dead rank stops the job; the last checkpoint resumes.
The MPI runs skip without mpi4py / mpiexec (pip install '.[mpi]'). The NCCL path needs CuPy and a GPU
and is not run here."""
import importlib.util
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from npdgm import distributed
from npdgm.bench.distributed import mpiexec

MPIEXEC = mpiexec()  # the mpich wheel's beside this Python (a venv not activated), else on PATH
HAVE_MPI = importlib.util.find_spec("mpi4py") is not None and MPIEXEC is not None
need_mpi = pytest.mark.skipif(not HAVE_MPI, reason="needs mpi4py and mpiexec (pip install '.[mpi]')")
TIMEOUT = 60


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "PMIX_", "NPDGM_DIST"))}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)
    return env


def _run(args, out, n=1, env=None, check=True):
    cmd = ([] if n == 1 else [MPIEXEC, "-n", str(n)]) + [sys.executable, "-m", "npdgm", *args, "--out", str(out),
                                                           "--no-plots", "--no-progress"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env or _env())
    if check:
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return p


def _records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _assert_two_ranks_match_one(args, out, rel):
    """Run ``args`` as 1 process into OUT/one and on 2 ranks into OUT/two; the same run to ``rel``."""
    _run(args, out / "one")
    _run(args, out / "two", n=2)
    _assert_same_run(out / "one", out / "two", rel)


def _assert_same_run(a, b, rel):
    ra, rb = _records(a), _records(b)
    assert [r["epoch"] for r in ra] == [r["epoch"] for r in rb]
    for x, y in zip(ra, rb):
        for k in x:
            if k.startswith(("train_", "test_")) and k != "train_seconds":
                assert y[k] == pytest.approx(x[k], rel=rel, abs=rel), (k, x[k], y[k])
    pa, pb = np.load(os.path.join(a, "checkpoint.npz")), np.load(os.path.join(b, "checkpoint.npz"))
    for k in pa.files:
        if pa[k].dtype.kind == "f":
            scale = max(float(np.abs(pa[k]).max()), 1e-12)
            assert float(np.abs(pa[k] - pb[k]).max()) <= rel * scale, k


VAE = ["train", "vae", "--hidden", "32", "--z-dim", "4", "--test-limit", "100", "--impute-n", "10"]
FLOW = ["train", "flow2d", "--dataset", "moons", "--couplings", "2", "--hidden", "16", "16", "--test-limit", "100"]


# -- without MPI -------------------------------------------------------------------------------------
def test_shard_bounds_cover_the_batch_in_order():
    for b in (1, 2, 45, 255, 256):
        for n in (1, 2, 3, 8):
            bounds = [distributed.shard_bounds(b, r, n) for r in range(n)]
            assert bounds[0][0] == 0 and bounds[-1][1] == b
            assert all(bounds[i][1] == bounds[i + 1][0] for i in range(n - 1))
            assert max(h - lo for lo, h in bounds) - min(h - lo for lo, h in bounds) <= 1


def test_detect_is_single_outside_mpiexec(monkeypatch):
    for k in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "PMIX_SIZE"):
        monkeypatch.delenv(k, raising=False)
    c = distributed.detect()
    assert isinstance(c, distributed.Single) and (c.rank, c.size) == (0, 1)
    buf = np.arange(4.0)
    assert c.allreduce_mean_(buf) is buf and list(buf) == [0, 1, 2, 3]


def test_move_grads_repoints_every_gradient_and_the_optimizer():
    """The shared-memory path's re-pointing, in one process: the values move, every grad is a view of the
    new buffer at its layout offset, a backward writes there, and Adam steps with it."""
    from npdgm import backend
    from npdgm.models.vae import VAE
    from npdgm.optim import Adam

    backend.set_dtype("float64")
    try:
        m = VAE(x_dim=12, hidden=[8], z_dim=2, seed=0)
        opt = Adam(m, lr=1e-2)
        x = np.random.default_rng(0).random((5, 12))
        eps = np.random.default_rng(1).standard_normal((5, 2))
        m.loss_and_grad(x, eps)
        before, old = m.flat_grads.copy(), m.flat_grads
        buf = np.full(old.size, np.nan)
        assert distributed.move_grads(m, buf, opt) is buf and m.flat_grads is buf
        assert np.array_equal(buf, before) and opt.pairs[0][1] is buf
        for p, (_, shape, off) in zip(m.parameters(), m.layout()):
            assert np.shares_memory(p.grad, buf) and p.grad.shape == shape
            assert np.array_equal(p.grad.ravel(), buf[off:off + p.grad.size])
        old[...] = 7.0
        m.loss_and_grad(x, eps)  # zeroes and writes the new buffer only
        assert np.array_equal(buf, before) and np.all(old == 7.0)
        p0 = m.flat_params.copy()
        opt.step()
        assert not np.array_equal(m.flat_params, p0)
        with pytest.raises(ValueError, match="does not match"):
            distributed.move_grads(m, np.zeros(3), opt)
        assert distributed.Single().share(m, opt) == "" and m.flat_grads is buf
        # the sharded step needs an optimizer of exactly the flat buffers, and a non-empty shard per rank
        assert distributed.SharedStep.supported(m, opt, 2)
        assert not distributed.SharedStep.supported(m, opt, m.flat_params.size + 1)
        assert not distributed.SharedStep.supported(m, Adam(m.parameters(), lr=1e-2), 2)
    finally:
        backend.set_dtype("float32")


SHM = """
import json
import os
import sys
import numpy as np
from mpi4py import MPI
from npdgm import backend, distributed
from npdgm.models.vae import VAE
from npdgm.optim import Adam

comm = distributed.detect(force=True)
out = {"rank": comm.rank}
for dt in ("float32", "float64"):
    backend.set_dtype(dt)
    m, ref = VAE(x_dim=12, hidden=[8], z_dim=2, seed=0), VAE(x_dim=12, hidden=[8], z_dim=2, seed=0)
    opt, ref_opt = Adam(m, lr=1e-2), Adam(ref, lr=1e-2)     # ref: this process alone, the whole Adam step
    out["shared_" + dt] = comm.share(m, opt)
    out["twice_" + dt] = comm.share(m, opt)
    exact = step_exact = True
    for i in range(3):
        x = np.random.default_rng([comm.rank, i]).random((5, 12))
        m.loss_and_grad(x, np.random.default_rng([10 + comm.rank, i]).standard_normal((5, 2)))  # writes the buffer
        mine = m.flat_grads.copy()
        every = MPI.COMM_WORLD.allgather(mine)
        want = every[0] + every[1]
        for g in every[2:]:
            want = want + g
        want = want / comm.size                                 # the rank-order sum, then / N
        plain = mine.copy()
        comm.allreduce_mean_(plain)                             # not a shared buffer: Iallreduce
        got = comm.allreduce_mean_(m.flat_grads)
        exact = exact and got is m.flat_grads and bool(np.array_equal(m.flat_grads, want))
        opt.step()
        ref.flat_grads[...] = want
        ref_opt.step()
        step_exact = step_exact and all(np.array_equal(a, b) for a, b in
                                        ((m.flat_params, ref.flat_params), (opt.m[0], ref_opt.m[0]),
                                         (opt.v[0], ref_opt.v[0])))
    out["exact_" + dt], out["step_exact_" + dt], out["t_" + dt] = exact, step_exact, opt.t
    out["pairs_" + dt] = opt.pairs[0][0] is m.flat_params and opt.pairs[0][1] is m.flat_grads
    out["plain_rel_" + dt] = float(np.abs(plain - want).max() / np.abs(want).max())
    out["views_" + dt] = all(np.shares_memory(p.grad, m.flat_grads) and np.shares_memory(p.data, m.flat_params)
                             for p in m.parameters())
    out["state_" + dt] = all(np.array_equal(a, b) for a, b in zip(opt.state_dict().values(),
                                                                  ref_opt.state_dict().values()))
    out["sum_" + dt] = distributed.checksum(m.flat_grads)
    out["params_" + dt] = distributed.checksum(m.flat_params)
# SGD with momentum and AdamW: their state is sharded too, the same bits as the whole step
from npdgm.optim import SGD, AdamW
for name, make in (("sgd", lambda mod: SGD(mod, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)),
                   ("adamw", lambda mod: AdamW(mod, lr=1e-2))):
    m, ref = VAE(x_dim=12, hidden=[8], z_dim=2, seed=1), VAE(x_dim=12, hidden=[8], z_dim=2, seed=1)
    opt, ref_opt = make(m), make(ref)
    out["shared_" + name] = comm.share(m, opt)
    same = True
    for i in range(3):
        m.loss_and_grad(np.random.default_rng([comm.rank, i]).random((5, 12)),
                        np.random.default_rng([10 + comm.rank, i]).standard_normal((5, 2)))
        comm.allreduce_mean_(m.flat_grads)
        ref.flat_grads[...] = m.flat_grads
        opt.step()
        ref_opt.step()
        same = same and np.array_equal(m.flat_params, ref.flat_params)
    out["step_exact_" + name] = same and all(np.array_equal(a, b) for a, b in
                                             zip(opt.state_dict().values(), ref_opt.state_dict().values()))
# train.fit shares the buffers of the model it trains (and steps through them)
from npdgm.train import fit
m = VAE(x_dim=12, hidden=[8], z_dim=2, seed=0)
opt = Adam(m, lr=1e-2)
x = np.random.default_rng(0).random((40, 12))
fit(m, opt, x, epochs=1, batch_size=20, out=os.path.join(sys.argv[1], "fit"), rng=np.random.default_rng(0),
    step=lambda xb, yb, rng, shard=slice(None): m.train_step(xb, rng, shard), progress=False, log=lambda s: None,
    comm=comm)
out["fit_shared"] = comm.share(m, opt) if any(w.mine is m.flat_grads for w in comm.shared) else ""
out["fit_params"] = distributed.checksum(m.flat_params)
with open(os.path.join(sys.argv[1], f"rank{comm.rank}.json"), "w") as f:
    json.dump(out, f)
"""


def _shm_script(tmp_path, n, env):
    (tmp_path / "shm.py").write_text(SHM)
    p = subprocess.run([MPIEXEC, "-n", str(n), sys.executable, str(tmp_path / "shm.py"), str(tmp_path)],
                       capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(n)]


@need_mpi
@pytest.mark.parametrize("n", [2, 3])
def test_shared_memory_allreduce_and_sharded_step_match_one_process_bitwise(tmp_path, n):
    """share on one node puts the gradient buffers in an MPI window (the backward writes there) and one copy of
    the parameters and Adam's m, v in another; allreduce_mean_ of the buffer is ((g_0 + g_1) + g_2 ...) / N
    exactly, the same bits on every rank (3 ranks: a 3-way sum, uneven shards), and agrees with MPICH's
    Iallreduce of a plain copy; the sharded Adam step (each rank its 1/N) gives the bits of one process's
    whole step on that gradient, 3 steps running (parameters, m, v, step count)."""
    out = _shm_script(tmp_path, n, _env())
    for r in out:
        for dt, tol in (("float32", 1e-6), ("float64", 1e-14)):
            assert r["shared_" + dt] == r["twice_" + dt] == "grads+step", r
            assert r["exact_" + dt] and r["step_exact_" + dt] and r["state_" + dt] and r["t_" + dt] == 3, (dt, r)
            assert r["pairs_" + dt] and r["views_" + dt], r
            assert r["plain_rel_" + dt] <= tol, (dt, r)
            assert r["sum_" + dt] == out[0]["sum_" + dt] and r["params_" + dt] == out[0]["params_" + dt]
        assert r["fit_shared"] == "grads+step" and r["fit_params"] == out[0]["fit_params"]
        assert r["shared_sgd"] == r["shared_adamw"] == "grads+step" and r["step_exact_sgd"] and r["step_exact_adamw"]


@need_mpi
@pytest.mark.parametrize("mode", ["0", "grads"])
def test_shared_memory_can_be_switched_off(tmp_path, mode):
    """NPDGM_DIST_SHM=0: share leaves the buffers alone and the all-reduce is MPICH's; =grads: the gradients
    only are shared, every rank runs the whole Adam step. The same means and steps either way."""
    out = _shm_script(tmp_path, 2, _env(NPDGM_DIST_SHM=mode))
    want = "" if mode == "0" else "grads"
    for r in out:
        assert r["shared_float32"] == r["shared_float64"] == r["fit_shared"] == want, r
        assert r["plain_rel_float32"] <= 1e-6 and r["plain_rel_float64"] <= 1e-14
        assert r["step_exact_float64"] and r["t_float64"] == 3
        assert r["params_float64"] == out[0]["params_float64"] and r["fit_params"] == out[0]["fit_params"]


@need_mpi
@pytest.mark.parametrize("fault", ["exit", "hang"])
def test_a_dead_or_hung_rank_stops_the_shared_memory_allreduce(tmp_path, fault):
    """Rank 1 exits (or stops answering) at its 2nd all-reduce, the first through the shared window: rank 0
    waits at the window's barrier, times out (2 s) with the clear error, and the job ends non-zero."""
    (tmp_path / "shm.py").write_text(SHM)
    kill = "1:2" + (":hang" if fault == "hang" else "")
    t0 = time.monotonic()
    p = subprocess.run([MPIEXEC, "-n", "2", sys.executable, str(tmp_path / "shm.py"), str(tmp_path)],
                       capture_output=True, text=True, timeout=TIMEOUT,
                       env=_env(NPDGM_DIST_KILL=kill, NPDGM_DIST_TIMEOUT="2"))
    assert p.returncode != 0 and time.monotonic() - t0 < TIMEOUT
    assert not (tmp_path / "rank0.json").exists()
    if fault == "hang":  # an exiting rank may end the job through mpiexec before rank 0's timeout
        assert "rank 0/2: gradient allreduce got no answer from the other ranks in 2 s" in p.stderr, p.stderr[-2000:]


# -- 2 ranks against 1 process -----------------------------------------------------------------------
@need_mpi
def test_vae_two_ranks_equal_one_process_every_step_float64(tmp_path):
    """One step per epoch (B = 255 = 127 + 128: uneven shards), so each epoch's train loss is one step's."""
    args = VAE + ["--train-limit", "255", "--batch-size", "255", "--epochs", "3", "--dtype", "float64"]
    _assert_two_ranks_match_one(args, tmp_path, 1e-10)


@need_mpi
def test_vae_and_flow2d_two_ranks_uneven_last_batch_float32(tmp_path):
    """B = 45 on 256 examples: shards 22/23 and a last batch of 31 (15/16)."""
    for name, args in (("vae", VAE), ("flow", FLOW)):
        a = args + ["--train-limit", "256", "--batch-size", "45", "--epochs", "1", "--dtype", "float32"]
        _assert_two_ranks_match_one(a, tmp_path / name, 1e-5)


@need_mpi
def test_flow2d_two_ranks_equal_one_process_float64(tmp_path):
    args = FLOW + ["--train-limit", "255", "--batch-size", "85", "--epochs", "2", "--dtype", "float64"]
    _assert_two_ranks_match_one(args, tmp_path, 1e-10)


@need_mpi
def test_dead_rank_stops_the_job_and_the_checkpoint_resumes(tmp_path):
    """Rank 1 exits at its 3rd gradient allreduce (epoch 3; rank 0 may be killed while writing epoch 2):
    nobody hangs; the last checkpoint (epoch 1 or 2, atomic) resumes on 2 ranks and ends where an
    uninterrupted single-process run ends."""
    args = VAE + ["--train-limit", "255", "--batch-size", "255", "--epochs", "3", "--dtype", "float64"]
    t0 = time.monotonic()
    p = _run(args, tmp_path / "two", n=2, env=_env(NPDGM_DIST_KILL="1:3", NPDGM_DIST_TIMEOUT="5"), check=False)
    assert p.returncode != 0 and time.monotonic() - t0 < TIMEOUT
    from npdgm.io import load_arrays
    assert load_arrays(str(tmp_path / "two"))[1]["epoch"] in (1, 2)
    resumed = ["train", "vae", "--resume", str(tmp_path / "two"), "--no-plots", "--no-progress"]
    p = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-m", "npdgm", *resumed], capture_output=True,
                       text=True, timeout=TIMEOUT, env=_env())
    assert p.returncode == 0, p.stderr[-2000:]
    _run(args, tmp_path / "one")
    _assert_same_run(tmp_path / "one", tmp_path / "two", 1e-10)


@need_mpi
def test_a_rank_that_stops_answering_times_out_with_a_clear_error(tmp_path):
    """Rank 1 hangs at its 2nd allreduce: rank 0's collective times out (2 s) and aborts the job."""
    args = FLOW + ["--train-limit", "255", "--batch-size", "255", "--epochs", "3"]
    t0 = time.monotonic()
    p = _run(args, tmp_path / "two", n=2, env=_env(NPDGM_DIST_KILL="1:2:hang", NPDGM_DIST_TIMEOUT="2"), check=False)
    assert p.returncode != 0 and time.monotonic() - t0 < TIMEOUT
    assert "rank 0/2: gradient allreduce got no answer from the other ranks in 2 s" in p.stderr, p.stderr[-2000:]


@need_mpi
def test_rank0_refusing_the_run_dir_stops_the_other_ranks(tmp_path):
    """Rank 0 refuses a --out that holds a run (and exits); rank 1 must not wait forever at the start check."""
    args = FLOW + ["--train-limit", "100", "--batch-size", "50", "--epochs", "1"]
    _run(args, tmp_path / "busy")
    p = _run(args, tmp_path / "busy", n=2, env=_env(NPDGM_DIST_TIMEOUT="3"), check=False)
    assert p.returncode != 0 and "already holds files" in p.stderr
    # No hang (_run's timeout): rank 1 either times out at the start barrier ("rank 1/2: barrier got no
    # answer") or is ended by mpiexec once rank 0 has exited non-zero first, whichever comes first.
    assert "barrier got no answer" in p.stderr or "rank 1/2" not in p.stderr, p.stderr[-2000:]


@need_mpi
def test_batch_smaller_than_world_is_refused(tmp_path):
    args = FLOW + ["--train-limit", "255", "--batch-size", "127", "--epochs", "1"]  # last batch: 1 example
    p = _run(args, tmp_path / "two", n=2, check=False)
    assert p.returncode != 0 and "every batch needs >= 2 examples" in p.stderr


# -- evaluation split over the ranks ------------------------------------------------------------------
def test_image_streams_do_not_depend_on_the_batch_or_the_blocks():
    key = [3, 16, 1]
    whole = distributed.ImageStreams(key, range(5)).standard_normal((4, 5, 3))
    parts = np.concatenate([distributed.ImageStreams(key, range(0, 2)).standard_normal((4, 2, 3)),
                            distributed.ImageStreams(key, range(2, 5)).standard_normal((4, 3, 3))], axis=1)
    assert np.array_equal(whole, parts)
    s = distributed.ImageStreams(key, range(2, 5))  # draws in blocks of samples continue each image's stream
    assert np.array_equal(np.concatenate([s.standard_normal((1, 3, 3)), s.standard_normal((3, 3, 3))]), whole[:, 2:])
    u = distributed.ImageStreams(key, [7]).random((6, 1))
    assert u.shape == (6, 1) and np.array_equal(u[:, 0], np.random.default_rng([*key, 7]).random(6))
    with pytest.raises(ValueError, match=r"shape \(samples, 5 images, ...\); got \(5, 3\)"):
        distributed.ImageStreams(key, range(5)).standard_normal((5, 3))


def test_rows_and_mean_over_rows_in_one_process():
    assert distributed.rows(7) == slice(0, 7)
    seen = []
    assert distributed.mean_over_rows(7, lambda r: seen.append(r) or {"a": 1.5}) == {"a": 1.5}
    assert seen == [slice(0, 7)]


SPLIT = '''
import json
import sys
import numpy as np
from npdgm import backend, distributed
from npdgm.commands.vae import evaluate_nelbo
from npdgm.models.vae import VAE

comm = distributed.init()
backend.set_dtype("float64")
m = VAE(x_dim=784, hidden=[16], z_dim=3, seed=0)
x = np.random.default_rng(1).random((23, 784))
seen, loss = [], m.loss
m.loss = lambda xb, eps: (seen.append(len(xb)), loss(xb, eps))[1]
split = evaluate_nelbo(m, x, 0, batch=10, comm=comm)
rows = list(seen)
mean = distributed.mean_over_rows(23, lambda r: float(x[r].sum(1).mean()), comm)
with open(f"{sys.argv[1]}/rank{comm.rank}.json", "w") as f:  # a file per rank: mpiexec may interleave stdout lines
    json.dump({"rank": comm.rank, "rows": rows, "split": split, "one": evaluate_nelbo(m, x, 0, batch=10),
               "mean": mean, "mean_one": float(x.sum(1).mean())}, f)
'''


@need_mpi
def test_training_evaluation_is_split_over_the_ranks(tmp_path):
    """evaluate_nelbo on 2 ranks: each takes its rows of every batch (10, 10, 3 -> 5/5, 5/5, 1/2) and gets
    the numbers of one process; mean_over_rows likewise."""
    (tmp_path / "split.py").write_text(SPLIT)
    p = subprocess.run([MPIEXEC, "-n", "2", sys.executable, str(tmp_path / "split.py"), str(tmp_path)],
                       capture_output=True, text=True, timeout=TIMEOUT, env=_env())
    assert p.returncode == 0, p.stderr[-2000:]
    out = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rows"] for r in out] == [[5, 5, 1], [5, 5, 2]]
    for r in out:
        for k, v in r["one"].items():
            assert r["split"][k] == pytest.approx(v, rel=1e-12)
        assert r["mean"] == pytest.approx(r["mean_one"], rel=1e-12)


def _evaluate(run, n, batch, js):
    cmd = ([] if n == 1 else [MPIEXEC, "-n", str(n)]) + [
        sys.executable, "-m", "npdgm", "evaluate", str(run), "--method", "elbo", "iwae", "naive", "ais", "--k", "20",
        "--n-images", "7", "--batch", str(batch), "--steps", "5", "--leapfrog", "2", "--chains", "3", "--json", str(js)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=_env())
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    with open(js) as f:
        return p.stdout, json.load(f)["methods"]


@need_mpi
def test_evaluate_two_ranks_equal_one_process(tmp_path):
    """npdgm evaluate on 2 ranks (images 0-2 / 3-6, batches of 2) gives the numbers of 1 process with one
    batch of 7 (each image draws from its own stream), and rank 0 alone prints."""
    _run(VAE + ["--train-limit", "100", "--batch-size", "50", "--epochs", "1", "--dtype", "float64"], tmp_path / "run")
    _, one = _evaluate(tmp_path / "run", 1, 7, tmp_path / "one.json")      # one batch of 7
    out, two = _evaluate(tmp_path / "run", 2, 2, tmp_path / "two.json")    # batches 2+1 and 2+2 on 2 ranks
    for m in ("elbo", "iwae", "naive", "ais"):
        for k in ("mean", "se"):
            assert two[m][k] == pytest.approx(one[m][k], rel=1e-10), (m, k)
        assert sum(line.startswith(m + " ") for line in out.splitlines()) == 1, out


# -- cvae, m2 and gmm on 2 ranks ------------------------------------------------------------------------
CVAE = ["train", "cvae", "--hidden", "32", "--z-dim", "4", "--test-limit", "101", "--n-samples", "2"]
M2 = ["train", "m2", "--hidden", "32", "--z-dim", "4", "--classifier-hidden", "16", "--labels", "20",
      "--labelled-batch", "15", "--eval-n", "51", "--baseline-steps", "5", "--test-limit", "101"]


@need_mpi
def test_cvae_and_m2_two_ranks_equal_one_process_float64(tmp_path):
    """Uneven shards: B = 255 = 127 + 128 unlabelled (and CVAE) images, 15 = 7 + 8 labelled M2 images."""
    for name, args in (("cvae", CVAE), ("m2", M2)):
        a = args + ["--train-limit", "255", "--batch-size", "255", "--epochs", "2", "--dtype", "float64"]
        _assert_two_ranks_match_one(a, tmp_path / name, 1e-10)


@need_mpi
def test_gmm_two_ranks_equal_one_process(tmp_path):
    """Data-parallel EM: the same log-likelihood every iteration and the same final mixture."""
    a = ["train", "gmm", "--dataset", "moons", "--components", "5", "--train-limit", "501", "--max-iter", "30"]
    _assert_two_ranks_match_one(a, tmp_path, 1e-10)
    assert len(_records(tmp_path / "two")) > 5


# -- npdgm bench --distributed --------------------------------------------------------------------------
@need_mpi
def test_bench_distributed_times_one_and_two_ranks(tmp_path, capsys):
    from npdgm import cli

    js = tmp_path / "dist.json"
    assert cli.main(["bench", "--distributed", "--workloads", "vae", "--batch", "33", "--ranks", "1,2", "--threads",
                     "2", "--steps", "2", "--repeats", "1", "--warmup", "1", "--json", str(js)]) == 0
    rows = json.loads(js.read_text())["results"]
    assert [(r["ranks"], r["threads_per_rank"], r["comm"]) for r in rows] == [(1, 2, "none"), (2, 1, "mpi-shm-sharded")]
    assert rows[0]["allreduce_ms"] is None and rows[1]["allreduce_ms"] > 0 and rows[1]["allreduce_only_ms"] > 0
    assert rows[1]["optimizer_ms"] > 0
    assert rows[0]["speedup"] == 1
    assert rows[1]["speedup"] == pytest.approx(rows[0]["ms_per_step"] / rows[1]["ms_per_step"], rel=1e-2)
    assert rows[1]["grad_mb"] == pytest.approx(rows[1]["params"] * 4 / 2 ** 20, abs=0.01)
    assert "| vae | 33 | 2 x 1 | mpi-shm-sharded |" in capsys.readouterr().out


def test_bench_distributed_refuses_bad_ranks(capsys):
    from npdgm import cli

    assert cli.main(["bench", "--distributed", "--ranks", "0"]) == 2
    assert "npdgm: error: --ranks must list rank counts >= 1, got '0'" in capsys.readouterr().err


# -- NCCL (GPU; run by benchmarks/gpu_check.sh through pytest -m gpu, skipped here) -----------------------
NCCL = '''
import sys
import cupy
import numpy as np
from npdgm import distributed

comm = distributed.detect(force=True, gpu=True)
assert comm.name == "nccl" and comm.size == int(sys.argv[1]), (comm.name, comm.size)
for dt in (np.float32, np.float64):
    buf = cupy.arange(10, dtype=dt) * (comm.rank + 1)
    comm.allreduce_mean_(buf)
    want = np.arange(10, dtype=dt) * (comm.size + 1) / 2      # mean over ranks of r + 1
    assert buf.dtype == dt and np.allclose(cupy.asnumpy(buf), want), (dt, cupy.asnumpy(buf))
print("nccl ok", comm.rank, comm.size)
'''


@pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None, reason="needs mpi4py")
def test_nccl_missing_from_cupy_is_a_clear_error(monkeypatch):
    """cupy.cuda.nccl imports without libnccl (CuPy's pip wheels do not carry it) and only sets
    available = False: NCCLComm says so instead of failing on a missing nccl.get_unique_id."""
    import types

    nccl = types.SimpleNamespace(available=False)
    fake = types.ModuleType("cupy")
    fake.cuda = types.ModuleType("cupy.cuda")
    fake.cuda.nccl = nccl
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setitem(sys.modules, "cupy.cuda", fake.cuda)
    monkeypatch.setitem(sys.modules, "cupy.cuda.nccl", nccl)
    with pytest.raises(distributed.DistributedError, match="NCCL is not available to CuPy"):
        distributed.NCCLComm()


@pytest.mark.gpu
@need_mpi
def test_nccl_allreduce_and_the_bench_row(cupy, tmp_path):
    """NCCLComm on as many ranks as GPUs (1 when one is lent): the all-reduce mean on device buffers of
    both dtypes; then npdgm bench --distributed --backends cupy times a step through NCCL."""
    from cupy.cuda import nccl

    if not nccl.available:
        pytest.skip("CuPy has no NCCL here (cupy.cuda.nccl.available is False)")
    n = max(1, min(2, cupy.cuda.runtime.getDeviceCount()))
    (tmp_path / "nccl.py").write_text(NCCL)
    p = subprocess.run([MPIEXEC, "-n", str(n), sys.executable, str(tmp_path / "nccl.py"), str(n)],
                       capture_output=True, text=True, timeout=120, env=_env())
    assert p.returncode == 0 and p.stdout.count("nccl ok") == n, p.stdout[-2000:] + p.stderr[-2000:]
    js = tmp_path / "nccl.json"
    p = subprocess.run([sys.executable, "-m", "npdgm", "bench", "--distributed", "--backends", "cupy", "--workloads",
                        "vae", "--ranks", str(n), "--steps", "3", "--repeats", "2", "--json", str(js)],
                       capture_output=True, text=True, timeout=300, env=_env())
    assert p.returncode == 0, p.stderr[-2000:]
    (row,) = json.loads(js.read_text())["results"]
    assert row["comm"] == "nccl" and row["ranks"] == n and row["allreduce_ms"] > 0


@need_mpi
def test_a_two_rank_run_resumes_on_one_process(tmp_path):
    """Every rank holds the full state and the checkpoint is the single-process one, so N may change on
    --resume: 2 ranks for 2 epochs, then 1 process to epoch 3 = 1 process for 3 epochs."""
    args = FLOW + ["--train-limit", "255", "--batch-size", "85", "--dtype", "float64"]
    _run(args + ["--epochs", "2"], tmp_path / "two", n=2)
    p = subprocess.run([sys.executable, "-m", "npdgm", "train", "flow2d", "--resume", str(tmp_path / "two"),
                        "--epochs", "3", "--no-plots", "--no-progress"], capture_output=True, text=True,
                       timeout=TIMEOUT, env=_env())
    assert p.returncode == 0, p.stderr[-2000:]
    _run(args + ["--epochs", "3"], tmp_path / "one")
    _assert_same_run(tmp_path / "one", tmp_path / "two", 1e-10)


# -- issue 23: interrupts and divergence under MPI: rank 0 alone speaks, nobody waits for the timeout ----
@need_mpi
def test_an_interrupted_rank_stops_the_others_and_rank0_alone_reports(tmp_path):
    out = tmp_path / "r"
    t0 = time.monotonic()   # rank 1 gets SIGINT at its 13th gradient allreduce: epoch 4 of 4 batches
    p = _run([*VAE, "--train-limit", "200", "--batch-size", "50", "--epochs", "8"], out, n=2, check=False,
             env=_env(NPDGM_DIST_KILL="1:13:int", NPDGM_DIST_TIMEOUT="40"))
    assert p.returncode == 130, p.stdout[-2000:] + p.stderr[-2000:]
    assert time.monotonic() - t0 < 30   # not the collective timeout
    assert p.stderr.strip().splitlines() == [f"npdgm: interrupted (on rank 1): the checkpoint in {out} holds epoch 3; "
                                             f"continue with --resume {out}"]


@need_mpi
def test_a_diverged_two_rank_run_is_reported_once(tmp_path):
    p = _run([*VAE, "--train-limit", "200", "--batch-size", "50", "--epochs", "2", "--lr", "100"], tmp_path / "r",
             n=2, check=False, env=_env(PYTHONWARNINGS="ignore"))
    assert p.returncode == 2
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and "no checkpoint was written" in err[0], err


def test_dist_timeout_must_be_a_positive_number():
    assert distributed.timeout_from_env({}) == distributed.DEFAULT_TIMEOUT
    assert distributed.timeout_from_env({"NPDGM_DIST_TIMEOUT": "2.5"}) == 2.5
    for bad in ("abc", "-5", "0", "nan", "inf"):
        with pytest.raises(ValueError, match=f"NPDGM_DIST_TIMEOUT must be a positive number.*got '{bad}'"):
            distributed.timeout_from_env({"NPDGM_DIST_TIMEOUT": bad})


@need_mpi
def test_a_bad_dist_timeout_is_one_line_naming_the_variable(tmp_path):
    p = _run([*VAE, "--train-limit", "100", "--epochs", "1", "--distributed"], tmp_path / "r", check=False,
             env=_env(NPDGM_DIST_TIMEOUT="abc"))
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "npdgm: error: NPDGM_DIST_TIMEOUT must be a positive number of seconds (how long a collective waits for the "
        "other ranks), got 'abc'"]
