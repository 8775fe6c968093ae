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
  attention         optional: how self-attention is computed, a
                    common.ATTENTIONS name: 'flax' (flax's
                    MultiHeadDotProductAttention) or 'fused_qkv' (one
                    matmul for q, k, v against the same three kernels).
                    Same params and outputs (up to float32 rounding).
                    Default DEFAULT_ATTENTION.
  scan              nn.scan over the blocks: params of block i are row i of
                    one stacked 'encoder/blocks/block' subtree instead of
                    'encoder/block{i}'; same outputs for the same weights.
  image.variant     clip_jax.models.vit.VARIANTS name ('mu', 'tiny', 'S/16',
                    'B/32', 'B/16', 'L/14'); image.width / depth / mlp_dim /
                    heads / patch_size, when set and not None, override it.
  image.image_size  input resolution (square), a multiple of the patch size.
  image.pool        'cls' (class token) | 'map' (attention pooling).
  image.ln_pre      optional, default True (CLIP): LayerNorm before the blocks.
  image.patch_bias  optional, default False (CLIP): bias on the patch
                    embedding (SigLIP: True).
  image.patch_embed optional, default 'conv': 'matmul' embeds the patches
                    with a reshape and one matmul against the same kernel
                    (same params and outputs; see models/vit.py).
  text.variant      clip_jax.models.text.VARIANTS name ('mu', 'tiny', 'base'
                    = CLIP's 12 x 512 x 8 heads, 'large' = 12 x 768 x 12);
                    text.width / depth / mlp_dim / heads override it.
  text.vocab_size, text.context_length, text.eos_id, text.pad_id
  text.pool         'eos' | 'last' | 'first' | 'mean' | 'argmax' (the
                    highest token id: OpenAI CLIP; see models/text.py).
  text.causal       causal self-attention (CLIP: True).
  text.mask_pad     optional, default True: pad keys (token == pad_id) are
                    masked out of attention; False = every key attended (as
                    OpenAI CLIP, HF CLIP without attention_mask, SigLIP).
  text.embed_lookup optional, default 'gather': 'one_hot' reads token rows
                    by a one-hot matmul, so their gradient is a matmul
                    instead of a scatter-add (see models/text.py).
  ln_eps            optional, default 1e-5 (PyTorch's, CLIP): every
                    LayerNorm's epsilon (SigLIP: 1e-6).
  image_projection  optional, default True: img_proj, a bias-free Dense from
                    the image width to embed_dim. False (SigLIP): no
                    projection; embed_dim must equal the image width.
  text_projection_bias  optional, default False: txt_proj has a bias
                    (SigLIP's text head).

Images: encode_image takes float images, already normalised, or uint8
pixels [..., S, S, 3], which it normalises itself ((pixels / 255 - mean) /
std, float32, the same steps as data.transforms.normalize): the input
pipeline can ship uint8 (config.data.uint8_images), 4x fewer host-to-device
bytes. mean/std are build_model's pixel_mean / pixel_std (the trainer passes
config.data.mean / std); a model built without them refuses uint8.

Params: {'img': ViT, 'txt': TextTransformer, 'img_proj', 'txt_proj'
(Dense from each tower's width to embed_dim, kept outside the towers;
bias-free unless text_projection_bias; no img_proj if not
image_projection), 'logit_scale' (float32 scalar, log of the scale),
'logit_bias' (float32 scalar, only when logit_bias_init is set),
'ssl_head' (SLIP's MLP head, only when built with ssl_head dims: see
clip_jax/slip.py)}. With the
CLIP variants the parameter count equals OpenAI CLIP's (ViT-B/32: 151,277,313).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from clip_jax.models import common, text, vit

DEFAULT_ATTENTION = "flax"


def l2_normalize(x, eps: float = 1e-12):
  x = x.astype(jnp.float32)
  return x / jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True),
                                  eps))


def normalize_pixels(pixels, mean, std):
  """uint8 [..., 3] -> float32 (pixels / 255 - mean) / std, as x * scale -
  offset with the constants data.transforms.normalize uses."""
  scale = 1.0 / (255.0 * np.asarray(std, np.float32))
  offset = np.asarray(mean, np.float32) / np.asarray(std, np.float32)
  # XLA may fuse this into one multiply-add (rounding once where NumPy
  # rounds twice): values then differ from the host's by one float32
  # rounding, <= 1.2e-7 for CLIP's statistics.
  return pixels.astype(jnp.float32) * scale - offset


class SslHead(nn.Module):
  """SLIP's SimCLR projection head: image features [B, width] -> [B, out].

  Dense(mlp_dim) -> LayerNorm -> ReLU, twice, then Dense(out_dim). SLIP
  (facebookresearch/SLIP models.py, _build_mlp) normalises with SyncBatchNorm;
  LayerNorm here because the model keeps no batch statistics (a pure
  function of params: no mutable collections in the train step) and needs
  no cross-device batch reduction. LayerNorm params are float32.
  """
  mlp_dim: int
  out_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i in (1, 2):
      x = nn.Dense(self.mlp_dim, dtype=self.dtype, name=f"dense{i}")(x)
      x = nn.relu(nn.LayerNorm(dtype=self.dtype, name=f"ln{i}")(x))
    return nn.Dense(self.out_dim, dtype=self.dtype, name="out")(x)


class TwoTowers(nn.Module):
  """(images, tokens) -> (zimg, ztxt, {'logit_scale', 'logit_bias'})."""
  img: nn.Module   # Image tower (params under 'img').
  txt: nn.Module   # Text tower (params under 'txt').
  embed_dim: int
  logit_scale_init: float
  logit_bias_init: float | None
  dtype: Any = jnp.float32
  pixel_mean: tuple[float, ...] | None = None  # For uint8 images.
  pixel_std: tuple[float, ...] | None = None
  image_projection: bool = True  # False: image features are the embedding.
  text_projection_bias: bool = False
  # (mlp_dim, out_dim) of SLIP's SSL head on the image features; None = none.
  ssl_head_dims: tuple[int, int] | None = None

  def setup(self):
    self.img_proj = (nn.Dense(self.embed_dim, use_bias=False,
                              dtype=self.dtype)
                     if self.image_projection else lambda x: x)
    self.txt_proj = nn.Dense(self.embed_dim, use_bias=self.text_projection_bias,
                             dtype=self.dtype)
    self.logit_scale = self.param(
        "logit_scale",
        nn.initializers.constant(math.log(self.logit_scale_init)), (),
        jnp.float32)
    if self.logit_bias_init is not None:
      self.logit_bias = self.param(
          "logit_bias", nn.initializers.constant(self.logit_bias_init), (),
          jnp.float32)
    if self.ssl_head_dims is not None:
      self.ssl_head = SslHead(*self.ssl_head_dims, dtype=self.dtype)

  def _float_images(self, images):
    if images.dtype == jnp.uint8:
      if self.pixel_mean is None or self.pixel_std is None:
        raise ValueError(
            "encode_image got uint8 pixels but the model has no pixel "
            "mean/std; build it with build_run_model(config) (which takes "
            "config.data.mean/std), or pass normalised float images.")
      images = normalize_pixels(images, self.pixel_mean, self.pixel_std)
    return images

  def encode_image(self, images, *, train: bool = False):
    images = self._float_images(images)
    return l2_normalize(self.img_proj(self.img(images, train=train)))

  def encode_ssl(self, images, *, train: bool = False):
    """SLIP: L2-normalised SSL-head embeddings of (augmented) images: the
    image tower's pooled features (before img_proj) through ssl_head."""
    if self.ssl_head_dims is None:
      raise ValueError("encode_ssl needs a model built with an SSL head "
                       "(config.slip.weight > 0, see clip_jax/slip.py).")
    images = self._float_images(images)
    return l2_normalize(self.ssl_head(self.img(images, train=train)))

  def encode_text(self, tokens, *, train: bool = False):
    return l2_normalize(self.txt_proj(self.txt(tokens, train=train)))

  def __call__(self, images, tokens, *, train: bool = False):
    zimg = None if images is None else self.encode_image(images, train=train)
    ztxt = None if tokens is None else self.encode_text(tokens, train=train)
    bias = self.logit_bias if self.logit_bias_init is not None else None
    if self.ssl_head_dims is not None and self.is_initializing():
      # init runs __call__ only: create the head's params here.
      self.ssl_head(jnp.zeros((1, self.img.width), self.dtype))
    return zimg, ztxt, {"logit_scale": jnp.exp(self.logit_scale),
                        "logit_bias": bias}


def build_model(model_config, *, pixel_mean=None,
                pixel_std=None, ssl_head_dims=None) -> TwoTowers:
  """The model a config describes (raises ValueError on a bad config).

  pixel_mean / pixel_std (config.data.mean / std): how encode_image
  normalises uint8 images; None = it accepts only float images.
  ssl_head_dims: (mlp_dim, out_dim) of SLIP's head (slip.head_dims), or
  None (no head: the model of every run without SLIP).
  """
  if (pixel_mean is None) != (pixel_std is None):
    raise ValueError("build_model: give both pixel_mean and pixel_std, or "
                     "neither.")
  for name, value in (("pixel_mean", pixel_mean), ("pixel_std", pixel_std)):
    if value is not None and (len(value) != 3 or (
        name == "pixel_std" and min(value) <= 0)):
      raise ValueError(f"build_model: {name}={tuple(value)} must be 3 "
                       "per-channel values (std > 0).")
  dtype = common.parse_dtype(model_config.dtype)
  common.get_activation(model_config.activation)
  shared = dict(activation=model_config.activation, dtype=dtype,
                remat_policy=remat_policy(model_config),
                scan=model_config.scan,
                attention=common.check_attention(
                    model_config.get("attention", DEFAULT_ATTENTION)),
                ln_eps=model_config.get("ln_eps") or common.LN_EPS)
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
  img = vit.build(model_config.image, **shared)
  image_projection = model_config.get("image_projection") is not False
  if not image_projection and img.width != model_config.embed_dim:
    raise ValueError(
        f"config.model.image_projection=False needs embed_dim equal to the "
        f"image width {img.width}, got embed_dim={model_config.embed_dim}; "
        "set embed_dim to the width or keep the projection.")
  return TwoTowers(
      img=img,
      txt=text.build(model_config.text, **shared),
      embed_dim=model_config.embed_dim,
      logit_scale_init=model_config.logit_scale_init,
      logit_bias_init=model_config.get("logit_bias_init"),
      dtype=dtype,
      pixel_mean=None if pixel_mean is None else tuple(map(float, pixel_mean)),
      pixel_std=None if pixel_std is None else tuple(map(float, pixel_std)),
      image_projection=image_projection,
      text_projection_bias=bool(model_config.get("text_projection_bias")),
      ssl_head_dims=None if ssl_head_dims is None else tuple(ssl_head_dims))


def build_run_model(config) -> TwoTowers:
  """The model of a run's whole config: config.model, with the pixel
  mean/std of config.data (uint8 images are normalised on the device),
  SLIP's SSL head when config.slip asks for it and, with config.lora on,
  the LoRA adapters merged into the kernels it reads (clip_jax/lora.py)."""
  from clip_jax import lora, slip  # pylint: disable=g-import-not-at-top
  model = build_model(config.model, pixel_mean=config.data.get("mean"),
                      pixel_std=config.data.get("std"),
                      ssl_head_dims=slip.head_dims(config))
  if lora.enabled(config.get("lora")):
    model = lora.wrap_model(model, config.lora)
  return model


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
