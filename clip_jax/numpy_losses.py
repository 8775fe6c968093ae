"""float64 NumPy contrastive losses: the benchmarks' independent reference.

Plain formulas, no JAX: `loss_and_grads` is the dense value and gradients
(small N); the `*_chunked` losses hold [rows, N] logits at a time, so they
fit at N = 32,768. A module of its own so that tests can import it without
the flags the benchmark entry point defines.
"""

from __future__ import annotations

import numpy as np


def loss_and_grads(name, a, b, scale, bias):
  """float64 dense value and grads (a, b, scale, bias): the reference."""
  n = len(a)
  sim = a @ b.T
  if name == "softmax":
    z = scale * sim

    def softmax(x, axis):
      e = np.exp(x - x.max(axis=axis, keepdims=True))
      return e / e.sum(axis=axis, keepdims=True)

    def lse(x, axis):
      m = x.max(axis=axis)
      return m + np.log(np.exp(x - np.expand_dims(m, axis)).sum(axis=axis))

    value = ((lse(z, 1) + lse(z, 0)).sum() - 2 * np.trace(z)) / (2 * n)
    eye = np.eye(n)
    g = (softmax(z, 1) + softmax(z, 0) - 2 * eye) / (2 * n)
    return value, (scale * g @ b, scale * g.T @ a, (g * sim).sum(), 0.0)
  z = scale * sim + bias
  y = 2 * np.eye(n) - 1
  value = np.logaddexp(0.0, -y * z).sum() / n
  g = -y * np.exp(-np.logaddexp(0.0, y * z)) / n  # -y sigmoid(-yz) / n.
  return value, (scale * g @ b, scale * g.T @ a, (g * sim).sum(), g.sum())


def softmax_loss_chunked(a, b, scale, rows=1024):
  """CLIP's loss in float64, [rows, N] logits at a time (fits at N = 32K)."""
  n = len(a)
  row_lse = np.empty(n)
  col_max, col_sum = np.full(n, -np.inf), np.zeros(n)
  diag = scale * np.einsum("ij,ij->i", a, b)
  for start in range(0, n, rows):
    z = scale * (a[start:start + rows] @ b.T)
    m = z.max(axis=1, keepdims=True)
    row_lse[start:start + rows] = (m + np.log(np.exp(z - m).sum(
        axis=1, keepdims=True)))[:, 0]
    new_max = np.maximum(col_max, z.max(axis=0))
    col_sum = col_sum * np.exp(col_max - new_max) + np.exp(
        z - new_max).sum(axis=0)
    col_max = new_max
  col_lse = col_max + np.log(col_sum)
  return ((row_lse - diag).sum() + (col_lse - diag).sum()) / (2 * n)


def sigmoid_loss_chunked(a, b, scale, bias, rows=1024):
  """SigLIP's loss in float64 (sum over pairs / N), [rows, N] at a time."""
  n, total = len(a), 0.0
  for start in range(0, n, rows):
    z = scale * (a[start:start + rows] @ b.T) + bias
    labels = -np.ones_like(z)
    idx = np.arange(min(rows, n - start))
    labels[idx, start + idx] = 1.0
    total += np.logaddexp(0.0, -labels * z).sum()
  return total / n
