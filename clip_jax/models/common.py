"""Pieces both towers share: dtypes, activations, the pre-LN encoder."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def quick_gelu(x):
  """OpenAI CLIP's approximation: x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": nn.gelu, "quick_gelu": quick_gelu}


def parse_dtype(name: str):
  if name not in DTYPES:
    raise ValueError(f"dtype {name!r} is not one of {sorted(DTYPES)}.")
  return DTYPES[name]


def get_activation(name: str) -> Callable:
  if name not in ACTIVATIONS:
    raise ValueError(
        f"activation {name!r} is not one of {sorted(ACTIVATIONS)}.")
  return ACTIVATIONS[name]


def resolve_variant(tower_config, variants: dict, tower: str) -> dict:
  """Named size, with explicit keys in the config taking precedence."""
  if tower_config.variant not in variants:
    raise ValueError(
        f"config.model.{tower}.variant={tower_config.variant!r} is not one "
        f"of {sorted(variants)}.")
  dims = dict(variants[tower_config.variant])
  for key in dims:
    value = tower_config.get(key)
    if value is not None:
      dims[key] = value
  for key, value in dims.items():
    if value <= 0:
      raise ValueError(f"config.model.{tower}.{key}={value} must be > 0.")
  if dims["width"] % dims["heads"]:
    raise ValueError(
        f"config.model.{tower}: width {dims['width']} is not divisible by "
        f"{dims['heads']} heads.")
  return dims


class MlpBlock(nn.Module):
  mlp_dim: int
  activation: str
  dtype: Any

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, name="fc1")(x)
    x = get_activation(self.activation)(x)
    return nn.Dense(width, dtype=self.dtype, name="fc2")(x)


class EncoderBlock(nn.Module):
  """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""
  mlp_dim: int
  heads: int
  activation: str
  dtype: Any

  @nn.compact
  def __call__(self, x, mask=None):
    y = nn.LayerNorm(dtype=self.dtype, name="ln1")(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.heads, dtype=self.dtype, name="attn")(y, y, mask=mask)
    x = x + y
    y = nn.LayerNorm(dtype=self.dtype, name="ln2")(x)
    y = MlpBlock(self.mlp_dim, self.activation, self.dtype, name="mlp")(y)
    return x + y


class _ScanBlock(nn.Module):
  """EncoderBlock with the (carry, x) -> (carry, out) signature of nn.scan."""
  mlp_dim: int
  heads: int
  activation: str
  dtype: Any

  @nn.compact
  def __call__(self, x, mask):
    x = EncoderBlock(self.mlp_dim, self.heads, self.activation, self.dtype,
                     name="block")(x, mask)
    return x, None


class Encoder(nn.Module):
  """`depth` pre-LN blocks, optionally rematerialised and/or scanned.

  Unscanned params: block0 ... block{depth-1}. Scanned: one 'blocks' subtree
  whose leaves have a leading [depth] axis (same math, one compiled body).
  """
  depth: int
  mlp_dim: int
  heads: int
  activation: str
  dtype: Any
  remat: bool = False
  scan: bool = False

  @nn.compact
  def __call__(self, x, mask=None):
    if self.scan:
      block = _ScanBlock
      if self.remat:
        block = nn.remat(block, prevent_cse=False)
      x, _ = nn.scan(
          block, variable_axes={"params": 0}, split_rngs={"params": True},
          in_axes=nn.broadcast, length=self.depth)(
              self.mlp_dim, self.heads, self.activation, self.dtype,
              name="blocks")(x, mask)
      return x
    block = nn.remat(EncoderBlock) if self.remat else EncoderBlock
    for i in range(self.depth):
      x = block(self.mlp_dim, self.heads, self.activation, self.dtype,
                name=f"block{i}")(x, mask)
    return x
