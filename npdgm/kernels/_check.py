"""Cheap argument checks shared by the kernels (shapes and dtypes only: no pass over data)."""


def check_2d(name, a):
    if getattr(a, "ndim", None) != 2:
        raise ValueError(f"{name} must be a 2-D array (batch, features), got shape {getattr(a, 'shape', type(a))}")


def check_float(name, a):
    if getattr(a, "dtype", None) is None or a.dtype.kind != "f":
        raise TypeError(f"{name} must be a float32/float64 array, got dtype {getattr(a, 'dtype', type(a))}")


def check_same_shape(name_a, a, name_b, b):
    if a.shape != b.shape:
        raise ValueError(f"{name_a} has shape {a.shape} but {name_b} has shape {b.shape}; they must match")


def check_same_dtype(name_a, a, name_b, b):
    if a.dtype != b.dtype:
        raise TypeError(f"{name_a} is {a.dtype} but {name_b} is {b.dtype}; they must match")
