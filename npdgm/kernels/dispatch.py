"""The one door between the reference and the fast wing (:mod:`npdgm.accel`).

A reference function marked ``@twinnable`` runs its own lines unless a twin is registered under its
name. The reference never imports the fast wing: the wing registers its twins here when it is switched
on (``npdgm.accel.enable``) and removes them when switched off. A twin takes the reference's
arguments and returns its result, or ``NotImplemented`` for arguments it does not handle (then the
reference lines run: small arrays, mixed dtypes, anything but NumPy / CuPy float arrays).

    @twinnable
    def relu_backward(dy, y):
        ...                                 # the formula, and nothing else

With no twin registered (``--accel off``, the default of the library) every call is the reference.
"""
from __future__ import annotations

import functools

_twins = {}     # reference name -> twin (the wing fills it; empty means: the reference everywhere)


def twinnable(fn):
    """Mark ``fn`` (a function or a method) as one the fast wing may replace by a tested twin."""
    name = f"{fn.__module__}.{fn.__qualname__}"

    @functools.wraps(fn)
    def call(*args, **kwargs):
        twin = _twins.get(name)
        if twin is not None:
            out = twin(*args, **kwargs)
            if out is not NotImplemented:
                return out
        return fn(*args, **kwargs)

    call.reference = fn
    call.twin_name = name
    return call


def register(reference, twin):
    """Run ``twin`` in place of the ``@twinnable`` function ``reference`` from now on."""
    _twins[reference.twin_name] = twin


def twins():
    """{reference name: twin} now registered (a copy: hand it to :func:`set_twins` to come back here)."""
    return dict(_twins)


def set_twins(table):
    """Replace every registration by ``table`` (from :func:`twins`; ``{}``: the reference everywhere)."""
    global _twins
    _twins = dict(table)
