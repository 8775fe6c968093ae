"""Gradient accumulation: exact == the full-batch step; naive is not.

The reference is the full-batch step (accum_steps=1: one forward and
backward over the whole global batch, the path tests/test_train.py checks
against a single device), on the same mesh and the same batch.
"""

import re

import jax
import numpy as np
import pytest
from train_testing import random_batch, tiny_config

from clip_jax import config as config_lib
from clip_jax import losses, optim, train_state
from clip_jax import sharding as sharding_lib
from clip_jax.models import two_towers

BATCH = 32  # 4 rows per device: accum_steps 4 leaves 1 row per device.
MESHES = [((8, 1), "replicate"), ((2, 4), "fsdp")]
COLLECTIVE = re.compile(
    r"all-to-all|collective-permute|all-gather|all-reduce|reduce-scatter")


def _config(loss, mesh_shape, rule):
  return tiny_config(loss, rule, batch=BATCH, mesh_shape=mesh_shape)




def _setup(config):
  mesh = sharding_lib.make_mesh(config.mesh)
  model = two_towers.build_model(config.model)
  tx, schedule = optim.make_optimizer(
      config, train_state.param_shapes(model, config), total_steps=3,
      warmup_steps=0)
  return mesh, model, tx, schedule


def _params_after_steps(config, state, shardings, accum_steps,
                        accum_mode="exact"):
  """Params after optimiser steps 1 and 3 (a new batch each step)."""
  mesh, model, tx, schedule = _setup(config)
  step_fn = train_state.make_train_step(
      model, tx, losses.get_loss(config.loss), schedule, mesh, shardings,
      max_log_logit_scale=two_towers.max_log_logit_scale(config.model),
      accum_steps=accum_steps, accum_mode=accum_mode)
  state = jax.tree_util.tree_map(lambda x: x.copy(), state)  # It is donated.
  snapshots, history = [], []
  for i in range(3):
    batch = sharding_lib.host_to_global(random_batch(config, seed=i), mesh)
    state, metrics = step_fn(state, batch)
    history.append((float(metrics["loss"]), float(metrics["grad_norm"])))
    if i in (0, 2):
      snapshots.append(jax.device_get(state["params"]))
  return snapshots, history


# Every loss on both meshes; accum_steps 2 on one mesh and 4 (one row per
# device per micro-batch) on the other. Each case compiles the reference
# step and one accumulating step (~10 s of CPU each), so the full
# {1, 2, 4} x losses x meshes product would triple the cost for no new path.
CASES = [(loss, mesh, rule, k) for loss in ("softmax", "sigmoid",
                                            "sigmoid_chunked")
         for (mesh, rule), k in zip(MESHES, (2, 4))]


@pytest.mark.parametrize("loss,mesh_shape,rule,accum_steps", CASES)
def test_exact_accumulation_equals_full_batch_step(loss, mesh_shape, rule,
                                                    accum_steps):
  config = _config(loss, mesh_shape, rule)
  mesh, model, tx, _ = _setup(config)
  state, shardings = train_state.create_state(model, tx, config, mesh)
  reference, ref_loss = _params_after_steps(config, state, shardings, 1)
  snapshots, history = _params_after_steps(config, state, shardings,
                                           accum_steps)
  # The full-batch loss on the same embeddings, and the gradient's norm, up
  # to float rounding.
  np.testing.assert_allclose(history, ref_loss, rtol=1e-5)
  for after, got, want in zip((1, 3), snapshots, reference):
    # The gradients differ from the reference only by float32 summation
    # order. One Adam step moves a param by about lr * m / (sqrt(v) + eps)
    # (<= lr = 5e-4), so a gradient relative error of a few ulp changes a
    # param by ~1e-10; atol 1e-7 is one float32 ulp of a param of size 1
    # (the params are O(0.1)-O(1)) and still 1/5000 of one step: a
    # gradient wrong by 0.1% of its size would fail it.
    jax.tree_util.tree_map_with_path(
        lambda path, a, b, n=after: np.testing.assert_allclose(
            a, b, rtol=1e-6, atol=1e-7,
            err_msg=f"{jax.tree_util.keystr(path)} after {n} steps"),
        got, want)


def _grads(config, accum_steps, accum_mode):
  mesh, model, tx, _ = _setup(config)
  state, shardings = train_state.create_state(model, tx, config, mesh)
  fn = jax.jit(train_state.make_loss_and_grads(
      model, losses.get_loss(config.loss), mesh, shardings["params"],
      accum_steps=accum_steps, accum_mode=accum_mode))
  batch = sharding_lib.host_to_global(random_batch(config), mesh)
  return jax.device_get(fn(state["params"], batch))


def _max_abs(tree):
  return max(float(np.max(np.abs(x))) for x in jax.tree_util.tree_leaves(tree))


def test_exact_gradient_is_the_full_batch_one_and_naive_is_not():
  """Gradients themselves, not just params after Adam.

  Adam's step is invariant to a constant factor on a gradient (up to eps),
  so the params tests above would not see e.g. open_clip's k-fold
  logit-scale gradient, or micro-batch gradients averaged instead of summed.
  The sigmoid loss has both a scale and a bias parameter. Its bias starts at
  0, not SigLIP's -10, so that the negatives (the part naive accumulation
  changes) carry a good share of the gradient at initialisation.
  """
  config = _config("sigmoid", (8, 1), "replicate")
  config.model.logit_bias_init = 0.0
  ref_loss, ref = _grads(config, 1, "exact")
  exact_loss, exact = _grads(config, 4, "exact")
  naive_loss, naive = _grads(config, 4, "naive")
  np.testing.assert_allclose(exact_loss, ref_loss, rtol=1e-6)
  for name in ref:
    # Float32 summation order only: 1e-5 of the leaf's largest entry.
    scale = _max_abs(ref[name])
    jax.tree_util.tree_map(
        lambda a, b, n=name, s=scale: np.testing.assert_allclose(
            a, b, rtol=1e-5, atol=1e-5 * s, err_msg=n),
        exact[name], ref[name])
  # The naive value against its own dense reference: the sigmoid loss of
  # each micro-batch (row r of every device's 4, r = 0..3), averaged.
  mesh, model, tx, _ = _setup(config)
  params = jax.device_get(train_state.create_state(
      model, tx, config, mesh)[0]["params"])
  zimg, ztxt, out = train_state.embed(model, params, random_batch(config))
  rows = np.arange(BATCH).reshape(8, 4)  # [device, row on the device]
  micro = [losses.sigmoid_loss(zimg[rows[:, r]], ztxt[rows[:, r]],
                               out["logit_scale"], out["logit_bias"])
           for r in range(4)]
  np.testing.assert_allclose(naive_loss, np.mean(micro), rtol=1e-5)
  for name in ("logit_scale", "logit_bias", "img_proj", "txt_proj"):
    diff = max(float(np.max(np.abs(x - y))) for x, y in zip(
        jax.tree_util.tree_leaves(naive[name]),
        jax.tree_util.tree_leaves(ref[name])))
    assert diff > 0.05 * _max_abs(ref[name]), (name, diff)


def test_microbatch_split_is_local_and_spread_over_all_devices():
  config = _config("softmax", (2, 4), "fsdp")
  mesh = sharding_lib.make_mesh(config.mesh)
  x = sharding_lib.host_to_global(
      np.arange(BATCH * 3, dtype=np.float32).reshape(BATCH, 3), mesh)
  split = jax.jit(lambda x: train_state.split_microbatches(x, 2, mesh))
  hlo = split.lower(x).compile().as_text()
  assert not COLLECTIVE.search(hlo), "the split moved data between devices"
  parts = split(x)
  # Device d holds global rows 4d..4d+3; micro-batch i takes rows 4d+2i and
  # 4d+2i+1 of every device d.
  want = np.asarray(x).reshape(8, 2, 2, 3).transpose(1, 0, 2, 3).reshape(
      2, 16, 3)
  np.testing.assert_array_equal(parts, want)
  for i in range(2):
    devices = {s.device for s in parts.addressable_shards
               if s.index[0] in (slice(None), slice(i, i + 1))}
    assert len(devices) == 8
  assert parts.sharding.spec == jax.sharding.PartitionSpec(
      None, ("data", "fsdp"))
  merge = jax.jit(lambda p: train_state.merge_microbatches(p, mesh))
  assert not COLLECTIVE.search(merge.lower(parts).compile().as_text())
  np.testing.assert_array_equal(merge(parts), np.asarray(x))


@pytest.mark.parametrize("accum_steps,ok", [(4, True), (3, False),
                                            (8, False)])
def test_accum_steps_must_divide_the_per_device_batch(accum_steps, ok):
  config = _config("softmax", (8, 1), "replicate")
  config.accum_steps = accum_steps
  if ok:
    config_lib.validate(config, device_count=8)
    return
  with pytest.raises(ValueError, match=(
      f"accum_steps={accum_steps} does not divide the per-device batch 4 "
      r"\(batch_size 32 / 8 devices\)")):
    config_lib.validate(config, device_count=8)


def test_unknown_accum_mode_is_rejected():
  config = _config("softmax", (8, 1), "replicate")
  config.accum_mode = "approximate"
  with pytest.raises(ValueError, match="accum_mode='approximate'"):
    config_lib.validate(config, device_count=8)


def test_multi_positive_keys_follow_their_rows_through_exact_accumulation():
  """accum_steps=4 (one row per device per micro-batch) equals the
  full-batch step for the keyed loss, whose keys must be split and merged
  like the embeddings; and the full-batch value is the float64 NumPy loss
  of the same keys on the host embeddings (the keys reached the loss in
  their rows' order)."""
  from clip_jax import numpy_losses  # pylint: disable=g-import-not-at-top
  config = _config("multi_positive", (2, 4), "fsdp")
  mesh, model, tx, _ = _setup(config)
  state, shardings = train_state.create_state(model, tx, config, mesh)
  host = random_batch(config)
  # Few distinct keys (many positives per row) and some -1 (no key).
  host[train_state.LOSS_KEY] = np.random.default_rng(7).integers(
      -1, 5, size=BATCH).astype(np.int32)
  batch = sharding_lib.host_to_global(host, mesh)

  def loss_and_grads(accum_steps, loss="multi_positive", batch=batch):
    return jax.device_get(jax.jit(train_state.make_loss_and_grads(
        model, losses.get_loss(loss), mesh, shardings["params"],
        accum_steps=accum_steps, accum_mode="exact"))(state["params"], batch))

  ref_loss, ref = loss_and_grads(1)
  exact_loss, exact = loss_and_grads(4)
  np.testing.assert_allclose(exact_loss, ref_loss, rtol=1e-6)
  for name in ref:
    scale = _max_abs(ref[name])
    jax.tree_util.tree_map(
        lambda a, b, n=name, s=scale: np.testing.assert_allclose(
            a, b, rtol=1e-5, atol=1e-5 * s, err_msg=n),
        exact[name], ref[name])
  params = jax.device_get(state["params"])
  zimg, ztxt, out = train_state.embed(model, params, host)
  want, _ = numpy_losses.loss_and_grads(
      "multi_positive", np.float64(zimg), np.float64(ztxt),
      float(out["logit_scale"]), 0.0, keys=host[train_state.LOSS_KEY])
  np.testing.assert_allclose(ref_loss, want, rtol=1e-5)
  # Control: the keys change the loss (softmax on the same batch differs).
  softmax_loss, _ = loss_and_grads(1, "softmax")
  assert abs(softmax_loss - ref_loss) > 1e-3, (softmax_loss, ref_loss)
