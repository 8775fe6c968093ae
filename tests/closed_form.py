"""Toy models whose embeddings are known in closed form (test helpers).

`ClosedFormTowers` follows the TwoTowers protocol (`model.apply({'params':
params}, x, method='encode_image' | 'encode_text')`, no parameters):
  encode_image: an image whose mean red value (in [0, 1] pixels, undoing
      the CLIP normalisation) is k * RED_STEP / 255 embeds to e_k;
  encode_text: tokens [t0, t1, ...] embed to normalise(e_t0 + tilt * t1 *
      e_{dim-1}): class t0, tilted by a template id t1 (tilt * t1 stays
      well below 1, so the class never changes).
`solid_image(k, size)` is such an image (uint8); `tokenize_fn(class_names)`
maps a text to [index of the class name it contains, hash of the rest].
"""

from __future__ import annotations

import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

RED_STEP = 40
CLIP_MEAN_R, CLIP_STD_R = 0.48145466, 0.26862954


class ClosedFormTowers(nn.Module):
  dim: int = 8
  tilt: float = 0.01

  def encode_image(self, images, *, train: bool = False):
    del train
    red = jnp.mean(images[..., 0], axis=(1, 2)) * CLIP_STD_R + CLIP_MEAN_R
    k = jnp.round(red * 255.0 / RED_STEP).astype(jnp.int32)
    return jax.nn.one_hot(k, self.dim, dtype=jnp.float32)

  def encode_text(self, tokens, *, train: bool = False):
    del train
    v = (jax.nn.one_hot(tokens[:, 0], self.dim, dtype=jnp.float32)
         + self.tilt * (tokens[:, 1] % 8)[:, None].astype(jnp.float32)
         * jax.nn.one_hot(self.dim - 1, self.dim, dtype=jnp.float32))
    return v / jnp.linalg.norm(v, axis=-1, keepdims=True)


def solid_image(k: int, size: int = 8) -> np.ndarray:
  """uint8 [size, size, 3] that ClosedFormTowers embeds as e_k."""
  img = np.full((size, size, 3), 128, np.uint8)
  img[..., 0] = k * RED_STEP
  return img


def tokenize_fn(class_names):
  """texts -> int32 [n, 2]: [class index, template id] (the class whose
  name appears as a word in the text, longest name first)."""
  by_length = sorted(range(len(class_names)),
                     key=lambda i: -len(class_names[i]))

  def tokenize(texts):
    out = []
    for text in texts:
      padded = f" {text.lower()} "
      k = next((i for i in by_length
                if f" {class_names[i].lower()}" in padded), None)
      if k is None:
        raise ValueError(f"No class name in {text!r}.")
      rest = padded.replace(class_names[k].lower(), "{}")
      out.append([k, zlib.crc32(rest.encode()) % 1000])
    return np.asarray(out, np.int32)

  return tokenize
