"""npdgm.validate: the one place for integer / number / RNG option checks."""
import math

import numpy as np
import pytest

from npdgm.validate import OptionTypeError, as_rng, check_float, check_int


def test_check_int_accepts_numpy_integers_and_rejects_floats_and_bools():
    assert check_int(np.int64(3), "n", lo=1) == 3 and type(check_int(np.int32(3), "n")) is int
    for bad in (1.5, 2.0, True, np.bool_(True), "3", None):
        with pytest.raises(TypeError, match="n must be a positive integer, got"):
            check_int(bad, "n", lo=1)
    with pytest.raises(ValueError, match="n must be a positive integer, got 0"):
        check_int(0, "n", lo=1)
    with pytest.raises(ValueError, match="seed must be a non-negative integer, got -1"):
        check_int(-1, "seed", lo=0)
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 4\], got 5"):
        check_int(5, "k", lo=1, hi=4)
    # a type error is also a ValueError, so existing `except ValueError` keeps working
    assert issubclass(OptionTypeError, TypeError) and issubclass(OptionTypeError, ValueError)


def test_check_float_accepts_numpy_scalars_and_rejects_nonfinite_and_out_of_range():
    assert check_float(np.float32(0.5), "sigma", lo=0, strict_lo=True) == 0.5
    assert check_float(np.int64(2), "x") == 2.0 and type(check_float(np.float64(1), "x")) is float
    for bad in (True, "0.5", None, [1.0]):
        with pytest.raises(TypeError, match="sigma must be a number"):
            check_float(bad, "sigma")
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="sigma must be a finite number"):
            check_float(bad, "sigma")
    assert check_float(math.inf, "t", finite=False) == math.inf
    with pytest.raises(ValueError, match="must be a finite number"):
        check_float(math.nan, "t", finite=False)
    with pytest.raises(ValueError, match="clip must be > 0, got 0"):
        check_float(0, "clip", lo=0, strict_lo=True)
    assert check_float(0, "beta", lo=0) == 0.0
    with pytest.raises(ValueError, match="p must be <= 1, got 2"):
        check_float(2, "p", hi=1)


def test_as_rng():
    g = np.random.default_rng(0)
    assert as_rng(g) is g
    assert as_rng(np.int64(5)).random() == np.random.default_rng(5).random()
    assert isinstance(as_rng(None), np.random.Generator)
    for bad in (1.5, True, "0"):
        with pytest.raises(TypeError, match="seed must be None, a non-negative integer seed"):
            as_rng(bad, "seed")
    with pytest.raises(ValueError, match="rng must be a non-negative integer, got -1"):
        as_rng(-1)
