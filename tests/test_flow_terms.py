"""Issue 29 item 1: a flow's log-likelihood is log p_Z(f(x)) + sum log|det df/dx|; every flow command logs
both terms per epoch (train and test) and draws them beside the total (terms.png)."""
import json
import math

import numpy as np
import pytest

from npdgm import cli
from npdgm.models import flows as F
from npdgm.plots import flows as PF

COMMANDS = {
    "flow2d": ["flow2d", "--dataset", "moons", "--couplings", "2", "--hidden", "8", "--train-limit", "128",
               "--steps", "8"],
    "nice": ["nice", "--hidden", "8", "--couplings", "2", "--epochs", "2"],
    "realnvp": ["realnvp", "--hidden", "8", "--couplings", "2", "--epochs", "2"],
    "maf": ["maf", "--hidden", "8", "--layers", "2", "--epochs", "2"],
    "glow": ["glow", "--levels", "1", "--depth", "1", "--hidden", "4", "--epochs", "2"],
}


@pytest.mark.parametrize("family", list(COMMANDS))
def test_every_flow_command_logs_the_two_terms_and_they_sum_to_the_total(family, tmp_path):
    argv = ["train", *COMMANDS[family], "--test-limit", "32", "--batch-size", "32", "--no-progress",
            "--out", str(tmp_path / "r")]
    if family != "flow2d":
        argv += ["--train-limit", "64"]
    assert cli.main(argv + (["--no-plots"] if family not in ("flow2d", "glow") else [])) == 0
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2
    for r in records:
        for split in ("train", "test"):
            total = -r[f"{split}_nll"]
            assert math.isclose(r[f"{split}_logprior"] + r[f"{split}_logdet"], total, rel_tol=1e-5, abs_tol=1e-3), r
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert math.isclose(summary["test_logprior"] + summary["test_logdet"], summary["test_ll"], rel_tol=1e-6)
    if family in ("flow2d", "glow"):
        assert (tmp_path / "r" / "terms.png").stat().st_size > 0


def test_nll_terms_are_the_prior_and_the_log_det_of_the_forward_pass():
    flow = F.realnvp2d(n_couplings=3, hidden=(8,), seed=1)
    x = np.random.default_rng(0).standard_normal((50, 2)).astype(np.float32) * 2
    z, ld = flow.forward(x)
    z, ld = z.astype(np.float64), ld.astype(np.float64)
    t = flow.nll_terms(x, batch_size=7)
    assert math.isclose(t["logprior"], float(np.mean(-0.5 * (z ** 2).sum(1) - math.log(2 * math.pi))), rel_tol=1e-5)
    assert math.isclose(t["logdet"], float(ld.mean()), rel_tol=1e-5, abs_tol=1e-6)
    assert math.isclose(t["nll"], flow.nll(x), rel_tol=1e-6)
    step = flow.train_step(x)
    assert math.isclose(float(step["logprior"]) + float(step["logdet"]), -float(step["loss"]), rel_tol=1e-5)


def test_the_terms_figure_has_the_total_and_both_terms_side_by_side(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(PF, "_save", lambda fig, path: seen.append(fig))
    records = [{"epoch": e, "train_nll": 3.0 / e, "train_logprior": -2.0, "train_logdet": 2.0 - 3.0 / e - 2.0,
                "test_nll": 3.1 / e, "test_ll": -3.1 / e, "test_logprior": -2.1, "test_logdet": 0.1 - 3.1 / e}
               for e in (1, 2, 3)]
    PF.likelihood_terms(records, tmp_path / "t.png", title="t")
    fig, = seen
    assert [ax.get_title() for ax in fig.axes] == [label for _, label in PF.TERM_PANELS]
    legends = [[t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes]
    assert legends == [["train log-likelihood (total)", "test log-likelihood (total)"],
                       ["train prior term", "test prior term"], ["train log-det term", "test log-det term"]]
    train_total = fig.axes[0].get_lines()[0].get_ydata()
    assert np.allclose(train_total, [-3.0, -1.5, -1.0])
