"""M2 training curves (PNG, Agg): test classification error per epoch beside the labelled-only
baseline, and the bounds (test -ELBO(x, y), U(x); train labelled / unlabelled losses)."""
from __future__ import annotations

from . import _save, finish_curves, pyplot, train_test_lines


def curves(records, path, baseline=None):
    """Left: test error of M2's classifier per epoch (percent), the baseline as a horizontal line.
    Right: nats per image: test -ELBO(x, y), test U(x) (>= -log p(x)) (true bounds), and the train
    labelled / unlabelled losses (their KL weighted by the model's beta)."""
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    pts = [(r["epoch"], 100 * r["test_error"]) for r in records if "test_error" in r]
    if pts:
        a.plot(*zip(*pts), marker="o", label="M2 classifier q(y|x)")
    if baseline and "baseline_test_error" in baseline:
        a.axhline(100 * baseline["baseline_test_error"], color="C3", ls="--",
                  label=f"labelled-only baseline ({100 * baseline['baseline_test_error']:.1f}%)")
    finish_curves(a, "test error (%)", "classification error")
    train_test_lines(b, records, [("test_nelbo_xy", "test -ELBO(x, y)"), ("test_nelbo_x", "test U(x)"),
                                  ("train_labelled", "train L(x, y), labelled (KL x beta)"),
                                  ("train_unlabelled", "train U(x) (KL x beta)")])
    finish_curves(b, "nats per image", "bounds")
    return _save(fig, path)
