"""Shared by the train-step tests: a tiny config and random batches."""

import numpy as np

from clip_jax import config as config_lib


def tiny_config(loss, rule, *, batch=32, mesh_shape=None):
  """configs/clip.py:tiny with `loss`, one sharding rule for every leaf and
  a constant schedule; `mesh_shape` (data, fsdp) if given."""
  config = config_lib.load_config_file("configs/clip.py",
                                       f"tiny,loss={loss},batch={batch}")
  if mesh_shape is not None:
    config.mesh.data, config.mesh.fsdp = mesh_shape
  config.sharding_rules = [(".*", rule)]
  config.schedule = "constant"
  # Adam divides by sqrt(v) + eps: with CLIP's eps=1e-6 a gradient that is
  # float noise around 0 (the attention key bias has exactly zero gradient)
  # becomes a full-size step of either sign, so runs that differ only in
  # summation order drift apart. With 1e-3 the comparisons are about the
  # gradient, not that amplification.
  config.adam.eps = 1e-3
  return config


def random_batch(config, seed=0):
  """A global batch of normal-noise float images and random token ids."""
  rng = np.random.default_rng(seed)
  n = config.batch_size
  size, length = config.model.image.image_size, config.model.text.context_length
  return {
      "image": rng.normal(size=(n, size, size, 3)).astype(np.float32),
      "text": rng.integers(3, config.model.text.vocab_size,
                           size=(n, length)).astype(np.int32),
  }
