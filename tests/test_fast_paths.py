"""Faster formulations of the towers against the plain (reference) ones.

Each option computes the same function from the same params: the param
trees (names, shapes, init values) must be identical, and outputs and
gradients equal up to float32 rounding (the reference is the model built
with the plain formulation: flax's MultiHeadDotProductAttention, the
strided nn.Conv patch embedding, the nn.Embed gather).
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from clip_jax import config as config_lib
from clip_jax.models import two_towers


def _config(**overrides):
  c = ml_collections.ConfigDict(dict(
      embed_dim=24, logit_scale_init=1 / 0.07, logit_scale_max=100.0,
      logit_bias_init=None, dtype="float32", activation="gelu",
      remat=False, remat_policy="none", scan=False, attention="flax",
      image=dict(variant="mu", image_size=12, patch_size=3, pool="cls",
                 width=32, depth=1, heads=4),
      text=dict(variant="mu", vocab_size=50, context_length=8, pool="eos",
                causal=True, eos_id=1, pad_id=0, depth=1, heads=4)))
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return c


def _inputs(batch=4):
  rng = np.random.default_rng(0)
  images = rng.normal(size=(batch, 12, 12, 3)).astype(np.float32)
  tokens = rng.integers(2, 50, (batch, 8)).astype(np.int32)
  tokens[:, 5] = 1  # EOS, then padding: the pad mask matters.
  tokens[:, 6:] = 0
  return jnp.asarray(images), jnp.asarray(tokens)


def _loss(model, params, images, tokens):
  zimg, ztxt, out = model.apply({"params": params}, images, tokens)
  logits = out["logit_scale"] * zimg @ ztxt.T
  return jnp.mean(jax.nn.log_softmax(logits)) + jnp.sum(zimg * ztxt)


@pytest.mark.parametrize("base", [
    {},
    # Scanned, rematerialised, MAP head, bidirectional text, mean pooling.
    {"scan": True, "remat_policy": "full", "image.depth": 2,
     "image.pool": "map", "text.causal": False, "text.pool": "mean",
     "image.patch_bias": True},
])
@pytest.mark.parametrize("option", [
    {"attention": "fused_qkv"},
    {"image.patch_embed": "matmul"},
    {"text.embed_lookup": "one_hot"},
])
def test_fast_formulation_matches_reference(base, option):
  images, tokens = _inputs()
  reference = two_towers.build_model(_config(**base))
  fast = two_towers.build_model(_config(**base, **option))
  key = jax.random.key(3)
  params = reference.init(key, images[:1], tokens[:1])["params"]
  fast_params = fast.init(key, images[:1], tokens[:1])["params"]
  # Same names, shapes and initial values.
  assert (jax.tree_util.tree_structure(params) ==
          jax.tree_util.tree_structure(fast_params))
  for a, b in zip(jax.tree_util.tree_leaves(params),
                  jax.tree_util.tree_leaves(fast_params)):
    assert a.shape == b.shape
    np.testing.assert_array_equal(a, b)
  want = jax.jit(reference.apply)({"params": params}, images, tokens)
  got = jax.jit(fast.apply)({"params": params}, images, tokens)
  for a, b in zip(want[:2], got[:2]):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=2e-6)
  grad = jax.jit(jax.grad(_loss, argnums=1), static_argnums=0)
  want_g, got_g = grad(reference, params, images, tokens), grad(
      fast, params, images, tokens)
  # Relative to the largest gradient entry of the model: the key biases'
  # gradients are exactly 0 in exact arithmetic (softmax ignores a shift
  # common to a query's scores), so both sides there are rounding noise.
  scale = max(float(jnp.abs(a).max())
              for a in jax.tree_util.tree_leaves(want_g))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want_g),
                          jax.tree_util.tree_leaves(got_g)):
    np.testing.assert_allclose(b / scale, a / scale, atol=1e-5,
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("key, value, bad", [
    ("model.attention", "fused_qkv", "fused"),
    ("model.image.patch_embed", "matmul", "dense"),
    ("model.text.embed_lookup", "one_hot", "onehot"),
])
def test_run_config_accepts_the_options_and_refuses_unknown_values(
    key, value, bad):
  """The keys are known to config.validate (a run can set them by flag)
  and a misspelt value names the key."""
  *parents, leaf = key.split(".")

  def with_value(v):
    config = config_lib.load_config_file("configs/demo.py")
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = v
    return config

  config_lib.validate(with_value(value), device_count=1)
  with pytest.raises(ValueError, match=f"config.{key}={bad!r}"):
    config_lib.validate(with_value(bad), device_count=1)
