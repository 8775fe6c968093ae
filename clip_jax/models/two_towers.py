"""The two-tower model: image and text towers, projections, scale and bias.

Model config keys (`config.model`):
  embed_dim         width of the joint embedding space.
  logit_scale_init  initial logit scale (the multiplier itself): 1/0.07 for
                    CLIP, 10 for SigLIP. Stored as its log, exponentiated in
                    the forward pass.
  logit_scale_max   cap on the scale (CLIP: 100); the trainer clamps the
                    stored log after every update. None = uncapped.
  logit_bias_init   initial logit bias (SigLIP: -10); None = no bias param.
  dtype             compute dtype 'float32' | 'bfloat16'. Params are float32;
                    embeddings, scale and bias are returned in float32.
  activation        'gelu' | 'quick_gelu' (OpenAI CLIP's).
  remat             rematerialise each transformer block in the backward pass.
  scan              nn.scan over the blocks (params stacked on a depth axis).
  image.variant     clip_jax.models.vit.VARIANTS name ('B/32', 'B/16', 'L/14',
                    'S/16', 'tiny', 'mu'); image.width/depth/mlp_dim/heads/
                    patch_size, when set, override the variant's value.
  image.image_size  input resolution (square).
  image.pool        'cls' (class token) | 'map' (attention pooling).
  text.variant      clip_jax.models.text.VARIANTS name ('base' = CLIP's
                    12 x 512, 'large', 'tiny', 'mu'); width/depth/mlp_dim/heads
                    override it.
  text.vocab_size, text.context_length, text.eos_id, text.pad_id
  text.pool         'eos' | 'last' | 'first' | 'mean' (see models/text.py).
  text.causal       causal self-attention (CLIP: True).

Params: {'img': ViT, 'txt': TextTransformer, 'img_proj', 'txt_proj'
(bias-free Dense to embed_dim), 'logit_scale' (log of the scale),
'logit_bias' (only when logit_bias_init is set)}.
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
        "logit_scale", nn.initializers.constant(math.log(self.logit_scale_init)),
        (), jnp.float32)
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
                remat=model_config.remat, scan=model_config.scan)
  if model_config.embed_dim <= 0:
    raise ValueError(
        f"config.model.embed_dim={model_config.embed_dim} must be > 0.")
  if model_config.logit_scale_init <= 0:
    raise ValueError(f"config.model.logit_scale_init="
                     f"{model_config.logit_scale_init} must be > 0.")
  return TwoTowers(
      img=vit.build(model_config.image, **shared),
      txt=text.build(model_config.text, **shared),
      embed_dim=model_config.embed_dim,
      logit_scale_init=model_config.logit_scale_init,
      logit_bias_init=model_config.get("logit_bias_init"),
      dtype=dtype)


def validate_model_config(model_config) -> None:
  build_model(model_config)


def max_log_logit_scale(model_config) -> float | None:
  """log(logit_scale_max), the trainer's clamp on the stored log-scale."""
  cap = model_config.get("logit_scale_max")
  return None if cap is None else math.log(cap)
