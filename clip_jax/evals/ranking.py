"""Ranks of the right answers among similarity scores, chunked over queries.

The shared core of zero-shot classification (queries = images, keys = class
vectors) and retrieval (images <-> captions). Scores are cosine similarities
`query @ key` in float32 computed with `Precision.HIGHEST` (on TPU the
default f32 matmul rounds through bfloat16, which invents ties and flips
near-ties).

Ranks are 1-based. Ties are broken by key index, lower index first: the
rank of the target key t of a query is

  1 + #{j : s_j > s_t} + #{j < t : s_j == s_t},

i.e. its position in a *stable* descending sort of the scores. The same rule
gives `jax.lax.top_k`'s order ("if two elements are equal, the lower-index
element appears first"), so `rank <= k` iff the target is among the top-k
predictions. With several correct keys per query (an image's captions), the
rank is that of the first correct key in the stable order: the best-scoring
correct key, the lowest-indexed one among equals.

A query whose target score is not finite (NaN / inf embeddings of a
diverged model) gets rank `num_keys + 1`: a miss at every k, never a hit.

No [Q, K] matrix is built for all queries at once: queries go through in
chunks of `chunk_size` rows (the last chunk padded, so one compilation),
the keys stay on one device. Runs on the default device of this process.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST
DEFAULT_CHUNK_SIZE = 1024


def scores(queries, keys):
  """float32 [Q, K] = queries @ keys.T at full float32 precision."""
  return jnp.matmul(jnp.asarray(queries, jnp.float32),
                    jnp.asarray(keys, jnp.float32).T, precision=_HIGHEST)


@jax.jit
def _target_ranks(queries, keys, targets):
  s = scores(queries, keys)
  true = jnp.take_along_axis(s, targets[:, None], axis=1)
  index = jnp.arange(s.shape[1])
  beats = (s > true) | ((s == true) & (index[None, :] < targets[:, None]))
  ranks = 1 + jnp.sum(beats, axis=1, dtype=jnp.int32)
  return jnp.where(jnp.isfinite(true[:, 0]), ranks, s.shape[1] + 1)


@jax.jit
def _first_positive_ranks(queries, keys, key_owner, query_ids):
  s = scores(queries, keys)
  positive = key_owner[None, :] == query_ids[:, None]
  best = jnp.max(jnp.where(positive, s, -jnp.inf), axis=1, keepdims=True)
  index = jnp.arange(s.shape[1])
  # The lowest index among the positives scoring `best`.
  first = jnp.min(jnp.where(positive & (s == best), index[None, :],
                            s.shape[1]), axis=1, keepdims=True)
  beats = (s > best) | ((s == best) & (index[None, :] < first))
  ranks = 1 + jnp.sum(beats, axis=1, dtype=jnp.int32)
  return jnp.where(jnp.isfinite(best[:, 0]), ranks, s.shape[1] + 1)


def _chunked(fn, queries, per_query, constants, chunk_size):
  """Applies fn(query_chunk, *constants, *per_query_chunks) chunk by chunk."""
  queries = np.asarray(queries, np.float32)
  n = len(queries)
  if n == 0:
    return np.zeros((0,), np.int32)
  chunk = min(chunk_size, n)
  constants = [jnp.asarray(c) for c in constants]
  out = []
  for start in range(0, n, chunk):
    stop = min(start + chunk, n)
    pad = chunk - (stop - start)
    rows = [np.pad(a[start:stop], [(0, pad)] + [(0, 0)] * (a.ndim - 1))
            for a in (queries, *per_query)]
    out.append(fn(rows[0], *constants, *rows[1:]))
  # One host transfer at the end (the chunks are dispatched asynchronously).
  return np.concatenate([np.asarray(o) for o in out])[:n]


def target_ranks(queries, keys, targets, *,
                 chunk_size: int = DEFAULT_CHUNK_SIZE) -> np.ndarray:
  """int32 [Q]: rank of key `targets[q]` for each query (module docstring).

  queries float [Q, D], keys float [K, D], targets int [Q] in [0, K).
  """
  targets = np.asarray(targets)
  num_keys = len(keys)
  if targets.shape != (len(queries),):
    raise ValueError(f"targets has shape {targets.shape}; expected "
                     f"({len(queries)},), one per query.")
  if len(targets) and (targets.min() < 0 or targets.max() >= num_keys):
    bad = targets[(targets < 0) | (targets >= num_keys)]
    raise ValueError(
        f"targets must be in [0, {num_keys}) (one per key); found "
        f"{sorted(set(bad.tolist()))[:10]}. Check the labels / class names.")
  return _chunked(_target_ranks, queries,
                  [targets.astype(np.int32)], [np.asarray(keys, np.float32)],
                  chunk_size)


def first_positive_ranks(queries, keys, key_owner, query_ids=None, *,
                         chunk_size: int = DEFAULT_CHUNK_SIZE) -> np.ndarray:
  """int32 [Q]: rank of the first correct key of each query.

  Key j is correct for query q iff key_owner[j] == query_ids[q] (query_ids
  defaults to 0..Q-1). A query without any correct key gets rank K + 1.
  """
  n = len(queries)
  query_ids = np.arange(n) if query_ids is None else np.asarray(query_ids)
  return _chunked(
      _first_positive_ranks, queries,
      [query_ids.astype(np.int32)],
      [np.asarray(keys, np.float32), np.asarray(key_owner, np.int32)],
      chunk_size)


@functools.partial(jax.jit, static_argnames="k")
def _top_k(queries, keys, k):
  return jax.lax.top_k(scores(queries, keys), k)[1]


def top_k(queries, keys, k: int, *,
          chunk_size: int = DEFAULT_CHUNK_SIZE) -> np.ndarray:
  """int32 [Q, k]: indices of the k best keys per query, best first; ties
  -> lower key index first (jax.lax.top_k's documented order)."""
  k = min(k, len(keys))
  queries = np.asarray(queries, np.float32)
  if len(queries) == 0:
    return np.zeros((0, k), np.int32)
  chunk = min(chunk_size, len(queries))
  keys = jnp.asarray(keys, jnp.float32)
  out = []
  for start in range(0, len(queries), chunk):
    rows = queries[start:start + chunk]
    rows = np.pad(rows, [(0, chunk - len(rows)), (0, 0)])
    out.append(_top_k(rows, keys, k))
  return np.concatenate([np.asarray(o) for o in out])[:len(queries)]
