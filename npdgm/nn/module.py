"""Parameter and Module: named parameters, a forward cache, a backward that accumulates grads.

A module's ``forward(x)`` stores what its ``backward`` needs; ``backward(dy)`` returns dx
and adds the parameter gradients into ``p.grad``. After :meth:`Module.flatten` every
parameter (and every gradient) is a view into one contiguous buffer, ``flat_params`` /
``flat_grads``: the optimizer updates one array, a checkpoint is one array plus
:meth:`Module.layout`, and zero_grad costs no pass over memory (see :meth:`Module.zero_grad`).
"""
from __future__ import annotations

import numpy

from .. import backend


class Parameter:
    """A trainable array ``data`` and its gradient ``grad`` (same shape and dtype).

    ``zeroed`` is True while the gradient is known to hold zeros: set by :meth:`Module.zero_grad`
    (and by :meth:`Module.flatten`). A backward that finds it set may write its gradient with ``out=``
    into ``grad`` instead of adding a temporary (one pass over memory instead of three), and must
    clear it. Reading ``grad`` changes nothing; the write paths say that they write:

        p.grad += g                    assignment (``+=``, ``-=``, ``=``) goes through the setter,
                                       which clears ``zeroed``
        p.accumulate(g, index)         grad[index] += g (a slice of the gradient), clears ``zeroed``
        p.zeroed = False               after writing into ``p.grad[...]`` by hand between
                                       ``zero_grad`` and a backward that should add to it

    ``stale`` is True while the gradient is zero in meaning but its memory still holds old values:
    :meth:`Module.zero_grad` of a flattened module only marks its parameters (no fill of the whole
    buffer), and the zeros are written on first use: reading ``grad`` fills a stale gradient with
    zeros first, a backward that overwrites it with ``out=`` (``Linear``: dW = x.T @ dy, db = sum dy)
    clears ``stale`` without a fill, and the optimizers and ``Module.flat_grads`` fill whatever is
    still stale before they read. So a step whose backward writes every gradient with ``out=`` (the
    MLPs, the flows' coupling nets) zeroes nothing at all. Code holding the raw gradient buffer sees
    the previous values until then.
    """

    __slots__ = ("data", "_grad", "zeroed", "stale")

    def __init__(self, data):
        self.data = data
        self._grad = backend.array_module(data).zeros_like(data)
        self.zeroed = True
        self.stale = False

    @property
    def grad(self):
        """The gradient array (the same array every time; a stale one is filled with zeros first)."""
        if self.stale:
            self._grad.fill(0)
            self.stale = False
        return self._grad

    @grad.setter
    def grad(self, value):
        self.zeroed = self.stale = False
        self._grad = value

    def accumulate(self, g, index=Ellipsis):
        """grad[index] += g, and the gradient is no longer known to be zero."""
        self.grad[index] += g
        self.zeroed = False

    def overwritten(self):
        """Call after writing the whole gradient with ``out=`` (no read): neither zero nor stale now."""
        self.zeroed = self.stale = False

    @property
    def shape(self):
        return self.data.shape

    def __repr__(self):
        return f"Parameter(shape={self.data.shape}, dtype={self.data.dtype})"


def fill_stale(params):
    """Write the zeros of every gradient in ``params`` that :meth:`Module.zero_grad` marked stale and no
    backward overwrote (see :class:`Parameter`)."""
    for p in params:
        if p.stale:
            p.grad  # noqa: B018  (the getter writes the zeros)


class Module:
    """Base class: parameters and child modules assigned as attributes are registered by name."""

    def __init__(self):
        object.__setattr__(self, "_params", {})
        object.__setattr__(self, "_modules", {})
        object.__setattr__(self, "flat_params", None)
        object.__setattr__(self, "_flat_grads", None)

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
        """{name: gradient array} of the same layout as :attr:`params` (views; reading changes nothing.
        Writing into them between ``zero_grad`` and a backward that should add to the written values:
        clear ``p.zeroed`` as well, or use ``p.grad += ...`` / :meth:`Parameter.accumulate`)."""
        return {n: p.grad for n, p in self.named_parameters()}

    def num_parameters(self) -> int:
        return sum(int(p.data.size) for p in self.parameters())

    @property
    def flat_grads(self):
        """The flat gradient buffer (None before :meth:`flatten`); stale gradients in it (see
        :class:`Parameter`) are filled with zeros first, so its values are the gradients."""
        buf = self._flat_grads
        if buf is not None:
            fill_stale(self.parameters())
        return buf

    @flat_grads.setter
    def flat_grads(self, buf):
        object.__setattr__(self, "_flat_grads", buf)

    def zero_grad(self):
        """Every gradient to zero. Flattened: the parameters are only marked (``zeroed``, ``stale``) and
        each gradient's zeros are written when it is first used, unless the backward overwrites it
        (measured: the 77 MB fill was 4.7 ms of a 2-thread nice step; see :class:`Parameter`)."""
        flat = self._flat_grads is not None
        for p in self.parameters():
            if flat:
                p.stale = True
            else:
                p._grad.fill(0)
                p.stale = False
            p.zeroed = True

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
            p._grad = gview
            p.zeroed, p.stale = True, False  # a fresh zero buffer (old gradient values are not carried over)
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

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def __repr__(self):
        return f"{type(self).__name__}({self.num_parameters()} parameters)"
