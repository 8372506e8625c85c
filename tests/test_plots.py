"""Figures: what a reader sees (tick positions, legend and axis labels, titles), read off the matplotlib
figure just before it is saved."""
import numpy as np
import pytest

from npdgm import plots
from npdgm.plots import cvae as PC
from npdgm.plots import flows as PF
from npdgm.plots import gmm as PG
from npdgm.plots import m2 as PM
from npdgm.plots import vae as PV


@pytest.fixture
def figures(monkeypatch):
    """Every figure a plot function saves, still open (the PNG is written as usual)."""
    seen, save = [], plots._save

    def keep(fig, path):
        fig.canvas.draw()
        seen.append((fig, [t.get_text() for ax in fig.axes for t in ax.get_xticklabels()]))
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    for mod in (PC, PF, PG, PM, PV):
        if hasattr(mod, "_save"):
            monkeypatch.setattr(mod, "_save", keep)
    return seen


RECORDS = [{"epoch": e, "train_loss": 3.0 / e, "test_nll": 3.1 / e, "train_bpd": 2.0 / e, "test_bpd": 2.1 / e,
            "train_nelbo": 110.0 / e, "test_nelbo": 111.0 / e, "test_recon": 90.0, "test_kl": 20.0,
            "test_error": 0.1 / e, "test_nelbo_xy": 100.0, "iteration": e, "train_nll": 1.0 / e}
           for e in (1, 2, 3)]


@pytest.mark.parametrize("draw", [
    lambda p: PF.nll_curves(RECORDS, p), lambda p: PF.bpd_curves(RECORDS, p), lambda p: PV.curves(RECORDS, p),
    lambda p: PM.curves(RECORDS, p), lambda p: PG.em_curves(RECORDS, p)], ids=["nll", "bpd", "vae", "m2", "em"])
def test_curves_tick_whole_epochs_only(draw, figures, tmp_path):
    draw(tmp_path / "c.png")
    fig, _ = figures[-1]
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    assert (tmp_path / "c.png").stat().st_size > 0


def test_flow_and_gmm_legends_are_words_not_metric_keys(figures, tmp_path):
    PF.nll_curves(RECORDS, tmp_path / "a.png")
    PF.bpd_curves(RECORDS, tmp_path / "b.png")
    PG.em_curves(RECORDS, tmp_path / "c.png")
    legends = [t.get_text() for fig, _ in figures for ax in fig.axes for t in ax.get_legend().get_texts()]
    assert legends == ["train NLL", "test NLL", "train bits/dim", "test bits/dim", "train NLL", "test NLL"]


def test_long_title_of_a_narrow_grid_wraps_inside_the_figure(figures, tmp_path):
    title = "component means m + V mu_k (weights 0.170 .. 0.050), a title far wider than four images"
    plots.save_image_grid(np.zeros((4, 784)), tmp_path / "g.png", nrow=4, title=title)
    fig, _ = figures[-1]
    text = fig.axes[0].title
    assert text.get_text().replace("\n", " ") == title and "\n" in text.get_text()
    box, figbox = text.get_window_extent(), fig.bbox
    assert figbox.x0 <= box.x0 and box.x1 <= figbox.x1


class _TwoClassModel:
    num_classes = 3

    def style_transfer(self, x, y):
        return np.repeat(np.asarray(x)[:, None], self.num_classes, axis=1)


def test_style_transfer_columns_are_labelled(figures, tmp_path):
    PC.style_transfer(_TwoClassModel(), np.zeros((2, 784)), np.array([0, 2]), tmp_path / "s.png")
    fig, xlabels = figures[-1]
    assert xlabels == ["input", "0", "1", "2"]
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["y=0", "y=2"]
    assert fig.axes[0].get_title().startswith("style transfer")


def test_curves_read_the_older_metric_names(figures, tmp_path):
    """Runs of older versions: flows logged the train NLL as train_loss only, the VAE summary held
    test_iwae_nll (now test_nll); both still reach the figure."""
    old = [{"epoch": e, "train_loss": 3.0 / e, "test_nll": 3.1 / e} for e in (1, 2)]
    PF.nll_curves(old, tmp_path / "a.png")
    PV.curves(RECORDS, tmp_path / "b.png", {"iwae_k": 5, "iwae_n": 10, "test_iwae_nll": 95.0})
    PV.curves(RECORDS, tmp_path / "c.png", {"iwae_k": 5, "iwae_n": 10, "test_nll": 95.0})
    legends = [[t.get_text() for t in fig.axes[0].get_legend().get_texts()] for fig, _ in figures]
    assert legends[0] == ["train NLL", "test NLL"]
    assert legends[1] == legends[2] and "test -log p(x), IWAE k=5 (n=10)" in legends[1]


def test_scatter_panels_one_per_title(figures, tmp_path):
    pts = np.random.default_rng(0).standard_normal((100, 2))
    plots.scatter_panels([("data", pts), ("T=0.5", pts * 0.5)], tmp_path / "s.png", title="t")
    fig, _ = figures[-1]
    assert [ax.get_title() for ax in fig.axes] == ["data (100)", "T=0.5 (100)"]
