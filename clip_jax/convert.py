r"""Pretrained CLIP / SigLIP checkpoints <-> clip_jax workdirs.

  python -m clip_jax.convert --from hf --in DIR --out WORKDIR
  python -m clip_jax.convert --from openai --in ViT-B-32.pt --out WORKDIR
  python -m clip_jax.convert --from open_clip --in model.safetensors \
      --out WORKDIR [--activation gelu_exact] [--arch B/32]
  python -m clip_jax.convert --to hf --in WORKDIR --out HF_DIR

Sources:
  hf         a Hugging Face CLIPModel or SiglipModel directory: config.json
             and model.safetensors (or a sharded
             model.safetensors.index.json); its preprocessor_config.json,
             if present, gives the image mean/std.
  openai     OpenAI's .pt (a TorchScript archive) or any state dict with
             OpenAI's names; quick_gelu.
  open_clip  an open_clip state dict (.pt/.bin via torch.save, or
             .safetensors) of a model with open_clip's own ViT and text
             transformer (not timm / HF towers). Its activation is not in
             the weights: --activation (default: the open_clip_config.json
             beside the file if present, else gelu_exact, open_clip's
             default; '-quickgelu' models and OpenAI weights use
             quick_gelu).
No torch is needed: clip_jax.tensor_files reads safetensors and PyTorch zip
archives itself (with an unpickler that builds nothing but tensors).

--arch (B/32, B/16, L/14, ...) checks that the weights are that
clip_jax.models.vit variant and names it in the config (else the dims are
written out explicitly). --image_size S resizes the position embedding to
another resolution (bicubic over the patch grid, as open_clip's
resize_pos_embed does; the class token's row is kept). --scan writes the
blocks stacked for config.model.scan=True.

The workdir written (the layout clip_jax.train writes):
  WORKDIR/config.json, config.txt, configs/segment_1_step_0.json
  WORKDIR/checkpoints/0/state   {'step': 0, 'params', 'opt': fresh AdamW
                                 state of the config's optimiser}
so `python -m clip_jax.evaluate --workdir WORKDIR ...` evaluates it and
`python -m clip_jax.train` resumes it (fine-tuning from step 0; see
configs/converted.py). The config holds the model, float32, and the
preprocessing it expects in config.data: image_size, mean, std,
eval_resize ('shortest_side' = CLIP's resize then centre crop, 'squash' =
SigLIP's resize to a square), tokenizer ('clip_bpe' for CLIP, SigLIP's
spiece.model if it is in the HF directory; else --tokenizer), the EOS
policy and lower-casing.

--to hf writes a CLIP-architecture workdir (class-token pooling, image
projection, no patch or text-projection bias) as model.safetensors +
config.json + preprocessor_config.json that transformers.CLIPModel
.from_pretrained loads.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys

import numpy as np

from clip_jax import tensor_files

SOURCES = ("hf", "openai", "open_clip")
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)


# ---------------------------------------------------------------------------
# Parameter layouts. PyTorch Linear weights are [out, in]; flax Dense kernels
# [in, out]; flax attention kernels [width, heads, head_dim] (query / key /
# value, bias [heads, head_dim]) and [heads, head_dim, width] (out).


def _dense(weight, bias=None) -> dict:
  out = {"kernel": np.asarray(weight, np.float32).T}
  if bias is not None:
    out["bias"] = np.asarray(bias, np.float32)
  return out


def _ln(weight, bias) -> dict:
  return {"scale": np.asarray(weight, np.float32),
          "bias": np.asarray(bias, np.float32)}


def _attention(q, k, v, out, heads: int) -> dict:
  """(weight, bias) pairs of q, k, v, out projections -> flax MHA params."""
  width = out[0].shape[0]
  head_dim = width // heads
  params = {}
  for name, (weight, bias) in (("query", q), ("key", k), ("value", v)):
    params[name] = {
        "kernel": np.asarray(weight, np.float32).T.reshape(
            width, heads, head_dim),
        "bias": np.asarray(bias, np.float32).reshape(heads, head_dim)}
  params["out"] = {
      "kernel": np.asarray(out[0], np.float32).T.reshape(
          heads, head_dim, width),
      "bias": np.asarray(out[1], np.float32)}
  return params


def _split_in_proj(weight, bias):
  """PyTorch MultiheadAttention's packed [3W, W] -> (q, k, v) pairs."""
  ws, bs = np.split(np.asarray(weight), 3), np.split(np.asarray(bias), 3)
  return list(zip(ws, bs))


def _attention_to_torch(params) -> dict:
  """flax MHA params -> {'q': (weight, bias), ..., 'out': (weight, bias)}."""
  out = {}
  for name, short in (("query", "q"), ("key", "k"), ("value", "v")):
    kernel = params[name]["kernel"]
    width = kernel.shape[0]
    out[short] = (kernel.reshape(width, -1).T, params[name]["bias"].ravel())
  kernel = params["out"]["kernel"]
  out["out"] = (kernel.reshape(-1, kernel.shape[-1]).T, params["out"]["bias"])
  return out


def _count_layers(tensors, prefix: str) -> int:
  layers = {int(k[len(prefix):].split(".")[0]) for k in tensors
            if k.startswith(prefix)}
  if layers != set(range(len(layers))):
    raise ValueError(f"Layers under {prefix!r} are not numbered 0..n-1: "
                     f"{sorted(layers)}.")
  return len(layers)


def resize_pos_embed(pos, new_grid: int, *, extra_tokens: int):
  """[extra + g*g, W] -> [extra + new_grid**2, W]: bicubic over the grid
  (the class token's row, if any, unchanged)."""
  import jax  # pylint: disable=g-import-not-at-top
  extra, grid_rows = pos[:extra_tokens], pos[extra_tokens:]
  grid = int(round(math.sqrt(len(grid_rows))))
  if grid * grid != len(grid_rows):
    raise ValueError(f"Position embedding of {len(grid_rows)} patch rows is "
                     "not a square grid.")
  if grid == new_grid:
    return pos
  width = pos.shape[-1]
  resized = jax.image.resize(grid_rows.reshape(grid, grid, width),
                             (new_grid, new_grid, width), "bicubic")
  return np.concatenate([extra, np.asarray(resized, np.float32).reshape(
      new_grid * new_grid, width)]).astype(np.float32)


# ---------------------------------------------------------------------------
# Hugging Face CLIPModel / SiglipModel.


def _hf_block(tensors, prefix: str, heads: int) -> dict:
  t = lambda name: tensors[prefix + name]
  proj = lambda name: (t(f"self_attn.{name}.weight"),
                       t(f"self_attn.{name}.bias"))
  return {
      "ln1": _ln(t("layer_norm1.weight"), t("layer_norm1.bias")),
      "attn": _attention(proj("q_proj"), proj("k_proj"), proj("v_proj"),
                         proj("out_proj"), heads),
      "ln2": _ln(t("layer_norm2.weight"), t("layer_norm2.bias")),
      "mlp": {"fc1": _dense(t("mlp.fc1.weight"), t("mlp.fc1.bias")),
              "fc2": _dense(t("mlp.fc2.weight"), t("mlp.fc2.bias"))},
  }


def _hf_encoder(tensors, prefix: str, heads: int) -> tuple[dict, int]:
  depth = _count_layers(tensors, prefix)
  return ({f"block{i}": _hf_block(tensors, f"{prefix}{i}.", heads)
           for i in range(depth)}, depth)


HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu_exact",
                  "gelu_pytorch_tanh": "gelu", "gelu_new": "gelu"}


def _hf_activation(tower_config) -> str:
  act = tower_config.get("hidden_act", "quick_gelu")
  if act not in HF_ACTIVATIONS:
    raise ValueError(f"HF hidden_act={act!r} is not one of "
                     f"{sorted(HF_ACTIVATIONS)}.")
  return HF_ACTIVATIONS[act]


def from_hf(tensors: dict, hf_config: dict) -> tuple[dict, dict, dict]:
  """HF CLIPModel / SiglipModel tensors + config.json ->
  (model config dict, params, data config updates)."""
  siglip = "siglip" in hf_config.get("model_type", "") or (
      "logit_bias" in tensors)
  vc, tc = hf_config.get("vision_config", {}), hf_config.get(
      "text_config", {})
  v_heads, t_heads = (c.get("num_attention_heads", 12) for c in (vc, tc))
  activation = _hf_activation(vc)
  if _hf_activation(tc) != activation:
    raise ValueError(f"The towers' activations differ ({vc.get('hidden_act')}"
                     f", {tc.get('hidden_act')}); clip_jax uses one.")
  eps = float(vc.get("layer_norm_eps", 1e-6 if siglip else 1e-5))
  t = tensors
  v = "vision_model."
  img_blocks, v_depth = _hf_encoder(t, v + "encoder.layers.", v_heads)
  patch = t[v + "embeddings.patch_embedding.weight"]
  width, p = patch.shape[0], patch.shape[-1]
  img = {"patch_embed": {"kernel": np.transpose(patch, (2, 3, 1, 0)).astype(
             np.float32)},
         "pos_embed": t[v + "embeddings.position_embedding.weight"].astype(
             np.float32),
         "encoder": img_blocks,
         "ln_post": _ln(t[v + "post_layernorm.weight"],
                        t[v + "post_layernorm.bias"])}
  if v + "embeddings.patch_embedding.bias" in t:
    img["patch_embed"]["bias"] = t[v + "embeddings.patch_embedding.bias"]
  if v + "embeddings.class_embedding" in t:
    img["cls"] = t[v + "embeddings.class_embedding"].astype(np.float32)
  if v + "pre_layrnorm.weight" in t:
    img["ln_pre"] = _ln(t[v + "pre_layrnorm.weight"],
                        t[v + "pre_layrnorm.bias"])
  pool = "cls"
  if v + "head.probe" in t:
    pool = "map"
    h = v + "head."
    img["map_head"] = {
        "probe": t[h + "probe"].astype(np.float32),
        "attn": _attention(*_split_in_proj(t[h + "attention.in_proj_weight"],
                                           t[h + "attention.in_proj_bias"]),
                           (t[h + "attention.out_proj.weight"],
                            t[h + "attention.out_proj.bias"]), v_heads),
        "ln": _ln(t[h + "layernorm.weight"], t[h + "layernorm.bias"]),
        "mlp": {"fc1": _dense(t[h + "mlp.fc1.weight"], t[h + "mlp.fc1.bias"]),
                "fc2": _dense(t[h + "mlp.fc2.weight"], t[h + "mlp.fc2.bias"])}}
  elif siglip:
    raise ValueError("A SigLIP vision tower without its attention-pooling "
                     "head (vision_use_head=False) is not supported.")

  x = "text_model."
  txt_blocks, t_depth = _hf_encoder(t, x + "encoder.layers.", t_heads)
  token = t[x + "embeddings.token_embedding.weight"]
  txt = {"token_embed": {"embedding": token.astype(np.float32)},
         "pos_embed": t[x + "embeddings.position_embedding.weight"].astype(
             np.float32),
         "encoder": txt_blocks,
         "ln_final": _ln(t[x + "final_layer_norm.weight"],
                         t[x + "final_layer_norm.bias"])}
  params = {"img": img, "txt": txt,
            "logit_scale": np.float32(np.ravel(t["logit_scale"])[0])}
  if siglip:
    params["txt_proj"] = _dense(t[x + "head.weight"], t[x + "head.bias"])
    params["logit_bias"] = np.float32(np.ravel(t["logit_bias"])[0])
    embed_dim = width
  else:
    params["img_proj"] = _dense(t["visual_projection.weight"])
    params["txt_proj"] = _dense(t["text_projection.weight"])
    embed_dim = t["text_projection.weight"].shape[0]

  eos_id = int(tc.get("eos_token_id", 49407 if not siglip else 1))
  pad_id = int(tc.get("pad_token_id", 1))
  text_pool = "last" if siglip else ("argmax" if eos_id == 2 else "eos")
  model = dict(
      embed_dim=int(embed_dim), activation=activation, ln_eps=eps,
      image=dict(width=int(width), depth=v_depth, heads=int(v_heads),
                 mlp_dim=int(img_blocks["block0"]["mlp"]["fc1"]["kernel"]
                             .shape[1]),
                 patch_size=int(p), image_size=int(vc.get("image_size", 224)),
                 pool=pool, ln_pre="ln_pre" in img,
                 patch_bias="bias" in img["patch_embed"]),
      text=dict(width=int(token.shape[1]), depth=t_depth, heads=int(t_heads),
                mlp_dim=int(txt_blocks["block0"]["mlp"]["fc1"]["kernel"]
                            .shape[1]),
                vocab_size=int(token.shape[0]),
                context_length=int(txt["pos_embed"].shape[0]),
                pool=text_pool, causal=not siglip, eos_id=eos_id,
                pad_id=pad_id, mask_pad=False))
  if siglip:
    model.update(image_projection=False, text_projection_bias=True)
  data = (dict(mean=SIGLIP_MEAN, std=SIGLIP_STD, eval_resize="squash",
               eos_policy="last", lowercase=True)
          if siglip else dict(eval_resize="shortest_side", eos_policy="eos",
                              lowercase=True, tokenizer="clip_bpe"))
  return model, params, data


# ---------------------------------------------------------------------------
# OpenAI / open_clip state dicts (the same names).


def _openai_block(tensors, prefix: str, heads: int) -> dict:
  t = lambda name: tensors[prefix + name]
  return {
      "ln1": _ln(t("ln_1.weight"), t("ln_1.bias")),
      "attn": _attention(*_split_in_proj(t("attn.in_proj_weight"),
                                         t("attn.in_proj_bias")),
                         (t("attn.out_proj.weight"), t("attn.out_proj.bias")),
                         heads),
      "ln2": _ln(t("ln_2.weight"), t("ln_2.bias")),
      "mlp": {"fc1": _dense(t("mlp.c_fc.weight"), t("mlp.c_fc.bias")),
              "fc2": _dense(t("mlp.c_proj.weight"), t("mlp.c_proj.bias"))},
  }


def _openai_encoder(tensors, prefix: str, heads: int) -> tuple[dict, int]:
  depth = _count_layers(tensors, prefix)
  if not depth:
    raise ValueError(f"No transformer blocks under {prefix!r}: not an "
                     "OpenAI / open_clip ViT state dict (timm or HF towers "
                     "are not supported).")
  return ({f"block{i}": _openai_block(tensors, f"{prefix}{i}.", heads)
           for i in range(depth)}, depth)


def _projection(tensors, name: str):
  """open_clip's projections: a [width, embed] parameter, or a Linear."""
  if name in tensors:
    return {"kernel": np.asarray(tensors[name], np.float32)}
  if name + ".weight" in tensors and name + ".bias" not in tensors:
    return _dense(tensors[name + ".weight"])
  raise ValueError(f"No bias-free projection {name!r} in the state dict.")


def from_openai(tensors: dict, *, activation: str = "quick_gelu",
                image_heads: int | None = None,
                text_heads: int | None = None) -> tuple[dict, dict, dict]:
  """OpenAI / open_clip state dict -> (model config, params, data config).

  Head counts are not in the weights: default width // 64 (OpenAI's and
  open_clip's head width)."""
  t = tensors
  unsupported = [k for k in t if k.startswith(("visual.trunk.",
                                               "text.transformer.",
                                               "visual.attn_pool"))]
  if unsupported:
    raise ValueError(f"Unsupported open_clip towers (timm / HF / attention "
                     f"pooling): {unsupported[:3]}.")
  conv = t["visual.conv1.weight"]
  width, p = conv.shape[0], conv.shape[-1]
  v_heads = image_heads or width // 64
  img_blocks, v_depth = _openai_encoder(t, "visual.transformer.resblocks.",
                                        v_heads)
  pos = t["visual.positional_embedding"].astype(np.float32)
  grid = int(round(math.sqrt(pos.shape[0] - 1)))
  img = {"patch_embed": {"kernel": np.transpose(conv, (2, 3, 1, 0)).astype(
             np.float32)},
         "cls": t["visual.class_embedding"].astype(np.float32),
         "pos_embed": pos, "encoder": img_blocks,
         "ln_pre": _ln(t["visual.ln_pre.weight"], t["visual.ln_pre.bias"]),
         "ln_post": _ln(t["visual.ln_post.weight"], t["visual.ln_post.bias"])}
  token = t["token_embedding.weight"]
  t_width = token.shape[1]
  t_heads = text_heads or t_width // 64
  txt_blocks, t_depth = _openai_encoder(t, "transformer.resblocks.", t_heads)
  txt = {"token_embed": {"embedding": token.astype(np.float32)},
         "pos_embed": t["positional_embedding"].astype(np.float32),
         "encoder": txt_blocks,
         "ln_final": _ln(t["ln_final.weight"], t["ln_final.bias"])}
  img_proj = _projection(t, "visual.proj")
  params = {"img": img, "txt": txt, "img_proj": img_proj,
            "txt_proj": _projection(t, "text_projection"),
            "logit_scale": np.float32(np.ravel(t["logit_scale"])[0])}
  if "logit_bias" in t:
    params["logit_bias"] = np.float32(np.ravel(t["logit_bias"])[0])
  vocab = int(token.shape[0])
  model = dict(
      embed_dim=int(img_proj["kernel"].shape[1]), activation=activation,
      image=dict(width=int(width), depth=v_depth, heads=int(v_heads),
                 mlp_dim=int(img_blocks["block0"]["mlp"]["fc1"]["kernel"]
                             .shape[1]),
                 patch_size=int(p), image_size=int(p * grid), pool="cls",
                 ln_pre=True),
      text=dict(width=int(t_width), depth=t_depth, heads=int(t_heads),
                mlp_dim=int(txt_blocks["block0"]["mlp"]["fc1"]["kernel"]
                            .shape[1]),
                vocab_size=vocab, context_length=int(txt["pos_embed"].shape[0]),
                pool="argmax", causal=True, eos_id=vocab - 1, pad_id=0,
                mask_pad=False))
  data = dict(eval_resize="shortest_side", eos_policy="eos", lowercase=True,
              tokenizer="clip_bpe")
  return model, params, data


# ---------------------------------------------------------------------------
# Config and workdir.


def _fill_variant(tower: dict, variants: dict, arch: str | None,
                  kind: str) -> dict:
  """Names the variant whose dims the tower has (explicit dims stay)."""
  dims = {k: tower[k] for k in next(iter(variants.values()))}
  if arch is not None:
    if arch not in variants:
      raise ValueError(f"--arch {arch!r} is not one of {sorted(variants)}.")
    if variants[arch] != dims:
      raise ValueError(f"The weights' {kind} tower is {dims}, not {arch} "
                       f"{variants[arch]}; drop --arch or pick the right one.")
    return {**tower, "variant": arch}
  match = [name for name, v in variants.items() if v == dims]
  return {**tower, "variant": match[0] if match else next(iter(variants))}


def make_config(model: dict, data: dict, *, arch: str | None = None,
                image_size: int | None = None, tokenizer: str | None = None):
  """The clip_jax config of a converted model (float32, fine-tuning
  defaults; see configs/converted.py)."""
  import ml_collections  # pylint: disable=g-import-not-at-top

  from clip_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from clip_jax.data import (
    clip_bpe,  # pylint: disable=g-import-not-at-top
    pipeline,  # pylint: disable=g-import-not-at-top
  )
  from clip_jax.models import text as text_lib  # pylint: disable=g-import-not-at-top
  from clip_jax.models import vit  # pylint: disable=g-import-not-at-top
  image = _fill_variant(model["image"], vit.VARIANTS, arch, "image")
  if image_size is not None:
    image["image_size"] = image_size
  text = _fill_variant(model["text"], text_lib.VARIANTS, None, "text")
  c = config_lib.base_config()
  has_bias = "logit_bias_init" in model
  c.model = ml_collections.ConfigDict(dict(
      model, image=image, text=text, dtype="float32", remat=False,
      remat_policy="none", scan=False,
      logit_scale_init=model.get("logit_scale_init", 1 / 0.07),
      logit_scale_max=model.get("logit_scale_max"),
      logit_bias_init=model.get("logit_bias_init")))
  c.loss = "sigmoid" if has_bias else "softmax"
  c.batch_size = 256
  c.total_steps = 1000
  c.warmup_steps = 100
  c.lr = 1e-5
  c.wd = 0.1
  c.data = pipeline.default_data_config()
  c.data.update(data)
  if (c.data.tokenizer == "clip_bpe" and not tokenizer
      and text["vocab_size"] != clip_bpe.VOCAB_SIZE):
    # Not OpenAI's vocabulary (a custom or test model): the user's tokenizer
    # must be named with --tokenizer; until then the emoji placeholder.
    logging.warning(
        "The text tower has %d tokens, not clip_bpe's %d: its tokenizer is "
        "unknown; pass --tokenizer (config.data.tokenizer) to evaluate it.",
        text["vocab_size"], clip_bpe.VOCAB_SIZE)
    c.data.tokenizer = pipeline.default_data_config()["tokenizer"]
  c.data.source = "emoji"  # A placeholder: point it at your data to train.
  c.data.image_size = image["image_size"]
  c.data.context_length = text["context_length"]
  c.data.vocab_size = text["vocab_size"]
  if tokenizer:
    c.data.tokenizer = tokenizer
  return c


def _scalars_into_config(model: dict, params: dict) -> dict:
  """Init values equal to the converted ones (they only matter to
  validation: the params hold the values)."""
  scale = float(np.exp(params["logit_scale"]))
  # CLIP's cap of 100 (OpenAI's final scale is 100 up to float rounding).
  cap = 100.0 if scale <= 100.0 + 1e-3 and "logit_bias" not in params else None
  model = dict(model, logit_scale_init=min(scale, cap or scale),
               logit_scale_max=cap)
  if "logit_bias" in params:
    model["logit_bias_init"] = float(params["logit_bias"])
  return model


def stack_blocks(params: dict) -> dict:
  """Unscanned params (encoder/block{i}) -> the layout of model.scan=True
  (encoder/blocks/block, each leaf with a leading [depth] axis)."""
  import jax  # pylint: disable=g-import-not-at-top
  params = dict(params)
  for tower in ("img", "txt"):
    encoder = params[tower]["encoder"]
    blocks = [encoder[f"block{i}"] for i in range(len(encoder))]
    stacked = jax.tree_util.tree_map(lambda *x: np.stack(x), *blocks)
    params[tower] = {**params[tower],
                     "encoder": {"blocks": {"block": stacked}}}
  return params


def unstack_blocks(params: dict) -> dict:
  """The inverse of stack_blocks."""
  import jax  # pylint: disable=g-import-not-at-top
  params = dict(params)
  for tower in ("img", "txt"):
    stacked = params[tower]["encoder"]["blocks"]["block"]
    depth = len(jax.tree_util.tree_leaves(stacked)[0])
    params[tower] = {**params[tower], "encoder": {
        f"block{i}": jax.tree_util.tree_map(lambda x, i=i: x[i], stacked)
        for i in range(depth)}}
  return params


def check_params_fit(model, config, params) -> None:
  """Raises ValueError listing converted params the model does not have or
  whose shapes differ (and params the model has that were not converted)."""
  from clip_jax import train_state  # pylint: disable=g-import-not-at-top
  want = _by_path(train_state.param_shapes(model, config))
  have = _by_path(params)
  problems = [f"{k}: converted {have.get(k)}, model {want.get(k)}"
              for k in sorted(set(want) | set(have))
              if have.get(k) != want.get(k)]
  if problems:
    raise ValueError("The converted parameters do not fit the model: "
                     + "; ".join(problems[:5]))


def _by_path(tree) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path):
          tuple(np.shape(leaf)) for path, leaf in leaves}


def write_workdir(config, params: dict, workdir: str) -> str:
  """Writes config + step-0 checkpoint (train's layout) into a new workdir."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from clip_jax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from clip_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from clip_jax import optim  # pylint: disable=g-import-not-at-top
  from clip_jax.models import two_towers  # pylint: disable=g-import-not-at-top
  if os.path.exists(os.path.join(workdir, "checkpoints")) or os.path.exists(
      os.path.join(workdir, "config.json")):
    raise FileExistsError(f"{workdir} already holds a run; give a new --out.")
  # One device: the batch's split over devices is the training run's
  # concern (checked when it starts), not the checkpoint's.
  config_lib.validate(config, device_count=1)
  model = two_towers.build_run_model(config)
  check_params_fit(model, config, params)
  params = jax.tree_util.tree_map(jnp.asarray, params)
  tx, _ = optim.make_optimizer(config, params, total_steps=1, warmup_steps=0)
  state = {"step": jnp.zeros((), jnp.int32), "params": params,
           "opt": tx.init(params)}
  ckpt = checkpoint_lib.Checkpointer(workdir, every_steps=1, keep=1,
                                     async_save=False)
  try:
    ckpt.save(0, state)
  finally:
    ckpt.close()
  config_lib.save(config, workdir)
  return workdir


def read_hf_dir(path: str) -> tuple[dict, dict, dict | None]:
  """(tensors, config.json, preprocessor_config.json or None)."""
  folder = path if os.path.isdir(path) else os.path.dirname(path)
  config_path = os.path.join(folder, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"No config.json beside {path}: --from hf needs "
                            "the model directory save_pretrained wrote.")
  with open(config_path) as f:
    hf_config = json.load(f)
  pre = os.path.join(folder, "preprocessor_config.json")
  preprocessor = None
  if os.path.isfile(pre):
    with open(pre) as f:
      preprocessor = json.load(f)
  return tensor_files.read_tensors(path), hf_config, preprocessor


def _hf_preprocessing(preprocessor: dict) -> dict:
  """config.data keys from a HF preprocessor_config.json: mean, std and
  how the square is made (shortest edge + centre crop, or a squash)."""
  data = {}
  for key, hf_key in (("mean", "image_mean"), ("std", "image_std")):
    if hf_key in preprocessor:
      data[key] = tuple(float(x) for x in preprocessor[hf_key])
  size = preprocessor.get("size")
  if isinstance(size, dict) and "shortest_edge" in size:
    crop = preprocessor.get("crop_size") or {}
    if preprocessor.get("do_center_crop", True) and crop.get(
        "height", size["shortest_edge"]) != size["shortest_edge"]:
      raise ValueError(
          f"The preprocessor resizes to {size['shortest_edge']} and crops "
          f"{crop}: clip_jax crops the size it resizes to (data.image_size).")
    data["eval_resize"] = "shortest_side"
  elif isinstance(size, dict) and "height" in size:
    data["eval_resize"] = "squash"
  return data


def _open_clip_model_cfg(path: str) -> dict:
  """model_cfg of the open_clip_config.json beside the weights, or {}."""
  folder = path if os.path.isdir(path) else os.path.dirname(path)
  cfg = os.path.join(folder, "open_clip_config.json")
  if not os.path.isfile(cfg):
    return {}
  with open(cfg) as f:
    return json.load(f).get("model_cfg", {})


def convert(source: str, path: str, workdir: str, *, arch: str | None = None,
            activation: str | None = None, image_size: int | None = None,
            tokenizer: str | None = None, image_heads: int | None = None,
            text_heads: int | None = None, scan: bool = False):
  """Converts a checkpoint into a new clip_jax workdir; returns its config.

  scan: write the blocks stacked for config.model.scan=True (one compiled
  block body; what large models train with)."""
  model, params, data = load_checkpoint(
      source, path, activation=activation, image_heads=image_heads,
      text_heads=text_heads)
  if image_size is not None and image_size != model["image"]["image_size"]:
    patch = model["image"]["patch_size"]
    if image_size % patch:
      raise ValueError(f"--image_size {image_size} is not a multiple of the "
                       f"patch size {patch}.")
    params["img"]["pos_embed"] = resize_pos_embed(
        params["img"]["pos_embed"], image_size // patch,
        extra_tokens=int("cls" in params["img"]))
  config = make_config(_scalars_into_config(model, params), data, arch=arch,
                       image_size=image_size, tokenizer=tokenizer)
  if scan:
    config.model.scan = True
    params = stack_blocks(params)
  write_workdir(config, params, workdir)
  return config


def load_checkpoint(source: str, path: str, *, activation: str | None = None,
                    image_heads: int | None = None,
                    text_heads: int | None = None):
  """(model config dict, params, data config) of a checkpoint.

  activation / image_heads / text_heads: for openai / open_clip weights,
  which do not hold them (default: open_clip_config.json beside the
  weights if present, else OpenAI's: quick_gelu for 'openai', gelu_exact
  for 'open_clip', width // 64 heads)."""
  if source == "hf":
    tensors, hf_config, preprocessor = read_hf_dir(path)
    model, params, data = from_hf(tensors, hf_config)
    if preprocessor:
      data.update(_hf_preprocessing(preprocessor))
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    spiece = os.path.abspath(os.path.join(folder, "spiece.model"))
    if "tokenizer" not in data and os.path.isfile(spiece):
      data["tokenizer"] = spiece
    return model, params, data
  if source in ("openai", "open_clip"):
    cfg = _open_clip_model_cfg(path) if source == "open_clip" else {}
    if activation is None:
      activation = ("quick_gelu" if source == "openai" or
                    cfg.get("quick_gelu") else "gelu_exact")
    vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    if image_heads is None and "width" in vision:
      image_heads = vision["width"] // vision.get("head_width", 64)
    text_heads = text_heads or text.get("heads")
    return from_openai(tensor_files.read_tensors(path), activation=activation,
                       image_heads=image_heads, text_heads=text_heads)
  raise ValueError(f"--from {source!r} is not one of {SOURCES}.")


# ---------------------------------------------------------------------------
# Export to Hugging Face CLIPModel.


def _check_exportable(mc) -> None:
  problems = []
  if mc.image.pool != "cls":
    problems.append("image.pool must be 'cls'")
  if mc.get("image_projection") is False or mc.get("text_projection_bias"):
    problems.append("needs an image projection and a bias-free text one")
  if mc.image.get("patch_bias"):
    problems.append("image.patch_bias must be False")
  if not mc.image.get("ln_pre", True):
    problems.append("image.ln_pre must be True")
  if mc.get("logit_bias_init") is not None:
    problems.append("CLIPModel has no logit bias")
  if not mc.text.causal or mc.text.pool not in ("eos", "argmax"):
    problems.append("text must be causal with 'eos' or 'argmax' pooling")
  if mc.activation not in ("quick_gelu", "gelu_exact", "gelu"):
    problems.append(f"activation {mc.activation!r}")
  if problems:
    raise ValueError("This model is not a CLIPModel: " + "; ".join(problems)
                     + ".")


def to_hf_tensors(params: dict, model_config) -> dict:
  """clip_jax params of a CLIP-architecture model -> HF CLIPModel names."""
  p = jax_to_numpy(params)
  out = {}

  def encoder(blocks, prefix):
    for i in range(len(blocks)):
      b = blocks[f"block{i}"]
      pre = f"{prefix}.encoder.layers.{i}."
      for ln, hf in (("ln1", "layer_norm1"), ("ln2", "layer_norm2")):
        out[pre + hf + ".weight"] = b[ln]["scale"]
        out[pre + hf + ".bias"] = b[ln]["bias"]
      for short, (weight, bias) in _attention_to_torch(b["attn"]).items():
        name = "out_proj" if short == "out" else f"{short}_proj"
        out[f"{pre}self_attn.{name}.weight"] = weight
        out[f"{pre}self_attn.{name}.bias"] = bias
      for fc in ("fc1", "fc2"):
        out[f"{pre}mlp.{fc}.weight"] = b["mlp"][fc]["kernel"].T
        out[f"{pre}mlp.{fc}.bias"] = b["mlp"][fc]["bias"]

  img, txt = p["img"], p["txt"]
  v = "vision_model"
  out[f"{v}.embeddings.patch_embedding.weight"] = np.transpose(
      img["patch_embed"]["kernel"], (3, 2, 0, 1))
  out[f"{v}.embeddings.class_embedding"] = img["cls"]
  out[f"{v}.embeddings.position_embedding.weight"] = img["pos_embed"]
  for ours, hf in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
    out[f"{v}.{hf}.weight"] = img[ours]["scale"]
    out[f"{v}.{hf}.bias"] = img[ours]["bias"]
  encoder(img["encoder"], v)
  x = "text_model"
  out[f"{x}.embeddings.token_embedding.weight"] = txt["token_embed"][
      "embedding"]
  out[f"{x}.embeddings.position_embedding.weight"] = txt["pos_embed"]
  out[f"{x}.final_layer_norm.weight"] = txt["ln_final"]["scale"]
  out[f"{x}.final_layer_norm.bias"] = txt["ln_final"]["bias"]
  encoder(txt["encoder"], x)
  out["visual_projection.weight"] = p["img_proj"]["kernel"].T
  out["text_projection.weight"] = p["txt_proj"]["kernel"].T
  out["logit_scale"] = np.asarray(p["logit_scale"], np.float32).reshape(())
  del model_config
  return {k: np.asarray(v, np.float32, order="C") for k, v in out.items()}


def jax_to_numpy(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree_util.tree_map(lambda a: np.asarray(jax.device_get(a)), tree)


HF_ACT_NAMES = {"quick_gelu": "quick_gelu", "gelu_exact": "gelu",
                "gelu": "gelu_pytorch_tanh"}


def hf_config_of(config) -> dict:
  """config.json of transformers.CLIPModel for a clip_jax config."""
  from clip_jax.models import common, vit  # pylint: disable=g-import-not-at-top
  from clip_jax.models import text as text_lib  # pylint: disable=g-import-not-at-top
  mc = config.model
  img = common.resolve_variant(mc.image, vit.VARIANTS, "image")
  txt = common.resolve_variant(mc.text, text_lib.VARIANTS, "text")
  act, eps = HF_ACT_NAMES[mc.activation], mc.get("ln_eps") or common.LN_EPS
  eos = mc.text.eos_id
  if mc.text.pool == "argmax" and eos != mc.text.vocab_size - 1:
    # HF pools at the highest id (argmax) only when eos_token_id is 2; at
    # the top id first-EOS and argmax pooling agree.
    eos = 2
  return {
      "architectures": ["CLIPModel"], "model_type": "clip",
      "projection_dim": mc.embed_dim,
      "logit_scale_init_value": math.log(mc.logit_scale_init),
      "text_config": {
          "model_type": "clip_text_model", "vocab_size": mc.text.vocab_size,
          "hidden_size": txt["width"], "intermediate_size": txt["mlp_dim"],
          "num_hidden_layers": txt["depth"],
          "num_attention_heads": txt["heads"],
          "max_position_embeddings": mc.text.context_length,
          "hidden_act": act, "layer_norm_eps": eps,
          "projection_dim": mc.embed_dim, "eos_token_id": eos,
          "pad_token_id": mc.text.pad_id,
          "bos_token_id": max(0, mc.text.vocab_size - 2)},
      "vision_config": {
          "model_type": "clip_vision_model", "hidden_size": img["width"],
          "intermediate_size": img["mlp_dim"],
          "num_hidden_layers": img["depth"],
          "num_attention_heads": img["heads"],
          "image_size": mc.image.image_size, "patch_size": img["patch_size"],
          "num_channels": 3, "hidden_act": act, "layer_norm_eps": eps,
          "projection_dim": mc.embed_dim},
  }


def export_hf(workdir: str, out_dir: str, *, step: int | None = None) -> str:
  """Writes WORKDIR's checkpoint as a transformers CLIPModel directory."""
  from clip_jax import api, lora  # pylint: disable=g-import-not-at-top
  config = api.load_run_config(workdir)
  if lora.enabled(config.get("lora")):  # CLIPModel has no adapters.
    raise ValueError(
        f"{workdir!r} is a LoRA run (config.lora): its adapters would be "
        "left out of the export. Fold them in first: python -m "
        f"clip_jax.lora merge --workdir {workdir} --out MERGED, then export "
        "MERGED.")
  _check_exportable(config.model)
  hf_config = hf_config_of(config)
  _, params, _, _ = api.restore_params(config, workdir, step)
  params = jax_to_numpy(params)
  if config.model.get("scan"):
    params = unstack_blocks(params)
  os.makedirs(out_dir, exist_ok=True)
  tensor_files.write_safetensors(os.path.join(out_dir, "model.safetensors"),
                                 to_hf_tensors(params, config.model))
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=2)
  size = config.data.image_size
  with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
    json.dump({"image_processor_type": "CLIPImageProcessor",
               "do_resize": True, "size": {"shortest_edge": size},
               "do_center_crop": True,
               "crop_size": {"height": size, "width": size},
               "do_rescale": True, "rescale_factor": 1 / 255,
               "do_normalize": True, "image_mean": list(config.data.mean),
               "image_std": list(config.data.std), "resample": 3,
               "do_convert_rgb": True}, f, indent=2)
  return out_dir


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m clip_jax.convert",
      description="Convert CLIP / SigLIP checkpoints to and from clip_jax "
                  "workdirs (see the module docstring).")
  parser.add_argument("--from", dest="source", choices=SOURCES)
  parser.add_argument("--to", dest="target", choices=("hf",))
  parser.add_argument("--in", dest="path", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--arch", default=None,
                      help="check the image tower is this vit.VARIANTS name")
  parser.add_argument("--activation", default=None,
                      help="open_clip: quick_gelu | gelu_exact | gelu")
  parser.add_argument("--image_heads", type=int, default=None,
                      help="openai/open_clip: image heads (width // 64)")
  parser.add_argument("--text_heads", type=int, default=None,
                      help="openai/open_clip: text heads (width // 64)")
  parser.add_argument("--image_size", type=int, default=None,
                      help="resize the position embedding to this size")
  parser.add_argument("--tokenizer", default=None,
                      help="config.data.tokenizer of the converted run")
  parser.add_argument("--scan", action="store_true",
                      help="write config.model.scan=True (stacked blocks)")
  parser.add_argument("--step", type=int, default=None,
                      help="--to hf: the checkpoint step (default latest)")
  args = parser.parse_args(argv)
  if (args.source is None) == (args.target is None):
    parser.error("give exactly one of --from SOURCE or --to hf.")
  try:
    if args.target == "hf":
      export_hf(args.path, args.out, step=args.step)
      print(f"wrote {args.out}/model.safetensors and config.json")
    else:
      convert(args.source, args.path, args.out, arch=args.arch,
              activation=args.activation, image_size=args.image_size,
              tokenizer=args.tokenizer, image_heads=args.image_heads,
              text_heads=args.text_heads, scan=args.scan)
      print(f"wrote {args.out} (config.json, checkpoints/0)")
  except (ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
