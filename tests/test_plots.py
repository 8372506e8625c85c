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
    assert [ax.get_title() for ax in fig.axes] == ["data (100 points)", "T=0.5 (100 points)"]
    assert [(ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes] == [("x1", "x2")] * 2


# -- issue 24: what a reader of each figure needs ------------------------------------------------------
ONE_EPOCH = [{"epoch": 1, "step": 8, "train_loss": 3.0, "train_nelbo": 110.0, "train_recon": 90.0, "train_kl": 20.0,
              "test_nelbo": 111.0, "test_recon": 91.0, "test_kl": 20.0, "test_nll": 3.1, "train_nll": 3.0,
              "train_bpd": 2.0, "test_bpd": 2.1, "test_error": 0.3, "iteration": 1, "train_labelled": 120.0,
              "train_unlabelled": 130.0, "test_nelbo_xy": 110.0, "test_nelbo_x": 112.0}]


@pytest.mark.parametrize("draw", [
    lambda p: PF.nll_curves(ONE_EPOCH, p), lambda p: PF.bpd_curves(ONE_EPOCH, p), lambda p: PV.curves(ONE_EPOCH, p),
    lambda p: PM.curves(ONE_EPOCH, p), lambda p: PG.em_curves(ONE_EPOCH, p)], ids=["nll", "bpd", "vae", "m2", "em"])
def test_one_epoch_curves_tick_whole_epochs_only(draw, figures, tmp_path):
    """A 1-epoch run got ticks 0.96, 0.98, 1.00, ... (MaxNLocator's fallback on a short range)."""
    draw(tmp_path / "c.png")
    fig, _ = figures[-1]
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks == [1.0], ticks


def _lines(ax):
    return {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}


def test_vae_curves_pair_train_and_test_by_colour_and_give_kl_its_own_axis(figures, tmp_path):
    records = [dict(RECORDS[i], train_recon=89.0, train_kl=21.0) for i in range(3)]
    PV.curves(records, tmp_path / "c.png")
    fig, _ = figures[-1]
    panels = [_lines(ax) for ax in fig.axes]
    for lines, term in zip(panels, ["-ELBO", "reconstruction", "KL"]):
        train, test = lines[f"train {term}"], lines[f"test {term}"]
        assert train.get_color() == test.get_color()
        assert (train.get_linestyle(), test.get_linestyle()) == ("-", "--")
    assert [sorted(p) for p in panels][2] == ["test KL", "train KL"]  # KL alone on its axis
    colours = {lines[f"test {t}"].get_color() for lines, t in zip(panels, ["-ELBO", "reconstruction", "KL"])}
    assert len(colours) == 3


def test_vae_curves_of_an_iwae_run_have_a_train_line(figures, tmp_path):
    """--objective iwae logs train_loss (the -IWAE bound), no train_nelbo: its curves had no train line."""
    records = [{"epoch": e, "step": 8 * e, "train_loss": 300.0 / e, "test_nelbo": 310.0 / e, "test_recon": 290.0 / e,
                "test_kl": 20.0} for e in (1, 2)]
    PV.curves(records, tmp_path / "c.png")
    fig, _ = figures[-1]
    train = [k for k in _lines(fig.axes[0]) if k.startswith("train")]
    assert train == ["train -IWAE bound (the objective)"]


def test_m2_curves_plot_the_fraction_the_metrics_log(figures, tmp_path):
    PM.curves(RECORDS, tmp_path / "c.png", {"baseline_test_error": 0.262})
    fig, _ = figures[-1]
    err = _lines(fig.axes[0])["M2 classifier q(y|x)"]
    assert list(err.get_ydata()) == [r["test_error"] for r in RECORDS]
    assert "fraction" in fig.axes[0].get_ylabel()
    assert any("0.2620" in k for k in _lines(fig.axes[0]))


class _Decoder2d:
    z_dim = 2

    def decode(self, z):
        return np.tile(np.asarray(z)[:, :1], (1, 784)) * 0 + 0.5


def test_manifold_has_z1_z2_axes_with_ticks(figures, tmp_path):
    PV.manifold(_Decoder2d(), tmp_path / "m.png", n=10)
    fig, xlabels = figures[-1]
    ax = fig.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("z1", "z2")
    xs = [float(t) for t in xlabels]
    ys = [float(t.get_text()) for t in ax.get_yticklabels()]
    assert len(xs) >= 3 and xs == sorted(xs) and xs[0] < 0 < xs[-1]
    assert ys == sorted(ys, reverse=True)  # z2 grows upwards


def test_imputation_title_names_its_fourth_row(figures, tmp_path):
    x = np.zeros((10, 784))
    PV.imputation(x, x, x, tmp_path / "i.png", title="imputation of rows 10-17", cond_mean=x)
    fig, _ = figures[-1]
    rows = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert len(rows) == 4 and "E[x_missing | x_observed]" in fig.axes[0].get_title()


def test_style_transfer_title_fits_on_one_line(figures, tmp_path):
    model10 = _TwoClassModel()
    model10.num_classes = 10  # as the CVAE's and M2's figures on MNIST
    PC.style_transfer(model10, np.zeros((2, 784)), np.array([0, 2]), tmp_path / "t.png")
    fig, _ = figures[-1]
    assert fig.axes[0].get_title().startswith("style transfer") and "\n" not in fig.axes[0].get_title()


def test_flow2d_density_panels_have_axis_labels_and_explain_the_latent_colour(figures, tmp_path):
    from npdgm.data import make_toy2d
    from npdgm.models import flows as F

    flow = F.realnvp2d(n_couplings=2, hidden=(8,), seed=0)
    data = make_toy2d("moons", 200, np.random.default_rng(0))
    PF.flow2d_panels(flow, data, tmp_path / "d.png", n_samples=200)
    fig, _ = figures[-1]
    panels = fig.axes[:4]
    assert [(ax.get_xlabel(), ax.get_ylabel()) for ax in panels] == [("x1", "x2")] * 3 + [("z1", "z2")]
    colourbar = [ax for ax in fig.axes[4:] if "angle of x" in ax.get_ylabel()]
    assert colourbar, [ax.get_ylabel() for ax in fig.axes]


def test_flow2d_curves_are_titled_by_the_flow_kind(monkeypatch, tmp_path):
    from npdgm import cli

    titles = []
    monkeypatch.setattr(PF, "nll_curves", lambda records, path, title=None, x="epoch": titles.append((title, x)))
    monkeypatch.setattr(PF, "flow2d_panels", lambda *a, **k: None)
    assert cli.main(["train", "flow2d", "--flow", "maf", "--dataset", "moons", "--steps", "2", "--batch-size", "32",
                     "--test-limit", "64", "--no-progress", "--out", tmp_path / "r"]) == 0
    assert titles == [("maf flow on moons", "step")]
    # npdgm sample on it: the figure title said "N samples per panel" above a panel of 10,000 test points
    import npdgm.plots as P

    seen = []
    monkeypatch.setattr(P, "scatter_panels", lambda panels, path, title=None: seen.append((title, panels)))
    assert cli.main(["sample", tmp_path / "r", "--n", "30", "--temperatures", "0.5", "1",
                     "--out", tmp_path / "s.png"]) == 0
    (title, panels), = seen
    assert title == "30 samples per temperature (seed 0)"
    assert [len(p) for _, p in panels] == [64, 30, 30]


def test_step_curves_fall_back_to_epochs_for_records_without_steps(figures, tmp_path):
    PF.nll_curves([dict(r, step=100 * r["epoch"]) for r in RECORDS], tmp_path / "a.png", x="step")
    PF.nll_curves(RECORDS, tmp_path / "b.png", x="step")
    assert [fig.axes[0].get_xlabel() for fig, _ in figures] == ["step", "epoch"]
    assert list(_lines(figures[0][0].axes[0])["train NLL"].get_xdata()) == [100, 200, 300]
