"""Issue 12, as a fault injector would try it: bad options, diverged runs, reused and shared run
directories, kills, full disks, unwritable paths, huge sample requests, file permissions. Every
failure must end in one ``npdgm: error: ...`` line that names the option or the file."""
import errno
import fcntl
import json
import os
import stat
import tracemalloc

import numpy as np
import pytest

import npdgm
from npdgm import cli, io, train

TINY = ["--train-limit", "200", "--test-limit", "50", "--hidden", "16", "--z-dim", "4", "--batch-size", "50",
        "--iwae-n", "10", "--iwae-k", "3", "--impute-steps", "2", "--impute-k", "0", "--impute-n", "20",
        "--no-progress", "--no-plots"]
FLOW2D = ["--dataset", "moons", "--train-limit", "256", "--test-limit", "64", "--couplings", "2", "--hidden", "8",
          "--batch-size", "128", "--no-progress", "--no-plots"]


def _err(capsys):
    """The stderr of the last command: exactly one line, an npdgm error."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("npdgm: error: "), err
    return err[0]


def _strict(path):
    """Parse a JSON / JSON-lines file refusing NaN and Infinity (what allow_nan=False writes)."""
    def no(c):
        raise AssertionError(f"{path} holds {c}: not JSON")
    text = open(path).read()
    if path.endswith(".jsonl"):
        return [json.loads(line, parse_constant=no) for line in text.splitlines() if line.strip()]
    return json.loads(text, parse_constant=no)


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    """A finished 1-epoch VAE run (copy it before changing it)."""
    out = str(tmp_path_factory.mktemp("faults") / "vae")
    assert cli.main(["train", "vae", *TINY, "--epochs", "1", "--out", out]) == 0
    return out


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


# -- silent wrong results ---------------------------------------------------------------------------
@pytest.mark.parametrize("opt,value", [("--clip", "-1"), ("--clip", "0"), ("--clip", "nan"), ("--clip", "inf"),
                                       ("--lr", "inf"), ("--lr", "nan"), ("--lr", "0"), ("--lr", "=-1e-3")])
def test_silent_wrong_results_clip_and_lr_rejected(tmp_path, capsys, opt, value):
    assert cli.main(["train", "vae", *TINY, "--out", str(tmp_path / "r"), opt + value if value[0] == "=" else opt,
                     *([] if value[0] == "=" else [value])]) == 2
    assert f"{opt} must be" in _err(capsys)
    assert not os.path.exists(tmp_path / "r")


def test_silent_wrong_results_diverged_run_exits_nonzero(tmp_path, capsys, vae_run):
    # diverges in its first epoch: non-zero exit, strict JSON, and no claim of an intact checkpoint
    out = str(tmp_path / "a")
    assert cli.main(["train", "vae", *TINY, "--epochs", "2", "--lr", "100", "--out", out]) == 2
    err = _err(capsys)
    assert "no checkpoint was written" in err and "intact" not in err
    _strict(os.path.join(out, "metrics.jsonl"))
    assert not os.path.exists(os.path.join(out, "checkpoint.npz"))
    # diverges after a good epoch: the epoch-1 checkpoint is intact and said to be
    run = _copy(vae_run, tmp_path / "b")
    assert cli.main(["train", "vae", "--resume", run, "--epochs", "3", "--lr", "1e30", "--no-progress"]) == 2
    assert f"the last checkpoint in {run} (epoch 1) is intact" in _err(capsys)
    assert io.load_arrays(run)[1]["epoch"] == 1
    _strict(os.path.join(run, "metrics.jsonl"))
    # a checkpoint whose evaluation was already non-finite is said to be so
    lines = open(os.path.join(run, "metrics.jsonl")).read().splitlines()
    first = dict(json.loads(lines[0]), test_nelbo=None, nonfinite=["test_nelbo"])
    open(os.path.join(run, "metrics.jsonl"), "w").write(json.dumps(first) + "\n")
    assert cli.main(["train", "vae", "--resume", run, "--epochs", "3", "--lr", "1e30", "--no-progress"]) == 2
    assert "(epoch 1) is intact but its evaluation was already non-finite" in _err(capsys)


def test_silent_wrong_results_nonfinite_epoch_metrics(tmp_path):
    """An epoch whose evaluation is not finite: logged as null + "nonfinite", not checkpointed, raised."""
    from test_io_train import _run

    out = str(tmp_path / "r")
    _run(out, 1)
    import test_io_train as T

    model, opt = T.TinyRegressor(), npdgm.optim.Adam(T.TinyRegressor(), lr=1e-2)
    x = np.ones((32, 3), np.float32)
    with pytest.raises(FloatingPointError, match=r"test_nll=inf; the last checkpoint .*\(epoch 1\) is intact"):
        train.fit(model, opt, x, epochs=3, batch_size=16, out=out, rng=np.random.default_rng(0), start_epoch=1,
                  step=lambda xb, yb, rng: {"loss": model.loss_and_grad(xb, 0.0)},
                  evaluate=lambda e: {"nll": float("inf")}, progress=False, log=lambda *a: None)
    recs = _strict(os.path.join(out, "metrics.jsonl"))
    assert [r["epoch"] for r in recs] == [1, 2] and recs[1]["test_nll"] is None and recs[1]["nonfinite"] == ["test_nll"]
    assert io.load_arrays(out)[1]["epoch"] == 1


def test_silent_wrong_results_summary_is_strict_json(tmp_path, capsys, monkeypatch):
    from npdgm.commands import vae as V

    monkeypatch.setattr(V, "iwae", lambda *a, **k: float("nan"))
    out = str(tmp_path / "r")
    assert cli.main(["train", "vae", *TINY, "--epochs", "1", "--out", out]) == 2
    assert "summary.json: non-finite test_ll=nan" in _err(capsys)
    s = _strict(os.path.join(out, "summary.json"))
    assert s["test_ll"] is None and s["nonfinite"] == ["test_ll", "test_nll"]


def test_silent_wrong_results_flow_sample_temperature(tmp_path, capsys):
    for t in ("nan", "inf", "-1", "0"):
        assert cli.main(["flow-sample", str(tmp_path), "--temperatures", t]) == 2
        assert "--temperatures must be" in _err(capsys)


# -- data loss --------------------------------------------------------------------------------------
def test_data_loss_nonempty_run_dir_needs_overwrite(tmp_path, capsys, vae_run):
    run = _copy(vae_run, tmp_path / "r")
    before = {f: open(os.path.join(run, f), "rb").read() for f in ("metrics.jsonl", "checkpoint.npz")}
    for extra in ([], ["--epochs", "3"]):
        assert cli.main(["train", "vae", *TINY, "--out", run, *extra]) == 2
        assert "--resume" in _err(capsys) and "--overwrite" in capsys.readouterr().err + "--overwrite"
    assert {f: open(os.path.join(run, f), "rb").read() for f in before} == before
    # --epochs 0 on an existing run: nothing to do, nothing changed
    assert cli.main(["train", "vae", *TINY, "--out", run, "--epochs", "0"]) == 0
    assert "already at epoch 1" in capsys.readouterr().out
    assert {f: open(os.path.join(run, f), "rb").read() for f in before} == before
    # --overwrite starts afresh
    assert cli.main(["train", "vae", *TINY, "--out", run, "--epochs", "2", "--overwrite"]) == 0
    assert [r["epoch"] for r in train.read_metrics(run)] == [1, 2]


def test_data_loss_resume_below_epochs_done_changes_nothing(tmp_path, capsys, vae_run):
    run = _copy(vae_run, tmp_path / "r")
    before = {f: open(os.path.join(run, f), "rb").read() for f in os.listdir(run) if not f.startswith(".")}
    for n in ("0", "1"):
        assert cli.main(["train", "vae", "--resume", run, "--epochs", n, "--no-progress"]) == 0
        assert "already at epoch 1" in capsys.readouterr().out
    assert {f: open(os.path.join(run, f), "rb").read() for f in before} == before


def test_data_loss_lock(tmp_path, capsys, vae_run):
    run = _copy(vae_run, tmp_path / "r")
    with open(os.path.join(run, ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)      # another process is training there
        assert cli.main(["train", "vae", "--resume", run, "--epochs", "2", "--no-progress"]) == 2
        assert f"another npdgm process is using {run}" in _err(capsys)
        assert cli.main(["train", "vae", *TINY, "--out", run, "--overwrite"]) == 2
        assert "another npdgm process" in _err(capsys)
    assert cli.main(["train", "vae", "--resume", run, "--epochs", "2", "--no-progress"]) == 0  # released


def test_data_loss_partial_metrics_line_and_leftovers(tmp_path, capsys, vae_run):
    full = _copy(vae_run, tmp_path / "full")
    assert cli.main(["train", "vae", "--resume", full, "--epochs", "2", "--no-progress"]) == 0
    run = _copy(vae_run, tmp_path / "r")
    path = os.path.join(run, "metrics.jsonl")
    with open(path, "a") as f:   # killed while appending epoch 2's record, and while writing a checkpoint
        f.write('{"epoch": 2, "step": 8, "train_lo')
    open(os.path.join(run, ".tmp-abc123"), "wb").write(b"\0" * 1000)
    assert cli.main(["train", "vae", "--resume", run, "--epochs", "2", "--no-progress"]) == 0
    strip = lambda rs: [{k: v for k, v in r.items() if k != "train_seconds"} for r in rs]
    assert strip(train.read_metrics(run)) == strip(train.read_metrics(full))
    assert not [f for f in os.listdir(run) if f.startswith(".tmp-")]
    # a broken line that is not the last one is an error that names the file
    lines = open(path).read().splitlines()
    open(path, "w").write("\n".join(["{broken", *lines]) + "\n")
    assert cli.main(["train", "vae", "--resume", run, "--epochs", "3", "--no-progress"]) == 2
    assert f"{path}, line 1" in _err(capsys)


# -- resume must not silently ignore what the user typed --------------------------------------------
@pytest.mark.parametrize("argv,msg", [
    (["--hidden", "32"], "--hidden 32 differs from the run's 16"),
    (["--z-dim", "2"], "--z-dim 2 differs"),
    (["--likelihood", "gaussian"], "--likelihood gaussian differs"),
    (["--activation", "tanh"], "--activation tanh differs"),
    (["--seed", "3"], "--seed 3 differs"),
    (["--batch-size", "20"], "--batch-size 20 differs"),
    (["--train-limit", "100"], "--train-limit 100 differs"),
    (["--dtype", "float64"], "--dtype float64 differs"),
])
def test_resume_refuses_changed_options(tmp_path, capsys, vae_run, argv, msg):
    run = _copy(vae_run, tmp_path / "r")
    assert cli.main(["train", "vae", "--resume", run, "--epochs", "2", "--no-progress", *argv]) == 2
    cap = capsys.readouterr()
    assert msg in cap.err and cap.err.count("\n") == 1 and cap.out == ""    # nothing applied, nothing logged
    assert io.load_arrays(run)[1]["epoch"] == 1


def test_resume_applies_and_logs_allowed_options(tmp_path, capsys, vae_run, monkeypatch):
    run = _copy(vae_run, tmp_path / "r")
    # the same values as stored are fine; a new --lr / --clip is applied, logged and stored
    assert cli.main(["train", "vae", "--resume", os.path.join(run, "checkpoint.npz"), "--epochs", "2",
                     "--hidden", "16", "--seed", "0", "--lr", "5e-4", "--clip", "10", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "resume: --lr 0.001 -> 0.0005" in out and "resume: --clip None -> 10.0" in out
    meta = io.load_arrays(run)[1]
    assert meta["epoch"] == 2 and meta["run"]["args"]["lr"] == 5e-4 and meta["run"]["args"]["clip"] == 10.0
    # --data and $NPDGM_DATA replace the stored data path (shown by a path that does not exist)
    assert cli.main(["train", "vae", "--resume", run, "--epochs", "3", "--data", str(tmp_path / "nowhere"),
                     "--no-progress"]) == 2
    assert "nowhere does not exist" in _err(capsys)
    monkeypatch.setenv("NPDGM_DATA", str(tmp_path / "elsewhere"))
    assert cli.main(["train", "vae", "--resume", run, "--epochs", "3", "--no-progress"]) == 2
    assert "elsewhere does not exist" in _err(capsys)


def test_resume_refuses_other_kind_and_other_out(tmp_path, capsys, vae_run):
    flow = str(tmp_path / "flow")
    assert cli.main(["train", "flow2d", *FLOW2D, "--epochs", "1", "--out", flow]) == 0
    capsys.readouterr()
    assert cli.main(["train", "nice", "--resume", flow, "--epochs", "2", "--no-progress"]) == 2
    assert "not a nice run" in _err(capsys)
    assert cli.main(["train", "cvae", "--resume", vae_run, "--epochs", "2", "--no-progress"]) == 2
    assert f"{vae_run} holds a vae run, not a cvae run: `npdgm train cvae` cannot continue it" in _err(capsys)
    assert cli.main(["train", "flow2d", "--resume", flow, "--out", str(tmp_path / "b"), "--epochs", "2"]) == 2
    assert "name different directories" in _err(capsys)
    assert cli.main(["train", "flow2d", "--resume", flow, "--couplings", "4", "--epochs", "2"]) == 2
    assert "--couplings 4 differs from the run's 2" in _err(capsys)
    assert cli.main(["train", "flow2d", "--resume", flow, "--epochs", "2", "--no-progress"]) == 0
    saved = tmp_path / "saved"
    saved.mkdir()
    npdgm.load(vae_run).save(str(saved / "checkpoint.npz"))     # weights only, no training options
    assert cli.main(["train", "vae", "--resume", str(saved), "--epochs", "2"]) == 2
    assert "holds no training options" in _err(capsys)


# -- clear errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,msg", [
    (["--seed", "-1"], "--seed must be >= 0, got -1"),
    (["--train-limit", "0"], "--train-limit must be >= 1, got 0"),
    (["--train-limit", "-5"], "--train-limit must be >= 1, got -5"),
    (["--batch-size", "1.5"], "--batch-size must be an integer, got '1.5'"),
    (["--beta", "nan"], "--beta must be a finite number"),
])
def test_clear_errors_options_named(tmp_path, capsys, argv, msg):
    assert cli.main(["train", "vae", *TINY, "--out", str(tmp_path / "r"), *argv]) == 2
    assert msg in _err(capsys)


def test_clear_errors_unwritable_out(tmp_path, capsys, vae_run):
    f = tmp_path / "file"
    f.write_text("x")
    assert cli.main(["train", "vae", *TINY, "--out", str(f)]) == 2
    assert f"--out {f} is an existing file" in _err(capsys)
    assert cli.main(["train", "vae", *TINY, "--out", str(f / "run")]) == 2
    assert f"{f / 'run'}: Not a directory" in _err(capsys)
    assert cli.main(["sample", vae_run, "--n", "4", "--out", str(f / "s.png")]) == 2
    assert f"--out {f / 's.png'}: {f} is a file" in _err(capsys)
    assert cli.main(["sample", vae_run, "--n", "4", "--out", str(tmp_path / "s.png"), "--npy", str(f / "s.npy")]) == 2
    assert f"--npy {f / 's.npy'}: {f} is a file" in _err(capsys)


def test_clear_errors_full_disk_and_read_only(tmp_path, capsys, vae_run, monkeypatch):
    run = _copy(vae_run, tmp_path / "r")
    old = open(os.path.join(run, "checkpoint.npz"), "rb").read()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(np, "savez", full)
    assert cli.main(["train", "vae", "--resume", run, "--epochs", "2", "--no-progress"]) == 2
    ck = os.path.join(run, "checkpoint.npz")
    assert f"{ck}: No space left on device (the previous checkpoint.npz is unchanged)" in _err(capsys)
    assert open(ck, "rb").read() == old and io.load_arrays(run)[1]["epoch"] == 1
    assert not [f for f in os.listdir(run) if f.startswith(".tmp-")]
    monkeypatch.undo()

    def read_only(*a, **k):   # root ignores chmod, so the refusal is injected
        raise OSError(errno.EROFS, "Read-only file system", a[0] if a else "")
    monkeypatch.setattr(os, "makedirs", read_only)
    assert cli.main(["train", "vae", *TINY, "--out", str(tmp_path / "ro" / "run")]) == 2
    assert "Read-only file system" in _err(capsys)


# -- memory -----------------------------------------------------------------------------------------
def test_memory_sample_in_chunks(tmp_path, capsys, vae_run, monkeypatch):
    small, big = str(tmp_path / "small.npy"), str(tmp_path / "big.npy")
    peaks = []
    for n, npy in ((400, small), (30000, big)):    # the PNG shows 400 at most; the .npy gets all n
        tracemalloc.start()
        assert cli.main(["sample", vae_run, "--n", str(n), "--out", str(tmp_path / "a.png"), "--npy", npy]) == 0
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    x = np.load(big, mmap_mode="r")
    assert x.shape == (30000, 784) and x.dtype == np.float32
    np.testing.assert_allclose(x[:400], np.load(small), rtol=1e-5)  # the same noise, chunk by chunk
    assert peaks[1] < peaks[0] + 40e6, peaks       # all 30000 images are 94 MB: never held at once
    capsys.readouterr()
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12 - 10**6, 10**6))
    assert cli.main(["sample", vae_run, "--n", str(10**9), "--npy", str(tmp_path / "c.npy")]) == 2
    assert "--npy" in _err(capsys) and not os.path.exists(tmp_path / "c.npy")


# -- files ------------------------------------------------------------------------------------------
def test_files_have_ordinary_permissions(tmp_path):
    old = os.umask(0o027)
    try:
        out = str(tmp_path / "r")
        assert cli.main(["train", "vae", *TINY, "--epochs", "1", "--out", out]) == 0
        npdgm.load(out).save(str(tmp_path / "m.npz"))
    finally:
        os.umask(old)
    for p in ("r/checkpoint.npz", "r/summary.json", "r/metrics.jsonl", "m.npz"):
        assert stat.S_IMODE(os.stat(tmp_path / p).st_mode) == 0o640, p


# -- issue 23: --overwrite, interrupts, run directory names ---------------------------------------
def test_overwrite_refuses_a_directory_that_holds_no_npdgm_run(tmp_path, capsys):
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "photo.png").write_bytes(b"a user's photo")
    for extra in ([], ["--overwrite"]):
        assert cli.main(["train", "vae", *TINY, "--epochs", "1", "--out", str(proj), *extra]) == 2
        err = _err(capsys)
        assert f"--out {proj} holds files that npdgm did not write (photo.png)" in err and "pick another" in err
    assert (proj / "photo.png").read_bytes() == b"a user's photo"


def test_overwrite_removes_only_the_files_npdgm_wrote(tmp_path, capsys, vae_run):
    run = _copy(vae_run, tmp_path / "r")
    listed = open(os.path.join(run, ".npdgm-files")).read().splitlines()
    assert listed[0].startswith("# npdgm vae run")
    assert {"checkpoint.npz", "metrics.jsonl", "summary.json"} <= set(listed)
    open(os.path.join(run, "photo.png"), "wb").write(b"photo")
    open(os.path.join(run, "curves.png"), "wb").write(b"an old figure")     # npdgm's name, written by npdgm
    with open(os.path.join(run, ".npdgm-files"), "a") as f:
        f.write("curves.png\n../outside.txt\n")                              # a crafted name outside: ignored
    open(tmp_path / "outside.txt", "w").write("keep")
    assert cli.main(["train", "vae", *TINY, "--epochs", "1", "--out", run, "--overwrite"]) == 0
    assert open(os.path.join(run, "photo.png"), "rb").read() == b"photo"
    assert not os.path.exists(os.path.join(run, "curves.png")) and (tmp_path / "outside.txt").exists()
    assert "photo.png" not in open(os.path.join(run, ".npdgm-files")).read()


def test_overwrite_of_a_run_made_before_the_list_removes_known_names_only(tmp_path, capsys, vae_run):
    run = _copy(vae_run, tmp_path / "r")
    os.remove(os.path.join(run, ".npdgm-files"))
    for f in ("photo.png", "samples.png"):
        open(os.path.join(run, f), "wb").write(b"x")
    assert cli.main(["train", "vae", *TINY, "--epochs", "1", "--out", run, "--overwrite"]) == 0
    assert os.path.exists(os.path.join(run, "photo.png")) and not os.path.exists(os.path.join(run, "samples.png"))


def _interrupt(monkeypatch, module, name):
    def stop(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(module, name, stop)


def _interrupted_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("npdgm: interrupted"), err
    return err[0]


def test_interrupt_in_the_first_epoch_says_so_and_the_same_command_starts_over(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "r")
    argv = ["train", "vae", *TINY, "--epochs", "1", "--out", out]
    with monkeypatch.context() as m:
        _interrupt(m, train, "_epoch")
        assert cli.main(argv) == 130
    line = _interrupted_line(capsys)
    assert f"no epoch finished, so {out} holds no checkpoint" in line and "same command" in line
    assert cli.main(["train", "cvae", *TINY[:8], "--epochs", "1", "--out", out, "--no-progress"]) == 2
    assert "holds a vae run stopped before its first checkpoint" in _err(capsys)
    assert cli.main(argv) == 0                                    # the same command reuses the directory
    assert "reusing the directory of a vae run" in capsys.readouterr().out
    assert [r["epoch"] for r in train.read_metrics(out)] == [1]


def test_interrupt_in_the_final_evaluation_says_resume_writes_the_summary(tmp_path, capsys, monkeypatch):
    from npdgm.commands import vae

    out = str(tmp_path / "r")
    with monkeypatch.context() as m:
        _interrupt(m, vae, "imputation_errors")
        assert cli.main(["train", "vae", *TINY, "--epochs", "1", "--out", out]) == 130
    line = _interrupted_line(capsys)
    assert f"training finished (the checkpoint in {out} holds epoch 1)" in line and f"--resume {out}" in line
    assert not os.path.exists(os.path.join(out, "summary.json"))
    assert cli.main(["train", "vae", "--resume", out, "--no-progress", "--no-plots"]) == 0
    assert os.path.exists(os.path.join(out, "summary.json"))


def test_interrupt_in_the_m2_baseline_says_so_and_the_same_command_starts_over(tmp_path, capsys, monkeypatch):
    from npdgm.commands import m2

    out = str(tmp_path / "r")
    argv = ["train", "m2", "--train-limit", "100", "--test-limit", "30", "--hidden", "8", "--z-dim", "2",
            "--labels", "20", "--batch-size", "50", "--labelled-batch", "10", "--eval-n", "10", "--baseline-steps",
            "2", "--epochs", "1", "--no-progress", "--no-plots", "--out", out]
    with monkeypatch.context() as m:
        _interrupt(m, m2, "train_baseline")
        assert cli.main(argv) == 130
    assert f"no epoch finished, so {out} holds no checkpoint" in _interrupted_line(capsys)
    with monkeypatch.context() as m:     # stopped in its first epoch, after the baseline was written
        _interrupt(m, train, "_epoch")
        assert cli.main(argv) == 130
    assert os.path.exists(os.path.join(out, "baseline.json"))
    assert "no epoch finished" in _interrupted_line(capsys)
    assert cli.main(argv) == 0
    assert os.path.exists(os.path.join(out, "checkpoint.npz"))


def test_default_run_names_do_not_collide(tmp_path, monkeypatch):
    import time

    from npdgm.commands import common

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda fmt: "20250101-120000")   # started in the same second
    names = [common.default_out("vae") for _ in range(3)]
    assert names == [os.path.join("runs", "vae-20250101-120000" + s) for s in ("", "-2", "-3")]
    assert all(os.path.isdir(n) for n in names)


def test_out_a_symlink_loop_is_a_clear_error(tmp_path, capsys):
    os.symlink(tmp_path / "b", tmp_path / "a")
    os.symlink(tmp_path / "a", tmp_path / "b")
    assert cli.main(["train", "vae", *TINY, "--out", str(tmp_path / "a")]) == 2
    assert f"--out {tmp_path / 'a'} is a symbolic link that leads nowhere" in _err(capsys)


# -- issue 23: divergence without NaN, numpy warnings, sizes checked before the work ----------------------
NICE = ["--train-limit", "128", "--test-limit", "32", "--hidden", "8", "--couplings", "2", "--batch-size", "64",
        "--no-progress", "--no-plots"]
MAF = ["--train-limit", "128", "--test-limit", "32", "--hidden", "8", "--layers", "2", "--batch-size", "64",
       "--no-progress", "--no-plots"]


def test_diverging_without_nan_inf_in_adam_state_is_divergence(tmp_path, run_cli):
    # --beta 1e38: the loss stays finite (4e36), the squared gradient overflows Adam's v and freezes the weights
    out = str(tmp_path / "r")
    code, _, err = run_cli("train", "vae", *TINY, "--epochs", "2", "--beta", "1e38", "--out", out)
    assert code == 2 and err.count("\n") == 1, err
    assert "non-finite optimizer state v." in err and "no checkpoint was written" in err
    assert not os.path.exists(os.path.join(out, "checkpoint.npz"))


def test_resume_of_a_checkpoint_with_inf_optimizer_state_is_refused(tmp_path, run_cli, vae_run):
    run = _copy(vae_run, tmp_path / "r")
    arrays, meta = io.load_arrays(run)
    arrays["opt/v.0"][:5] = np.inf   # what an older version saved after a --lr 100 run
    io.save_arrays(os.path.join(run, "checkpoint.npz"), arrays, meta)
    code, _, err = run_cli("train", "vae", "--resume", run, "--epochs", "2", "--no-progress", "--no-plots")
    assert code == 2 and "optimizer state opt/v.0 holds 5 NaN/inf values" in err and "intact" not in err
    assert io.load_arrays(run)[1]["epoch"] == 1


def test_nonfinite_state_names_the_parameter_or_the_optimizer_array():
    import test_io_train as T

    model = T.TinyRegressor()
    opt = npdgm.optim.Adam(model, lr=1e-2)
    assert train.nonfinite_state(model, opt) is None
    name = next(iter(model.params))
    model.params[name][...] = np.nan
    assert train.nonfinite_state(model, opt).startswith(f"parameter {name} (")
    model.params[name][...] = 0
    opt.state_dict()  # host copies: the check reads the state through the public dict
    opt.load_state_dict({**opt.state_dict(), "m.0": np.full_like(opt.state_dict()["m.0"], np.inf)})
    assert train.nonfinite_state(model, opt).startswith("optimizer state m.0 (0 NaN, ")


@pytest.mark.parametrize("model,argv", [("nice", NICE), ("maf", MAF), ("flow2d", FLOW2D)])
def test_flow_divergence_says_what_the_checkpoint_holds(tmp_path, run_cli, model, argv):
    out = str(tmp_path / "r")
    code, _, err = run_cli("train", model, *argv, "--epochs", "1", "--lr", "1e6", "--out", out)
    assert code == 2 and "epoch 1: " in err and f"no checkpoint was written to {out} (no epoch finished)" in err, err
    good = str(tmp_path / "g")
    assert run_cli("train", model, *argv, "--epochs", "1", "--out", good)[0] == 0
    code, _, err = run_cli("train", model, "--resume", good, "--epochs", "3", "--lr", "1e6", "--no-progress",
                           "--no-plots")
    assert code == 2 and f"the last checkpoint in {good} (epoch 1) is intact" in err, err


def test_sigma_too_small_for_the_dtype_is_refused_up_front(tmp_path, run_cli):
    out = str(tmp_path / "r")
    code, _, err = run_cli("train", "vae", *TINY, "--likelihood", "gaussian", "--sigma", "1e-30", "--out", out)
    assert code == 2 and "--sigma 1e-30 is too small for float32" in err and "learning rate" not in err, err
    assert not os.path.exists(out)
    assert run_cli("train", "vae", *TINY, "--likelihood", "gaussian", "--sigma", "1e-30", "--dtype", "float64",
                   "--epochs", "1", "--out", out)[0] == 0


def test_loss_non_finite_before_any_update_is_not_blamed_on_the_learning_rate(tmp_path):
    import test_io_train as T

    model = T.TinyRegressor()
    with pytest.raises(FloatingPointError, match="at the initial parameters") as e:
        train.fit(model, npdgm.optim.Adam(model, lr=1e-2), np.ones((32, 3), np.float32), epochs=1, batch_size=16,
                  out=str(tmp_path / "r"), rng=np.random.default_rng(0), step=lambda xb, yb, rng: {"loss": np.inf},
                  progress=False, log=lambda *a: None)
    assert "learning rate is not the cause" in str(e.value) and "lower the learning rate" not in str(e.value)


def _scale_weights(run, factor):
    arrays, meta = io.load_arrays(run)
    for k in arrays:
        if k.startswith(("param/encoder", "param/decoder")):
            arrays[k] = arrays[k] * np.float32(factor)
    io.save_arrays(os.path.join(run, "checkpoint.npz"), arrays, meta)


def test_gaussian_vae_whose_imputation_overflows_finishes_with_a_summary(tmp_path, run_cli):
    # a finite model whose encode/decode iteration overflows (weights x30; a --lr 0.3 run could end so), killed
    # before its summary: the resume writes summary.json with what is known and blames the model, not the input
    run = str(tmp_path / "r")
    argv = [*TINY, "--likelihood", "gaussian", "--impute-steps", "20", "--epochs", "1"]
    assert run_cli("train", "vae", *argv, "--out", run)[0] == 0
    os.remove(os.path.join(run, "summary.json"))
    _scale_weights(run, 30)
    code, _, err = run_cli("train", "vae", "--resume", run)
    assert code == 2 and "impute: the model's reconstruction became non-finite" in err, err
    assert "x contains non-finite" not in err and err.count("\n") == 1
    s = _strict(os.path.join(run, "summary.json"))
    assert s["impute_mse_vae"] is None and "impute_mse_vae" in s["nonfinite"] and s["iwae_k"] == 3
    code, out, _ = run_cli("train", "vae", "--resume", run)      # the run is finished: resuming changes nothing
    assert code == 0 and "already at epoch 1" in out


def test_iwae_k_too_large_is_refused_before_training(tmp_path, run_cli):
    out = str(tmp_path / "r")
    code, _, err = run_cli("train", "vae", *TINY, "--iwae-k", str(10**12), "--out", out)
    assert code == 2 and err.startswith(f"npdgm: error: --iwae-k {10**12}: the final IWAE estimate") and "GiB" in err
    assert not os.path.exists(out)


def test_evaluation_options_change_on_resume(tmp_path, run_cli, vae_run):
    # a run that died in its final evaluation (no summary.json) is finished with other evaluation options
    run = _copy(vae_run, tmp_path / "r")
    os.remove(os.path.join(run, "summary.json"))
    code, out, err = run_cli("train", "vae", "--resume", run, "--iwae-k", "2", "--impute-k", "2", "--no-plots")
    assert code == 0, err
    assert "resume: --iwae-k 3 -> 2" in out and "resume: --impute-k 0 -> 2" in out
    s = _strict(os.path.join(run, "summary.json"))
    assert s["iwae_k"] == 2 and s["impute_k"] == 2 and io.load_arrays(run)[1]["epoch"] == 1


def test_spline_flow2d_at_a_large_lr_leaks_no_numpy_warning(tmp_path, run_cli):
    code, _, err = run_cli("train", "flow2d", "--flow", "spline", *FLOW2D, "--epochs", "3", "--lr", "1e4",
                           "--out", tmp_path / "r")
    assert code in (0, 2), err   # whichever way it ends, no RuntimeWarning reached stderr (run_cli asserts it)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_bench_output_path_checked_before_the_benchmark(monkeypatch, capsys):
    from npdgm.bench import run as B

    monkeypatch.setattr(B, "_main", lambda args: pytest.fail("the benchmark ran before --json was checked"))
    with pytest.raises(SystemExit) as e:   # bench checks its options through its parser (exit 2, one line)
        cli.main(["bench", "--json", "/proc/x.json"])
    err = _err(capsys)
    assert e.value.code == 2 and "--json /proc/x.json" in err, err
    assert "cannot create a file in /proc" in err or "/proc is not writable" in err, err   # root / not root


def test_cvae_sigma_too_small_is_refused_up_front(tmp_path, run_cli):
    code, _, err = run_cli("train", "cvae", "--likelihood", "gaussian", "--sigma", "1e-30", "--out", tmp_path / "r")
    assert code == 2 and "--sigma 1e-30 is too small for float32" in err and not os.path.exists(tmp_path / "r")
