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
    bad = subprocess.run([sys.executable, "-c", "import npdgm"],
                         env={**__import__("os").environ, "NPDGM_BACKEND": "nope"}, capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown backend 'nope'" in bad.stderr


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


@pytest.mark.parametrize("preset, want", [(None, "12"), ("20", "20")])
def test_openblas_thread_timeout_default_when_npdgm_loads_first(preset, want):
    """import npdgm before NumPy sets OPENBLAS_THREAD_TIMEOUT=12 for OpenBLAS to read; a user's value is kept."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    if preset:
        env["OPENBLAS_THREAD_TIMEOUT"] = preset
    code = "import npdgm, os, sys; assert 'numpy' in sys.modules; print(os.environ['OPENBLAS_THREAD_TIMEOUT'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == want
