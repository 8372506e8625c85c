"""CLI conventions across the model families: ``npdgm sample`` for every kind, one flag per idea,
help defaults, old stored option names on --resume, metrics.csv and docs/metrics.md."""
import csv
import json
import os

import numpy as np
import pytest

import npdgm
from npdgm import cli, io
from npdgm.commands import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMG = ["--train-limit", "200", "--test-limit", "40", "--batch-size", "50", "--no-progress"]
RUNS = {
    "vae": ["vae", *IMG, "--hidden", "8", "--z-dim", "2", "--iwae-n", "10", "--iwae-k", "3", "--impute-n", "10",
            "--impute-k", "2"],
    "cvae": ["cvae", *IMG, "--hidden", "8", "--z-dim", "2"],
    "m2": ["m2", *IMG, "--labels", "20", "--hidden", "8", "--z-dim", "2", "--eval-n", "20", "--baseline-steps", "3"],
    "nice": ["nice", *IMG, "--hidden", "8", "8", "--couplings", "2"],
    "flow2d": ["flow2d", "--train-limit", "256", "--test-limit", "64", "--couplings", "2", "--hidden", "8",
               "--batch-size", "64", "--epochs", "1", "--no-progress"],
    "gmm": ["gmm", "--dataset", "moons", "--train-limit", "300", "--test-limit", "100", "--components", "3",
            "--max-iter", "3", "--no-progress"],
    "gmm-mnist": ["gmm", "--dataset", "mnist", "--train-limit", "200", "--test-limit", "40", "--pca-dim", "5",
                  "--components", "2", "--max-iter", "2", "--no-progress"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One tiny run of every kind (figures of cvae and m2 only); their style-transfer titles recorded."""
    from npdgm.plots import cvae as PC

    base, titles, orig = tmp_path_factory.mktemp("runs"), [], PC.style_transfer
    PC.style_transfer = lambda *a, **k: (titles.append(k.get("title")), orig(*a, **k))[1]
    try:
        out = {}
        for name, argv in RUNS.items():
            out[name] = str(base / name)
            epochs = [] if "--epochs" in argv or argv[0] == "gmm" else ["--epochs", "1"]
            plots = [] if name in ("cvae", "m2") else ["--no-plots"]
            assert cli.main(["train", *argv, *epochs, *plots, "--out", out[name]]) == 0, name
    finally:
        PC.style_transfer = orig
    out["style_titles"] = titles
    return out


# -- npdgm sample / flow-sample ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vae", "cvae", "m2", "nice", "gmm-mnist"])
def test_sample_every_image_kind_writes_grid_and_npy(runs, tmp_path, name, capsys):
    png, npy = tmp_path / "s.png", tmp_path / "s.npy"
    assert cli.main(["sample", runs[name], "--n", "23", "--out", png, "--npy", npy]) == 0, capsys.readouterr().err
    assert png.stat().st_size > 1000
    x = np.load(npy)
    assert x.shape == (23, 784) and np.isfinite(x).all()


def test_sample_cvae_columns_are_labels(runs, tmp_path):
    npy = tmp_path / "s.npy"
    assert cli.main(["sample", runs["cvae"], "--n", "20", "--seed", "3", "--out", tmp_path / "a.png",
                     "--npy", npy]) == 0
    m = npdgm.load(runs["cvae"])
    z = np.random.default_rng(3).standard_normal((20, m.z_dim), dtype=np.float32)
    np.testing.assert_allclose(np.load(npy), m.decode(z.astype(m.dtype), np.arange(20) % 10), rtol=1e-6)


@pytest.mark.parametrize("name", ["flow2d", "gmm"])
def test_sample_2d_runs_scatter_and_npy(runs, tmp_path, name):
    png, npy = tmp_path / "s.png", tmp_path / "s.npy"
    assert cli.main(["sample", runs[name], "--n", "300", "--out", png, "--npy", npy]) == 0
    assert png.stat().st_size > 1000 and np.load(npy).shape == (300, 2)


def test_sample_2d_temperatures_one_panel_each(runs, tmp_path, monkeypatch):
    import npdgm.plots as P

    seen = []
    monkeypatch.setattr(P, "scatter_panels", lambda panels, path, title=None: seen.append([t for t, _ in panels]))
    assert cli.main(["flow-sample", runs["flow2d"], "--n", "50", "--temperatures", "0.5", "0.8", "1",
                     "--out", tmp_path / "f.png"]) == 0
    assert seen == [["moons test data", "samples, T=0.5", "samples, T=0.8", "samples, T=1"]]


def test_sample_2d_huge_n_is_capped_in_the_png(runs, tmp_path, monkeypatch, run_cli):
    """Issue 23: ``sample FLOW2D_RUN --n 1000000000`` drew 10^9 points per panel and never ended; the PNG now
    shows the first SCATTER_MAX per panel (as image runs show GRID_MAX) and says so; --npy would save all n."""
    import npdgm.plots as P
    from npdgm.commands import sample as S

    drawn, sampler, seen = [0], S.sampler, []

    def counting(*a, **k):
        f = sampler(*a, **k)

        def g(n, rng):
            drawn[0] += n
            assert drawn[0] <= 10 * S.SCATTER_MAX, "drawing far more points than the PNG can show"
            return f(n, rng)
        return g
    monkeypatch.setattr(S, "sampler", counting)
    monkeypatch.setattr(P, "scatter_panels", lambda panels, path, title=None: seen.append((panels, title)))
    code, out, _ = run_cli("sample", runs["flow2d"], "--n", 10**9, "--temperatures", "1", "--out", tmp_path / "f.png")
    assert code == 0 and f"the PNG shows the first {S.SCATTER_MAX} of the {10**9} samples per panel" in out
    (panels, title), = seen
    assert len(panels[-1][1]) == S.SCATTER_MAX and f"the first {S.SCATTER_MAX} of {10**9}" in title


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_sample_npy_on_a_virtual_filesystem_names_the_reason(runs, run_cli):
    """Issue 23: ``--npy /proc/nope.npy`` said "would need 0.0 GiB but /proc has 0.0 GiB free"."""
    code, _, err = run_cli("sample", runs["flow2d"], "--npy", "/proc/nope.npy")
    assert code == 2 and err.startswith("npdgm: error: --npy /proc/nope.npy: ") and "GiB" not in err, err
    assert "cannot create a file in /proc: a virtual filesystem" in err or "/proc is not writable" in err, err


def test_sample_flow_npy_in_chunks_equals_one_draw(runs, tmp_path, monkeypatch):
    from npdgm.commands import sample as S

    monkeypatch.setattr(S, "SAMPLE_CHUNK", 7)
    npy = tmp_path / "s.npy"
    assert cli.main(["sample", runs["flow2d"], "--n", "30", "--seed", "4", "--temperatures", "0.7",
                     "--out", tmp_path / "a.png", "--npy", npy]) == 0
    one = npdgm.backend.to_host(npdgm.load(runs["flow2d"]).sample(30, temperature=0.7, rng=4))
    np.testing.assert_array_equal(np.load(npy), one)


@pytest.mark.parametrize("argv, msg", [(["--draw"], "--draw applies to vae runs"),
                                       (["--temperatures", "1"], "--temperatures applies to flow runs")])
def test_sample_options_of_another_kind_are_refused(runs, argv, msg, capsys):
    assert cli.main(["sample", runs["cvae"], *argv]) == 2
    assert msg in capsys.readouterr().err


def test_flow_sample_is_an_alias_keeping_its_file_name(runs):
    assert cli.main(["flow-sample", runs["flow2d"], "--n", "20"]) == 0
    assert os.path.exists(os.path.join(runs["flow2d"], "flow-samples-seed0.png"))


# -- one flag per idea, help defaults -------------------------------------------------------------------
def test_nice_hidden_is_a_list(runs, capsys):
    net = npdgm.load(runs["nice"]).config
    assert json.load(open(os.path.join(runs["nice"], "summary.json")))["parameters"] > 0
    stored = io.load_arrays(runs["nice"])[1]["run"]["args"]
    assert stored["hidden"] == [8, 8] and "n_hidden" not in stored, (stored, net)
    assert cli.main(["train", "nice", "--hidden", "8", "9", "--out", "x"]) == 2
    assert "one width for every hidden layer" in capsys.readouterr().err


def test_nice_n_hidden_is_gone(tmp_path, capsys):
    """The deprecated --n-hidden is removed (--hidden 8 8 says it); runs that stored n_hidden still resume."""
    assert cli.main(["train", "nice", "--hidden", "8", "--n-hidden", "2", "--out", str(tmp_path / "n")]) == 2
    assert "unrecognized arguments: --n-hidden 2" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["flow2d", "realnvp", "gmm"])
def test_train_limit_names_the_2d_point_count(tmp_path, model):
    argv = ["--dataset", "spirals"] if model != "flow2d" else []
    extra = ["--max-iter", "1", "--components", "2"] if model == "gmm" else ["--couplings", "1", "--hidden", "4",
                                                                              "--epochs", "1"]
    assert cli.main(["train", model, *argv, "--train-limit", "96", "--test-limit", "32", *extra, "--out",
                     tmp_path, "--no-plots", "--no-progress"]) == 0
    s = json.load(open(tmp_path / "summary.json"))
    assert s["test_n"] == 32


def _subparsers(parser):
    import argparse

    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, p in a.choices.items():
                yield name, p
                yield from _subparsers(p)


def test_help_shows_every_default():
    bad = []
    for name, p in _subparsers(cli.build_parser()):
        if name == "bench":   # npdgm/bench/run.py: checked by its own tests
            continue
        for a in p._actions:
            if a.option_strings and a.nargs != 0 and a.help and "--help" not in a.option_strings:
                text = a.help % {"default": a.default} if "%(" in a.help else a.help
                if "default" not in text or "None" in text:
                    bad.append(f"{name} {a.option_strings[0]}: {text}")
    assert not bad, "\n".join(bad)


def test_help_says_resume_keeps_stored_epochs(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["train", "vae", "-h"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 10; on --resume the stored value)" in out


# -- old stored option names keep resuming ---------------------------------------------------------------
def _rewrite_run(path, f):
    arrays, meta = io.load_arrays(path)
    f(meta["run"]["args"])
    io.save_arrays(os.path.join(path, "checkpoint.npz"), arrays, meta)


@pytest.mark.parametrize("model", ["flow2d", "nice"])
def test_resume_of_a_run_stored_with_old_option_names(tmp_path, model):
    argv = (RUNS["flow2d"][1:-3] if model == "flow2d" else RUNS["nice"][1:]) + ["--no-plots", "--no-progress"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    assert cli.main(["train", model, *argv, "--epochs", "2", "--out", full]) == 0
    assert cli.main(["train", model, *argv, "--epochs", "1", "--out", part]) == 0

    def old(run):   # the names of older versions
        if model == "flow2d":
            run["n_train"], run["n_test"] = run.pop("train_limit"), run.pop("test_limit")
        else:
            run["hidden"], run["n_hidden"] = run["hidden"][0], len(run["hidden"])
    _rewrite_run(part, old)
    assert cli.main(["train", model, "--resume", part, "--epochs", "2", "--no-progress", "--no-plots"]) == 0
    a, b = io.load_arrays(full)[0], io.load_arrays(part)[0]
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    if model == "nice":   # a typed --hidden is compared with the mapped stored value
        assert cli.main(["train", model, "--resume", part, "--hidden", "8", "8", "--epochs", "2"]) == 0


# -- metrics files -------------------------------------------------------------------------------------
def test_metrics_csv_holds_the_jsonl_records(runs):
    for name in ("vae", "m2", "flow2d", "gmm"):
        recs = [json.loads(line) for line in open(os.path.join(runs[name], "metrics.jsonl"))]
        rows = list(csv.DictReader(open(os.path.join(runs[name], "metrics.csv"))))
        assert len(rows) == len(recs) > 0, name
        for r, row in zip(recs, rows):
            assert set(row) == {k for rec in recs for k in rec}, name
            for k, v in r.items():
                assert (float(row[k]) == pytest.approx(v, rel=1e-12) if isinstance(v, float) else row[k] == str(v)), k


def test_metrics_csv_follows_a_resume_truncation(tmp_path):
    from npdgm import train

    out = str(tmp_path)
    for e in (1, 2, 3):
        train.log_record(out, {"epoch": e, "train_loss": 1.0 / e}, [{"epoch": i} for i in range(1, e)])
    train._truncate_metrics(out, 2)
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]


def test_every_metrics_and_summary_key_is_documented(runs):
    doc = open(os.path.join(ROOT, "docs", "metrics.md")).read()
    missing = set()
    for name in RUNS:
        recs = [json.loads(line) for line in open(os.path.join(runs[name], "metrics.jsonl"))]
        keys = {k for r in recs for k in r} | set(json.load(open(os.path.join(runs[name], "summary.json"))))
        if name == "m2":
            keys |= set(json.load(open(os.path.join(runs[name], "baseline.json"))))
        missing |= {f"{name}:{k}" for k in keys if f"`{k}`" not in doc}
    assert not missing, sorted(missing)


def test_m2_and_cvae_share_the_style_transfer_figure(runs):
    assert runs["style_titles"] == [None, None]   # both use plots.cvae's title (with column labels)
    for name in ("cvae", "m2"):
        assert os.path.exists(os.path.join(runs[name], "style_transfer.png"))


def test_commands_never_import_cli_and_stay_short():
    import ast
    import glob

    for f in glob.glob(os.path.join(ROOT, "npdgm", "commands", "*.py")):
        tree = ast.parse(open(f).read())
        for n in ast.walk(tree):
            if isinstance(n, ast.ImportFrom):
                assert not (n.module or "").endswith("cli") and "cli" not in [a.name for a in n.names], f
            if isinstance(n, ast.FunctionDef):
                assert n.end_lineno - n.lineno + 1 < 50, f"{f}: {n.name} is {n.end_lineno - n.lineno + 1} lines"
    assert common.write_json and common.start_training
