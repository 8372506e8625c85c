"""Parameter and Module: named parameters, a forward cache, a backward that accumulates grads.

A module's ``forward(x)`` stores what its ``backward`` needs; ``backward(dy)`` returns dx
and adds the parameter gradients into ``p.grad`` (``input_vjp(dy)``: the same dx alone). After
:meth:`Module.flatten` every parameter (and every gradient) is a view into one contiguous buffer,
``flat_params`` / ``flat_grads``: the optimizer updates one array, a checkpoint is one array plus
:meth:`Module.layout`, and zero_grad is one fill.
"""
from __future__ import annotations

import numpy

from .. import backend
from ..kernels.dispatch import twinnable


class Parameter:
    """A trainable array ``data`` and its gradient ``grad`` (same shape and dtype). A backward adds into
    ``grad`` (``p.grad += g``, or :meth:`accumulate` for a slice); :meth:`Module.zero_grad` zeroes it."""

    __slots__ = ("data", "grad")

    def __init__(self, data):
        self.data = data
        self.grad = backend.array_module(data).zeros_like(data)

    def accumulate(self, g, index=Ellipsis):
        """grad[index] += g."""
        self.grad[index] += g

    @property
    def shape(self):
        return self.data.shape

    def __repr__(self):
        return f"Parameter(shape={self.data.shape}, dtype={self.data.dtype})"


class Module:
    """Base class: parameters and child modules assigned as attributes are registered by name."""

    def __init__(self):
        object.__setattr__(self, "_params", {})
        object.__setattr__(self, "_modules", {})
        object.__setattr__(self, "flat_params", None)
        object.__setattr__(self, "flat_grads", None)

    def __setattr__(self, name, value):
        if "_params" not in self.__dict__:
            raise RuntimeError(f"{type(self).__name__}.__init__ must call super().__init__() first")
        if isinstance(value, Parameter):
            self._params[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        object.__setattr__(self, name, value)

    # -- parameters -------------------------------------------------------------------------
    def named_parameters(self, prefix=""):
        """Yield (dotted name, Parameter) in registration order, children after own params."""
        for name, p in self._params.items():
            yield prefix + name, p
        for mname, m in self._modules.items():
            yield from m.named_parameters(prefix + mname + ".")

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    @property
    def params(self):
        """{name: value array} (views; writing into them changes the model)."""
        return {n: p.data for n, p in self.named_parameters()}

    @property
    def grads(self):
        """{name: gradient array} of the same layout as :attr:`params` (views)."""
        return {n: p.grad for n, p in self.named_parameters()}

    def num_parameters(self) -> int:
        return sum(int(p.data.size) for p in self.parameters())

    @twinnable
    def zero_grad(self):
        """Every gradient to zero (flattened: one fill of ``flat_grads``)."""
        if self.flat_grads is not None:
            self.flat_grads.fill(0)
            return
        for p in self.parameters():
            p.grad.fill(0)

    def layout(self):
        """[(name, shape, offset)] of every parameter in the flat buffer (element offsets)."""
        out, off = [], 0
        for n, p in self.named_parameters():
            out.append((n, tuple(p.data.shape), off))
            off += int(p.data.size)
        return out

    def views(self, buf):
        """[view of the 1-D ``buf`` for every parameter]: its slice at :meth:`layout`'s offset, in its shape,
        in :meth:`parameters` order (how a flat buffer holds the parameters, or their gradients)."""
        return [buf[off:off + int(numpy.prod(shape, dtype=numpy.int64))].reshape(shape)
                for _, shape, off in self.layout()]

    def flatten(self):
        """Move every parameter and gradient into one contiguous buffer each (views keep their names)."""
        ps = self.parameters()
        if not ps:
            return self
        xp = backend.array_module(ps[0].data)
        dtype = ps[0].data.dtype
        for p in ps:
            if p.data.dtype != dtype:
                raise TypeError(f"cannot flatten parameters of mixed dtypes ({p.data.dtype} vs {dtype})")
        total = sum(int(p.data.size) for p in ps)
        flat, gflat = xp.empty(total, dtype=dtype), xp.zeros(total, dtype=dtype)
        for p, view, gview in zip(ps, self.views(flat), self.views(gflat)):
            view[...] = p.data
            p.data = view
            p.grad = gview                  # a fresh zero buffer (old gradient values are not carried over)
        object.__setattr__(self, "flat_params", flat)
        object.__setattr__(self, "flat_grads", gflat)
        return self

    # -- checkpoints ------------------------------------------------------------------------
    def state_dict(self):
        """{name: host NumPy copy of the parameter}."""
        return {n: backend.to_host(p.data).copy() for n, p in self.named_parameters()}

    def load_state_dict(self, state):
        """Copy values in by name; every name, shape and dtype must match exactly."""
        own = dict(self.named_parameters())
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise KeyError(f"state dict does not match the model: missing {missing}, unexpected {unexpected}")
        for n, p in own.items():
            v = state[n]
            if tuple(v.shape) != tuple(p.data.shape):
                raise ValueError(f"state dict entry {n!r} has shape {tuple(v.shape)}, model expects {p.data.shape}")
            if numpy.dtype(v.dtype) != numpy.dtype(p.data.dtype):
                raise TypeError(f"state dict entry {n!r} has dtype {v.dtype}, model expects {p.data.dtype}")
            p.data[...] = backend.array_module(p.data).asarray(v)
        return self

    # -- forward / backward -----------------------------------------------------------------
    def forward(self, x):
        raise NotImplementedError

    def backward(self, dy, need_dx=True):
        raise NotImplementedError

    def input_vjp(self, dy):
        """J^T dy: the gradient with respect to the input of the last ``forward``, with no parameter gradient
        computed or accumulated (what a sampler needs from a decoder, d/dz log p(x|z), or a MADE its Jacobi
        steps). A module without parameters gives its backward; a module with parameters overrides this."""
        if self._params or self._modules:
            raise NotImplementedError(f"{type(self).__name__} has parameters and no input_vjp of its own")
        return self.backward(dy)

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def __repr__(self):
        return f"{type(self).__name__}({self.num_parameters()} parameters)"
