"""Embedding many images or texts on the mesh, batch by batch.

An `encode_fn(params, x)` maps a global batch `x` (a jax.Array sharded over
the batch, `sharding.batch_sharding(mesh)`) to embeddings [b, D] (replicated
or batch-sharded). `make_encode_fn` builds one from a TwoTowers model.

Multi-process: every process iterates the *same* global batches (eval data
readers are deterministic and unshuffled). A process passes either a whole
batch or, for images, only the rows its own devices hold ('image_rows',
see evals/readers.py; sharding.host_rows) and the global array is built row
by row from the index each device holds (`sharding.rows_to_global`), so row
r is example r on any device order (TPU pods are not process-major). The
embeddings come back to every process, in input order.

Padding: a batch of b rows is padded (repeating its last row) to a multiple
of the device count, and the padding dropped again; rows whose batch 'mask'
is 0 (padding the reader added to the last partial batch, or examples it
could not read) are dropped too, and so are rows whose 'image_mask' is 0 on
the process that decoded them (combined across processes). So every real
example is embedded exactly once, in input order.

Transfers: batch i's embeddings are copied to the host while batch i+1 runs
(one batch of lag), so the device is not idle while the host converts, and
at most two batches of embeddings are held on device.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import jax
import numpy as np
from jax.experimental import multihost_utils

from clip_jax import sharding as sharding_lib

DEFAULT_BATCH_SIZE = 256


@functools.partial(jax.jit, static_argnames=("model", "method", "mesh"))
def _apply(params, x, *, model, method: str, mesh):
  x = jax.lax.with_sharding_constraint(x, sharding_lib.batch_sharding(mesh))
  out = model.apply({"params": params}, x, method=getattr(model, method))
  return jax.lax.with_sharding_constraint(out, sharding_lib.replicated(mesh))


def make_encode_fn(model, mesh, kind: str) -> Callable:
  """encode_fn(params, x) for kind 'image' (model.encode_image) or 'text'
  (model.encode_text); jitted, output replicated. Compiled once per
  (model, mesh, kind, input shape) — jax's cache, not ours."""
  if kind not in ("image", "text"):
    raise ValueError(f"kind={kind!r}: expected 'image' or 'text'.")
  return functools.partial(_apply, model=model, method=f"encode_{kind}",
                           mesh=mesh)


def padded_size(n: int, multiple: int) -> int:
  """The smallest multiple of `multiple` that is >= n (and >= multiple)."""
  return max(1, -(-n // multiple)) * multiple


def _row_multiple(mesh) -> int:
  return mesh.size  # Every device holds an equal slice of a batch.


def _to_host(x) -> np.ndarray:
  if x.is_fully_addressable or x.is_fully_replicated:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _pad_rows(x: np.ndarray, n: int) -> np.ndarray:
  if len(x) == n:
    return x
  return np.concatenate([x, np.repeat(x[-1:], n - len(x), axis=0)])


class _Embedder:
  """Runs encode_fn over global batches with one batch of transfer lag.

  Per added batch, `added` holds the rows asked for (keep), `keeps` the
  rows embedded (keep and decoded).
  """

  def __init__(self, encode_fn, params, mesh):
    self.encode_fn, self.params, self.mesh = encode_fn, params, mesh
    self.multiple = _row_multiple(mesh)
    self.pending = None
    self.done, self.keeps, self.added = [], [], []

  def add(self, x: np.ndarray, keep: np.ndarray, size: int | None = None, *,
          rows=None, ok=None):
    """Embeds rows x[keep]; pads x to `size` rows (or the next multiple).

    With `rows`, x holds only those rows of a `size`-row batch (at least
    this process's, sharding.host_rows) and `ok` (per row of x) says which
    were decoded; rows not ok on the process holding them are dropped.
    """
    x, keep = np.asarray(x), np.asarray(keep, bool)
    size = padded_size(len(keep), self.multiple) if size is None else size
    if rows is None:
      global_x = sharding_lib.rows_to_global(_pad_rows(x, size), self.mesh)
      global_ok = None
    else:
      if size % self.multiple or len(keep) > size:
        raise ValueError(
            f"A batch of {len(keep)} rows padded to {size} does not split "
            f"over the {self.multiple} devices; use an eval batch_size "
            f"that is a multiple of {self.multiple}.")
      global_x = sharding_lib.rows_to_global(x, self.mesh, rows=rows,
                                             num_rows=size)
      ok = np.ones(len(x), np.float32) if ok is None else ok
      global_ok = sharding_lib.rows_to_global(
          np.asarray(ok, np.float32), self.mesh, rows=rows, num_rows=size)
    out = self.encode_fn(self.params, global_x)
    self._flush()
    self.pending = (out, keep, global_ok)

  def _flush(self):
    if self.pending is not None:
      out, keep, global_ok = self.pending
      self.added.append(keep)
      if global_ok is not None:
        keep = keep & (_to_host(global_ok)[:len(keep)] > 0)
      self.done.append(_to_host(out)[:len(keep)][keep])
      self.keeps.append(keep)
      self.pending = None

  def result(self) -> np.ndarray | None:
    self._flush()
    if not self.done:
      return None
    return np.concatenate(self.done).astype(np.float32)


def embed_arrays(encode_fn, params, mesh, inputs, *,
                 batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
  """float32 [N, D]: every row of `inputs` (images or tokens) embedded.

  Chunks of batch_size rows (rounded up to the device count); the last
  chunk is padded to the same size, so one compilation serves all.
  """
  inputs = np.asarray(inputs)
  if len(inputs) == 0:
    raise ValueError("embed_arrays() got no inputs.")
  size = padded_size(min(batch_size, len(inputs)), _row_multiple(mesh))
  embedder = _Embedder(encode_fn, params, mesh)
  for start in range(0, len(inputs), size):
    chunk = inputs[start:start + size]
    embedder.add(chunk, np.ones(len(chunk), bool), size)
  return embedder.result()


def embed_batches(encode_fn, params, mesh, batches: Iterable[dict], *,
                  key: str = "image") -> tuple[np.ndarray, dict]:
  """Embeds batch[key] of eval batches; drops rows with mask 0.

  Returns (float32 [N, D] embeddings of the real rows, in order; dict of
  the batches' other per-row entries, real rows only, concatenated: e.g.
  'label', 'index', 'captions'). Scalars, 'mask' and the image-rows
  entries are not returned; 'num_skipped' (per-row counts, plus images no
  process could decode) is summed into an int.
  """
  embedder = _Embedder(encode_fn, params, mesh)
  entries, num_skipped, seen, size = [], 0, 0, 0
  for batch in batches:
    x = np.asarray(batch[key])
    mask = batch.get("mask")
    rows = batch.get(f"{key}_rows")
    num = len(x) if rows is None else len(mask)
    keep = (np.ones(num, bool) if mask is None
            else np.asarray(mask).reshape(-1) > 0)
    if len(keep) != num:
      raise ValueError(f"Batch has {num} rows of {key!r} but "
                       f"{len(keep)} mask entries.")
    num_skipped += int(np.sum(batch.get("num_skipped", 0)))
    seen += 1
    if not keep.any():
      continue
    # A short last batch is padded to the size of the earlier ones: one
    # compilation serves all batches.
    size = max(size, padded_size(num, embedder.multiple))
    embedder.add(x, keep, size, rows=rows, ok=batch.get(f"{key}_mask"))
    entries.append({
        name: value for name, value in batch.items()
        if name not in (key, "mask", "num_skipped", f"{key}_rows",
                        f"{key}_mask")})
  embeddings = embedder.result()
  if embeddings is None or not len(embeddings):
    raise ValueError(f"No examples to embed ({seen} batches, all rows "
                     "masked or unreadable)." if seen
                     else "No batches to embed.")
  rows_out = {}
  for batch, keep, added in zip(entries, embedder.keeps, embedder.added):
    num_skipped += int(np.sum(added & ~keep))  # Images nobody could decode.
    for name, value in batch.items():
      if not isinstance(value, (list, tuple)):
        value = np.asarray(value)
        if value.ndim == 0:
          continue  # Not a per-row entry.
      if len(value) != len(keep):
        continue  # Not a per-row entry.
      if isinstance(value, np.ndarray):
        rows_out.setdefault(name, []).append(value[keep])
      else:  # A list (e.g. captions per row).
        rows_out.setdefault(name, []).append(
            [v for v, k in zip(value, keep) if k])
  out = {}
  for name, parts in rows_out.items():
    out[name] = (np.concatenate(parts) if isinstance(parts[0], np.ndarray)
                 else [v for part in parts for v in part])
  out["num_skipped"] = num_skipped
  return embeddings, out


def text_embedder(encode_fn, params, mesh, tokenize: Callable, *,
                  batch_size: int = DEFAULT_BATCH_SIZE) -> Callable:
  """embed_texts(list[str]) -> float32 [n, D]: tokenize and embed in
  batches (tokenize: list[str] -> int32 [n, L])."""

  def embed_texts(texts):
    texts = list(texts)
    size = padded_size(min(batch_size, len(texts)), _row_multiple(mesh))
    embedder = _Embedder(encode_fn, params, mesh)
    for start in range(0, len(texts), size):
      chunk = texts[start:start + size]
      tokens = np.asarray(tokenize(chunk))
      if len(tokens) != len(chunk):
        raise ValueError(f"tokenize returned {len(tokens)} rows for "
                         f"{len(chunk)} texts.")
      embedder.add(tokens, np.ones(len(chunk), bool), size)
    result = embedder.result()
    if result is None:
      raise ValueError("embed_texts() got no texts.")
    return result

  return embed_texts
