"""The registry of reference cases: ``name -> (make, run, formula)``.

A case is ``make(rng, dtype) -> {name: array}`` (inputs, parameters, noise and the upstream gradients)
and ``run(inputs) -> (outputs, grads)``. :mod:`npdgm.reference.kernels` registers one case per kernel
table entry, :mod:`npdgm.reference.models` the whole models and flow layers; :mod:`npdgm.reference`
writes and checks them.
"""
CASES = {}  # name -> dict(make, run, formula)


def register(name, formula, make):
    """Decorator registering ``run(inputs) -> (outputs, grads)`` as case ``name``, whose inputs
    come from ``make(rng, dtype) -> {name: array}`` (the upstream gradient is ``dy``). A name is
    registered once: the case names are the file names of a reference directory."""
    def deco(run):
        if name in CASES:
            raise ValueError(f"reference case {name!r} is registered twice")
        CASES[name] = {"make": make, "run": run, "formula": formula}
        return run
    return deco
