"""Fused layer pairs: a Linear layer and the ReLU after it in one pass.

The twin of ``nn.Sequential.forward`` walks the layers as the reference does, but runs a ``Linear``
followed by a ReLU ``Activation`` through ``kernels.linear_relu_forward`` (whose twin adds the bias and
applies the ReLU in one pass over the product, in place: the reference's bits), and leaves in both layers
what their backward reads (the Linear's input, the ReLU's output).
"""
from __future__ import annotations

from ..kernels.linear import linear_relu_forward
from ..nn.layers import Activation, Linear


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
