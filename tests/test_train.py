"""Train step: loss goes down, and 8 devices (any mesh) == 1 device."""

import jax
import numpy as np
import pytest

from clip_jax import config as config_lib
from clip_jax import losses, optim, train_state
from clip_jax import sharding as sharding_lib
from clip_jax.models import two_towers

STEPS = 4


def _config(loss, rule):
  config = config_lib.load_config_file("configs/clip.py",
                                       f"tiny,loss={loss},batch=32")
  config.sharding_rules = [(".*", rule)]
  config.schedule = "constant"
  # Adam divides by sqrt(v) + eps: with CLIP's eps=1e-6 a gradient that is
  # float noise around 0 becomes a full-size step of either sign, so runs
  # that differ only in summation order drift apart. A larger eps keeps the
  # comparison about the distributed computation, not that amplification.
  config.adam.eps = 1e-3
  return config


def _batch(config, seed=0):
  rng = np.random.default_rng(seed)
  size, length = config.model.image.image_size, config.model.text.context_length
  return {
      "image": rng.normal(size=(config.batch_size, size, size, 3)).astype(
          np.float32),
      "text": rng.integers(3, config.model.text.vocab_size,
                           size=(config.batch_size, length)).astype(np.int32),
  }


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
  batch = sharding_lib.host_to_global(_batch(config), mesh)
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
  reference, ref_params = _run(_config(loss, "replicate"),
                               jax.devices()[:1], (1, 1))
  assert reference[-1] < reference[0]  # It learns the fixed batch.
  for mesh_shape, rule in [((8, 1), "replicate"), ((2, 4), "fsdp")]:
    history, params = _run(_config(loss, rule), jax.devices(), mesh_shape)
    np.testing.assert_allclose(history, reference, rtol=1e-4, atol=1e-5)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-5),
        params, ref_params)


def test_logit_scale_is_capped():
  config = _config("softmax", "replicate")
  config.model.logit_scale_init = 99.9
  config.lr = 1.0  # Large steps push the scale past the cap at once.
  mesh = sharding_lib.make_mesh(config.mesh)
  model = two_towers.build_model(config.model)
  shapes = train_state.param_shapes(model, config)
  tx, schedule = optim.make_optimizer(config, shapes, total_steps=2,
                                      warmup_steps=0)
  state, shardings = train_state.create_state(model, tx, config, mesh)
  step_fn = train_state.make_train_step(
      model, tx, losses.get_loss("softmax"), schedule, mesh, shardings,
      max_log_logit_scale=np.log(100.0))
  batch = sharding_lib.host_to_global(_batch(config), mesh)
  for _ in range(2):
    state, _ = step_fn(state, batch)
  assert float(np.exp(state["params"]["logit_scale"])) <= 100.0 * (1 + 1e-6)
