import platform
import sys

import numpy as np
import pytest

import npdgm
from npdgm import backend


def test_default_is_numpy_float32():
    assert backend.get_backend() == "numpy"
    assert backend.xp() is np
    assert backend.get_dtype() == np.float32


def test_unknown_backend_names_the_choices():
    with pytest.raises(backend.BackendError, match="unknown backend 'jax'.*numpy"):
        npdgm.set_backend("jax")
    assert backend.get_backend() == "numpy"


def test_cupy_missing_gives_one_clear_error():
    if backend.cupy_available():
        pytest.skip("CuPy and a GPU are present here")
    with pytest.raises(backend.BackendError, match="cupy"):
        npdgm.set_backend("cupy")
    assert backend.get_backend() == "numpy"


def test_bad_dtype():
    with pytest.raises(ValueError, match="dtype must be one of"):
        npdgm.set_dtype("float16")


def test_use_restores_settings():
    with backend.use("numpy", "float64"):
        assert backend.get_dtype() == np.float64
    assert backend.get_dtype() == np.float32


def test_rng_same_seed_same_numbers():
    a = backend.rng(7).standard_normal(5)
    b = backend.rng(7).standard_normal(5)
    c = backend.rng(8).standard_normal(5)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_host_device_round_trip():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    d = backend.to_device(x, np.float64)
    assert d.dtype == np.float64
    assert np.array_equal(backend.to_host(d), x)


def test_check_finite_names_argument():
    with pytest.raises(ValueError, match=r"x contains non-finite values \(1 NaN, 1 inf\)"):
        backend.check_finite("x", np.array([1.0, np.nan, np.inf]))


def test_env_variable_selects_backend(monkeypatch):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "import npdgm; print(npdgm.get_backend())"],
                         env={**__import__("os").environ, "NPDGM_BACKEND": "numpy"}, capture_output=True, text=True)
    assert out.stdout.strip() == "numpy"


ENV_SCRIPT = """
import sys
import npdgm                                   # importing must not apply NPDGM_BACKEND
from npdgm import cli
for argv in (["--help"], ["--version"]):
    try:
        cli.main(argv)
    except SystemExit as e:
        assert e.code in (0, None), (argv, e.code)
print("info rc", cli.main(["info"]))
print("explicit rc", cli.main(["train", "gmm", "--components", "2", "--max-iter", "2", "--n-train", "32",
                               "--n-test", "16", "--backend", "numpy", "--no-plots", "--no-progress",
                               "--out", sys.argv[1] + "/a"]))
print("env rc", cli.main(["train", "gmm", "--components", "2", "--max-iter", "2", "--n-train", "32",
                          "--n-test", "16", "--no-plots", "--no-progress", "--out", sys.argv[1] + "/b"]))
"""


@pytest.mark.parametrize("value, why", [("bogus", "unknown backend 'bogus'"), ("cupy", "CuPy")])
def test_bad_env_backend_breaks_nothing_until_used(value, why, tmp_path):
    """NPDGM_BACKEND=bogus (or cupy without CuPy) used to fail `import npdgm`, so even --help,
    --version, info and --backend numpy died with a traceback. Now it is applied lazily."""
    import os
    import subprocess
    import sys

    if value == "cupy" and backend.cupy_available():
        pytest.skip("CuPy and a GPU are present here")
    env = {**os.environ, "NPDGM_BACKEND": value}
    r = subprocess.run([sys.executable, "-c", ENV_SCRIPT, str(tmp_path)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "usage: npdgm" in r.stdout and "npdgm 0." in r.stdout          # --help, --version
    assert "info rc 0" in r.stdout and f"NPDGM_BACKEND='{value}'" in r.stdout and why in r.stdout
    assert "explicit rc 0" in r.stdout and (tmp_path / "a" / "checkpoint.npz").exists()
    # the one use that needs the variable stops with one clear line naming it, never falls back to NumPy
    assert "env rc 2" in r.stdout and not (tmp_path / "b" / "checkpoint.npz").exists()
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("npdgm: error:")]
    assert len(errors) == 1 and f"NPDGM_BACKEND='{value}'" in errors[0] and why in errors[0]
    assert "Traceback" not in r.stderr


def test_env_backend_is_applied_at_first_use_and_never_silently_dropped(monkeypatch):
    monkeypatch.setitem(backend._state, "name", None)      # as after `import npdgm`
    monkeypatch.setenv("NPDGM_BACKEND", "bogus")
    assert "NPDGM_BACKEND='bogus': unknown backend" in backend.env_backend_problem()
    for _ in range(2):                                      # every use raises, not only the first
        with pytest.raises(backend.BackendError, match="NPDGM_BACKEND='bogus': unknown backend 'bogus'"):
            backend.xp()
    with backend.use("numpy", "float64"):                   # an explicit choice wins
        assert backend.xp() is np and backend.rng(0).random() == np.random.default_rng(0).random()
    assert backend._state["name"] is None                   # restored: still "not applied yet"
    monkeypatch.setenv("NPDGM_BACKEND", " NumPy ")
    assert backend.env_backend_problem() is None and backend.get_backend() == "numpy"


def test_numpy_scalars_accepted_floats_and_none_rejected():
    assert backend.rng(np.int64(7)).random() == backend.rng(7).random()
    with pytest.raises(TypeError, match="seed must be a non-negative integer, got 1.5"):
        backend.rng(1.5)
    with pytest.raises(TypeError, match="seed must be a non-negative integer, got True"):
        backend.rng(True)
    with pytest.raises(ValueError, match="seed must be a non-negative integer, got -1"):
        backend.rng(-1)
    for bad in (None, 1.5, "float16", "nope"):
        with pytest.raises((TypeError, ValueError), match="dtype must be one of"):
            npdgm.set_dtype(bad)
    assert backend.get_dtype() == np.float32                # set_dtype(None) used to switch to float64
    with backend.use(dtype=np.float64):
        assert backend.get_dtype() == np.float64


@pytest.mark.gpu
def test_cupy_backend_runs_the_same_kernels(cupy):
    cp = cupy
    from npdgm import kernels as K

    x = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
    W = np.random.default_rng(1).standard_normal((5, 3)).astype(np.float32)
    b = np.zeros(3, np.float32)
    y_cpu = K.linear_forward(x, W, b)
    y_gpu = K.linear_forward(cp.asarray(x), cp.asarray(W), cp.asarray(b))
    np.testing.assert_allclose(cp.asnumpy(y_gpu), y_cpu, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset, want", [(None, "None"), ("20", "20")])
def test_openblas_thread_timeout_default_when_npdgm_loads_first(preset, want):
    """import npdgm before NumPy sets OPENBLAS_THREAD_TIMEOUT=21 for NumPy's import only (children do not
    inherit it; see tests/test_packaging.py); a user's value is kept."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    if preset:
        env["OPENBLAS_THREAD_TIMEOUT"] = preset
    code = "import npdgm, os, sys; assert 'numpy' in sys.modules; print(os.environ.get('OPENBLAS_THREAD_TIMEOUT'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == want


_FAULTS = """
import resource, sys
import npdgm, numpy as np
from npdgm.accel import process
if sys.argv[1] == "on":
    npdgm.accel.enable("auto")
def step():                                         # a training step's pattern of 512 KiB arrays
    live = [np.ones(1 << 17, np.float32) for _ in range(8)]      # forward: activations kept
    while live:                                     # backward: each one freed beside a temporary gradient
        g = np.ones(1 << 17, np.float32)
        live.pop()
        del g
for _ in range(5):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    step()
print(process.settings()["malloc keeps freed memory"], resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not (sys.platform == "linux" and platform.libc_ver()[0] == "glibc"), reason="glibc only")
@pytest.mark.parametrize("keep, wing", [("1", "on"), ("0", "on"), ("1", "off")])
def test_freed_step_arrays_are_reused_without_page_faults(keep, wing):
    """The fast wing, switched on, keeps freed heap memory (npdgm.accel.process.keep_freed_heap): a step's
    arrays, allocated and freed every step, come back without faulting their pages in again.
    NPDGM_KEEP_HEAP=0 shows what glibc's defaults cost (measured: 89,600 page faults in these 50 steps, 0
    with the setting). ``import npdgm`` alone changes nothing in the process: the defaults stay."""
    import os
    import subprocess

    env = dict(os.environ, NPDGM_KEEP_HEAP=keep)
    for k in ("GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        env.pop(k, None)
    out = subprocess.run([sys.executable, "-c", _FAULTS, wing], env=env, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    assert applied == {"on": "True" if keep == "1" else "False", "off": "None"}[wing]
    if keep == "1" and wing == "on":
        assert int(faults) < 500, faults
    else:
        assert int(faults) > 10_000, faults          # the cost the setting removes (so the test can fail)
