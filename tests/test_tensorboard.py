"""`npdgm train MODEL --tensorboard`: event files beside metrics.jsonl (tensorboardX, an extra), a clean error
without it, and no stale points after --resume."""
import json
import os
import struct
import sys

import pytest

from npdgm import cli, tensorboard, train

TINY = ["--epochs", "2", "--train-limit", "128", "--test-limit", "32", "--iwae-n", "0", "--impute-n", "4",
        "--no-plots", "--no-progress"]


def test_scalars_group_train_and_test_of_a_quantity():
    rec = {"epoch": 2, "step": 16, "train_nelbo": 110.5, "test_nelbo": 111.0, "train_seconds": 1.5,
           "nonfinite": ["x"], "flag": True}
    assert tensorboard.scalars(rec) == [("train/nelbo", 110.5), ("test/nelbo", 111.0), ("train/seconds", 1.5)]
    assert tensorboard.record_step(rec) == 16
    assert tensorboard.record_step({"iteration": 3, "epoch": 1}) == 3
    assert tensorboard.record_step({"epoch": 4}) == 4


def test_without_tensorboardx_the_error_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    assert cli.main(["train", "vae", *TINY, "--tensorboard", "--out", tmp_path / "r"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == 'npdgm: error: --tensorboard needs tensorboardX: pip install "npdgm[tensorboard]" ' \
                  '(or pip install tensorboardX)'
    assert not (tmp_path / "r").exists() and train.RECORD_HOOKS == []


class FakeWriter:
    """tensorboardX.SummaryWriter's calls, kept in memory per folder."""
    folders = {}

    def __init__(self, folder):
        os.makedirs(folder)
        self.points = FakeWriter.folders[folder] = []

    def add_scalar(self, tag, value, step):
        self.points.append((tag, step, value))

    def flush(self):
        pass

    def close(self):
        pass


def test_every_record_becomes_scalars_and_resume_replays_the_kept_ones(tmp_path, monkeypatch):
    monkeypatch.setattr(tensorboard, "summary_writer", lambda: FakeWriter)
    run = str(tmp_path / "r")
    assert cli.main(["train", "vae", *TINY, "--tensorboard", "--out", run]) == 0
    assert train.RECORD_HOOKS == []  # closed with the command: a later command writes no events
    records = train.read_metrics(run)
    points = FakeWriter.folders.pop(os.path.join(run, "tensorboard"))
    assert points == [(t, r["step"], v) for r in records for t, v in tensorboard.scalars(r)]
    assert {"train/nelbo", "test/nelbo", "test/kl"} <= {t for t, _, _ in points}
    assert cli.main(["train", "vae", "--resume", run, "--epochs", "3", "--no-plots", "--no-progress",
                     "--tensorboard"]) == 0
    resumed = FakeWriter.folders.pop(os.path.join(run, "tensorboard"))
    assert sorted({s for _, s, _ in resumed}) == [r["step"] for r in train.read_metrics(run)]  # epochs 1..3 once


def _events(folder):
    """(tag, step, value) of every scalar in a folder of TFRecord event files (tensorboardX's own protobuf)."""
    from tensorboardX.proto import event_pb2

    out = []
    for name in sorted(os.listdir(folder)):
        data = open(os.path.join(folder, name), "rb").read()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return out


def test_event_files_hold_the_metrics(tmp_path):
    pytest.importorskip("tensorboardX")
    run = str(tmp_path / "r")
    assert cli.main(["train", "vae", *TINY, "--tensorboard", "--out", run]) == 0
    events = _events(os.path.join(run, "tensorboard"))
    last = json.loads(open(os.path.join(run, "metrics.jsonl")).read().splitlines()[-1])
    assert ("test/nelbo", last["step"], pytest.approx(last["test_nelbo"], rel=1e-6)) in events
