"""ViT image tower: patches -> pre-LN transformer -> one pooled vector.

Matches OpenAI CLIP's visual tower (bias-free conv patch embedding, class
token, learned position embedding, LayerNorm before (`ln_pre`) and after the
blocks), with MAP (multihead attention pooling with a learned probe, as in
SigLIP / big_vision) as the alternative head. With pool='map' there is no
class token; `ln_pre=False` drops the LayerNorm before the blocks (as in
big_vision's ViT). The projection to the joint space lives in two_towers.

Config (`config.model.image`):
  variant     a VARIANTS name; width / depth / mlp_dim / heads / patch_size
              keys, when present and not None, override the variant's value.
  image_size  input resolution (square); a multiple of the patch size.
  pool        'cls' | 'map'.
  ln_pre      LayerNorm after patch + position embedding (default True, as
              in CLIP).
  patch_bias  optional, default False (CLIP): a bias on the patch
              embedding (SigLIP has one: param patch_embed/bias [width]).
  patch_embed optional, default 'conv': how patches are embedded, a
              PATCH_EMBEDS name: 'conv' (a strided nn.Conv) or 'matmul'
              (patches cut out by a reshape, then one [p*p*3, width]
              matmul against the same kernel). Same params, same outputs
              up to float32 rounding.

Params: patch_embed/kernel [p, p, 3, width] (and bias), cls [width]
(pool='cls'), pos_embed [tokens, width], ln_pre, encoder/..., ln_post,
map_head/...
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from clip_jax.models import common

# width, depth, mlp_dim, heads, patch_size.
VARIANTS = {
    "mu": dict(width=32, depth=1, mlp_dim=64, heads=2, patch_size=8),
    "tiny": dict(width=96, depth=3, mlp_dim=384, heads=4, patch_size=8),
    "S/16": dict(width=384, depth=12, mlp_dim=1536, heads=6, patch_size=16),
    "B/32": dict(width=768, depth=12, mlp_dim=3072, heads=12, patch_size=32),
    "B/16": dict(width=768, depth=12, mlp_dim=3072, heads=12, patch_size=16),
    "L/14": dict(width=1024, depth=24, mlp_dim=4096, heads=16, patch_size=14),
}
POOLS = ("cls", "map")
PATCH_EMBEDS = ("conv", "matmul")


def check_patch_embed(name: str) -> str:
  if name not in PATCH_EMBEDS:
    raise ValueError(f"config.model.image.patch_embed={name!r} is not one of "
                     f"{PATCH_EMBEDS}.")
  return name


def patches(images, p: int):
  """[B, H, W, C] -> [B, (H/p) (W/p), p p C]: row-major patches, each
  flattened in (row, column, channel) order, as a [p, p, C, width] conv
  kernel is laid out."""
  b, h, w, c = images.shape
  x = images.reshape(b, h // p, p, w // p, p, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


class MatmulPatchEmbed(nn.Module):
  """nn.Conv(width, (p, p), strides=(p, p), 'VALID')'s params and outputs
  as a reshape and one matmul: a strided conv whose stride equals its
  window is a matmul of the flattened patches. Params kernel [p, p, C,
  width] (and bias [width]) with nn.Conv's initialisers, so the same rng
  draws the same values. Returns [B, tokens, width]."""
  width: int
  patch_size: int
  use_bias: bool
  dtype: Any

  @nn.compact
  def __call__(self, images):
    p, channels = self.patch_size, images.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (p, p, channels, self.width))
    x = patches(images, p)
    x = jnp.dot(x, kernel.reshape(p * p * channels, self.width).astype(
        self.dtype))
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros_init(), (self.width,))
      x = x + bias.astype(self.dtype)
    return x


class MAPHead(nn.Module):
  """Attention pooling: a learned probe attends over the tokens."""
  mlp_dim: int
  heads: int
  activation: str
  dtype: Any
  ln_eps: float = common.LN_EPS

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    probe = self.param("probe", nn.initializers.xavier_uniform(),
                       (1, 1, width))
    probe = jnp.tile(probe, (x.shape[0], 1, 1)).astype(self.dtype)
    x = common.attention(self.heads, self.dtype, "attn")(probe, x)
    y = common.layer_norm(self.dtype, "ln", self.ln_eps)(x)
    x = x + common.MlpBlock(self.mlp_dim, self.activation, self.dtype,
                            name="mlp")(y)
    return x[:, 0]


class ViT(nn.Module):
  """images [B, H, W, 3] -> features [B, width]."""
  width: int
  depth: int
  mlp_dim: int
  heads: int
  patch_size: int
  image_size: int
  pool: str = "cls"
  ln_pre: bool = True
  patch_bias: bool = False
  ln_eps: float = common.LN_EPS
  activation: str = "quick_gelu"
  dtype: Any = jnp.float32
  remat_policy: str = "none"  # common.REMAT_POLICIES name.
  scan: bool = False
  attention: str = "flax"  # common.ATTENTIONS name.
  patch_embed: str = "conv"  # A PATCH_EMBEDS name.

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    del train  # No dropout: CLIP/SigLIP pretraining uses none.
    if images.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(
          f"Images of size {images.shape[1:3]} given to an image tower built "
          f"for {self.image_size}x{self.image_size}; resize them or set "
          "config.model.image.image_size.")
    p = self.patch_size
    if check_patch_embed(self.patch_embed) == "matmul":
      x = MatmulPatchEmbed(self.width, p, self.patch_bias, self.dtype,
                           name="patch_embed")(images.astype(self.dtype))
    else:
      x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID",
                  use_bias=self.patch_bias, dtype=self.dtype,
                  name="patch_embed")(
                      images.astype(self.dtype))
    x = x.reshape(x.shape[0], -1, self.width)
    if self.pool == "cls":
      cls = self.param("cls", nn.initializers.normal(self.width ** -0.5),
                       (self.width,))
      cls = jnp.broadcast_to(cls.astype(self.dtype),
                             (x.shape[0], 1, self.width))
      x = jnp.concatenate([cls, x], axis=1)
    pos = self.param("pos_embed", nn.initializers.normal(self.width ** -0.5),
                     (x.shape[1], self.width))
    x = x + pos.astype(self.dtype)
    if self.ln_pre:
      x = common.layer_norm(self.dtype, "ln_pre", self.ln_eps)(x)
    x = common.Encoder(self.depth, self.mlp_dim, self.heads, self.activation,
                       self.dtype, self.remat_policy, self.scan,
                       self.attention, self.ln_eps, name="encoder")(x)
    x = common.layer_norm(self.dtype, "ln_post", self.ln_eps)(x)
    if self.pool == "cls":
      return x[:, 0]
    return MAPHead(self.mlp_dim, self.heads, self.activation, self.dtype,
                   self.ln_eps, name="map_head")(x)


def build(image_config, *, activation, dtype, remat_policy,
          scan, attention="flax", ln_eps=common.LN_EPS) -> ViT:
  dims = common.resolve_variant(image_config, VARIANTS, "image")
  if image_config.pool not in POOLS:
    raise ValueError(
        f"config.model.image.pool={image_config.pool!r} is not one of {POOLS}.")
  if image_config.image_size % dims["patch_size"]:
    raise ValueError(
        f"config.model.image.image_size={image_config.image_size} is not a "
        f"multiple of the patch size {dims['patch_size']}.")
  return ViT(**dims, image_size=image_config.image_size,
             pool=image_config.pool,
             ln_pre=bool(image_config.get("ln_pre", True)),
             patch_bias=bool(image_config.get("patch_bias") or False),
             patch_embed=check_patch_embed(
                 image_config.get("patch_embed") or "conv"),
             ln_eps=ln_eps,
             activation=activation, dtype=dtype, remat_policy=remat_policy,
             scan=scan, attention=attention)
