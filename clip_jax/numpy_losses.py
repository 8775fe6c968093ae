"""float64 NumPy contrastive losses: the benchmarks' independent reference.

Plain formulas, no JAX: `loss_and_grads` is the dense value and gradients
(small N); the `*_chunked` losses hold [rows, N] logits at a time, so they
fit at N = 32,768. A module of its own so that tests can import it without
the flags the benchmark entry point defines.
"""

from __future__ import annotations

import numpy as np


def positive_mask(keys):
  """[N, N] bool: (i, j) positive iff i == j or keys[i] == keys[j] >= 0."""
  keys = np.asarray(keys)
  same = (keys[:, None] == keys[None, :]) & (keys[:, None] >= 0)
  return same | np.eye(len(keys), dtype=bool)


def _multi_positive(a, b, scale, keys):
  """UniCL: soft targets P_ij / c_i over the rows (img->txt) and P_ij / c_j
  over the columns (txt->img); dL/dz = (softmax - targets) per direction."""
  n = len(a)
  sim = a @ b.T
  z = scale * sim
  positive = positive_mask(np.arange(n) if keys is None else keys)
  row_targets = positive / positive.sum(axis=1, keepdims=True)
  col_targets = positive / positive.sum(axis=0, keepdims=True)
  row_logp = z - _lse(z, 1)[:, None]
  col_logp = z - _lse(z, 0)[None, :]
  value = -((row_targets * row_logp).sum() +
            (col_targets * col_logp).sum()) / (2 * n)
  g = (_softmax(z, 1) - row_targets + _softmax(z, 0) - col_targets) / (2 * n)
  return value, (scale * g @ b, scale * g.T @ a, (g * sim).sum(), 0.0)


def _vse(a, b, margin, hardest):
  """VSE++ (hardest) / VSE0 on raw cosines, both directions, / N.

  Hardest negatives by np.argmax (ties: the lowest index). dL/dsim: +1 at
  each active hinge's negative, -1 at its positive, / N."""
  n = len(a)
  sim = a @ b.T
  pos = np.diag(sim)
  off = ~np.eye(n, dtype=bool)
  row_h = margin - pos[:, None] + sim  # Image i vs text j.
  col_h = margin - pos[None, :] + sim  # Text j vs image i.
  g = np.zeros_like(sim)
  if hardest:
    masked = np.where(off, sim, -np.inf)
    jr, ic = masked.argmax(axis=1), masked.argmax(axis=0)
    rows = row_h[np.arange(n), jr]
    cols = col_h[ic, np.arange(n)]
    value = (np.maximum(rows, 0).sum() + np.maximum(cols, 0).sum()) / n
    for i in range(n):
      if rows[i] > 0:
        g[i, jr[i]] += 1
        g[i, i] -= 1
      if cols[i] > 0:
        g[ic[i], i] += 1
        g[i, i] -= 1
  else:
    row_active = ((row_h > 0) & off).astype(float)
    col_active = ((col_h > 0) & off).astype(float)
    value = ((np.maximum(row_h, 0) * off).sum() +
             (np.maximum(col_h, 0) * off).sum()) / n
    g += row_active + col_active
    g -= np.diag(row_active.sum(axis=1) + col_active.sum(axis=0))
  g /= n
  return value, (g @ b, g.T @ a, 0.0, 0.0)


def _softmax(x, axis):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def _lse(x, axis):
  m = x.max(axis=axis)
  return m + np.log(np.exp(x - np.expand_dims(m, axis)).sum(axis=axis))


def loss_and_grads(name, a, b, scale, bias, *, keys=None, margin=0.2):
  """float64 dense value and grads (a, b, scale, bias): the reference.

  `keys`: multi_positive's per-row keys (None: all distinct); `margin`:
  the VSE losses'."""
  n = len(a)
  sim = a @ b.T
  if name == "multi_positive":
    return _multi_positive(a, b, scale, keys)
  if name in ("vse_max", "vse_sum"):
    return _vse(a, b, margin, hardest=name == "vse_max")
  if name == "softmax":
    z = scale * sim
    value = ((_lse(z, 1) + _lse(z, 0)).sum() - 2 * np.trace(z)) / (2 * n)
    eye = np.eye(n)
    g = (_softmax(z, 1) + _softmax(z, 0) - 2 * eye) / (2 * n)
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
