"""Checkpoints (atomic, validated) and the shared training loop (metrics, resume bit-for-bit)."""
import json
import os

import numpy as np
import pytest

from npdgm import io, optim, train
from npdgm.models import registry
from npdgm.kernels import mse_backward, mse_forward
from npdgm.models.base import Model
from npdgm.nn import MLP


@registry.register_model
class TinyRegressor(Model):
    kind = "test-tiny"

    def __init__(self, hidden=8, seed=0):
        super().__init__(hidden=hidden, seed=seed)
        self.net = MLP(3, [hidden], 1, activation="tanh", rng=seed)
        self.flatten()

    def loss_and_grad(self, x, noise):
        y = x[:, :1] * 2 + noise
        pred = self.net.forward(x)
        loss = mse_forward(pred, y)
        self.net.backward(mse_backward(1.0, pred, y), need_dx=False)
        return loss


def _run(out, epochs, start=0, model=None, opt=None, rng=None):
    x = np.random.default_rng(0).standard_normal((64, 3)).astype(np.float32)
    model = model or TinyRegressor()
    opt = opt or optim.Adam(model, lr=1e-2)
    rng = rng or np.random.default_rng(5)

    def step(xb, yb, rng):
        return {"loss": model.loss_and_grad(xb, rng.standard_normal((len(xb), 1), dtype=np.float32) * 0.1)}

    recs = train.fit(model, opt, x, epochs=epochs, batch_size=16, out=out, rng=rng, step=step,
                     evaluate=lambda e: {"loss": 0.5}, start_epoch=start, run_meta={"hidden": 8},
                     progress=False, log=lambda *a: None)
    return model, recs


def test_fit_writes_metrics_and_checkpoint(tmp_path):
    out = str(tmp_path / "run")
    model, recs = _run(out, 3)
    lines = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["epoch"] for r in lines] == [1, 2, 3] and lines == recs
    assert lines[-1]["train_loss"] < lines[0]["train_loss"] and lines[0]["test_loss"] == 0.5
    loaded = registry.load(out)
    assert isinstance(loaded, TinyRegressor)
    for k, v in model.params.items():
        assert np.array_equal(loaded.params[k], v)
    arrays, meta = io.load_arrays(os.path.join(out, "checkpoint.npz"))
    assert meta["epoch"] == 3 and meta["run"] == {"hidden": 8}
    assert [l[0] for l in meta["layout"]] == list(model.params) and meta["layout"][1][2] == 3 * 8


def test_resume_is_bit_for_bit(tmp_path):
    full, _ = _run(str(tmp_path / "full"), 3)
    part = str(tmp_path / "part")
    _run(part, 1)
    model = registry.load(part)
    opt = optim.Adam(model, lr=1e-2)
    rng, epoch = train.restore_checkpoint(part, opt)
    assert epoch == 1
    resumed, _ = _run(part, 3, start=epoch, model=model, opt=opt, rng=rng)
    for k, v in full.params.items():
        assert np.array_equal(resumed.params[k], v), k
    assert [r["epoch"] for r in train.read_metrics(part)] == [1, 2, 3]


def test_nan_loss_stops_with_a_clear_error(tmp_path):
    model = TinyRegressor()
    opt = optim.SGD(model, lr=1e6)
    x = np.random.default_rng(0).standard_normal((64, 3)).astype(np.float32) * 100

    def step(xb, yb, rng):
        return {"loss": model.loss_and_grad(xb, np.zeros((len(xb), 1), np.float32))}

    with pytest.raises(FloatingPointError, match="loss became"):
        with np.errstate(all="ignore"):
            train.fit(model, opt, x, epochs=50, batch_size=8, out=str(tmp_path), rng=np.random.default_rng(0),
                      step=step, progress=False, log=lambda *a: None)


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    p = tmp_path / "ck.npz"
    io.save_arrays(p, {"a": np.arange(3)}, {"kind": "x"})

    def boom(f):
        f.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        io.atomic_write_bytes(p, boom)
    arrays, meta = io.load_arrays(p)
    assert np.array_equal(arrays["a"], np.arange(3)) and meta["kind"] == "x"
    assert [f.name for f in tmp_path.iterdir()] == ["ck.npz"]


def test_corrupt_and_mismatched_checkpoints(tmp_path):
    p = tmp_path / "c.npz"
    p.write_bytes(b"garbage")
    with pytest.raises(io.CheckpointError, match="corrupt or truncated"):
        registry.load(p)
    with pytest.raises(io.CheckpointError, match="no checkpoint"):
        registry.load(tmp_path / "missing.npz")
    np.savez(p, a=np.zeros(2))
    with pytest.raises(io.CheckpointError, match="no __meta__"):
        registry.load(p)
    TinyRegressor().save(p)
    arrays, meta = io.load_arrays(p)
    meta["config"]["hidden"] = 5
    io.save_arrays(p, arrays, meta)
    with pytest.raises(io.CheckpointError, match="weights do not match"):
        registry.load(p)
    meta["kind"] = "nope"
    io.save_arrays(p, arrays, meta)
    with pytest.raises(io.CheckpointError, match="unknown model kind 'nope'"):
        registry.load(p)
    full = open(tmp_path / "c.npz", "rb").read()
    (tmp_path / "t.npz").write_bytes(full[: len(full) // 2])
    with pytest.raises(io.CheckpointError):
        registry.load(tmp_path / "t.npz")


def test_fit_batches_labels_with_their_rows(tmp_path):
    """fit(model, opt, x, y): the step gets (xb, yb) with yb the labels of xb's rows, shuffled alike."""
    model = TinyRegressor()
    opt = optim.SGD(model, lr=1e-6)
    x = np.arange(50, dtype=np.float32)[:, None].repeat(3, 1)
    y = np.arange(50) * 10
    seen = []

    def step(xb, yb, rng):
        seen.append((xb[:, 0].astype(int), yb))
        return {"loss": model.loss_and_grad(xb, np.zeros((len(xb), 1), np.float32))}

    train.fit(model, opt, x, y, epochs=2, batch_size=16, out=str(tmp_path), rng=np.random.default_rng(0), step=step,
              progress=False, log=lambda *a: None)
    assert len(seen) == 8 and all(np.array_equal(xi * 10, yi) for xi, yi in seen)
    assert sorted(np.concatenate([xi for xi, _ in seen[:4]])) == list(range(50))
    with pytest.raises(ValueError, match="train_y has 3 rows"):
        train.fit(model, opt, x, y[:3], epochs=1, batch_size=16, out=str(tmp_path), rng=np.random.default_rng(0),
                  step=step, progress=False, log=lambda *a: None)


def test_fit_interrupted_says_what_the_checkpoint_holds(tmp_path, capsys, monkeypatch):
    """Ctrl-C in epoch 2: train.Interrupted (a KeyboardInterrupt) names the epoch of the intact checkpoint and
    prints nothing itself (the command line prints it once, on stderr)."""
    out = str(tmp_path / "run")
    calls, epoch = [0], train._epoch

    def stop_in_epoch_2(*a, **k):
        calls[0] += 1
        if calls[0] == 2:
            raise KeyboardInterrupt
        return epoch(*a, **k)
    monkeypatch.setattr(train, "_epoch", stop_in_epoch_2)
    with pytest.raises(train.Interrupted) as e:
        _run(out, 3)
    assert isinstance(e.value, KeyboardInterrupt) and e.value.saved == 1
    assert str(e.value) == f"interrupted: the checkpoint in {out} holds epoch 1; continue with --resume {out}"
    assert capsys.readouterr().out == "" and io.load_arrays(out)[1]["epoch"] == 1


def test_writes_into_a_run_directory_are_listed(tmp_path):
    from npdgm import runfiles

    run, other = tmp_path / "run", tmp_path / "other"
    run.mkdir()
    other.mkdir()
    runfiles.start_list(str(run), "vae")
    for _ in range(2):
        io.atomic_write_bytes(run / "a.json", lambda f: f.write(b"{}"))
        train.append_line(str(run / "m.jsonl"), "{}")
    io.atomic_write_bytes(other / "b.json", lambda f: f.write(b"{}"))
    assert runfiles.read_list(str(run)) == ("vae", ["a.json", "m.jsonl"])
    assert os.listdir(other) == ["b.json"]           # a directory without a list gets none
    with open(run / runfiles.LIST, "a") as f:
        f.write("cut-sho")                            # an append cut short by a kill: ignored
    assert runfiles.read_list(str(run))[1] == ["a.json", "m.jsonl"]
