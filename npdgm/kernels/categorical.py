"""Categorical distributions from logits: log-softmax, cross-entropy, entropy, expectations.

Every function takes logits ``s`` of shape (B, C) (one row per example, one column per class) and
works along the class axis; losses return one value per row. Everything is evaluated from the
max-shifted logits, so any finite |s| is safe. With q = softmax(s):

    log_softmax          log q_c = s_c - logsumexp(s)
    softmax_ce           -log q_y                     (integer labels y)
    softmax_entropy      H(q) = -sum_c q_c log q_c
    softmax_expectation  E_q[v] = sum_c q_c v_c        (v: (B, C) values, e.g. -ELBO(x, c) in M2)
"""
from ..backend import array_module
from ._check import check_2d, check_same_shape


def softmax_forward(s):
    """q = softmax(s) along the last axis: exp(s - max) / sum exp(s - max).  s: (B, C) -> (B, C)."""
    xp = array_module(s)
    e = xp.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def softmax_backward(dq, q):
    """ds = q * (dq - sum_c dq_c q_c)   (Jacobian diag(q) - q q^T applied to dq), q = softmax(s)."""
    check_same_shape("dq", dq, "q", q)
    return q * (dq - (dq * q).sum(axis=-1, keepdims=True))


def log_softmax_forward(s):
    """y = log softmax(s) = s - logsumexp(s) along the last axis.  s: (B, C) -> (B, C)."""
    xp = array_module(s)
    m = s.max(axis=-1, keepdims=True)
    z = s - m
    return z - xp.log(xp.exp(z).sum(axis=-1, keepdims=True))


def log_softmax_backward(dy, y):
    """ds = dy - softmax(s) * sum_c dy_c,   from y = log_softmax(s) (softmax = exp(y))."""
    check_same_shape("dy", dy, "y", y)
    xp = array_module(y)
    return dy - xp.exp(y) * dy.sum(axis=-1, keepdims=True)


def _check_labels(s, labels):
    check_2d("logits", s)
    if getattr(labels, "ndim", None) != 1 or labels.shape[0] != s.shape[0]:
        raise ValueError(f"labels must have shape ({s.shape[0]},) to match logits {s.shape}, "
                         f"got {getattr(labels, 'shape', type(labels))}")
    if labels.dtype.kind not in "iu":
        raise TypeError(f"labels must be an integer array, got dtype {labels.dtype}")


def softmax_ce_forward(s, labels):
    """Cross-entropy of integer ``labels`` under softmax(s), per row: -log q_y = logsumexp(s) - s_y.

    s: (B, C) logits, labels: (B,) integers in [0, C) -> (B,)."""
    _check_labels(s, labels)
    xp = array_module(s)
    rows = xp.arange(s.shape[0])
    return -log_softmax_forward(s)[rows, labels]


def softmax_ce_backward(dloss, s, labels):
    """ds = dloss[:, None] * (softmax(s) - onehot(labels))."""
    xp = array_module(s)
    g = softmax_forward(s)
    g[xp.arange(s.shape[0]), labels] -= 1
    return dloss[:, None] * g


def softmax_entropy_forward(s):
    """H(softmax(s)) per row = -sum_c q_c log q_c.  s: (B, C) -> (B,), in nats."""
    check_2d("logits", s)
    xp = array_module(s)
    lq = log_softmax_forward(s)
    return -(xp.exp(lq) * lq).sum(axis=-1)


def softmax_entropy_backward(dH, s):
    """ds = -dH[:, None] * q * (log q + H):   dH/dq_c = -(log q_c + 1), through the softmax Jacobian
    the constant cancels, giving q_c (-log q_c - H)."""
    xp = array_module(s)
    lq = log_softmax_forward(s)
    q = xp.exp(lq)
    H = -(q * lq).sum(axis=-1, keepdims=True)
    return -dH[:, None] * q * (lq + H)


def softmax_expectation_forward(s, v):
    """E_{softmax(s)}[v] per row = sum_c q_c v_c.   s, v: (B, C) -> (B,)."""
    check_2d("logits", s)
    check_same_shape("logits", s, "v", v)
    return (softmax_forward(s) * v).sum(axis=-1)


def softmax_expectation_backward(dy, s, v):
    """ds = dy * q * (v - E_q[v]),   dv = dy * q.   Returns (ds, dv)."""
    q = softmax_forward(s)
    dq = dy[:, None] * q
    return dq * (v - (q * v).sum(axis=-1, keepdims=True)), dq
