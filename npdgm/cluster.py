"""Scoring a clustering against labels: the unsupervised cluster accuracy (best one-to-one map of clusters to
classes, found by the Hungarian method) and purity (each cluster read as its majority class).

    acc    = max over one-to-one maps m: clusters -> classes of (1/N) sum_i [m(c_i) = y_i]
    purity = (1/N) sum_k max_y #{i : c_i = k, y_i = y}

With more clusters than classes the one-to-one map leaves clusters unmatched (their points count as wrong), so
acc <= purity; both are 1 for a perfect clustering and about the largest class's share for a constant one.
"""
from __future__ import annotations

import numpy as np

__all__ = ["contingency", "linear_assignment", "cluster_accuracy", "purity"]


def contingency(assigned, labels):
    """counts[k, y] = #{i : assigned_i = k, labels_i = y} for non-negative integer arrays of one length."""
    assigned, labels = np.asarray(assigned), np.asarray(labels)
    if assigned.shape != labels.shape or assigned.ndim != 1 or not len(assigned):
        raise ValueError(f"assigned and labels must be non-empty 1-D arrays of one length, got shapes "
                         f"{assigned.shape} and {labels.shape}")
    if assigned.dtype.kind not in "iu" or labels.dtype.kind not in "iu" or assigned.min() < 0 or labels.min() < 0:
        raise ValueError("assigned and labels must hold non-negative integers")
    counts = np.zeros((int(assigned.max()) + 1, int(labels.max()) + 1), dtype=np.int64)
    np.add.at(counts, (assigned, labels), 1)
    return counts


def linear_assignment(cost):
    """Rows -> columns of a (n, m) cost matrix, n <= m, minimizing the summed cost (Hungarian method with
    potentials, O(n^2 m)). Returns col (n,): the column of each row."""
    cost = np.asarray(cost, dtype=np.float64)
    n, m = cost.shape
    if n > m:
        raise ValueError(f"linear_assignment needs rows <= columns, got {cost.shape}; pass the transpose")
    u, v = np.zeros(n + 1), np.zeros(m + 1)
    p = np.zeros(m + 1, dtype=np.int64)          # p[j]: the row (1-based) matched to column j, 0 = none
    way = np.zeros(m + 1, dtype=np.int64)
    for i in range(1, n + 1):
        p[0], j0 = i, 0
        minv, used = np.full(m + 1, np.inf), np.zeros(m + 1, dtype=bool)
        while p[j0]:
            used[j0] = True
            i0 = p[j0]
            free = ~used[1:]
            cur = cost[i0 - 1] - u[i0] - v[1:]
            better = free & (cur < minv[1:])
            minv[1:][better] = cur[better]
            way[1:][better] = j0
            j1 = 1 + int(np.argmin(np.where(free, minv[1:], np.inf)))
            delta = minv[j1]
            u[p[used]] += delta
            v[used] -= delta
            minv[1:][free] -= delta
            j0 = j1
        while j0:
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
    col = np.empty(n, dtype=np.int64)
    for j in range(1, m + 1):
        if p[j]:
            col[p[j] - 1] = j - 1
    return col


def cluster_accuracy(assigned, labels):
    """(acc, mapping): the unsupervised clustering accuracy and the best one-to-one {cluster: class}."""
    counts = contingency(assigned, labels)
    k, c = counts.shape
    if k <= c:
        col = linear_assignment(-counts)
        mapping = {int(r): int(col[r]) for r in range(k)}
    else:
        row = linear_assignment(-counts.T)
        mapping = {int(row[y]): int(y) for y in range(c)}
    hits = sum(counts[r, y] for r, y in mapping.items())
    return float(hits / counts.sum()), mapping


def purity(assigned, labels):
    """(1/N) sum over clusters of its majority class's count."""
    counts = contingency(assigned, labels)
    return float(counts.max(axis=1).sum() / counts.sum())
