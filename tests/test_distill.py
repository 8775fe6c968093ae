"""Distillation (clip_jax/distill.py): both terms vs float64 NumPy formulas
with hand-derived gradients, dense and sharded (8 devices, two mesh
shapes, a permuted device order); zero when the student is the teacher;
exact accumulation == the full batch; a short train run from a teacher
workdir made here; config errors naming the mismatch."""

import functools
import os
import re
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from _train_worker import synthetic_stream
from etils import epath
from train_testing import random_batch, tiny_config, write_source

from clip_jax import api, distill, losses, optim, train, train_state
from clip_jax import config as config_lib
from clip_jax import sharding as sharding_lib
from clip_jax.models import two_towers

N, DS, DT = 64, 16, 24
# (data, fsdp) shapes, and one with the devices in a shuffled order.
MESHES = [None, (8, 1), (2, 4), "permuted"]


def _unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _softmax(x, axis):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def _log_softmax(x, axis):
  x = x - x.max(axis=axis, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def numpy_relation(a, b, ta, tb, s, t):
  """Value and grads (a, b, s) of KL(teacher || student) over rows plus
  over columns of the similarity matrices, divided by N; float64."""
  n = len(a)
  z, zt = s * a @ b.T, t * ta @ tb.T
  value = 0.0
  grad_z = np.zeros_like(z)
  for axis in (1, 0):  # image->text rows, text->image columns.
    log_p, log_q = _log_softmax(zt, axis), _log_softmax(z, axis)
    value += np.sum(np.exp(log_p) * (log_p - log_q))
    grad_z += _softmax(z, axis) - _softmax(zt, axis)  # d KL / d logits.
  grad_z /= n
  return value / n, (s * grad_z @ b, s * grad_z.T @ a,
                     np.sum(grad_z * (a @ b.T)))


def numpy_feature(a, t, kind, w):
  """Value and grads (a, w) of the mean over rows of 1 - cos(a w, t) or
  ||a w - t||^2; w None = identity."""
  n = len(a)
  p = a if w is None else a @ w
  if kind == "cosine":
    norm = np.linalg.norm(p, axis=1, keepdims=True)
    t_hat = t / np.linalg.norm(t, axis=1, keepdims=True)
    cos = np.sum(p * t_hat, axis=1, keepdims=True) / norm
    value = np.mean(1 - cos)
    grad_p = -(t_hat / norm - cos * p / norm**2) / n
  else:
    value = np.mean(np.sum((p - t) ** 2, axis=1))
    grad_p = 2 * (p - t) / n
  if w is None:
    return value, (grad_p, None)
  return value, (grad_p @ w.T, a.T @ grad_p)


@functools.lru_cache(maxsize=None)
def _mesh(shape):
  if shape is None:
    return None
  devices = jax.devices()
  if shape == "permuted":
    order = np.random.default_rng(0).permutation(len(devices))
    devices, shape = [devices[i] for i in order], (4, 2)
  return sharding_lib.make_mesh(
      ml_collections.ConfigDict(dict(data=shape[0], fsdp=shape[1])), devices)


def _put(x, mesh):
  x = jnp.float32(x)
  return x if mesh is None else jax.device_put(
      x, sharding_lib.batch_sharding(mesh))


def _embeddings(seed=0, n=N):
  rng = np.random.default_rng(seed)
  a = _unit(rng.normal(size=(n, DS)))
  b = _unit(a + 0.8 * rng.normal(size=(n, DS)))
  ta = _unit(rng.normal(size=(n, DT)))
  tb = _unit(ta + 0.5 * rng.normal(size=(n, DT)))
  return a, b, ta, tb


def _assert_close(got, want, rtol, what):
  atol = rtol * max(np.abs(want).max(), 1e-2)
  np.testing.assert_allclose(np.asarray(got), want, rtol=rtol, atol=atol,
                             err_msg=what)


@pytest.mark.parametrize("shape", MESHES)
@pytest.mark.parametrize("scales", [(10.0, 30.0), (1 / 0.07, 100.0)])
def test_relation_value_and_grads_match_numpy(shape, scales):
  mesh = _mesh(shape)
  a, b, ta, tb = _embeddings()
  s, t = scales
  fn = jax.jit(jax.value_and_grad(
      functools.partial(distill.relation_distillation, mesh=mesh),
      argnums=(0, 1, 4)))
  value, grads = fn(_put(a, mesh), _put(b, mesh), _put(ta, mesh),
                    _put(tb, mesh), jnp.float32(s), jnp.float32(t))
  want, want_grads = numpy_relation(a, b, ta, tb, s, t)
  rtol = 1e-4 if s > 50 else 2e-5  # float32 logits of size ~s.
  np.testing.assert_allclose(float(value), want, rtol=rtol)
  for got, ref, what in zip(grads, want_grads, ("zimg", "ztxt", "scale")):
    _assert_close(got, ref, rtol, f"{shape} d/d{what}")


@pytest.mark.parametrize("shape", MESHES)
@pytest.mark.parametrize("kind", distill.FEATURE_LOSSES)
@pytest.mark.parametrize("projected", [False, True])
def test_feature_value_and_grads_match_numpy(shape, kind, projected):
  mesh = _mesh(shape)
  a, _, ta, _ = _embeddings(seed=1)
  if projected:
    w = np.random.default_rng(2).normal(size=(DS, DT)) / np.sqrt(DS)
    t = ta
  else:
    w, t = None, _unit(a + 0.3 * np.random.default_rng(3).normal(
        size=a.shape))
  fn = jax.jit(jax.value_and_grad(
      lambda a, t, w: distill.feature_distillation(a, t, kind, w),
      argnums=(0, 2)))
  value, (grad_a, grad_w) = fn(_put(a, mesh), _put(t, mesh),
                               None if w is None else jnp.float32(w))
  want, (want_a, want_w) = numpy_feature(a, t, kind, w)
  np.testing.assert_allclose(float(value), want, rtol=2e-5)
  _assert_close(grad_a, want_a, 2e-5, f"{shape} d/dzimg")
  if projected:
    _assert_close(grad_w, want_w, 2e-5, f"{shape} d/dprojection")


def test_relation_keeps_one_block_of_logits_per_device():
  """No [n, N] (nor [N, N]) buffer, forward or backward; only scalars are
  all-reduced."""
  mesh = _mesh((8, 1))
  args = [_put(x, mesh) for x in _embeddings()]
  fn = jax.jit(jax.value_and_grad(
      functools.partial(distill.relation_distillation, mesh=mesh),
      argnums=(0, 1, 4)))
  hlo = fn.lower(*args, jnp.float32(10.0),
                 jnp.float32(20.0)).compile().as_text()
  shapes = {tuple(int(d) for d in dims.split(",") if d)
            for dims in re.findall(r"f32\[([\d,]*)\]", hlo)}
  n = N // 8
  assert (n, n) in shapes and (n, N) not in shapes and (N, N) not in shapes
  for line in hlo.splitlines():
    if re.search(r"\ball-reduce(-start)?\(", line):
      assert not re.search(r"f32\[\d", line.split("=", 1)[1].split(
          "all-reduce")[0]), line


# ------------------------------------------------ teacher workdirs ----


def _teacher_config():
  """The tiny recipe with embed_dim 32 (the student below has 16)."""
  return tiny_config("softmax", "replicate", batch=32)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("teacher") / "run"
  config = _teacher_config()
  saved = write_source(workdir, config, {4: 21},
                       sharding_lib.make_mesh(config.mesh))
  return str(workdir), saved[4]


def _student_config(teacher_workdir, **distill_keys):
  config = tiny_config("softmax", "replicate", batch=32)
  config.model.embed_dim = 16
  config.distill.teacher_workdir = teacher_workdir
  config.distill.update(distill_keys)
  return config


def test_off_by_default_adds_no_params():
  config = tiny_config("softmax", "replicate")
  assert not distill.enabled(config)
  model = two_towers.build_model(config.model)
  rng = jax.random.key(3)
  plain = train_state.init_model_params(model, config, rng)
  params = train_state.init_params(model, config, rng)
  assert jax.tree_util.tree_structure(params) == (
      jax.tree_util.tree_structure(plain))
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, plain)


def test_teacher_restored_on_the_mesh(teacher):
  workdir, saved = teacher
  config = _student_config(workdir)
  config.sharding_rules = [(".*", "fsdp")]
  config.mesh.data, config.mesh.fsdp = 2, 4
  mesh = sharding_lib.make_mesh(config.mesh)
  loaded = distill.load_teacher(config, mesh)
  assert loaded.step == 4 and loaded.config.model.embed_dim == 32
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         jax.device_get(loaded.params), saved)
  specs = [x.sharding.spec for x in jax.tree_util.tree_leaves(
      loaded.params)]
  assert any("fsdp" in spec for spec in specs)  # Our rules, our mesh.


@pytest.mark.parametrize("kind", distill.FEATURE_LOSSES)
def test_zero_when_the_student_is_the_teacher(teacher, kind):
  """Same model, same params: no projection (equal widths), feature 0 and
  both KLs 0, up to float32 rounding."""
  workdir, saved = teacher
  config = _teacher_config()
  config.distill.update(teacher_workdir=workdir, feature_loss=kind)
  assert distill.init_params(config, jax.random.key(0)) == {}
  mesh = sharding_lib.make_mesh(config.mesh)
  model = two_towers.build_model(config.model)
  extra = distill.make_extra_loss(config, model, mesh)
  batch = sharding_lib.host_to_global(random_batch(config), mesh)
  zimg, ztxt, out = train_state.embed(model, saved, batch)
  total, terms = jax.jit(lambda p, b, z1, z2: extra.loss(
      p, z1, z2, out, extra.targets(p, b), p))(saved, batch, zimg, ztxt)
  assert set(terms) == {"distill/feature", "distill/relation"}
  for value in (total, *terms.values()):
    assert abs(float(value)) < 2e-6, terms


def _loss_and_grads(config, teacher_workdir, accum_steps, accum_mode="exact",
                    batch=None):
  mesh = sharding_lib.make_mesh(config.mesh)
  model = two_towers.build_model(config.model)
  tx, _ = optim.make_optimizer(config, train_state.param_shapes(model, config),
                               total_steps=3, warmup_steps=0)
  state, shardings = train_state.create_state(model, tx, config, mesh)
  loaded = distill.load_teacher(config, mesh)
  extra = distill.make_extra_loss(config, loaded.model, mesh)
  fn = jax.jit(train_state.make_loss_and_grads(
      model, losses.get_loss(config.loss), mesh, shardings["params"],
      accum_steps=accum_steps, accum_mode=accum_mode, extra_loss=extra))
  batch = sharding_lib.host_to_global(
      random_batch(config) if batch is None else batch, mesh)
  return jax.device_get(fn(state["params"], batch, loaded.params))


def test_exact_accumulation_equals_the_full_batch(teacher):
  """Teacher embeddings per micro-batch, both terms on the whole batch:
  value, metrics and every gradient (the projection's included) equal the
  full-batch step's, up to float32 summation order."""
  config = _student_config(teacher[0], feature_weight=3.0,
                           relation_weight=0.5)
  config.mesh.data, config.mesh.fsdp = 2, 4
  config.sharding_rules = [(".*", "fsdp")]
  ref_loss, ref_grads, ref_metrics = _loss_and_grads(config, teacher[0], 1)
  loss, grads, metrics = _loss_and_grads(config, teacher[0], 4)
  assert ref_grads["distill"]["img_proj"]["kernel"].shape == (16, 32)
  assert set(ref_metrics) == {"contrastive_loss", "distill/feature",
                              "distill/relation"}
  np.testing.assert_allclose(
      ref_loss, ref_metrics["contrastive_loss"] + 3.0 *
      ref_metrics["distill/feature"] + 0.5 * ref_metrics["distill/relation"],
      rtol=1e-6)
  assert ref_metrics["distill/relation"] > 1e-3  # Not a trivial zero.
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  for name in ref_metrics:
    np.testing.assert_allclose(metrics[name], ref_metrics[name], rtol=1e-5)
  for name in ref_grads:
    # Float32 summation order only: 1e-5 of the subtree's largest entry
    # (some leaves, the attention key bias, are exactly 0 up to noise).
    scale = max(float(np.max(np.abs(x)))
                for x in jax.tree_util.tree_leaves(ref_grads[name]))
    jax.tree_util.tree_map(
        lambda a, b, n=name, s=scale: np.testing.assert_allclose(
            a, b, rtol=1e-5, atol=1e-5 * s, err_msg=n),
        grads[name], ref_grads[name])


def test_naive_accumulation_averages_the_micro_batches(teacher):
  """Naive: each micro-batch (rows 2r, 2r + 1 of every device's 4) its own
  loss, teacher terms included, averaged: against the full-batch function
  run on each micro-batch's rows as a batch of 16."""
  config = _student_config(teacher[0], feature_weight=2.0)
  batch = random_batch(config)
  loss, grads, metrics = _loss_and_grads(config, teacher[0], 2, "naive")
  rows = np.arange(32).reshape(8, 4)  # [device, row on the device]
  small = _student_config(teacher[0], feature_weight=2.0)
  small.batch_size = 16
  parts = [_loss_and_grads(small, teacher[0], 1, batch={
      k: v[rows[:, 2 * r:2 * r + 2].reshape(-1)] for k, v in batch.items()})
           for r in range(2)]
  np.testing.assert_allclose(loss, np.mean([p[0] for p in parts]),
                             rtol=1e-5)
  for name in metrics:
    np.testing.assert_allclose(
        metrics[name], np.mean([p[2][name] for p in parts]), rtol=1e-5)
  want = np.mean([p[1]["distill"]["img_proj"]["kernel"] for p in parts], 0)
  np.testing.assert_allclose(grads["distill"]["img_proj"]["kernel"], want,
                             rtol=1e-4, atol=1e-6 * np.abs(want).max())


@pytest.mark.slow  # Two short train runs (~1-2 min on a shared CPU).
def test_train_run_distils_and_resumes(teacher, tmp_path, capsys):
  """A short run: the terms are logged, the projection is trained and
  checkpointed (the teacher is not), a resume reads the teacher again,
  at the checkpoint the first segment pinned."""
  teacher_workdir = str(tmp_path / "teacher")  # Gains a checkpoint below.
  shutil.copytree(teacher[0], teacher_workdir)
  workdir = str(tmp_path / "student")
  config = _student_config(teacher_workdir, feature_loss="l2",
                           relation_temperature=0.1)
  config.total_steps, config.log_every_steps = 3, 1
  config.checkpoint_every_steps = 100
  result = train.train(config, workdir,
                       data=(synthetic_stream(config, 0, 1), None))
  metrics = result.metrics
  assert result.step == 3
  np.testing.assert_allclose(
      metrics["loss"], metrics["contrastive_loss"] +
      metrics["distill/feature"] + metrics["distill/relation"], rtol=1e-5)
  assert all(np.isfinite(metrics[k]) and metrics[k] > 0 for k in
             ("distill/feature", "distill/relation"))
  tree = ocp.StandardCheckpointHandler().metadata(
      epath.Path(workdir) / "checkpoints" / "3" / "state").tree
  assert set(tree["params"]) == {"img", "txt", "img_proj", "txt_proj",
                                 "logit_scale", "distill"}
  assert tuple(tree["params"]["distill"]["txt_proj"]["kernel"].shape) == (
      16, 32)
  assert "teacher" not in str(list(tree))
  # The student loads as any run does (api.restore_params, as
  # clip_jax.load and evaluate), projection included.
  restored = api.restore_params(config_lib.load(workdir), workdir, None)[1]
  assert restored["distill"]["img_proj"]["kernel"].shape == (16, 32)
  assert config_lib.load(workdir).distill.teacher_step == 4
  assert config.distill.teacher_step is None  # The caller's is not changed.
  # The teacher trains on: a newer checkpoint must not change the teacher
  # of a run that resumes.
  shutil.copytree(os.path.join(teacher_workdir, "checkpoints", "4"),
                  os.path.join(teacher_workdir, "checkpoints", "9"))
  config.total_steps = 4
  resumed = train.train(config, workdir,
                        data=(synthetic_stream(config, 0, 1), None),
                        allow_config_change=True)
  assert resumed.step == 4 and "distill/relation" in resumed.metrics
  # Read at both starts (it is not in the checkpoint).
  assert capsys.readouterr().out.count(
      f"Distilling from the teacher {teacher_workdir} (checkpoint 4") == 2
  assert config_lib.load(workdir).distill.teacher_step == 4


# ------------------------------------------------------ config errors ----


def _fake_teacher(tmp_path, **changes):
  """A teacher workdir with just a config.json and an empty checkpoint
  folder (step 7): enough for the config checks."""
  config = _teacher_config()
  config.update_from_flattened_dict(changes)
  workdir = tmp_path / "teacher"
  config_lib.save(config, str(workdir))
  os.makedirs(workdir / "checkpoints" / "7")
  return str(workdir)


@pytest.mark.parametrize("change, fragments", [
    ({"data.image_size": 16, "model.image.image_size": 16},
     ["data.image_size=16", "config.data.image_size=32", "image size"]),
    ({"data.context_length": 16, "model.text.context_length": 16},
     ["data.context_length=16", "config.data.context_length=8"]),
    ({"data.vocab_size": 48, "model.text.vocab_size": 48},
     ["data.vocab_size=48", "config.data.vocab_size=64", "vocabulary"]),
    ({"data.tokenizer": "clip_bpe"},
     ["data.tokenizer='clip_bpe'", "config.data.tokenizer='emoji'",
      "tokenizer"]),
    ({"data.mean": (0.5, 0.5, 0.5)}, ["data.mean=[0.5, 0.5, 0.5]",
                                      "pixel mean"]),
])
def test_teacher_with_other_inputs_is_rejected(tmp_path, change, fragments):
  config = _student_config(_fake_teacher(tmp_path, **change))
  with pytest.raises(ValueError) as error:
    config_lib.validate(config, device_count=8)
  message = str(error.value)
  assert "config.distill: the teacher" in message
  for fragment in fragments:
    assert fragment in message, message


@pytest.mark.parametrize("distill_keys, fragments", [
    ({"teacher_step": 3}, ["config.distill.teacher_step=3", "[7]"]),
    ({"feature_loss": "mse"}, ["config.distill.feature_loss='mse'",
                               "'cosine'"]),
    ({"feature_weight": 0.0, "relation_weight": 0.0},
     ["both config.distill.feature_weight and relation_weight are 0"]),
    ({"relation_weight": -1.0}, ["config.distill.relation_weight=-1.0",
                                 ">= 0"]),
    ({"relation_temperature": 0.0},
     ["config.distill.relation_temperature=0.0", "> 0"]),
])
def test_bad_distill_values_are_named(tmp_path, distill_keys, fragments):
  config = _student_config(_fake_teacher(tmp_path), **distill_keys)
  with pytest.raises(ValueError) as error:
    config_lib.validate(config, device_count=8)
  for fragment in fragments:
    assert fragment in str(error.value), str(error.value)


def test_teacher_workdir_without_config_or_checkpoint(tmp_path):
  config = _student_config(str(tmp_path))
  with pytest.raises(ValueError, match="has no config.json"):
    config_lib.validate(config, device_count=8)
  config_lib.save(_teacher_config(), str(tmp_path))
  with pytest.raises(ValueError, match="has no checkpoint in"):
    config_lib.validate(config, device_count=8)
  # Pinning the teacher's step names the distill key, not config.init's.
  with pytest.raises(ValueError, match=r"^config\.distill\.teacher_workdir="):
    distill.pin_teacher_step(config, None)
