"""Option checks shared by the whole package: one place that says what an integer, a number and a
random generator argument may be, and one wording for the error.

    >>> import numpy as np
    >>> from npdgm.validate import check_int, check_float
    >>> check_int(np.int64(3), "n", lo=1)            # NumPy scalars are numbers too
    3
    >>> check_float(np.float32(0.5), "sigma", lo=0, strict_lo=True)
    0.5
    >>> check_int(1.5, "seed")                        # not coerced
    Traceback (most recent call last):
    ...
    npdgm.validate.OptionTypeError: seed must be an integer, got 1.5 (float)

A value of the wrong type raises :class:`OptionTypeError`, which is both a ``TypeError`` and a
``ValueError`` (as NumPy's ``AxisError`` is both ``ValueError`` and ``IndexError``), so code that
catches either keeps working; a value out of range raises ``ValueError``. Both name the option.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["OptionTypeError", "check_int", "check_float", "as_rng"]


class OptionTypeError(TypeError, ValueError):
    """An option has the wrong type (``True`` for a size, ``1.5`` for a seed, ``"3"`` for a rate)."""


def _show(value):
    return f"{value!r} ({type(value).__name__})"


def _int_words(lo, hi):
    if lo == 1 and hi is None:
        return "a positive integer"
    if lo == 0 and hi is None:
        return "a non-negative integer"
    if lo is not None and hi is not None:
        return f"an integer in [{lo}, {hi}]"
    if lo is not None:
        return f"an integer >= {lo}"
    if hi is not None:
        return f"an integer <= {hi}"
    return "an integer"


def check_int(value, name, *, lo=None, hi=None):
    """``int(value)`` when ``value`` is a Python or NumPy integer (not a bool, not a float) with
    ``lo <= value <= hi``; otherwise raise naming ``name``."""
    words = _int_words(lo, hi)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise OptionTypeError(f"{name} must be {words}, got {_show(value)}")
    v = int(value)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ValueError(f"{name} must be {words}, got {v}")
    return v


def check_float(value, name, *, lo=None, hi=None, finite=True, strict_lo=False):
    """``float(value)`` when ``value`` is a Python or NumPy real number (not a bool, not a string),
    finite unless ``finite=False``, and ``lo <= value`` (``lo < value`` with ``strict_lo``),
    ``value <= hi``; otherwise raise naming ``name``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise OptionTypeError(f"{name} must be a number, got {_show(value)}")
    v = float(value)
    if math.isnan(v) or (finite and math.isinf(v)):
        raise ValueError(f"{name} must be a finite number, got {v}")
    if lo is not None and (v <= lo if strict_lo else v < lo):
        raise ValueError(f"{name} must be {'>' if strict_lo else '>='} {lo:g}, got {v:g}")
    if hi is not None and v > hi:
        raise ValueError(f"{name} must be <= {hi:g}, got {v:g}")
    return v


def as_rng(rng, name="rng"):
    """A random Generator from ``rng``: ``None`` (fresh entropy), a non-negative Python/NumPy int
    seed, or a Generator (NumPy's, or CuPy's on the GPU backend), returned as is. A float or bool
    seed is an error, never rounded."""
    if rng is None:
        return np.random.default_rng()
    if isinstance(rng, np.random.Generator):
        return rng
    if type(rng).__module__.startswith("cupy") and hasattr(rng, "standard_normal"):
        return rng
    if isinstance(rng, (bool, np.bool_)) or not isinstance(rng, (int, np.integer)):
        raise OptionTypeError(f"{name} must be None, a non-negative integer seed or a "
                              f"numpy.random.Generator, got {_show(rng)}")
    return np.random.default_rng(check_int(rng, name, lo=0))
