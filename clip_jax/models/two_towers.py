"""The two-tower model: image and text towers, projections, scale and bias.

Model config keys (`config.model`):
  embed_dim         width of the joint embedding space.
  logit_scale_init  initial logit scale (the multiplier itself): 1/0.07 for
                    CLIP, 10 for SigLIP. Stored as its log, exponentiated in
                    the forward pass (no clamp there).
  logit_scale_max   cap on the scale (CLIP: 100); the trainer clamps the
                    stored log to `max_log_logit_scale(config.model)` after
                    every update. None = uncapped.
  logit_bias_init   initial logit bias (SigLIP: -10); None = no bias param.
  dtype             compute dtype 'float32' | 'bfloat16'. Params are float32;
                    embeddings, scale and bias are returned in float32.
  activation        'gelu' (tanh approximation, SigLIP / big_vision) |
                    'gelu_exact' (erf, PyTorch's nn.GELU) | 'quick_gelu'
                    (OpenAI CLIP's x * sigmoid(1.702 x)).
  remat_policy      what each transformer block keeps for the backward pass
                    (nn.remat with a jax.checkpoint policy); same values and
                    grads whatever it is, less activation memory for more
                    recomputation: 'none' (no remat: keep everything),
                    'full' (keep only each block's input, recompute the
                    rest), 'dots_saveable' (keep matmul outputs, recompute
                    the elementwise ops, layer norms and softmax),
                    'dots_with_no_batch_dims_saveable' (keep only matmuls
                    against weights, recompute attention's batched ones too).
                    Optional; default: from `remat`.
  remat             the older boolean: True = remat_policy 'full'. Setting
                    remat=True with remat_policy='none' is an error.
  scan              nn.scan over the blocks: params of block i are row i of
                    one stacked 'encoder/blocks/block' subtree instead of
                    'encoder/block{i}'; same outputs for the same weights.
  image.variant     clip_jax.models.vit.VARIANTS name ('mu', 'tiny', 'S/16',
                    'B/32', 'B/16', 'L/14'); image.width / depth / mlp_dim /
                    heads / patch_size, when set and not None, override it.
  image.image_size  input resolution (square), a multiple of the patch size.
  image.pool        'cls' (class token) | 'map' (attention pooling).
  image.ln_pre      optional, default True (CLIP): LayerNorm before the blocks.
  text.variant      clip_jax.models.text.VARIANTS name ('mu', 'tiny', 'base'
                    = CLIP's 12 x 512 x 8 heads, 'large' = 12 x 768 x 12);
                    text.width / depth / mlp_dim / heads override it.
  text.vocab_size, text.context_length, text.eos_id, text.pad_id
  text.pool         'eos' | 'last' | 'first' | 'mean' (see models/text.py).
  text.causal       causal self-attention (CLIP: True).

Params: {'img': ViT, 'txt': TextTransformer, 'img_proj', 'txt_proj'
(bias-free Dense from each tower's width to embed_dim, kept outside the
towers), 'logit_scale' (float32 scalar, log of the scale), 'logit_bias'
(float32 scalar, only when logit_bias_init is set)}. With the CLIP variants
the parameter count equals OpenAI CLIP's (ViT-B/32: 151,277,313).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from clip_jax.models import common, text, vit


def l2_normalize(x, eps: float = 1e-12):
  x = x.astype(jnp.float32)
  return x / jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True),
                                  eps))


class TwoTowers(nn.Module):
  """(images, tokens) -> (zimg, ztxt, {'logit_scale', 'logit_bias'})."""
  img: nn.Module   # Image tower (params under 'img').
  txt: nn.Module   # Text tower (params under 'txt').
  embed_dim: int
  logit_scale_init: float
  logit_bias_init: float | None
  dtype: Any = jnp.float32

  def setup(self):
    self.img_proj = nn.Dense(self.embed_dim, use_bias=False, dtype=self.dtype)
    self.txt_proj = nn.Dense(self.embed_dim, use_bias=False, dtype=self.dtype)
    self.logit_scale = self.param(
        "logit_scale",
        nn.initializers.constant(math.log(self.logit_scale_init)), (),
        jnp.float32)
    if self.logit_bias_init is not None:
      self.logit_bias = self.param(
          "logit_bias", nn.initializers.constant(self.logit_bias_init), (),
          jnp.float32)

  def encode_image(self, images, *, train: bool = False):
    return l2_normalize(self.img_proj(self.img(images, train=train)))

  def encode_text(self, tokens, *, train: bool = False):
    return l2_normalize(self.txt_proj(self.txt(tokens, train=train)))

  def __call__(self, images, tokens, *, train: bool = False):
    zimg = None if images is None else self.encode_image(images, train=train)
    ztxt = None if tokens is None else self.encode_text(tokens, train=train)
    bias = self.logit_bias if self.logit_bias_init is not None else None
    return zimg, ztxt, {"logit_scale": jnp.exp(self.logit_scale),
                        "logit_bias": bias}


def build_model(model_config) -> TwoTowers:
  """The model a config describes (raises ValueError on a bad config)."""
  dtype = common.parse_dtype(model_config.dtype)
  common.get_activation(model_config.activation)
  shared = dict(activation=model_config.activation, dtype=dtype,
                remat_policy=remat_policy(model_config),
                scan=model_config.scan)
  if model_config.embed_dim <= 0:
    raise ValueError(
        f"config.model.embed_dim={model_config.embed_dim} must be > 0.")
  if model_config.logit_scale_init <= 0:
    raise ValueError(f"config.model.logit_scale_init="
                     f"{model_config.logit_scale_init} must be > 0.")
  cap = model_config.get("logit_scale_max")
  if cap is not None and cap < model_config.logit_scale_init:
    raise ValueError(
        f"config.model.logit_scale_max={cap} is below logit_scale_init="
        f"{model_config.logit_scale_init}; raise the cap, lower the init or "
        "set logit_scale_max=None (uncapped).")
  return TwoTowers(
      img=vit.build(model_config.image, **shared),
      txt=text.build(model_config.text, **shared),
      embed_dim=model_config.embed_dim,
      logit_scale_init=model_config.logit_scale_init,
      logit_bias_init=model_config.get("logit_bias_init"),
      dtype=dtype)


def remat_policy(model_config) -> str:
  """The effective common.REMAT_POLICIES name of `remat_policy` / `remat`."""
  policy = model_config.get("remat_policy")
  remat = bool(model_config.get("remat", False))
  if policy is None:
    return "full" if remat else "none"
  common.check_remat_policy(policy)
  if remat and policy == "none":
    raise ValueError(
        "config.model.remat=True contradicts config.model.remat_policy="
        "'none'; set only remat_policy (remat=True means 'full').")
  return policy


def validate_model_config(model_config) -> None:
  build_model(model_config)


def max_log_logit_scale(model_config) -> float | None:
  """log(logit_scale_max), the trainer's clamp on the stored log-scale."""
  cap = model_config.get("logit_scale_max")
  return None if cap is None else math.log(cap)
