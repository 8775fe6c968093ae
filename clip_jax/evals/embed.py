"""Embedding many images or texts on the mesh, batch by batch.

Batches are split over all devices like training batches. Every process
loads the same global batch and feeds its own rows; the embeddings come back
replicated. A last partial batch is padded to the full batch size and the
padding dropped again, so every example is embedded exactly once.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from clip_jax import sharding as sharding_lib
from clip_jax.models import two_towers


def round_batch_size(batch_size: int, device_count: int) -> int:
  """The smallest multiple of the device count >= batch_size."""
  return -(-batch_size // device_count) * device_count


@functools.lru_cache(maxsize=8)
def _encoder(model, mesh, method_name: str):
  method = getattr(two_towers.TwoTowers, method_name)
  return jax.jit(
      lambda params, x: model.apply({"params": params}, x, method=method),
      in_shardings=(None, sharding_lib.batch_sharding(mesh)),
      out_shardings=sharding_lib.replicated(mesh))


def _process_rows(x):
  """This process's contiguous share of a global batch."""
  n, index, count = len(x), jax.process_index(), jax.process_count()
  return x[index * n // count:(index + 1) * n // count]


def embed_arrays(model, params, mesh, inputs: np.ndarray, kind: str,
                 batch_size: int) -> np.ndarray:
  """Embeds every row of `inputs` (images or tokens); float32 [len, D]."""
  batch_size = round_batch_size(batch_size, mesh.size * jax.process_count())
  encode = _encoder(model, mesh, "encode_image" if kind == "image" else
                    "encode_text")
  out = []
  for start in range(0, len(inputs), batch_size):
    chunk = inputs[start:start + batch_size]
    real = len(chunk)
    if real < batch_size:
      pad = np.repeat(chunk[-1:], batch_size - real, axis=0)
      chunk = np.concatenate([chunk, pad])
    x = sharding_lib.host_to_global(_process_rows(chunk), mesh)
    out.append(np.asarray(encode(params, x))[:real])
  return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def embed_batches(model, params, mesh, batches):
  """Image embeddings of eval batches with 'mask'; returns (emb, batch rows)

  where rows is the dict of the batches' other arrays, real rows only.
  """
  embeddings, kept = [], {}
  for batch in batches:
    keep = batch["mask"] > 0
    emb = embed_arrays(model, params, mesh, batch["image"], "image",
                       len(batch["image"]))
    embeddings.append(emb[keep])
    for key, value in batch.items():
      if key not in ("image", "mask"):
        kept.setdefault(key, []).append(value[keep])
  return (np.concatenate(embeddings),
          {k: np.concatenate(v) for k, v in kept.items()})
