import argparse
import subprocess
import sys

import pytest

import npdgm
from npdgm import cli


def test_gradcheck_command_all_pass(capsys):
    assert cli.main(["gradcheck", "--only", "kernel."]) == 0
    out = capsys.readouterr().out
    assert "kernel.bernoulli_nll:logits" in out and "FAIL" not in out and " 0 failed" in out


def test_gradcheck_unknown_filter(capsys):
    assert cli.main(["gradcheck", "--only", "no-such-check"]) == 2


def test_python_dash_m_works_like_the_script():
    r = subprocess.run([sys.executable, "-m", "npdgm", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "gradcheck" in r.stdout and "train" in r.stdout


def test_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backend numpy" in out and "glibc malloc keeps freed memory:" in out and "OPENBLAS_THREAD_TIMEOUT:" in out


def _leaf_commands(parser, path=()):
    """Every subcommand path of ``parser`` (aliases once), walked from its subparsers actions."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    seen = set()
    for name, sp in subs[0].choices.items():
        if id(sp) not in seen:
            seen.add(id(sp))
            yield from _leaf_commands(sp, path + (name,))


LEAVES = [path for path, _ in _leaf_commands(cli.build_parser())]


def _stubbed_parser():
    """cli.build_parser with every command's work replaced by ``return 0``: parsing alone is tested."""
    p = _real_build_parser()
    for _, leaf in _leaf_commands(p):
        leaf.set_defaults(func=lambda args: 0)
    return p


_real_build_parser = cli.build_parser


def test_the_parser_walk_finds_every_command():
    assert {("data", "path"), ("train", "vae"), ("evaluate",), ("info",), ("bench",)} <= set(LEAVES)
    assert len(LEAVES) >= 20


@pytest.mark.parametrize("path", LEAVES, ids=" ".join)
def test_every_command_bare_and_help_exits_cleanly(path, monkeypatch, capsys):
    """Bare: 0 (parsed, the work stubbed out) or 2 with a one-line error pointing at -h; -h: 0 and a usage.
    Never a traceback, never argparse's SUPPRESS sentinel (``npdgm data path`` once crashed on it)."""
    monkeypatch.setattr(cli, "build_parser", _stubbed_parser)
    code = cli.main(list(path))
    out, err = capsys.readouterr()
    assert code in (0, 2), (path, code, err)
    if code == 2:
        assert err.startswith("npdgm: error: ") and err.count("\n") == 1 and "-h)" in err, err
    assert "SUPPRESS" not in out + err and "Traceback" not in out + err
    assert cli.main(list(path) + ["-h"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("usage: npdgm " + " ".join(path)) and not err


def test_data_path_without_a_name_prints_the_cache(tmp_path, capsys):
    assert cli.main(["data", "path", "--dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path)
    assert cli.main(["data", "path", "mnist", "--dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "mnist")


def test_training_into_a_pipe_prints_one_line_per_epoch_and_no_carriage_returns(tmp_path):
    """Output to a file or pipe gets no progress bar (its redraws made a 71 KB log for 10 epochs): one line per
    epoch on stdout, and stderr without the bar's carriage returns or blank lines."""
    r = subprocess.run([sys.executable, "-m", "npdgm", "train", "vae", "--epochs", "3", "--train-limit", "256",
                        "--test-limit", "64", "--batch-size", "32", "--no-plots", "--iwae-n", "0", "--impute-k", "0",
                        "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stdout + r.stderr and "\n\n" not in r.stdout + r.stderr
    assert [line.split()[0] for line in r.stdout.splitlines() if line.startswith("epoch=")] == \
        ["epoch=1", "epoch=2", "epoch=3"]
    assert r.stderr == ""


def test_progress_bar_only_on_a_terminal(monkeypatch):
    from npdgm import train

    class Tty:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty

        def write(self, s):
            return len(s)

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stderr", Tty(False))
    assert train.progress_bar(10, "x") is None
    monkeypatch.setattr(sys, "stderr", Tty(True))
    assert train.progress_bar(10, "x", enabled=False) is None
    bar = train.progress_bar(10, "x")
    assert bar is not None
    bar.close()


def test_long_jobs_say_what_they_do(tmp_path, capsys):
    """Off a terminal every long stage prints one line to stderr: figures, each estimator, sampling, gradcheck,
    export-reference (on a terminal a bar replaces the line where the work is a loop)."""
    run = str(tmp_path / "run")
    assert cli.main(["train", "vae", "--epochs", "1", "--train-limit", "128", "--test-limit", "32", "--iwae-n", "0",
                     "--impute-k", "0", "--hidden", "16", "--z-dim", "2", "--out", run]) == 0
    assert f"drawing figures into {run} ...\n" in capsys.readouterr().err
    assert cli.main(["evaluate", run, "--method", "iwae", "ais", "--n-images", "4", "--k", "4", "--steps", "3"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == ["iwae: 4 images, k=4 ...", "ais: 4 images, steps=3 leapfrog=2 chains=4 ..."]
    assert cli.main(["gradcheck", "--only", "kernel.linear"]) == 0
    assert capsys.readouterr().err == "gradcheck ...\n"
    assert cli.main(["export-reference", str(tmp_path / "ref"), "--dtype", "float32"]) == 0
    assert capsys.readouterr().err == f"reference cases -> {tmp_path / 'ref'} ...\n"


def _options(parser):
    return [a for a in parser._actions if a.option_strings and a.help != argparse.SUPPRESS
            and not isinstance(a, (argparse._HelpAction, argparse._VersionAction))]


@pytest.mark.parametrize("path", LEAVES, ids=" ".join)
def test_every_options_help_shows_its_default(path):
    leaf = dict(_leaf_commands(cli.build_parser()))[path]
    fmt = leaf._get_formatter()
    for a in _options(leaf):
        text = fmt._expand_help(a)
        assert "default: " in text, (path, a.option_strings, text)


SHARED_GROUP = {"seed": "run", "backend": "run", "dtype": "run", "distributed": "run", "no_progress": "run",
                "no_plots": "run", "resume": "run", "overwrite": "run", "data": "data", "dataset": "data",
                "train_limit": "data", "test_limit": "data", "binarize": "data"}


@pytest.mark.parametrize("path", [p for p in LEAVES if p != ("bench",)], ids=" ".join)
def test_option_groups_have_the_same_names_everywhere(path):
    """Options sit in groups named from common.GROUPS (the generic one holds only -h); an option that several
    commands share is in the same group in each."""
    from npdgm.commands.common import GROUPS

    leaf = dict(_leaf_commands(cli.build_parser()))[path]
    for g in leaf._action_groups:
        actions = [a for a in g._group_actions if a.option_strings and a.dest != "help"]
        assert g.title in GROUPS or not actions, (path, g.title, [a.dest for a in actions])
        for a in actions:
            assert SHARED_GROUP.get(a.dest, g.title) == g.title, (path, a.dest, g.title)


@pytest.mark.parametrize("argv, dest, value", [
    (["evaluate", "R", "--n-images", "7"], "n_images", 7), (["evaluate", "R", "--n", "7"], "n_images", 7),
    (["evaluate", "R", "--batch", "9"], "batch", 9), (["evaluate", "R", "--batch-size", "9"], "batch", 9),
    (["evaluate", "R", "--steps", "5"], "steps", 5), (["evaluate", "R", "--ais-steps", "5"], "steps", 5),
    (["evaluate", "R", "--plot", "a.png"], "plot", "a.png"), (["evaluate", "R", "--png", "a.png"], "plot", "a.png"),
    (["sample", "R", "--out", "a.png"], "out", "a.png"), (["sample", "R", "--png", "a.png"], "out", "a.png"),
    (["impute", "R", "--out", "a.png"], "out", "a.png"), (["impute", "R", "--png", "a.png"], "out", "a.png"),
    (["bench", "--batch", "8"], "batch", 8), (["bench", "--batch-size", "8"], "batch", 8),
    (["train", "vae", "--batch", "8"], "batch_size", 8), (["train", "vae", "--batch-size", "8"], "batch_size", 8),
    (["train", "flow2d", "--n-train", "8"], "train_limit", 8), (["train", "flow2d", "--train-limit", "8"],
                                                                "train_limit", 8),
])
def test_old_and_new_spellings_parse_to_the_same_option(argv, dest, value):
    assert getattr(cli.build_parser().parse_args(argv), dest) == value


def test_data_help_names_what_it_accepts():
    leaf = dict(_leaf_commands(cli.build_parser()))
    for path in [("train", "vae"), ("train", "cvae"), ("train", "m2"), ("train", "gmm"), ("evaluate",), ("impute",)]:
        (a,) = [a for a in leaf[path]._actions if a.dest == "data"]
        assert all(w in a.help for w in ("bundled", "mnist", "fashion-mnist", "directory")), (path, a.help)


def _printed_config(argv, capsys):
    assert cli.main(argv) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("fmt", ["json", "toml"])
@pytest.mark.parametrize("model", ["vae", "flow2d", "m2"])
def test_print_config_fed_to_config_gives_the_same_options(tmp_path, capsys, fmt, model):
    if fmt == "toml":
        pytest.importorskip("tomllib")
    typed = ["--epochs", "3", "--hidden", "64", "32", "--no-plots", "--seed", "7", "--clip", "2.5"]
    text = _printed_config(["train", model, *typed, "--print-config", fmt], capsys)
    path = tmp_path / f"run.{fmt}"
    path.write_text(text)
    again = _printed_config(["train", model, "--config", str(path), "--print-config", fmt], capsys)
    assert again == text
    direct = cli.build_parser().parse_args(["train", model, *typed])
    via_file, argv = cli._parse(["train", model, "--config", str(path)])
    assert {k: v for k, v in vars(via_file).items() if k != "func"} == \
        {k: v for k, v in vars(direct).items() if k != "func"}


def test_config_values_lose_to_typed_options(tmp_path, capsys):
    path = tmp_path / "run.json"
    path.write_text('{"epochs": 3, "lr": 0.01, "no-plots": true, "hidden": [8]}')
    args, _ = cli._parse(["train", "vae", "--config", str(path), "--lr", "0.5"])
    assert (args.epochs, args.lr, args.no_plots, args.hidden) == (3, 0.5, True, [8])
    assert cli.main(["train", "vae", "--config", str(path), "--lr", "0.5", "--print-config"]) == 0
    assert '"lr": 0.5' in capsys.readouterr().out


@pytest.mark.parametrize("text, msg", [
    ('{"no_such": 1}', "has no option 'no_such'"), ("[1, 2]", "expected a table"), ("{", "not valid JSON"),
    ('{"no_plots": 3}', "no_plots is a flag"), ('{"epochs": -1}', "--epochs must be >= 0"),
])
def test_bad_config_is_one_error_line(tmp_path, capsys, text, msg):
    path = tmp_path / "run.json"
    path.write_text(text)
    assert cli.main(["train", "vae", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("npdgm: error: ") and err.count("\n") == 1 and msg in err, err


def test_toml_config_without_tomllib_says_to_use_json(tmp_path, capsys, monkeypatch):
    path = tmp_path / "run.toml"
    path.write_text("epochs = 3\n")
    monkeypatch.setitem(sys.modules, "tomllib", None)
    assert cli.main(["train", "vae", "--config", str(path)]) == 2
    assert "TOML needs Python >= 3.11" in capsys.readouterr().err
    assert cli.main(["train", "vae", "--config", str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err


@pytest.mark.parametrize("bug", [KeyError("scale"), TypeError("unsupported operand"), AttributeError("shape")])
def test_an_internal_bug_keeps_its_traceback(monkeypatch, capsys, bug):
    """A KeyError / TypeError raised inside a command is a bug in npdgm, not bad input: cli.main lets it
    through (a traceback, exit 1) instead of printing it as a one-line ``npdgm: error`` with exit 2."""
    def broken(*a, **k):
        raise bug
    monkeypatch.setattr(cli, "package_versions", broken)
    with pytest.raises(type(bug)):
        cli.main(["info"])
    assert "npdgm: error" not in capsys.readouterr().err


def test_a_user_error_stays_one_line(tmp_path, capsys):
    """Bad input (here a checkpoint that is not one) is still one line and exit 2."""
    bad = tmp_path / "checkpoint.npz"
    bad.write_bytes(b"not a zip")
    assert cli.main(["sample", str(bad), "--out", str(tmp_path / "s.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("npdgm: error:") and str(bad) in err and "\n" not in err, err
