"""Shared by the train-step tests: a tiny config and random batches."""

import jax
import numpy as np

from clip_jax import checkpoint as checkpoint_lib
from clip_jax import config as config_lib
from clip_jax import optim, train_state
from clip_jax.models import two_towers


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


def state_of_seed(config, seed, mesh):
  """(train state with `seed`'s fresh init, its shardings) on `mesh`."""
  config = config.copy_and_resolve_references()
  config.seed = seed
  model = two_towers.build_model(config.model)
  tx, _ = optim.make_optimizer(config, train_state.param_shapes(model, config),
                               total_steps=10, warmup_steps=0)
  return train_state.create_state(model, tx, config, mesh)


def write_source(workdir, config, seeds_by_step, mesh):
  """A clip_jax workdir with one checkpoint per {step: seed}; returns
  {step: params on the host}."""
  config_lib.save(config, str(workdir))
  ckpt = checkpoint_lib.Checkpointer(str(workdir), every_steps=1, keep=5)
  saved = {}
  for step, seed in seeds_by_step.items():
    state, _ = state_of_seed(config, seed, mesh)
    saved[step] = jax.device_get(state["params"])
    ckpt.save(step, state)
  ckpt.close()
  return saved
