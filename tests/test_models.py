"""Towers and the two-tower model, against independent references.

References: a NumPy (float64) forward pass written from the architecture's
definition, OpenAI CLIP's published parameter counts, and perturbation tests
whose right answer follows from the masks (causal, pad, pooling position).
Models are tiny ('mu'-sized) and every forward pass is jitted, so the file
runs in seconds on CPU.
"""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from clip_jax.models import text as text_lib
from clip_jax.models import two_towers
from clip_jax.models import vit as vit_lib

EOS, PAD = 1, 0
L = 8  # Context length of the test configs.


CLIP_LIKE = {}
SIGLIP_LIKE = {"logit_scale_init": 10.0, "logit_scale_max": None,
               "logit_bias_init": -10.0, "activation": "gelu",
               "image.pool": "map", "image.ln_pre": False,
               "text.pool": "last", "text.causal": False}
# Bidirectional, mean pooling, scanned + rematerialised, two blocks.
MEAN_SCAN = {"activation": "gelu_exact", "text.pool": "mean",
             "text.causal": False, "scan": True, "remat": True,
             "image.depth": 2, "text.depth": 2}
# Rematerialised unscanned blocks, first-token pooling, a width override.
FIRST_REMAT = {"text.pool": "first", "text.depth": 2, "image.width": 48,
               "remat": True}


def _config(**overrides):
  c = ml_collections.ConfigDict(dict(
      embed_dim=16, logit_scale_init=1 / 0.07, logit_scale_max=100.0,
      logit_bias_init=None, dtype="float32", activation="quick_gelu",
      remat=False, scan=False,
      image=dict(variant="mu", image_size=16, pool="cls", patch_size=8,
                 depth=None, width=None, heads=None, ln_pre=True),
      text=dict(variant="mu", vocab_size=50, context_length=L, pool="eos",
                causal=True, eos_id=EOS, pad_id=PAD, depth=None, width=None)))
  c.update_from_flattened_dict(overrides)
  return c


def _inputs(batch=3, seed=0):
  """Images, and tokens: 5 words, EOS at position 5, then padding."""
  rng = np.random.default_rng(seed)
  images = jnp.asarray(rng.normal(size=(batch, 16, 16, 3)), jnp.float32)
  tokens = rng.integers(3, 50, size=(batch, L))
  tokens[:, 5] = EOS
  tokens[:, 6:] = PAD
  return images, jnp.asarray(tokens, jnp.int32)


# Compiling is what costs time on CPU, so each config is compiled once (one
# program computing everything the tests look at), every call uses the same
# input shapes (images [3, 16, 16, 3], tokens [3, L]), and XLA's LLVM
# optimisations are off (the programs are tiny; compiling them is the cost).
_jit = functools.partial(
    jax.jit, compiler_options={"xla_backend_optimization_level": 0})


@functools.lru_cache(maxsize=None)
def _build(overrides: tuple):
  """(config, model, param shapes, jitted run) for a config, cached."""
  config = _config(**dict(overrides))
  model = two_towers.build_model(config)
  shapes = jax.eval_shape(model.init, jax.random.key(0), *_inputs())

  def run(params, images, tokens):
    variables = {"params": params}
    (zimg, ztxt, out), state = model.apply(
        variables, images, tokens,
        capture_intermediates=lambda mdl, _: mdl.name in ("ln_final", "txt"))
    return dict(
        zimg=zimg, ztxt=ztxt, **out,
        # Per-position text outputs (after ln_final, before pooling).
        seq=state["intermediates"]["txt"]["ln_final"]["__call__"][0],
        # The text tower's pooled feature (before the projection).
        pooled=state["intermediates"]["txt"]["__call__"][0],
        encode_image=model.apply(variables, images,
                                 method=two_towers.TwoTowers.encode_image),
        encode_text=model.apply(variables, tokens, method=model.encode_text))
  return config, model, shapes["params"], _jit(run)


def _key(overrides):
  return tuple(sorted(overrides.items()))


def _random_params(overrides, seed=0):
  """Random values of the right shapes (init has zero biases and unit LN
  scales, which would hide mistakes in how those are used)."""
  config, _, shapes, _ = _build(_key(overrides))
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = path[-1].key
    if name == "logit_scale":
      return jnp.float32(np.log(config.logit_scale_init))
    if name == "logit_bias":
      return jnp.float32(config.logit_bias_init)
    x = 0.2 * rng.normal(size=s.shape) + (name == "scale")
    return jnp.asarray(x, s.dtype)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def _run(overrides, params=None, images=None, tokens=None):
  """Outputs (as NumPy) of the cached compiled model for a config."""
  _, _, _, run = _build(_key(overrides))
  default_images, default_tokens = _inputs()
  params = _random_params(overrides) if params is None else params
  out = run(params, default_images if images is None else images,
            default_tokens if tokens is None else tokens)
  return jax.tree_util.tree_map(np.asarray, out)


def _count(params):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))


# ---------------------------------------------------------------------------
# Init, shapes, norms, scale and bias.


def test_param_tree_init_shapes_norms_and_scale():
  config, model, shapes, _ = _build(_key(CLIP_LIKE))
  assert set(shapes) == {"img", "txt", "img_proj", "txt_proj", "logit_scale"}
  assert set(shapes["img_proj"]) == {"kernel"}  # Bias-free projections.
  assert shapes["img_proj"]["kernel"].shape == (32, 16)
  assert "cls" in shapes["img"] and "ln_pre" in shapes["img"]
  assert {x.dtype for x in jax.tree_util.tree_leaves(shapes)} == {
      jnp.dtype(jnp.float32)}
  assert shapes["logit_scale"].shape == ()
  # Initial values of the scalars (only they are created when neither tower
  # runs, which keeps this cheap: compiling a full init costs seconds).
  scalars = model.init(jax.random.key(0), None, None)["params"]
  assert set(scalars) == {"logit_scale"}
  np.testing.assert_allclose(scalars["logit_scale"], math.log(1 / 0.07),
                             rtol=1e-6)
  params = dict(_random_params(CLIP_LIKE), **scalars)
  out = _run(CLIP_LIKE, params)
  assert out["zimg"].shape == out["ztxt"].shape == (3, 16)
  assert out["zimg"].dtype == out["ztxt"].dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(out["zimg"], axis=1), 1.0,
                             rtol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(out["ztxt"], axis=1), 1.0,
                             rtol=1e-6)
  assert out["logit_scale"].dtype == np.float32
  np.testing.assert_allclose(out["logit_scale"], 1 / 0.07, rtol=1e-6)
  assert out["logit_bias"] is None
  # encode_image / encode_text on their own give the same vectors.
  np.testing.assert_allclose(out["encode_image"], out["zimg"], atol=1e-6)
  np.testing.assert_allclose(out["encode_text"], out["ztxt"], atol=1e-6)
  # Either input may be None (traced only: nothing to compile).
  variables = {"params": params}
  zimg, ztxt, _ = jax.eval_shape(model.apply, variables, _inputs()[0], None)
  assert ztxt is None and zimg.shape == (3, 16)
  zimg, ztxt, _ = jax.eval_shape(model.apply, variables, None, _inputs()[1])
  assert zimg is None and ztxt.shape == (3, 16)


def test_siglip_scale_and_bias_init():
  config, model, shapes, _ = _build(_key(SIGLIP_LIKE))
  assert "map_head" in shapes["img"] and "cls" not in shapes["img"]
  assert "ln_pre" not in shapes["img"]
  # Only the scale and bias are created when neither tower runs.
  scalars = model.init(jax.random.key(0), None, None)["params"]
  assert set(scalars) == {"logit_scale", "logit_bias"}
  assert scalars["logit_bias"].dtype == jnp.float32
  assert scalars["logit_bias"].shape == ()
  np.testing.assert_allclose(np.exp(scalars["logit_scale"]), 10.0, rtol=1e-6)
  assert float(scalars["logit_bias"]) == -10.0
  out = _run(SIGLIP_LIKE, dict(_random_params(SIGLIP_LIKE), **scalars))
  np.testing.assert_allclose(out["logit_scale"], 10.0, rtol=1e-6)
  assert out["logit_bias"].dtype == np.float32 and out["logit_bias"] == -10.0
  np.testing.assert_allclose(np.linalg.norm(out["zimg"], axis=1), 1.0,
                             rtol=1e-6)
  np.testing.assert_allclose(out["encode_image"], out["zimg"], atol=1e-6)
  np.testing.assert_allclose(out["encode_text"], out["ztxt"], atol=1e-6)
  assert two_towers.max_log_logit_scale(_config()) == pytest.approx(
      np.log(100.0))
  assert two_towers.max_log_logit_scale(config) is None


def test_forward_uses_unclamped_exp_of_the_stored_scale():
  params = dict(_random_params(CLIP_LIKE), logit_scale=jnp.float32(6.0))
  np.testing.assert_allclose(_run(CLIP_LIKE, params)["logit_scale"],
                             np.exp(6.0), rtol=1e-6)


# ---------------------------------------------------------------------------
# The whole model against a NumPy forward pass.


def _ln(x, p, eps=1e-5):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


ACT = {
    "quick_gelu": lambda x: x / (1 + np.exp(-1.702 * x)),
    "gelu": lambda x: 0.5 * x * (1 + np.tanh(
        np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3))),
    "gelu_exact": lambda x: 0.5 * x * (1 + np.vectorize(math.erf)(
        x / np.sqrt(2))),
}


def _mha(q_in, kv_in, p, heads, mask=None):
  """Multi-head attention; mask [B, Lq, Lk] True = may attend."""
  def proj(x, name):  # [B, T, W] -> [B, heads, T, head_dim]
    kernel = p[name]["kernel"].reshape(x.shape[-1], -1)
    y = x @ kernel + p[name]["bias"].reshape(-1)
    return y.reshape(*y.shape[:2], heads, -1).transpose(0, 2, 1, 3)
  q, k, v = proj(q_in, "query"), proj(kv_in, "key"), proj(kv_in, "value")
  logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
  if mask is not None:
    logits = np.where(mask[:, None], logits, -1e30)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  y = (w @ v).transpose(0, 2, 1, 3).reshape(*q_in.shape[:2], -1)
  return y @ p["out"]["kernel"].reshape(y.shape[-1], -1) + p["out"]["bias"]


def _mlp(x, p, act):
  h = ACT[act](x @ p["fc1"]["kernel"] + p["fc1"]["bias"])
  return h @ p["fc2"]["kernel"] + p["fc2"]["bias"]


def _blocks(x, p, depth, heads, act, mask=None):
  for i in range(depth):
    if "blocks" in p:  # Scanned: row i of the stacked params.
      b = jax.tree_util.tree_map(lambda a, i=i: a[i], p["blocks"]["block"])
    else:
      b = p[f"block{i}"]
    x = x + _mha(_ln(x, b["ln1"]), _ln(x, b["ln1"]), b["attn"], heads, mask)
    x = x + _mlp(_ln(x, b["ln2"]), b["mlp"], act)
  return x


def _numpy_two_towers(params, images, tokens, c):
  """The architecture, written out in NumPy from its definition."""
  params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  images, tokens = np.asarray(images, np.float64), np.asarray(tokens)
  act, ic, tc = c.activation, c.image, c.text
  dims_i = vit_lib.VARIANTS[ic.variant]
  dims_t = text_lib.VARIANTS[tc.variant]
  depth_i, depth_t = ic.depth or dims_i["depth"], tc.depth or dims_t["depth"]

  # Image: non-overlapping patches, flattened (row, col, channel).
  p = params["img"]
  b, s, _, _ = images.shape
  ps, g = ic.patch_size, s // ic.patch_size
  patches = images.reshape(b, g, ps, g, ps, 3).transpose(0, 1, 3, 2, 4, 5)
  x = patches.reshape(b, g * g, -1) @ p["patch_embed"]["kernel"].reshape(
      ps * ps * 3, -1)
  if ic.pool == "cls":
    x = np.concatenate([np.broadcast_to(p["cls"], (b, 1, x.shape[-1])), x], 1)
  x = x + p["pos_embed"]
  if ic.ln_pre:
    x = _ln(x, p["ln_pre"])
  x = _ln(_blocks(x, p["encoder"], depth_i, dims_i["heads"], act),
          p["ln_post"])
  if ic.pool == "cls":
    fimg = x[:, 0]
  else:
    h = p["map_head"]
    probe = np.broadcast_to(h["probe"], (b, 1, x.shape[-1]))
    y = _mha(probe, x, h["attn"], dims_i["heads"])
    fimg = (y + _mlp(_ln(y, h["ln"]), h["mlp"], act))[:, 0]

  # Text: embeddings, masked blocks, pooling.
  p = params["txt"]
  n = tokens.shape[1]
  x = p["token_embed"]["embedding"][tokens] + p["pos_embed"][:n]
  mask = np.broadcast_to((tokens != tc.pad_id)[:, None, :], (b, n, n))
  if tc.causal:
    mask = mask & np.tril(np.ones((n, n), bool))
  x = _ln(_blocks(x, p["encoder"], depth_t, dims_t["heads"], act, mask),
          p["ln_final"])
  if tc.pool == "eos":
    ftxt = np.stack([x[i, list(row).index(tc.eos_id) if tc.eos_id in row
                       else n - 1] for i, row in enumerate(tokens)])
  elif tc.pool == "last":
    ftxt = x[:, -1]
  elif tc.pool == "first":
    ftxt = x[:, 0]
  else:
    keep = (tokens != tc.pad_id)[..., None]
    ftxt = (x * keep).sum(1) / keep.sum(1)

  def embed(f, kernel):
    z = f @ kernel
    return z / np.linalg.norm(z, axis=-1, keepdims=True)
  return (embed(fimg, params["img_proj"]["kernel"]),
          embed(ftxt, params["txt_proj"]["kernel"]))


def _reference_tokens():
  """Row 0: EOS at 5 then pads; row 1: EOS at 3 and 5; row 2: no EOS."""
  _, tokens = _inputs()
  return tokens.at[1, 3].set(EOS).at[2].set(jnp.arange(3, 3 + L))


@pytest.mark.parametrize("overrides", [
    CLIP_LIKE,  # Class token, ln_pre, causal, EOS pooling, quick_gelu.
    SIGLIP_LIKE,  # MAP head, no ln_pre, bidirectional, last token, gelu.
    MEAN_SCAN,
    FIRST_REMAT,
], ids=["clip", "siglip", "mean_scan_remat", "first_remat"])
def test_matches_numpy_reference(overrides):
  config = _build(_key(overrides))[0]
  params = _random_params(overrides)
  images, tokens = _inputs()[0], _reference_tokens()
  out = _run(overrides, params, images, tokens)
  ref_img, ref_txt = _numpy_two_towers(params, images, tokens, config)
  np.testing.assert_allclose(out["zimg"], ref_img, atol=2e-5)
  np.testing.assert_allclose(out["ztxt"], ref_txt, atol=2e-5)


# ---------------------------------------------------------------------------
# Text pooling and masks.


def test_eos_pooling_reads_the_first_eos_position():
  """The pooled feature (before the projection) is the sequence output at
  the first EOS, or at the last position when there is none."""
  out = _run(CLIP_LIKE, tokens=_reference_tokens())
  np.testing.assert_allclose(
      out["pooled"], out["seq"][[0, 1, 2], [5, 3, L - 1]], rtol=1e-5,
      atol=1e-6)


def test_pool_tokens_against_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 3)).astype(np.float32)
  tokens = np.array([[4, 9, EOS, PAD, PAD], [4, 5, 6, 7, 8]])

  def pool(how):
    return text_lib.pool_tokens(x, tokens, how, eos_id=EOS, pad_id=PAD)
  np.testing.assert_allclose(pool("eos"), [x[0, 2], x[1, 4]])
  np.testing.assert_allclose(pool("mean"), [x[0, :3].mean(0), x[1].mean(0)],
                             rtol=1e-6)
  np.testing.assert_allclose(pool("last"), x[:, -1])
  np.testing.assert_allclose(pool("first"), x[:, 0])


@pytest.mark.parametrize("overrides", [CLIP_LIKE, MEAN_SCAN],
                         ids=["causal", "bidirectional"])
def test_causal_mask_blocks_the_future(overrides):
  causal = _build(_key(overrides))[0].text.causal
  row = jnp.asarray([5, 6, 7, 8, 9, 10, 11, EOS], jnp.int32)
  tokens = jnp.stack([row, row.at[4].set(20), row.at[0].set(20)])
  seq = _run(overrides, tokens=tokens)["seq"]
  diff = np.abs(seq[1] - seq[0]).max(axis=-1)  # Token 4 changed.
  assert diff[4] > 1e-3 and diff[5:].min() > 1e-4
  if causal:
    np.testing.assert_array_equal(diff[:4], 0.0)
  else:
    assert diff[:4].min() > 1e-4
  assert np.abs(seq[2] - seq[0]).max(axis=-1).min() > 1e-4  # Token 0: all.


def test_eos_embedding_ignores_tokens_after_eos_and_sees_the_rest():
  _, row = _inputs()
  row = row[0]  # EOS at position 5.
  ztxt = _run(CLIP_LIKE, tokens=jnp.stack([row, row.at[6:].set(9),
                                           row.at[2].set(9)]))["ztxt"]
  # After the EOS: no effect under the causal mask. Before it: an effect.
  np.testing.assert_allclose(ztxt[1], ztxt[0], atol=1e-6)
  assert np.abs(ztxt[2] - ztxt[0]).max() > 1e-3
  # Moving the EOS one later reads the feature elsewhere.
  moved = _run(CLIP_LIKE, tokens=jnp.stack([row, row.at[5].set(9).at[6].set(
      EOS), row]))["ztxt"]
  np.testing.assert_allclose(moved[0], ztxt[0], atol=1e-6)
  assert np.abs(moved[1] - ztxt[0]).max() > 1e-3


def test_pad_keys_are_masked_without_causal_mask():
  """Real-token outputs do not depend on how much padding follows."""
  _, model, _, _ = _build(_key(MEAN_SCAN))
  params = _random_params(MEAN_SCAN)
  row = jnp.asarray([5, 6, 7, EOS, PAD, PAD, PAD, PAD], jnp.int32)
  full = _run(MEAN_SCAN, params, tokens=jnp.stack([row] * 3))
  assert not _build(_key(MEAN_SCAN))[0].text.causal

  def sequence(tokens):
    _, state = model.txt.apply({"params": params["txt"]}, tokens,
                               capture_intermediates=True)
    return state["intermediates"]["ln_final"]["__call__"][0]
  short = np.asarray(_jit(sequence)(row[None, :4]))[0]
  np.testing.assert_allclose(full["seq"][0, :4], short, atol=1e-5)
  # Mean pooling: the mean over the real tokens only.
  np.testing.assert_allclose(full["pooled"][0], short.mean(0), rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize("overrides", [CLIP_LIKE, MEAN_SCAN],
                         ids=["causal_eos", "bidirectional_mean"])
def test_all_padding_row_gives_finite_outputs(overrides):
  """E.g. filler rows of a padded eval batch: every key is masked."""
  _, tokens = _inputs()
  out = _run(overrides, tokens=tokens.at[1].set(PAD))
  assert np.isfinite(out["ztxt"]).all() and np.isfinite(out["seq"]).all()


# ---------------------------------------------------------------------------
# scan / remat / bfloat16.


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
  """Same values and grads for the same weights.

  Whole-model forwards with scan / remat are checked against NumPy above;
  here the gradients, through the text tower (the encoder is shared by both
  towers; the text one also carries the attention mask through the scan).
  """
  flat = {"text.depth": 2}
  variants = [{}, dict(scan=True), dict(scan=True, remat=True),
              dict(remat=True)]
  towers = [_build(_key(dict(flat, **flags)))[1].txt for flags in variants]
  params = _random_params(flat)["txt"]
  stacked = _stack_blocks(params, 2)
  inputs = [stacked if flags.get("scan") else params for flags in variants]
  for flags, p in zip(variants, inputs):
    # The converted params have exactly the structure the model creates.
    shapes = _build(_key(dict(flat, **flags)))[2]["txt"]
    assert (jax.tree_util.tree_structure(shapes)
            == jax.tree_util.tree_structure(p)), flags
  _, tokens = _inputs()
  cotangent = jnp.asarray(np.random.default_rng(1).normal(size=(3, 32)),
                          jnp.float32)

  @_jit  # One program for all four (each compile costs seconds on CPU).
  def values_and_grads(inputs):
    return [jax.value_and_grad(
        lambda p, t=tower: jnp.sum(t.apply({"params": p}, tokens) * cotangent))(
            p) for tower, p in zip(towers, inputs)]

  results = values_and_grads(inputs)
  ref_value, ref_grads = results[0]
  for flags, (value, grads) in zip(variants[1:], results[1:]):
    want = _stack_blocks(ref_grads, 2) if flags.get("scan") else ref_grads
    np.testing.assert_allclose(value, ref_value, rtol=1e-5, err_msg=str(flags))
    jax.tree_util.tree_map(
        lambda a, b, f=flags: np.testing.assert_allclose(
            a, b, rtol=1e-4, atol=1e-5, err_msg=str(f)), grads, want)


def test_bfloat16_compute_keeps_float32_params_and_outputs():
  bf16_overrides = dict(SIGLIP_LIKE, dtype="bfloat16")
  _, _, shapes, _ = _build(_key(bf16_overrides))
  assert {x.dtype for x in jax.tree_util.tree_leaves(shapes)} == {
      jnp.dtype(jnp.float32)}
  params = _random_params(SIGLIP_LIKE)
  out = _run(bf16_overrides, params)
  ref = _run(SIGLIP_LIKE, params)
  for key in ("zimg", "ztxt", "logit_scale", "logit_bias"):
    assert out[key].dtype == np.float32, key
  np.testing.assert_allclose(np.linalg.norm(out["zimg"], axis=1), 1.0,
                             rtol=1e-5)
  # Cosine similarity with the float32 model's embeddings.
  assert np.min(np.sum(out["zimg"] * ref["zimg"], 1)) > 0.99
  assert np.min(np.sum(out["ztxt"] * ref["ztxt"], 1)) > 0.99


# ---------------------------------------------------------------------------
# Named sizes and config errors.


# OpenAI CLIP parameter counts: (image variant, text variant, embed dim,
# visual incl. projection, text incl. token/position embeddings and
# projection, total incl. logit_scale).
OPENAI_CLIP = [
    ("B/32", "base", 512, 87_849_216, 63_428_096, 151_277_313),
    ("B/16", "base", 512, 86_192_640, 63_428_096, 149_620_737),
    ("L/14", "large", 768, 303_966_208, 123_650_304, 427_616_513),
]


@pytest.mark.parametrize("image,text,embed,n_img,n_txt,n_all", OPENAI_CLIP,
                         ids=[row[0] for row in OPENAI_CLIP])
def test_parameter_counts_match_openai_clip(image, text, embed, n_img, n_txt,
                                            n_all):
  config = _config(**{"embed_dim": embed, "image.variant": image,
                      "image.image_size": 224, "image.patch_size": None,
                      "text.variant": text, "text.vocab_size": 49408,
                      "text.context_length": 77, "scan": True})
  model = two_towers.build_model(config)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 224, 224, 3)),
                          jnp.zeros((1, 77), jnp.int32))["params"]
  assert _count(shapes["img"]) + _count(shapes["img_proj"]) == n_img
  assert _count(shapes["txt"]) + _count(shapes["txt_proj"]) == n_txt
  assert _count(shapes) == n_all


def test_variant_sizes_and_overrides():
  config = _config(**{"image.variant": "S/16", "image.patch_size": None,
                      "image.image_size": 32, "image.width": 64,
                      "image.heads": 4, "text.variant": "tiny",
                      "text.depth": 1, "text.width": 40})
  model = two_towers.build_model(config)
  assert (model.img.width, model.img.depth, model.img.mlp_dim,
          model.img.heads, model.img.patch_size) == (64, 12, 1536, 4, 16)
  assert (model.txt.width, model.txt.depth) == (40, 1)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 32, 32, 3)),
                          jnp.zeros((1, L), jnp.int32))["params"]
  assert shapes["img"]["pos_embed"].shape == (1 + 4, 64)
  assert shapes["img_proj"]["kernel"].shape == (64, 16)
  assert shapes["txt_proj"]["kernel"].shape == (40, 16)
  assert "ln_pre" in shapes["img"]
  b32 = two_towers.build_model(_config(**{
      "image.variant": "B/32", "image.patch_size": None,
      "image.image_size": 224}))
  assert (b32.img.width, b32.img.depth, b32.img.mlp_dim, b32.img.heads,
          b32.img.patch_size) == (768, 12, 3072, 12, 32)


def test_config_errors():
  with pytest.raises(ValueError,
                     match=r"image.variant='B/33' is not one of .*'B/32'"):
    two_towers.build_model(_config(**{"image.variant": "B/33"}))
  with pytest.raises(ValueError,
                     match=r"text.variant='huge' is not one of .*'base'"):
    two_towers.build_model(_config(**{"text.variant": "huge"}))
  with pytest.raises(ValueError, match="not a multiple of the patch size 8"):
    two_towers.build_model(_config(**{"image.image_size": 20}))
  with pytest.raises(ValueError, match="text.pool='cls' is not one of"):
    two_towers.build_model(_config(**{"text.pool": "cls"}))
  with pytest.raises(ValueError, match="image.pool='eos' is not one of"):
    two_towers.build_model(_config(**{"image.pool": "eos"}))
  with pytest.raises(ValueError, match="dtype='float16' is not one of"):
    two_towers.build_model(_config(dtype="float16"))
  with pytest.raises(ValueError, match="activation='relu' is not one of"):
    two_towers.build_model(_config(activation="relu"))
  with pytest.raises(ValueError, match="logit_scale_max=10.0 is below"):
    two_towers.build_model(_config(logit_scale_max=10.0))
  with pytest.raises(ValueError, match="not divisible by 3 heads"):
    two_towers.build_model(_config(**{"image.heads": 3}))
  model = two_towers.build_model(_config())
  with pytest.raises(ValueError, match="Text of 9 tokens .* context length 8"):
    jax.eval_shape(lambda: model.init(jax.random.key(0), None,
                                      jnp.zeros((1, 9), jnp.int32)))
  with pytest.raises(ValueError, match=r"\(32, 32\) .* built for 16x16"):
    jax.eval_shape(lambda: model.init(jax.random.key(0),
                                      jnp.zeros((1, 32, 32, 3)), None))
