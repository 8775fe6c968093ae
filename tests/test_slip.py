"""SLIP: the SSL head, the pipeline's two views, the step's extra term.

References: a single-device dense loss written here (CLIP's softmax in
jnp and SimCLR's 2N x 2N NT-Xent with the self-pairs masked) over the same
model functions, differentiated by jax.grad; the pipeline's own batches
without views; SimCLR's known loss on orthogonal views (test_losses_slip_
align.py has the NumPy checks of the loss itself).
"""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from train_testing import write_source

from clip_jax import config as config_lib
from clip_jax import losses, slip, train, train_state
from clip_jax import sharding as sharding_lib
from clip_jax.data import pipeline
from clip_jax.models import two_towers


def tiny(weight=1.0, **slip_overrides):
  config = config_lib.load_config_file("configs/clip.py", "tiny,batch=32")
  config.slip.weight = weight
  config.slip.update(slip_overrides)
  return config


def test_head_widths_scale_with_the_image_tower():
  demo = config_lib.load_config_file("configs/demo.py")
  assert slip.head_dims(demo) is None  # Off by default.
  demo.slip.weight = 1.0
  assert slip.head_dims(demo) == (512, 32)  # Width 96: 4096/768, 256/768.
  b16 = config_lib.load_config_file("configs/clip.py", "model=B/16")
  b16.slip.weight = 1.0
  assert slip.head_dims(b16) == (4096, 256)  # SLIP's ViT-B/16 head.
  b16.slip.update(mlp_dim=64, out_dim=16)
  assert slip.head_dims(b16) == (64, 16)


def test_head_params_are_added_and_nothing_else_changes():
  off, on = tiny(0.0), tiny(1.0)
  params_off = jax.jit(lambda key: train_state.init_params(
      two_towers.build_run_model(off), off, key))(jax.random.key(0))
  params_on = jax.jit(lambda key: train_state.init_params(
      two_towers.build_run_model(on), on, key))(jax.random.key(0))
  params_on = jax.device_get(params_on)
  assert "ssl_head" not in params_off
  head = params_on.pop("ssl_head")
  # Tiny: width 32 -> hidden round(32 * 4096 / 768) = 171, out 11.
  assert head["dense1"]["kernel"].shape == (32, 171)
  assert head["dense2"]["kernel"].shape == (171, 171)
  assert head["out"]["kernel"].shape == (171, 11)
  assert set(head) == {"dense1", "ln1", "dense2", "ln2", "out"}
  jax.tree_util.tree_map(np.testing.assert_array_equal, params_on,
                         params_off)


def _mesh(permuted):
  devices = np.array(jax.devices())
  if permuted:
    devices = devices[np.random.default_rng(3).permutation(len(devices))]
  return sharding_lib.make_mesh(
      ml_collections.ConfigDict(dict(data=4, fsdp=2)), devices)


def _batch(config, seed=0):
  rng = np.random.default_rng(seed)
  n, size = config.batch_size, config.model.image.image_size
  return {
      "image": rng.normal(size=(n, size, size, 3)).astype(np.float32),
      "text": rng.integers(3, config.model.text.vocab_size,
                           size=(n, config.model.text.context_length)
                           ).astype(np.int32),
      "image_views": rng.normal(size=(n, 2, size, size, 3)).astype(
          np.float32),
  }


def dense_slip_loss(model, params, batch, weight, tau):
  """CLIP + weight x SimCLR, one device, no shard_map, written here."""
  zimg = model.apply({"params": params}, batch["image"],
                     method="encode_image")
  ztxt = model.apply({"params": params}, batch["text"],
                     method="encode_text")
  scale = jnp.exp(params["logit_scale"])
  logits = scale * zimg @ ztxt.T
  labels = jnp.arange(len(zimg))
  clip = (optax_ce(logits, labels) + optax_ce(logits.T, labels)) / 2
  h1 = model.apply({"params": params}, batch["image_views"][:, 0],
                   method="encode_ssl")
  h2 = model.apply({"params": params}, batch["image_views"][:, 1],
                   method="encode_ssl")
  z = jnp.concatenate([h1, h2])
  n2 = len(z)
  sim = z @ z.T / tau
  sim = jnp.where(jnp.eye(n2, dtype=bool), -jnp.inf, sim)
  positive = (jnp.arange(n2) + n2 // 2) % n2
  ssl = optax_ce(sim, positive)
  return clip + weight * ssl, (clip, ssl)


def optax_ce(logits, labels):
  """Mean softmax cross-entropy with integer labels."""
  lse = jax.nn.logsumexp(logits, axis=1)
  return jnp.mean(lse - logits[jnp.arange(len(labels)), labels])


def test_step_loss_and_grads_equal_the_dense_reference():
  """On a 4 x 2 mesh in a permuted device order (row order on devices
  unrelated to device ids): the sharded term and hook vs one device."""
  config = tiny(0.5)
  model = two_towers.build_run_model(config)
  mesh = _mesh(permuted=True)
  params = train_state.init_params(model, config, jax.random.key(1))
  shardings = sharding_lib.tree_shardings(params, mesh,
                                          config.sharding_rules)
  fn = jax.jit(train_state.make_loss_and_grads(
      model, losses.get_loss("softmax"), mesh, shardings,
      extra_loss=slip.make_extra_loss(model, config, mesh)))
  batch = _batch(config)
  loss, grads, metrics = fn(params, sharding_lib.host_to_global(batch, mesh),
                            None)
  reference = jax.jit(jax.value_and_grad(
      lambda p, b: dense_slip_loss(model, p, b, 0.5, 0.1), has_aux=True))
  (ref_loss, (clip, ssl)), ref_grads = reference(params, batch)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["contrastive_loss"]), float(clip),
                             rtol=1e-5)
  np.testing.assert_allclose(float(metrics["slip/ssl_loss"]), float(ssl),
                             rtol=1e-5)
  assert float(ssl) > 0.1  # Random views: far from the loss's minimum.
  flat = jax.tree_util.tree_leaves_with_path(grads)
  ref = dict(jax.tree_util.tree_leaves_with_path(ref_grads))
  assert any("ssl_head" in str(path) for path, _ in flat)
  # float32 noise relative to the gradient's overall size: some leaves
  # (the attention key bias) have an exact gradient of 0 and only noise.
  scale = max(float(np.abs(g).max()) for g in ref.values())
  for path, got in flat:
    want = np.asarray(ref[path])
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4,
                               atol=1e-5 * scale,
                               err_msg=jax.tree_util.keystr(path))


def test_term_with_exact_accumulation_is_refused():
  config = tiny(1.0)
  config.accum_steps = 2
  with pytest.raises(ValueError, match=r"config.slip.weight=1.0 \(SLIP\) "
                     r"with config.accum_steps=2.*Set accum_steps=1"):
    config_lib.validate(config, device_count=8)
  config.accum_mode = "naive"  # Each micro-batch's own loss: fine.
  config_lib.validate(config, device_count=8)
  model = two_towers.build_run_model(config)
  with pytest.raises(ValueError, match="exact accumulation cannot"):
    train_state.make_loss_and_grads(
        model, losses.get_loss("softmax"), _mesh(False), None,
        accum_steps=2, extra_loss=slip.make_extra_loss(model, config, None))


@pytest.mark.parametrize("key,value,fragment", [
    ("weight", -1.0, "config.slip.weight=-1.0 must be >= 0"),
    ("temperature", 0.0, "config.slip.temperature=0.0 must be > 0"),
    ("mlp_dim", 0, "config.slip.mlp_dim=0 must be > 0"),
    ("view_crop_scale", (0.5, 0.1), "config.slip.view_crop_scale=(0.5, 0.1)"),
    ("view_style_strength", 2.0, "config.slip.view_style_strength=2.0"),
])
def test_bad_slip_values_are_named(key, value, fragment):
  config = tiny(1.0)
  config.slip[key] = value
  with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(
      ")", r"\)")):
    config_lib.validate(config, device_count=8)


def _iterator(config, views=True):
  return pipeline.make_train_iterator(
      config.data, global_batch_size=16, seed=5,
      ssl_views=slip.view_options(config) if views else None)[0]


def _synthetic(**slip_overrides):
  config = tiny(1.0, **slip_overrides)
  config.data.update(prefetch=0, random_resized_crop=(0.5, 1.0),
                     style_strength=0.3)
  return config


def test_views_differ_and_leave_image_and_text_unchanged():
  config = _synthetic()
  with _iterator(config) as it, _iterator(config, views=False) as plain:
    batch, reference = next(it), next(plain)
  assert set(reference) == {"image", "text", "label", "caption_hash",
                            "num_skipped"}
  for key in reference:
    np.testing.assert_array_equal(batch[key], reference[key])
  views = batch["image_views"]
  assert views.shape == (16, 2, 32, 32, 3) and views.dtype == np.uint8
  for i in range(16):
    assert not np.array_equal(views[i, 0], views[i, 1])
    assert not np.array_equal(views[i, 0], batch["image"][i])


def test_views_follow_the_view_options():
  """Synthetic images are square and already 32 px: a crop of the whole
  area (any aspect that fits rounds to the full 32 x 32) is the image
  itself. With no style, each view is then the image or, with flips on,
  its mirror; and both occur."""
  config = _synthetic(view_crop_scale=(1.0, 1.0), view_style_strength=0.0,
                      view_flip=False)
  config.data.update(random_resized_crop=None, style_strength=0.0)
  with _iterator(config) as it:
    batch = next(it)
  for v in range(2):
    np.testing.assert_array_equal(batch["image_views"][:, v], batch["image"])
  config.slip.view_flip = True
  with _iterator(config) as it:
    batch = next(it)
  mirrored = 0
  for i in range(16):
    for v in range(2):
      view, image = batch["image_views"][i, v], batch["image"][i]
      if np.array_equal(view, image[:, ::-1]):
        mirrored += 1
      else:
        np.testing.assert_array_equal(view, image)
  assert 0 < mirrored < 32


def test_views_are_deterministic_on_resume():
  config = _synthetic()
  with _iterator(config) as it:
    next(it)
    state = it.get_state()
    want = next(it)
  with _iterator(config) as resumed:
    resumed.set_state(state)
    got = next(resumed)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key])


def test_float_views_are_normalised_like_the_image():
  config = _synthetic()
  config.data.uint8_images = False
  with _iterator(config) as floats:
    batch = next(floats)
  config.data.uint8_images = True
  with _iterator(config) as ints:
    raw = next(ints)
  assert batch["image_views"].dtype == np.float32
  from clip_jax.data import transforms  # pylint: disable=g-import-not-at-top
  np.testing.assert_array_equal(
      batch["image_views"],
      transforms.normalize(raw["image_views"], config.data.mean,
                           config.data.std))


def test_training_with_slip_logs_both_terms(tmp_path):
  """End to end: the pipeline's views reach the step, metrics are logged."""
  config = tiny(1.0)
  config.total_steps = 2
  config.warmup_steps = 1
  config.log_every_steps = 1
  config.data.prefetch = 0
  result = train.train(config, str(tmp_path))
  metrics = result.metrics
  assert np.isfinite(metrics["slip/ssl_loss"]) and metrics[
      "slip/ssl_loss"] > 0
  np.testing.assert_allclose(
      metrics["loss"], metrics["contrastive_loss"] + metrics["slip/ssl_loss"],
      rtol=1e-5)
  with open(tmp_path / "metrics.jsonl") as f:
    logged = [json.loads(line) for line in f]
  assert any("slip/ssl_loss" in row for row in logged)


@pytest.mark.slow  # A teacher checkpoint and a 2-step run (~1 min).
def test_training_with_slip_and_distillation_adds_every_term(tmp_path):
  """Both extra terms in one run (train.py joins them with
  combine_extra_losses, one step input per term): each is logged and the
  loss is their sum with the contrastive term."""
  teacher_workdir = tmp_path / "teacher"
  teacher_config = tiny(0.0)  # The student's inputs: same data keys.
  write_source(teacher_workdir, teacher_config, {4: 21},
               sharding_lib.make_mesh(teacher_config.mesh))
  config = tiny(0.5)
  config.distill.update(teacher_workdir=str(teacher_workdir),
                        feature_weight=2.0, relation_weight=3.0)
  config.total_steps, config.warmup_steps, config.log_every_steps = 2, 1, 1
  config.data.prefetch = 0
  metrics = train.train(config, str(tmp_path / "run")).metrics
  terms = ("contrastive_loss", "slip/ssl_loss", "distill/feature",
           "distill/relation")
  assert all(np.isfinite(metrics[k]) and metrics[k] > 0 for k in terms)
  np.testing.assert_allclose(
      metrics["loss"], metrics["contrastive_loss"]
      + 0.5 * metrics["slip/ssl_loss"] + 2.0 * metrics["distill/feature"]
      + 3.0 * metrics["distill/relation"], rtol=1e-5)


def test_runs_from_before_the_new_keys_resume_without_the_flag():
  """A stored config without slip / label_smoothing / optimizer (older
  runs) resumes with today's defaults; turning SLIP on still needs
  --allow_config_change."""
  new = tiny(0.0)
  stored = tiny(0.0)
  for key in ("slip", "label_smoothing", "optimizer"):
    del stored[key]

  def resume(config):
    return train.check_resume(config, stored, workdir="w", step=3,
                              mismatches=[], allow_change=False,
                              schedules=None)

  assert "Resuming from checkpoint 3" in resume(new)
  new.slip.weight = 1.0
  with pytest.raises(ValueError, match="slip.weight"):
    resume(new)


def test_a_batch_without_views_is_a_clear_error():
  config = tiny(1.0)
  model = two_towers.build_run_model(config)
  extra_loss = slip.make_extra_loss(model, config, None)
  with pytest.raises(ValueError, match="has no 'image_views'.*ssl_views"):
    extra_loss.targets(None, {"image": None, "text": None})
