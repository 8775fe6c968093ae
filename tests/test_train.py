"""Train step: loss goes down, and 8 devices (any mesh) == 1 device."""

import jax
import numpy as np
import pytest
from train_testing import random_batch, tiny_config

from clip_jax import losses, optim, train_state
from clip_jax import sharding as sharding_lib
from clip_jax.models import two_towers

STEPS = 4


def _run(config, devices, mesh_shape):
  """STEPS steps on a fixed batch; returns (losses, params as numpy)."""
  config.mesh.data, config.mesh.fsdp = mesh_shape
  mesh = sharding_lib.make_mesh(config.mesh, devices=devices)
  model = two_towers.build_model(config.model)
  shapes = train_state.param_shapes(model, config)
  tx, schedule = optim.make_optimizer(config, shapes, total_steps=STEPS,
                                      warmup_steps=0)
  state, shardings = train_state.create_state(model, tx, config, mesh)
  step_fn = train_state.make_train_step(
      model, tx, losses.get_loss(config.loss), schedule, mesh, shardings,
      max_log_logit_scale=two_towers.max_log_logit_scale(config.model))
  batch = sharding_lib.host_to_global(random_batch(config), mesh)
  history = []
  for _ in range(STEPS):
    state, metrics = step_fn(state, batch)
    history.append(float(metrics["loss"]))
  if mesh.shape["fsdp"] > 1 and config.sharding_rules[0][1] == "fsdp":
    # FSDP really shards: some parameter is split over the 'fsdp' axis.
    specs = [x.sharding.spec for x in jax.tree_util.tree_leaves(
        state["params"])]
    assert any("fsdp" in spec for spec in specs)
  assert int(state["step"]) == STEPS
  return history, jax.device_get(state["params"])


@pytest.mark.parametrize("loss", ["softmax", "sigmoid_chunked"])
def test_multi_device_equals_single_device(loss):
  reference, ref_params = _run(tiny_config(loss, "replicate"),
                               jax.devices()[:1], (1, 1))
  assert reference[-1] < reference[0]  # It learns the fixed batch.
  for mesh_shape, rule in [((8, 1), "replicate"), ((2, 4), "fsdp")]:
    history, params = _run(tiny_config(loss, rule), jax.devices(), mesh_shape)
    np.testing.assert_allclose(history, reference, rtol=1e-4, atol=1e-5)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-5),
        params, ref_params)


def _step_fn(config, loss_fn, max_log_logit_scale, total_steps=2,
             warmup_steps=0):
  mesh = sharding_lib.make_mesh(config.mesh)
  model = two_towers.build_model(config.model)
  shapes = train_state.param_shapes(model, config)
  tx, schedule = optim.make_optimizer(config, shapes, total_steps=total_steps,
                                      warmup_steps=warmup_steps)
  state, shardings = train_state.create_state(model, tx, config, mesh)
  step_fn = train_state.make_train_step(
      model, tx, loss_fn, schedule, mesh, shardings,
      max_log_logit_scale=max_log_logit_scale)
  return step_fn, state, mesh


def _matched_softmax(zimg, ztxt, logit_scale, logit_bias, mesh=None):
  """InfoNCE with perfectly matched pairs (texts = images).

  Each positive is its row's largest logit, so the loss always wants a larger
  scale: the regime where CLIP's cap binds.
  """
  del ztxt
  return losses.softmax_loss(zimg, zimg, logit_scale, logit_bias, mesh=mesh)


@pytest.mark.parametrize("capped", [True, False])
def test_logit_scale_is_capped(capped):
  config = tiny_config("softmax", "replicate")
  config.model.logit_scale_init = 99.9
  config.lr = 1.0  # Adam's first step moves the log-scale by +-lr = 1.
  cap = np.log(100.0) if capped else None
  step_fn, state, mesh = _step_fn(config, _matched_softmax, cap)
  batch = sharding_lib.host_to_global(random_batch(config), mesh)
  for _ in range(2):
    state, _ = step_fn(state, batch)
  scale = float(np.exp(state["params"]["logit_scale"]))
  if capped:
    np.testing.assert_allclose(scale, 100.0, rtol=1e-6)  # It binds.
  else:  # The control: the same run without the cap goes past 100.
    assert scale > 100.0 * np.e ** 0.9


def _bits(tree):
  """Every leaf as its raw bytes: equality here is bit for bit (-0.0, NaN)."""
  return [np.asarray(x).tobytes() for x in jax.tree_util.tree_leaves(tree)]


def test_nonfinite_step_is_skipped_and_counted():
  config = tiny_config("softmax", "replicate")
  config.schedule = "linear"
  # Warmup: the lr differs at every step, so a schedule that counted the
  # skipped steps would give different params after the good ones.
  step_fn, initial, mesh = _step_fn(
      config, losses.get_loss("softmax"), np.log(100.0), total_steps=10,
      warmup_steps=4)
  # Above the cap (as after resuming with a lower cap): a skipped step must
  # not clamp it either.
  initial["params"]["logit_scale"] = jax.device_put(
      np.float32(np.log(150.0)), initial["params"]["logit_scale"].sharding)
  host_initial = jax.device_get(initial)
  good = [sharding_lib.host_to_global(random_batch(config, seed=i), mesh)
          for i in range(2)]
  bad = random_batch(config)
  bad["image"][3] = np.nan  # One bad example poisons the whole step.
  bad = sharding_lib.host_to_global(bad, mesh)

  state = jax.tree_util.tree_map(lambda x: x.copy(), initial)
  counters = []
  for batch in (bad, bad):
    state, metrics = step_fn(state, batch)
    counters.append((int(metrics["train/nonfinite_steps"]),
                     int(metrics["train/nonfinite_consecutive"])))
    after = jax.device_get(state)
    assert _bits(after["params"]) == _bits(host_initial["params"])
    assert (_bits(after["opt"].inner_state)
            == _bits(host_initial["opt"].inner_state))
  assert counters == [(1, 1), (2, 2)]
  assert int(state["step"]) == 2  # Batches consumed, skipped ones included.
  lrs = []
  for batch in good:
    state, metrics = step_fn(state, batch)
    lrs.append(float(metrics["lr"]))
    assert (int(metrics["train/nonfinite_steps"]),
            int(metrics["train/nonfinite_consecutive"])) == (2, 0)
  assert int(state["opt"].total_notfinite) == 2  # Saved with the state.

  # The reference: the same good batches without the bad ones before.
  reference = initial
  for batch in good:
    reference, ref_metrics = step_fn(reference, batch)
  assert _bits(jax.device_get(state["params"])) == _bits(
      jax.device_get(reference["params"]))
  assert lrs[-1] == float(ref_metrics["lr"])
  # Warmup step 1 of 4 (the skipped steps not counted), to a float32 ulp:
  # the tests compile with LLVM at -O0 (conftest.py), which rounds the
  # ramp's arithmetic differently in the last bit.
  assert lrs[-1] == pytest.approx(config.lr / 4, rel=1e-6)
  assert float(np.exp(state["params"]["logit_scale"])) <= 100.0 * (1 + 1e-6)


def test_nonfinite_loss_with_finite_gradients_is_skipped():
  def infinite_loss(*args, mesh=None):
    return (losses.softmax_loss(*args, mesh=mesh)
            + jax.lax.stop_gradient(np.float32(np.inf)))

  config = tiny_config("softmax", "replicate")
  step_fn, state, mesh = _step_fn(config, infinite_loss, None)
  before = jax.device_get(state["params"])
  state, metrics = step_fn(
      state, sharding_lib.host_to_global(random_batch(config), mesh))
  assert int(metrics["train/nonfinite_steps"]) == 1
  assert _bits(jax.device_get(state["params"])) == _bits(before)


def test_step_inputs_carry_the_configured_loss_key():
  """A keyed loss gets config.loss_key's batch field as 'loss_key'; other
  losses get image and text only; a missing field is a clear error."""
  from clip_jax import train  # pylint: disable=g-import-not-at-top
  batch = {"image": np.zeros((4, 2)), "text": np.zeros((4, 3), np.int32),
           "label": np.array([3, 3, -1, 5]),
           "caption_hash": np.array([7, 8, 7, 9]), "num_skipped": 0}
  config = tiny_config("multi_positive", "replicate")
  for field in ("label", "caption_hash"):
    config.loss_key = field
    inputs = train.step_inputs(batch, config)
    assert sorted(inputs) == ["image", "loss_key", "text"]
    assert inputs["loss_key"].dtype == np.int32
    np.testing.assert_array_equal(inputs["loss_key"], batch[field])
  config.loss = "softmax"
  assert sorted(train.step_inputs(batch, config)) == ["image", "text"]
  config.loss = "multi_positive"
  with pytest.raises(ValueError, match="config.loss_key='caption_hash'.*"
                     "does not yield"):
    train.step_inputs({k: batch[k] for k in ("image", "text", "label")},
                      config)


def test_a_keyed_loss_without_any_key_is_reported():
  """loss_key='label' on data without labels (every label -1) trains plain
  softmax: the loop says so; one labelled row, or an unkeyed loss, is
  silent."""
  from clip_jax import train  # pylint: disable=g-import-not-at-top
  config = tiny_config("multi_positive", "replicate")
  batch = {"image": np.zeros((4, 2)), "text": np.zeros((4, 3), np.int32),
           "label": np.full(4, -1), "caption_hash": np.arange(4)}
  message = train.keyless_warning(train.step_inputs(batch, config), config)
  assert "config.loss_key='label'" in message
  assert "loss_key='caption_hash'" in message
  batch["label"] = np.array([-1, -1, 2, -1])
  assert train.keyless_warning(train.step_inputs(batch, config),
                               config) is None
  config.loss, batch["label"] = "softmax", np.full(4, -1)
  assert train.keyless_warning(train.step_inputs(batch, config),
                               config) is None


@pytest.mark.parametrize("loss", ["vse_max", "vse_sum"])
def test_vse_losses_leave_the_logit_scale_untouched(loss):
  """VSE++ uses raw cosines: the scale's gradient is exactly 0, so AdamW
  (which never decays it) leaves it bit-identical while the towers move."""
  config = tiny_config(loss, "replicate")
  config.vse_margin = 0.5
  step_fn, state, mesh = _step_fn(config, losses.loss_from_config(config),
                                  np.log(100.0))
  before = jax.device_get(state["params"])
  for seed in range(2):
    state, metrics = step_fn(state, sharding_lib.host_to_global(
        random_batch(config, seed=seed), mesh))
    assert float(metrics["loss"]) > 0
  after = jax.device_get(state["params"])
  assert _bits(after["logit_scale"]) == _bits(before["logit_scale"])
  assert _bits(after["img_proj"]) != _bits(before["img_proj"])
