"""config.adam.flatten: clipping and Adam over one concatenated vector.

The reference is the per-parameter optimiser (adam.flatten=False, plain
optax.adamw behind the same clip, multi_transform and apply_if_finite):
the updates must be equal up to float32 rounding of the global norm.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_testing import random_batch, tiny_config

from clip_jax import config as config_lib
from clip_jax import losses, optim, train_state
from clip_jax import sharding as sharding_lib
from clip_jax.models import two_towers


def _config(flatten, **overrides):
  c = config_lib.base_config()
  c.lr, c.wd, c.schedule = 0.1, 0.5, "constant"
  c.grad_clip_norm = 1.0  # Binds: the gradients below have norm > 1.
  c.wd_exclude = "cls"
  c.adam.flatten = flatten
  for key, value in overrides.items():
    c[key] = value
  return c


def _params_and_grads(seed):
  rng = np.random.default_rng(seed)
  shapes = {"img": {"kernel": (4, 3), "bias": (3,), "cls": (2, 3)},
            "txt": {"embed": (5, 4), "scale": (4,)}, "logit_scale": ()}
  def draw(shape):
    return jnp.asarray(rng.normal(size=shape), jnp.float32)
  params = jax.tree_util.tree_map(draw, shapes,
                                  is_leaf=lambda x: isinstance(x, tuple))
  grads = [jax.tree_util.tree_map(draw, shapes,
                                  is_leaf=lambda x: isinstance(x, tuple))
           for _ in range(3)]
  return params, grads


def _run(config, params, grads_list):
  """Params after one update per gradient tree (jitted like training)."""
  tx, _ = optim.make_optimizer(config, params, total_steps=10,
                               warmup_steps=0)
  update = jax.jit(tx.update)
  opt = tx.init(params)
  for grads in grads_list:
    updates, opt = update(grads, opt, params)
    params = jax.tree_util.tree_map(jnp.add, params, updates)
  return params, opt


def _assert_trees_close(got, want):
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want),
                          jax.tree_util.tree_leaves(got)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("overrides", [
    {}, {"freeze": "img/.*"}, {"grad_clip_norm": None}])
def test_flat_adamw_updates_equal_per_parameter_adamw(overrides):
  params, grads = _params_and_grads(0)
  want, _ = _run(_config(False, **overrides), params, grads)
  got, opt = _run(_config(True, **overrides), params, grads)
  _assert_trees_close(got, want)
  # The moments are one flat vector each, of the trained parameters.
  flat = [x.size for x in jax.tree_util.tree_leaves(opt) if x.ndim]
  assert flat == [_trained_size(params, overrides)] * 2
  if overrides.get("freeze"):
    np.testing.assert_array_equal(got["img"]["kernel"],
                                  params["img"]["kernel"])


def _trained_size(params, overrides):
  frozen = optim.frozen_mask(params, overrides.get("freeze"))
  return sum(p.size for p, f in zip(jax.tree_util.tree_leaves(params),
                                    jax.tree_util.tree_leaves(frozen))
             if not f)


def test_flat_adamw_skips_a_nonfinite_step():
  params, grads = _params_and_grads(1)
  bad = jax.tree_util.tree_map(lambda g: g.at[..., 0].set(jnp.nan)
                               if g.ndim else jnp.nan, grads[1])
  want, _ = _run(_config(False), params, [grads[0], bad, grads[2]])
  got, opt = _run(_config(True), params, [grads[0], bad, grads[2]])
  _assert_trees_close(got, want)
  assert int(opt.total_notfinite) == 1


def _train_two_steps(flatten):
  """Two train steps of the tiny CLIP, data-parallel over 8 devices with
  replicated params; returns the params on the host."""
  config = tiny_config("softmax", "replicate", mesh_shape=(8, 1))
  config.adam.flatten = flatten
  config.grad_clip_norm = 0.05  # Binds, so the flat norm is exercised.
  mesh = sharding_lib.make_mesh(config.mesh)
  model = two_towers.build_model(config.model)
  tx, schedule = optim.make_optimizer(
      config, train_state.param_shapes(model, config), total_steps=10,
      warmup_steps=0)
  state, shardings = train_state.create_state(model, tx, config, mesh)
  step = train_state.make_train_step(
      model, tx, losses.get_loss(config.loss), schedule, mesh, shardings,
      max_log_logit_scale=None)
  for seed in range(2):
    state, metrics = step(state, sharding_lib.host_to_global(
        random_batch(config, seed), mesh))
  assert np.isfinite(float(metrics["loss"]))
  return jax.device_get(state["params"])


def test_flat_adamw_train_step_on_8_devices_matches_per_parameter():
  assert jax.device_count() == 8
  _assert_trees_close(_train_two_steps(True), _train_two_steps(False))


def test_flat_adamw_refuses_sharded_params():
  config = tiny_config("softmax", "fsdp", mesh_shape=(1, 8))
  config.adam.flatten = True
  mesh = sharding_lib.make_mesh(config.mesh)
  model = two_towers.build_model(config.model)
  tx, _ = optim.make_optimizer(
      config, train_state.param_shapes(model, config), total_steps=10,
      warmup_steps=0)
  with pytest.raises(ValueError, match=r"adam\.flatten=True needs fully "
                     r"replicated params"):
    train_state.abstract_state(model, tx, config, mesh)
