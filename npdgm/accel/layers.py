"""Fused layer pairs: a Linear layer and the ReLU after it in one pass.

The twin of ``nn.Sequential.forward`` walks the layers as the reference does, but runs a ``Linear``
followed by a ReLU ``Activation`` through ``kernels.linear_relu_forward`` (whose twin adds the bias and
applies the ReLU in one pass over the product, in place: the reference's bits), and leaves in both layers
what their backward reads (the Linear's input, the ReLU's output).

The twins of ``Module.zero_grad`` and ``Linear.backward`` let a Linear layer write its gradients straight
into zeroed buffers instead of adding to them (see ``_zero_grads`` below).
"""
from __future__ import annotations

import weakref

from numpy import ndarray as _ndarray

from .. import backend
from ..backend import array_module
from ..kernels.linear import _matmul, linear_relu_forward
from ..nn.layers import Activation, Linear
from ..models.autoregressive import _Autoregressive
from ..nn.module import Module
from .optim import fill_zero


def _relu_pair(m, nxt, x):
    return (type(m) is Linear and type(nxt) is Activation and nxt.name == "relu"
            and getattr(x, "ndim", 0) == 2 and x.shape[1] == m.in_features)


def sequential_forward(seq, x):
    """``seq.forward(x)`` with every Linear + ReLU pair fused (a wrong input shape takes the reference
    ``Linear.forward``, for its error message)."""
    layers, i = seq.layers, 0
    while i < len(layers):
        m = layers[i]
        nxt = layers[i + 1] if i + 1 < len(layers) else None
        if _relu_pair(m, nxt, x):
            m._x = x
            x = nxt._cache = linear_relu_forward(x, m.W.data, m.b.data)
            i += 2
        else:
            x = m.forward(x)
            i += 1
    return x


# -- gradients known to be zero: Linear.backward writes them instead of adding -----------------------------
# The reference's zero_grad fills every gradient and Linear.backward adds dW = x^T dy and db = sum_B dy into
# them (a temporary per product, then a read-add-write pass over the gradient). Right after a zero_grad
# that addition is a copy, so the twins below keep a record the wing owns: the Linear layers whose gradient
# buffers hold the zeros of the last zero_grad and nothing else yet. The first backward of such a layer
# writes the products straight into its gradients (``out=``: one pass, no temporary) and leaves the record;
# any later backward of it (a layer called twice per step, gradient accumulation with zero_grad=False) adds,
# as the reference does. The fill stays whole, so every other backward (ActNorm, logvar_x, MaskedLinear,
# ConditionalMLP's split first layer) adds into zeros and every reader (optimizers, checks, all-reduce)
# sees zeros where no backward wrote. The one contract: code that adds into a Linear layer's gradient by
# hand between zero_grad and that layer's backward in the same step would see its addition overwritten
# (no module of the library does; a gradient buffer replaced since the zero_grad, as
# ``distributed.move_grads`` does, and layers sharing a Parameter take the reference).
_zero_grads = weakref.WeakKeyDictionary()   # Linear -> (W.grad, b.grad) as they were when zeroed


def _linear_layers(module):
    """Every module in ``module``'s tree whose backward is Linear.backward (the twin's), each once; a layer
    that shares a Parameter with another is left out (two layers must not both write one gradient)."""
    stack, found, owners = [module], {}, {}
    while stack:
        m = stack.pop()
        if isinstance(m, Linear) and type(m).backward is Linear.backward and id(m) not in found:
            found[id(m)] = m
            for p in (m.W, m.b):
                owners[id(p)] = owners.get(id(p), 0) + 1
        stack.extend(m._modules.values())
    return [m for m in found.values() if owners[id(m.W)] == 1 and owners[id(m.b)] == 1]


def zero_grad(module):
    """Twin of ``Module.zero_grad``: the reference's fill, then every Linear layer of the tree recorded as
    holding zero gradients (a flat NumPy gradient buffer: :func:`npdgm.accel.optim.fill_zero`)."""
    flat = module.flat_grads
    if type(flat) is _ndarray and flat.ndim == 1:
        fill_zero(flat)
    else:
        Module.zero_grad.reference(module)
    for lin in _flat_linear_layers(module, flat):
        _zero_grads[lin] = (lin.W.grad, lin.b.grad)


_layers_of = weakref.WeakKeyDictionary()    # flattened module -> (its flat_grads, its _linear_layers)


def _flat_linear_layers(module, flat):
    """:func:`_linear_layers`, kept per flattened module while its gradient buffer stays the same (a
    flattened model's layers are fixed: its buffers hold their layout)."""
    if flat is None:
        return _linear_layers(module)
    kept = _layers_of.get(module)
    if kept is None or kept[0] is not flat:
        kept = _layers_of[module] = (flat, _linear_layers(module))
    return kept[1]


def linear_backward(lin, dy, need_dx=True):
    """Twin of ``Linear.backward``: for a layer zeroed since its last backward, dW = x^T dy and db = sum_B dy
    written straight into its gradients (``out=``), dx = dy W^T; otherwise (and for arguments the reference
    should check or cast) NotImplemented: the reference adds. Same values as the reference (0 + g = g; a
    -0.0 product stays -0.0 where the reference's sum gives +0.0)."""
    zeroed = _zero_grads.pop(lin, None)
    W, b, x = lin.W, lin.b, lin._x
    if (zeroed is None or zeroed[0] is not W.grad or zeroed[1] is not b.grad or x is None
            or dy.shape != (x.shape[0], W.data.shape[1])
            or not dy.dtype == x.dtype == W.data.dtype == W.grad.dtype == b.grad.dtype):
        return NotImplemented
    xp = array_module(dy)
    dx = _matmul(xp, dy, W.data.T) if need_dx else None
    xp.matmul(x.T, dy, out=W.grad)
    dy.sum(axis=0, out=b.grad)
    return dx


def autoregressive_solve(layer, z):
    """The MAF/IAF incremental D-pass solve (``_Autoregressive._solve``, the same lines) on one BLAS thread: its D
    tiny GEMMs per layer only wait on each other with two (measured on a loaded 2-core machine: 18 s of CPU
    against 0.66 s for a 784-dimensional layer)."""
    with backend.one_blas_thread():
        return _Autoregressive._solve.reference(layer, z)
