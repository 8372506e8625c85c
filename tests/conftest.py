import os

import numpy as np
import pytest

SHARED_MNIST = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mnist")


@pytest.fixture(autouse=True, scope="session")
def _one_blas_thread():
    """The tests' matrices are small: one BLAS thread is faster than two fighting for two cores
    (NICE's learning test: 22 s at 2 threads, 3 s at 1). Benchmarks set their own thread counts."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


@pytest.fixture(autouse=True)
def _restore_backend():
    """Every test starts on NumPy / float32 and cannot leak a backend or dtype into the next one."""
    from npdgm import backend

    with backend.use("numpy", "float32"):
        yield


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def f64():
    """Run the test with float64 as the default dtype on NumPy."""
    from npdgm import backend

    with backend.use("numpy", "float64"):
        yield


@pytest.fixture
def shared_mnist():
    """Directory of the full MNIST IDX files, or skip when this checkout has no ../shared beside it."""
    if not os.path.isdir(SHARED_MNIST):
        pytest.skip("../shared/data/mnist not present")
    return SHARED_MNIST


@pytest.fixture
def cupy():
    """The cupy module, or skip when CuPy or a visible GPU is missing."""
    from npdgm import backend

    if not backend.cupy_available():
        pytest.skip("CuPy with a visible GPU is not available")
    import cupy

    return cupy


@pytest.fixture
def run_cli(capsys):
    """``run_cli(*argv) -> (exit code, stdout, stderr)`` of ``npdgm ARGV`` in this process, asserting that no
    RuntimeWarning (numpy's "overflow encountered in exp" and the like) reached the user: none was issued
    through the warnings machinery (pytest would otherwise record it silently) and none is in stderr."""
    import warnings

    from npdgm import cli

    def run(*argv):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            code = cli.main([str(a) for a in argv])
        cap = capsys.readouterr()
        leaked = [f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}" for w in caught
                  if issubclass(w.category, RuntimeWarning)]
        assert not leaked and "RuntimeWarning" not in cap.err, (leaked, cap.err)
        return code, cap.out, cap.err
    return run
