"""config.freeze: frozen params stay bit-identical and get no optimiser
state; the trained ones follow plain optax on the trained subset alone."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from train_testing import random_batch, tiny_config

from clip_jax import losses, optim, train_state
from clip_jax import sharding as sharding_lib
from clip_jax.models import two_towers

STEPS = 3


def _frozen_config():
  config = tiny_config("softmax", "replicate")
  config.freeze = "img/.*"
  config.wd = 0.5  # Large, so a decay applied to the wrong leaves shows.
  config.grad_clip_norm = 0.05  # Binds: see the assertion on the norms.
  return config


@pytest.fixture(scope="module")
def frozen_run():
  """(model, tx, initial state on the host, its shardings, step_fn, mesh,
  frozen mask) of _frozen_config, compiled once for the module."""
  config = _frozen_config()
  mesh = sharding_lib.make_mesh(config.mesh)
  model = two_towers.build_model(config.model)
  shapes = train_state.param_shapes(model, config)
  tx, schedule = optim.make_optimizer(config, shapes, total_steps=10,
                                      warmup_steps=0)
  state, shardings = train_state.create_state(model, tx, config, mesh)
  frozen = optim.frozen_mask(shapes, config.freeze)
  step_fn = train_state.make_train_step(
      model, tx, losses.get_loss(config.loss), schedule, mesh, shardings,
      max_log_logit_scale=None, frozen=frozen)
  return model, tx, jax.device_get(state), shardings, step_fn, mesh, frozen


def _setup(frozen_run):
  """A fresh copy of the initial state (the step donates its input)."""
  model, tx, host_state, shardings, step_fn, mesh, frozen = frozen_run
  state = jax.device_put(host_state, shardings)
  return model, tx, state, step_fn, mesh, frozen


def _bits(tree):
  return [np.asarray(x).tobytes() for x in jax.tree_util.tree_leaves(tree)]


def _dense_softmax(zimg, ztxt, scale):
  """CLIP's symmetric InfoNCE, dense on one device: the reference loss."""
  logits = scale * zimg @ ztxt.T
  labels = jnp.arange(len(zimg))
  row = jax.nn.log_softmax(logits, axis=1)[labels, labels]
  col = jax.nn.log_softmax(logits, axis=0)[labels, labels]
  return -(row.mean() + col.mean()) / 2


def _trained(params):
  return {k: v for k, v in params.items() if k != "img"}


def test_frozen_tower_is_bit_identical_and_trained_params_match_optax(
    frozen_run):
  config = _frozen_config()
  model, _, state, step_fn, mesh, _ = _setup(frozen_run)
  initial = jax.device_get(state["params"])
  batches = [random_batch(config, seed=i) for i in range(STEPS)]
  for batch in batches:
    state, metrics = step_fn(state, sharding_lib.host_to_global(batch, mesh))
  params = jax.device_get(state["params"])
  assert _bits(params["img"]) == _bits(initial["img"])

  # Reference: plain optax (clip, AdamW with the decay mask) on the trained
  # subset only, gradients of the dense loss on one device.
  ref_tx = optax.chain(
      optax.clip_by_global_norm(config.grad_clip_norm),
      optax.adamw(config.lr, b1=config.adam.b1, b2=config.adam.b2,
                  eps=config.adam.eps, weight_decay=config.wd,
                  mask=optim.decay_mask(_trained(initial), None)))

  def loss_of_trained(trained, batch):
    z_img, z_txt, out = train_state.embed(
        model, {**trained, "img": initial["img"]}, batch)
    return _dense_softmax(z_img, z_txt, out["logit_scale"])

  @jax.jit
  def ref_step(trained, opt, batch):
    grads = jax.grad(loss_of_trained)(trained, batch)
    updates, opt = ref_tx.update(grads, opt, trained)
    return optax.apply_updates(trained, updates), opt, optax.tree.norm(grads)

  device = jax.devices()[0]  # Dense, unsharded.
  trained = jax.device_put(_trained(initial), device)
  opt = ref_tx.init(trained)
  norms = []
  for batch in batches:
    trained, opt, norm = ref_step(trained, opt, jax.device_put(batch, device))
    norms.append(float(norm))
  assert min(norms) > config.grad_clip_norm  # The clipping did bind.
  # grad_norm is the trained params' norm (of the last step's gradient).
  np.testing.assert_allclose(float(metrics["grad_norm"]), norms[-1],
                             rtol=1e-4)
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
      _trained(params), jax.device_get(trained))
  # And they did move (the comparison is not between two initial states).
  assert _bits(_trained(params)) != _bits(_trained(initial))


def test_frozen_params_have_no_optimiser_state(frozen_run):
  _, tx, state, _, _, frozen = _setup(frozen_run)
  params = state["params"]
  trained_size = sum(x.size for x in jax.tree_util.tree_leaves(
      _trained(params)))
  frozen_size = sum(x.size for x in jax.tree_util.tree_leaves(params["img"]))
  assert frozen_size > 0
  float_leaves = [x for x in jax.tree_util.tree_leaves(state["opt"])
                  if jnp.issubdtype(x.dtype, jnp.floating)]
  # Adam's mu and nu for the trained params, nothing else.
  assert sum(x.size for x in float_leaves) == 2 * trained_size
  paths = [optim.path_str(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(state["opt"])[0]]
  assert not [p for p in paths if "/img/" in f"/{p}"]
  # The moments that do exist mirror the trained params exactly.
  mirrored = []
  optax.tree_utils.tree_map_params(
      tx, lambda x: x if isinstance(x, optax.MaskedNode) else (
          mirrored.append(x.shape) or x), state["opt"],
      transform_non_params=lambda x: x,
      is_leaf=lambda x: isinstance(x, optax.MaskedNode))
  assert sorted(mirrored) == sorted(
      2 * [x.shape for x in jax.tree_util.tree_leaves(_trained(params))])
  assert jax.tree_util.tree_leaves(frozen["img"]) and all(
      jax.tree_util.tree_leaves(frozen["img"]))


def test_nonfinite_steps_are_still_skipped_when_frozen(frozen_run):
  config = _frozen_config()
  _, _, state, step_fn, mesh, _ = _setup(frozen_run)
  initial = jax.device_get(state)
  bad = random_batch(config)
  bad["image"][0] = np.nan  # Through the frozen tower into the loss.
  state, metrics = step_fn(state, sharding_lib.host_to_global(bad, mesh))
  assert int(metrics["train/nonfinite_steps"]) == 1
  after = jax.device_get(state)
  assert _bits(after["params"]) == _bits(initial["params"])
  assert _bits(after["opt"].inner_state) == _bits(
      initial["opt"].inner_state)


def test_no_freeze_keeps_todays_optimiser():
  config = tiny_config("softmax", "replicate")
  model = two_towers.build_model(config.model)
  shapes = train_state.param_shapes(model, config)
  tx, _ = optim.make_optimizer(config, shapes, total_steps=10,
                               warmup_steps=0)
  state = tx.init(jax.tree_util.tree_map(jnp.zeros_like, shapes))
  assert not isinstance(state.inner_state, optax.MultiTransformState)
  assert not any(jax.tree_util.tree_leaves(optim.frozen_mask(shapes, None)))


def test_freeze_pattern_that_matches_nothing_is_an_error():
  config = tiny_config("softmax", "replicate")
  shapes = train_state.param_shapes(two_towers.build_model(config.model),
                                    config)
  with pytest.raises(ValueError, match=r"'image/\.\*' matches no parameter"):
    optim.frozen_mask(shapes, "image/.*")
  mask = optim.frozen_mask(shapes, ["img/.*", "logit_scale"])
  assert mask["logit_scale"] and not mask["txt_proj"]["kernel"]
