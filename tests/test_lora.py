"""config.lora: adapters beside their kernels, the base model exactly at
step 0, W + (alpha / r) A B afterwards (against a float64 NumPy merge),
only the adapters trained and given optimiser state, and `merge`."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from _train_worker import synthetic_stream
from train_testing import random_batch, tiny_config, write_source

from clip_jax import api, convert, lora, losses, optim, train, train_state
from clip_jax import config as config_lib
from clip_jax import sharding as sharding_lib
from clip_jax.models import two_towers

TARGETS = r".*/attn/(query|key|value|out)|.*/mlp/fc[12]|txt_proj"
MODELS = [(False, "flax"), (True, "flax"), (True, "fused_qkv")]


def _config(*, scan=False, attention="flax", targets=TARGETS, rank=4,
            alpha=8.0):
  config = tiny_config("softmax", "replicate", batch=16)
  config.model.scan = scan
  if attention != "flax":  # (Not a key of base_config's model yet.)
    config.model.attention = attention
  config.model.remat_policy = "full" if scan else "none"
  for tower in (config.model.image, config.model.text):
    tower.update(width=32, depth=2, heads=2, mlp_dim=64)
  config.lora.update(targets=targets, rank=rank, alpha=alpha)
  return config


def _off(config):
  off = config.copy_and_resolve_references()
  off.lora.targets = None
  return off


def _flat(tree):
  return {optim.path_str(p): np.asarray(x) for p, x in
          jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


def _init(config, seed=0):
  model = two_towers.build_run_model(config)
  init = jax.jit(lambda rng: train_state.init_params(model, config, rng))
  return model, init(jax.random.key(seed))


_APPLIED = {}  # Model -> its jitted embedding function (compiled once).


def _embed(model, params, batch):
  if model not in _APPLIED:
    _APPLIED[model] = jax.jit(
        lambda p, image, text: model.apply({"params": p}, image, text)[:2])
  return tuple(np.asarray(z) for z in _APPLIED[model](
      params, batch["image"], batch["text"]))


def _numpy_merge(flat, alpha_over_rank, scanned):
  """{path: float32 array}: every kernel with adapters -> W + s A B in
  float64 (one depth slice at a time when scanned), adapters dropped."""
  out = {}
  for path, value in flat.items():
    if path.endswith(("/lora_a", "/lora_b")):
      continue
    module = path[:-len("/kernel")]
    if path.endswith("/kernel") and f"{module}/lora_a" in flat:
      a = flat[f"{module}/lora_a"].astype(np.float64)
      b = flat[f"{module}/lora_b"].astype(np.float64)
      slices = zip(a, b) if scanned and "/blocks/" in path else [(a, b)]
      delta = np.stack([np.tensordot(ai, bi, axes=1) for ai, bi in slices])
      value = value + alpha_over_rank * delta.reshape(value.shape)
    out[path] = value.astype(np.float32)
  return out


def _nested(flat):
  tree = {}
  for path, leaf in flat.items():
    *parents, name = path.split("/")
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
    node[name] = jnp.asarray(leaf)
  return tree


def test_lora_off_is_todays_model_and_optimiser():
  config = tiny_config("softmax", "replicate")
  assert not lora.enabled(config.lora)
  model, params = _init(config)
  assert type(model) is two_towers.TwoTowers
  plain = two_towers.build_model(config.model, pixel_mean=config.data.mean,
                                 pixel_std=config.data.std)
  reference = train_state.init_params(plain, config, jax.random.key(0))
  assert jax.tree_util.tree_structure(params) == (
      jax.tree_util.tree_structure(reference))
  tx, _ = optim.make_optimizer(config, params, total_steps=2, warmup_steps=0)
  assert not isinstance(tx.init(params).inner_state,
                        optax.MultiTransformState)


@pytest.mark.parametrize("scan,attention", MODELS)
def test_adapters_start_at_the_base_model_then_add_scaled_ab(scan,
                                                             attention):
  """Adapters beside their kernels; the model is the base model at step 0
  (bit for bit) and the base model with NumPy-merged kernels once B != 0."""
  config = _config(scan=scan, attention=attention)
  model, params = _init(config)
  base_model, base = _init(_off(config))
  flat, base_flat = _flat(params), _flat(base)
  adapters = {p for p in flat if p.endswith(("/lora_a", "/lora_b"))}
  block = "blocks/block" if scan else "block0"
  rank = config.lora.rank
  width = config.model.image.width
  heads = config.model.image.heads
  lead = (config.model.image.depth,) if scan else ()
  assert flat[f"img/encoder/{block}/attn/query/lora_a"].shape == (
      *lead, width, rank)
  assert flat[f"img/encoder/{block}/attn/query/lora_b"].shape == (
      *lead, rank, heads, width // heads)
  assert flat[f"img/encoder/{block}/attn/out/lora_a"].shape == (
      *lead, heads, width // heads, rank)
  assert "txt_proj/lora_a" in flat and "img_proj/lora_a" not in flat
  assert not any("patch_embed" in p for p in adapters)
  # The base params are those of the same seed without LoRA, bit for bit.
  assert {p: v.tobytes() for p, v in flat.items() if p not in adapters} == {
      p: v.tobytes() for p, v in base_flat.items()}
  assert all(not flat[p].any() for p in adapters if p.endswith("lora_b"))
  assert all(flat[p].std() > 0 for p in adapters if p.endswith("lora_a"))
  batch = random_batch(config)
  for got, want in zip(_embed(model, params, batch),
                       _embed(base_model, base, batch)):
    assert got.tobytes() == want.tobytes()

  rng = np.random.default_rng(0)
  for path in flat:  # Non-zero B, so that the adapters change the model.
    if path.endswith("/lora_b"):
      flat[path] = rng.normal(0, 0.3, flat[path].shape).astype(np.float32)
  params = _nested(flat)
  merged = _nested(_numpy_merge(flat, config.lora.alpha / config.lora.rank,
                                scan))
  adapted = _embed(model, params, batch)
  reference = _embed(base_model, merged, batch)
  unadapted = _embed(base_model, _nested(
      {p: v for p, v in flat.items() if "/lora_" not in p}), batch)
  for got, want, base in zip(adapted, reference, unadapted):
    assert np.abs(want - base).max() > 1e-2  # The adapters matter.
    # Each merged kernel element differs from the float64 one by a few
    # float32 roundings (<= ~6e-7 relative); through 2 blocks and a
    # normalisation that stays far below 1e-5 on unit vectors.
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_merge_params_is_w_plus_scaled_ab_within_float32_rounding():
  config = _config(scan=True)
  _, params = _init(config)
  flat = _flat(params)
  rng = np.random.default_rng(1)
  for path in flat:
    if path.endswith("/lora_b"):
      flat[path] = rng.normal(0, 0.3, flat[path].shape).astype(np.float32)
  s = config.lora.alpha / config.lora.rank
  merged = _flat(lora.merge_params(_nested(flat), scale=s))
  reference = _numpy_merge(flat, s, scanned=True)
  assert sorted(merged) == sorted(reference)  # Adapters dropped.
  eps = np.finfo(np.float32).eps
  for path, want in reference.items():
    module = path[:-len("/kernel")]
    if f"{module}/lora_a" not in flat:
      assert merged[path].tobytes() == flat[path].tobytes()
      continue
    a, b = flat[f"{module}/lora_a"], flat[f"{module}/lora_b"]
    magnitude = np.abs(flat[path]) + s * _numpy_merge(
        {path: np.zeros_like(flat[path]), f"{module}/lora_a": np.abs(a),
         f"{module}/lora_b": np.abs(b)}, 1.0, scanned=True)[path]
    # A float32 dot product of r terms errs by <= r eps sum|a b|
    # (Higham's gamma_r), plus one rounding each for the scale, the sum
    # and the float64 reference's cast: (r + 3) eps of the magnitudes.
    bound = (a.shape[-1] + 3) * eps * magnitude
    assert np.all(np.abs(merged[path] - want) <= bound), path
    assert np.abs(merged[path] - flat[path]).max() > 1e-3


@pytest.fixture(scope="module")
def lora_run():
  """(config, model, tx, initial host state, shardings, step, mesh)."""
  config = _config(targets=r".*/attn/(query|value)")
  config.lora.train = "logit_scale"
  config.wd = 0.5  # Weight decay on frozen params would show.
  mesh = sharding_lib.make_mesh(config.mesh)
  model = two_towers.build_run_model(config)
  shapes = train_state.param_shapes(model, config)
  tx, schedule = optim.make_optimizer(config, shapes, total_steps=10,
                                      warmup_steps=0)
  state, shardings = train_state.create_state(model, tx, config, mesh)
  step_fn = train_state.make_train_step(
      model, tx, losses.get_loss(config.loss), schedule, mesh, shardings,
      max_log_logit_scale=None,
      frozen=optim.frozen_mask(shapes, optim.freeze_of(config)))
  return config, tx, jax.device_get(state), shardings, step_fn, mesh


def _is_trained(path):
  return path.endswith(("/lora_a", "/lora_b")) or path == "logit_scale"


def test_only_adapters_and_extra_params_train(lora_run):
  config, _, host_state, shardings, step_fn, mesh = lora_run
  state = jax.device_put(host_state, shardings)
  for seed in range(3):
    state, _ = step_fn(state, sharding_lib.host_to_global(
        random_batch(config, seed=seed), mesh))
  before, after = _flat(host_state["params"]), _flat(state["params"])
  frozen = [p for p in before if not _is_trained(p)]
  assert len(frozen) > 20
  assert all(after[p].tobytes() == before[p].tobytes() for p in frozen)
  trained = [p for p in before if _is_trained(p)]
  assert all(not np.array_equal(after[p], before[p]) for p in trained)
  assert {p.rsplit("/", 1)[0] for p in trained if "lora" in p} == {
      f"{t}/encoder/block{i}/attn/{n}" for t in ("img", "txt")
      for i in range(config.model.image.depth) for n in ("query", "value")}


def test_optimiser_state_holds_only_the_trained_params(lora_run):
  _, tx, host_state, _, _, _ = lora_run
  params = _flat(host_state["params"])
  trained = sum(v.size for p, v in params.items() if _is_trained(p))
  total = sum(v.size for v in params.values())
  assert trained < total / 10
  floats = [x for x in jax.tree_util.tree_leaves(host_state["opt"])
            if np.issubdtype(np.asarray(x).dtype, np.floating)]
  # Adam's mu and nu for the trained params, nothing else.
  assert sum(np.size(x) for x in floats) == 2 * trained
  paths = [optim.path_str(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(host_state["opt"])[0]]
  assert not [p for p in paths if p.endswith("/kernel")]
  counts = lora.count(lora_run[0])
  assert counts["trained"] == trained and counts["params"] == total
  assert counts["opt_elements"] == sum(
      np.size(x) for x in jax.tree_util.tree_leaves(host_state["opt"]))


def test_bad_lora_configs_are_errors():
  config = _config(targets="img/nothing")
  with pytest.raises(ValueError, match="matches no Dense module"):
    _init(config)
  config = _config()
  config.freeze = "img/.*"
  with pytest.raises(ValueError, match="config.freeze='img/.*' is set"):
    lora.check_config(config.lora, config.freeze)
  config = _config()
  config.lora.train = "logit_scal"
  with pytest.raises(ValueError, match="lora.train='logit_scal' matches no"):
    _init(config)
  config = _config(rank=0)
  with pytest.raises(ValueError, match="rank=0"):
    lora.check_config(config.lora)


def _checkpoint_params(workdir, step):
  path = os.path.join(str(workdir), "checkpoints", str(step), "state")
  with ocp.PyTreeCheckpointer() as checkpointer:
    tree = checkpointer.restore(path)
  return _flat(tree["params"])


def test_configs_lora_fine_tunes_a_pretrained_workdir_then_merges(tmp_path):
  source = tmp_path / "pretrained"
  source_config = config_lib.load_config_file("configs/clip.py",
                                              "tiny,batch=32")
  write_source(source, source_config, {2: 7},
               sharding_lib.make_mesh(source_config.mesh))
  config = config_lib.load_config_file(
      "configs/lora.py", f"init={source},rank=4,steps=3,batch=32,lr=0.01")
  assert config.model.to_dict() == source_config.model.to_dict()
  config.warmup_steps = 1
  run = tmp_path / "lora"
  result = train.train(config, str(run),
                       data=(synthetic_stream(config, 0, 1), None))
  assert result.step == 3 and np.isfinite(result.metrics["loss"])
  pretrained, tuned = _checkpoint_params(source, 2), _checkpoint_params(run, 3)
  adapters = [p for p in tuned if "/lora_" in p]
  assert adapters and sorted(set(tuned) - set(adapters)) == sorted(pretrained)
  for path, value in pretrained.items():  # Loaded, then frozen.
    if path != "logit_scale":
      assert tuned[path].tobytes() == value.tobytes(), path
  assert tuned["logit_scale"] != pretrained["logit_scale"]  # lora.train.
  assert all(tuned[p].any() for p in adapters if p.endswith("lora_b"))

  merged = tmp_path / "merged"
  assert lora.main(["merge", "--workdir", str(run), "--out",
                    str(merged)]) == 0
  adapted_model, merged_model = api.load(str(run)), api.load(str(merged))
  assert not lora.enabled(merged_model.config.lora)
  assert not lora.has_adapters(merged_model.params)
  assert merged_model.logit_scale == adapted_model.logit_scale
  batch = random_batch(config)
  for got, want in zip(_embed(merged_model.model, merged_model.params, batch),
                       _embed(adapted_model.model, adapted_model.params,
                              batch)):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match="not trained with LoRA"):
    lora.merge_workdir(str(merged), str(tmp_path / "again"))
  with pytest.raises(ValueError, match="LoRA run.*clip_jax.lora merge"):
    convert.export_hf(str(run), str(tmp_path / "hf"))  # Adapters lost.
