"""ConditionalMLP: an MLP on [x | e] whose first layer is split so the x-part can be shared.

    [x | e] @ W + b = x @ W[:D] + e @ W[D:] + b          x: (N, D), e: (N, C) one-hot rows e_y

Backward of the split first layer (dA = d loss / d first-layer output):

    dW[:D] = x^T dA,   dW[D:] = e^T dA  (row y collects the rows of label y),   db = sum_N dA,
    dx     = dA W[:D]^T

Written that way, the encoder of every class can share the x-part ``x @ W[:D]``, computed once
(:meth:`ConditionalMLP.forward_all`), which the semi-supervised M2 (:mod:`npdgm.models.m2`) relies on.
"""
from __future__ import annotations

from ..kernels.linear import linear_backward, linear_forward
from .layers import MLP

__all__ = ["ConditionalMLP"]


class ConditionalMLP(MLP):
    """An MLP on ``[x | e]`` (x: (N, D) features, e: (N, C) one-hot or any class weights), first layer
    split as ``x @ W[:D] + e @ W[D:] + b``. Same parameters and names as ``MLP(D + C, ...)``.

    forward(x, e)     rows [x_n | e_n]                                   -> (N, out)
    forward_all(x)    rows [x_b | e_c] for every class c (class-major:   -> (C * B, out)
                      row c * B + b), the x-part computed once
    backward(dy)      accumulates the parameter grads; returns dx (N, D) or (B, D) (for
                      forward_all: summed over the classes).
    """

    def __init__(self, in_features, num_classes, hidden, out_features, **kw):
        super().__init__(int(in_features) + int(num_classes), hidden, out_features, **kw)
        self.d_in, self.num_classes = int(in_features), int(num_classes)
        object.__setattr__(self, "_c", None)

    def _first(self, x, e):
        """The first layer's pre-activation: x @ W[:D] + b (the linear kernel), plus the class rows
        e @ W[D:] (e None: every class, (C, B, H) -> (C B, H))."""
        lin = self.layers[0]
        D = self.d_in
        if x.ndim != 2 or x.shape[1] != D:
            raise ValueError(f"ConditionalMLP expects x of shape (batch, {D}), got {x.shape}")
        a = linear_forward(x, lin.W.data[:D], lin.b.data)
        if e is None:
            C, B = self.num_classes, x.shape[0]
            a = (a[None] + lin.W.data[D:][:, None, :]).reshape(C * B, -1)
        else:
            a = a + e @ lin.W.data[D:]
        return a

    def _rest_forward(self, h):
        for m in self.layers[1:]:
            h = m.forward(h)
        return h

    def forward(self, x, e):
        """x (N, D), e (N, C) -> (N, out)."""
        if e.shape != (x.shape[0], self.num_classes):
            raise ValueError(f"class rows must have shape ({x.shape[0]}, {self.num_classes}), got {e.shape}")
        object.__setattr__(self, "_c", (x, e))
        return self._rest_forward(self._first(x, e))

    def forward_all(self, x):
        """x (B, D) -> (C * B, out): row c * B + b is the output for [x_b | e_c]."""
        object.__setattr__(self, "_c", (x, None))
        return self._rest_forward(self._first(x, None))

    def backward(self, dy, need_dx=True):
        """Rest of the layers as in Sequential; then the split first layer:
        dW[:D] += x^T dA,  dW[D:] += e^T dA (forward_all: row c += sum_b dA_cb),  db += sum dA,
        dx = dA W[:D]^T (forward_all: dA summed over c first). dy (N, out) -> dx (N, D) or (B, D)."""
        for m in self.layers[:0:-1]:
            dy = m.backward(dy)
        x, e = self._c
        lin, D = self.layers[0], self.d_in
        if e is None:
            dA3 = dy.reshape(self.num_classes, x.shape[0], -1)
            lin.W.accumulate(dA3.sum(axis=1), slice(D, None))
            dy = dA3.sum(axis=0)
        else:
            lin.W.accumulate(e.T @ dy, slice(D, None))
        dx, dW, db = linear_backward(dy, x, lin.W.data[:D], need_dx)
        lin.W.accumulate(dW, slice(None, D))
        lin.b.accumulate(db)
        return dx

    def input_vjp(self, dy):
        """dx of :meth:`backward` alone: the rest's input_vjp, then dx = dA W[:D]^T (forward_all: dA summed
        over the classes first); no parameter gradient."""
        for m in self.layers[:0:-1]:
            dy = m.input_vjp(dy)
        x, e = self._c
        if e is None:
            dy = dy.reshape(self.num_classes, x.shape[0], -1).sum(axis=0)
        return dy @ self.layers[0].W.data[:self.d_in].T
