"""M2 training curves (PNG, Agg): test classification error per epoch beside the labelled-only
baseline, and the bounds (test -ELBO(x, y), U(x); train labelled / unlabelled losses)."""
from __future__ import annotations

from . import _save, finish_curves, paired_lines, pyplot


def curves(records, path, baseline=None):
    """Left: test error of M2's classifier per epoch (a fraction, as metrics.jsonl logs it), the baseline
    as a horizontal line.
    Right: nats per image: test -ELBO(x, y), test U(x) (>= -log p(x)) (true bounds), and the train
    labelled / unlabelled losses (their KL weighted by the model's beta)."""
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    pts = [(r["epoch"], r["test_error"]) for r in records if "test_error" in r]
    if pts:
        a.plot(*zip(*pts), marker="o", label="M2 classifier q(y|x)")
    if baseline and "baseline_test_error" in baseline:
        a.axhline(baseline["baseline_test_error"], color="C3", ls=":",
                  label=f"labelled-only baseline ({baseline['baseline_test_error']:.4f})")
    finish_curves(a, "test error (fraction)", "classification error")
    paired_lines(b, records, [("L(x, y)", "train_labelled", "test_nelbo_xy"),
                              ("U(x)", "train_unlabelled", "test_nelbo_x")])
    b.text(0.01, 0.01, "train: labelled / unlabelled losses, KL x beta; test: the bounds (beta = 1)",
           transform=b.transAxes, fontsize=7, alpha=0.8)
    finish_curves(b, "nats per image", "bounds")
    return _save(fig, path)
