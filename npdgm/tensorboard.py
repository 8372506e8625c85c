"""TensorBoard event files beside metrics.jsonl: ``npdgm train MODEL --tensorboard`` (the ``tensorboard`` extra,
tensorboardX: a writer that needs neither torch nor TensorFlow).

Every record the training loop logs (:func:`npdgm.train.log_record`) becomes scalars in ``RUNDIR/tensorboard/``:
``train_nelbo`` -> tag ``train/nelbo``, ``test_nelbo`` -> ``test/nelbo`` (so TensorBoard draws train and test of
a quantity in one section), at the record's optimizer ``step`` (EM: its ``iteration``; else its ``epoch``). The
first record of a process rewrites the folder from metrics.jsonl, so a resumed run (whose metrics.jsonl drops
the records newer than its checkpoint) and an ``--overwrite`` leave no stale points. View with
``tensorboard --logdir RUNDIR`` (TensorBoard itself is a separate install).
"""
from __future__ import annotations

import math
import os
import shutil

from . import train

INSTALL = 'pip install "npdgm[tensorboard]" (or pip install tensorboardX)'
FOLDER = "tensorboard"
_AXES = ("step", "iteration", "epoch")  # the x of a record: the first of these it has


def summary_writer():
    """tensorboardX's SummaryWriter class, or a ValueError that says what to install."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise ValueError(f"--tensorboard needs tensorboardX: {INSTALL}") from None
    return SummaryWriter


def scalars(record):
    """[(tag, value)] of a metrics record: every finite or non-finite number except the axes; ``train_x`` ->
    ``train/x``, ``test_x`` -> ``test/x``, any other key as it is."""
    out = []
    for key, value in record.items():
        if key in _AXES or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        split, _, name = key.partition("_")
        out.append((f"{split}/{name}" if split in ("train", "test") and name else key,
                    float(value) if value is not None else math.nan))
    return out


def record_step(record):
    """The x of a record in TensorBoard: its step, else its EM iteration, else its epoch (0 without any)."""
    return int(next((record[k] for k in _AXES if isinstance(record.get(k), (int, float))), 0))


class EventLog:
    """A :data:`npdgm.train.RECORD_HOOKS` entry: ``(out, record)`` -> scalars in ``out/tensorboard``."""

    def __init__(self):
        self.cls = summary_writer()  # fails here, before any training, when tensorboardX is missing
        self.writers = {}

    def write(self, writer, record):
        step = record_step(record)
        for tag, value in scalars(record):
            writer.add_scalar(tag, value, step)

    def __call__(self, out, record):
        if out in self.writers:
            self.write(self.writers[out], record)
        else:  # first record of this process: replay metrics.jsonl, which already holds ``record``
            folder = os.path.join(out, FOLDER)
            shutil.rmtree(folder, ignore_errors=True)
            self.writers[out] = writer = self.cls(folder)
            for r in train.read_metrics(out):
                self.write(writer, r)
        self.writers[out].flush()

    def close(self):
        while self.writers:
            self.writers.popitem()[1].close()


def enable():
    """Write event files for every record logged from now on (until :func:`disable`); ValueError without
    tensorboardX."""
    if not any(isinstance(h, EventLog) for h in train.RECORD_HOOKS):
        train.RECORD_HOOKS.append(EventLog())


def disable():
    """Close the event files and stop writing them."""
    for h in [h for h in train.RECORD_HOOKS if isinstance(h, EventLog)]:
        h.close()
        train.RECORD_HOOKS.remove(h)
