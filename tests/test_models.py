"""Towers and the two-tower model: shapes, norms, pooling, masks, variants."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from clip_jax.models import text as text_lib
from clip_jax.models import two_towers

EOS, PAD = 1, 0


def _config(**overrides):
  c = ml_collections.ConfigDict(dict(
      embed_dim=16, logit_scale_init=1 / 0.07, logit_scale_max=100.0,
      logit_bias_init=None, dtype="float32", activation="quick_gelu",
      remat=False, scan=False,
      image=dict(variant="mu", image_size=16, pool="cls", patch_size=8),
      text=dict(variant="mu", vocab_size=50, context_length=8, pool="eos",
                causal=True, eos_id=EOS, pad_id=PAD)))
  c.update_from_flattened_dict(overrides)
  return c


def _inputs(batch=3, seed=0):
  rng = np.random.default_rng(seed)
  images = jnp.asarray(rng.normal(size=(batch, 16, 16, 3)), jnp.float32)
  tokens = rng.integers(3, 50, size=(batch, 8))
  tokens[:, 5] = EOS
  tokens[:, 6:] = PAD
  return images, jnp.asarray(tokens, jnp.int32)


def _init(config, seed=0):
  model = two_towers.build_model(config)
  images, tokens = _inputs()
  return model, model.init(jax.random.key(seed), images, tokens)


@pytest.mark.parametrize("pool", ["cls", "map"])
def test_shapes_norms_and_scale(pool):
  model, variables = _init(_config(**{"image.pool": pool}))
  images, tokens = _inputs()
  zimg, ztxt, out = model.apply(variables, images, tokens)
  assert zimg.shape == ztxt.shape == (3, 16)
  assert zimg.dtype == ztxt.dtype == jnp.float32
  np.testing.assert_allclose(np.linalg.norm(zimg, axis=1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(ztxt, axis=1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(out["logit_scale"], 1 / 0.07, rtol=1e-6)
  assert out["logit_bias"] is None
  assert "logit_bias" not in variables["params"]
  # encode_* on their own give the same vectors.
  np.testing.assert_array_equal(
      model.apply(variables, images, method=model.encode_image), zimg)
  np.testing.assert_array_equal(
      model.apply(variables, tokens, method=model.encode_text), ztxt)


def test_siglip_scale_and_bias_init():
  model, variables = _init(_config(logit_scale_init=10.0,
                                   logit_bias_init=-10.0))
  _, _, out = model.apply(variables, *_inputs())
  np.testing.assert_allclose(out["logit_scale"], 10.0, rtol=1e-6)
  assert float(out["logit_bias"]) == -10.0
  assert two_towers.max_log_logit_scale(_config()) == pytest.approx(
      np.log(100.0))


def _text_sequence(config, variables, tokens):
  """Per-position outputs of the text tower (before pooling)."""
  tower = two_towers.build_model(config).txt
  _, state = tower.apply({"params": variables["params"]["txt"]}, tokens,
                         capture_intermediates=True)
  return np.asarray(state["intermediates"]["ln_final"]["__call__"][0])


def test_eos_pooling_reads_the_eos_position():
  config = _config()
  model, variables = _init(config)
  _, tokens = _inputs()
  tokens = tokens.at[1, 5].set(7).at[1, 3].set(EOS)  # EOS earlier in row 1.
  seq = _text_sequence(config, variables, tokens)
  pooled = model.txt.apply({"params": variables["params"]["txt"]}, tokens)
  np.testing.assert_allclose(pooled[0], seq[0, 5], rtol=1e-6)
  np.testing.assert_allclose(pooled[1], seq[1, 3], rtol=1e-6)
  # No EOS at all: the last position.
  no_eos = tokens.at[2].set(jnp.arange(3, 11))
  pooled = model.txt.apply({"params": variables["params"]["txt"]}, no_eos)
  seq = _text_sequence(config, variables, no_eos)
  np.testing.assert_allclose(pooled[2], seq[2, -1], rtol=1e-6)


def test_pool_tokens_against_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 3)).astype(np.float32)
  tokens = np.array([[4, 9, EOS, PAD, PAD], [4, 5, 6, 7, 8]])
  eos = text_lib.pool_tokens(x, tokens, "eos", eos_id=EOS, pad_id=PAD)
  np.testing.assert_allclose(eos, [x[0, 2], x[1, 4]])
  mean = text_lib.pool_tokens(x, tokens, "mean", eos_id=EOS, pad_id=PAD)
  np.testing.assert_allclose(mean, [x[0, :3].mean(0), x[1].mean(0)],
                             rtol=1e-6)
  np.testing.assert_allclose(
      text_lib.pool_tokens(x, tokens, "last", eos_id=EOS, pad_id=PAD),
      x[:, -1])


@pytest.mark.parametrize("causal", [True, False])
def test_causal_mask_blocks_the_future(causal):
  config = _config(**{"text.causal": causal})
  _, variables = _init(config)
  tokens = jnp.asarray([[5, 6, 7, 8, 9, 10, 11, EOS]], jnp.int32)
  changed = tokens.at[0, 4].set(20)
  before = _text_sequence(config, variables, tokens)
  after = _text_sequence(config, variables, changed)
  diff = np.abs(after - before).max(axis=-1)[0]
  assert diff[4] > 1e-3 and diff[5:].max() > 1e-3
  if causal:
    np.testing.assert_array_equal(diff[:4], 0.0)
  else:
    assert diff[:4].min() > 1e-4


def test_tokens_after_eos_do_not_change_causal_eos_embedding():
  config = _config()
  model, variables = _init(config)
  _, tokens = _inputs()
  perturbed = tokens.at[:, 6:].set(9)
  a = model.apply(variables, tokens, method=model.encode_text)
  b = model.apply(variables, perturbed, method=model.encode_text)
  np.testing.assert_allclose(a, b, atol=1e-6)
  c = model.apply(variables, tokens.at[:, 2].set(9), method=model.encode_text)
  assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3


def _stack_blocks(params, depth):
  """Unscanned block0..blockN params -> scanned 'blocks/block' params."""
  def convert(tree):
    if not isinstance(tree, dict):
      return tree
    if "block0" in tree:
      blocks = [tree[f"block{i}"] for i in range(depth)]
      rest = {k: v for k, v in tree.items() if not k.startswith("block")}
      return {**rest, "blocks": {"block": jax.tree_util.tree_map(
          lambda *xs: jnp.stack(xs), *blocks)}}
    return {k: convert(v) for k, v in tree.items()}
  return convert(params)


def test_scan_and_remat_match_plain_layers():
  overrides = {"image.depth": 2, "text.depth": 2}
  plain_model, variables = _init(_config(**overrides))
  images, tokens = _inputs()

  def loss(model, params):
    zimg, ztxt, _ = model.apply({"params": params}, images, tokens)
    return jnp.sum(zimg @ ztxt.T)

  ref_value, ref_grads = jax.value_and_grad(
      lambda p: loss(plain_model, p))(variables["params"])
  scanned = two_towers.build_model(_config(scan=True, **overrides))
  stacked = _stack_blocks(variables["params"], 2)
  assert jax.tree_util.tree_structure(stacked) == jax.tree_util.tree_structure(
      scanned.init(jax.random.key(0), images, tokens)["params"])
  value, grads = jax.value_and_grad(lambda p: loss(scanned, p))(stacked)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
      grads, _stack_blocks(ref_grads, 2))
  remat = two_towers.build_model(_config(remat=True, **overrides))
  value, grads = jax.value_and_grad(lambda p: loss(remat, p))(
      variables["params"])
  np.testing.assert_allclose(value, ref_value, rtol=1e-6)
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
      grads, ref_grads)


def test_bfloat16_compute_keeps_float32_params_and_outputs():
  model, variables = _init(_config())
  bf16 = two_towers.build_model(_config(dtype="bfloat16"))
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(
      bf16.init(jax.random.key(0), *_inputs())))
  zimg, ztxt, out = bf16.apply(variables, *_inputs())
  assert zimg.dtype == ztxt.dtype == out["logit_scale"].dtype == jnp.float32
  ref_img, ref_txt, _ = model.apply(variables, *_inputs())
  # Cosine similarity with the float32 model's embeddings.
  assert np.min(np.sum(np.asarray(zimg) * np.asarray(ref_img), 1)) > 0.99
  assert np.min(np.sum(np.asarray(ztxt) * np.asarray(ref_txt), 1)) > 0.99


def _count(params):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))


def test_clip_vit_b32_parameter_count_matches_openai():
  """OpenAI CLIP ViT-B/32: 151,277,313 params (visual 87,849,216)."""
  config = _config(**{"embed_dim": 512, "image.variant": "B/32",
                      "image.image_size": 224, "image.patch_size": None,
                      "text.variant": "base", "text.vocab_size": 49408,
                      "text.context_length": 77})
  model = two_towers.build_model(config)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 224, 224, 3)),
                          jnp.zeros((1, 77), jnp.int32))["params"]
  assert _count(shapes["img"]) + _count(shapes["img_proj"]) == 87_849_216
  assert _count(shapes["txt"]) + _count(shapes["txt_proj"]) == 63_428_096
  assert _count(shapes) == 151_277_313


def test_config_errors():
  with pytest.raises(ValueError, match=r"image.variant='B/33' is not one of"):
    two_towers.build_model(_config(**{"image.variant": "B/33"}))
  with pytest.raises(ValueError, match="not a multiple of the patch size 8"):
    two_towers.build_model(_config(**{"image.image_size": 20}))
  with pytest.raises(ValueError, match="text.pool='cls' is not one of"):
    two_towers.build_model(_config(**{"text.pool": "cls"}))
  model, variables = _init(_config())
  with pytest.raises(ValueError, match="Text of 9 tokens .* context length 8"):
    model.apply(variables, jnp.zeros((1, 9), jnp.int32),
                method=model.encode_text)
