"""Pieces both towers share: dtypes, activations, the pre-LN encoder.

Numerics: params are float32 (flax's default param_dtype); `dtype` is the
compute dtype of matmuls and activations. LayerNorm statistics and the
attention softmax are always computed in float32 (flax's
`force_float32_reductions` / `force_fp32_for_softmax`). LayerNorm epsilon is
1e-5, PyTorch's default, as in OpenAI CLIP and open_clip (so their weights
can be loaded and reproduce their outputs); config.model.ln_eps changes it
(SigLIP: 1e-6).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# What a rematerialised block keeps for the backward pass (jax.checkpoint
# policies); the rest is recomputed. 'none' = no remat (everything kept),
# 'full' = only the block's input kept.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable":
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
LN_EPS = 1e-5


def quick_gelu(x):
  """OpenAI CLIP's approximation: x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


# 'gelu' is the tanh approximation (flax/big_vision's default, SigLIP);
# 'gelu_exact' the erf form (PyTorch's nn.GELU, open_clip's non-OpenAI models).
ACTIVATIONS = {
    "gelu": nn.gelu,
    "gelu_exact": lambda x: nn.gelu(x, approximate=False),
    "quick_gelu": quick_gelu,
}


def parse_dtype(name: str):
  """'float32' | 'bfloat16' -> the jnp dtype."""
  if name not in DTYPES:
    raise ValueError(f"config.model.dtype={name!r} is not one of "
                     f"{sorted(DTYPES)}.")
  return DTYPES[name]


def get_activation(name: str) -> Callable:
  """An ACTIVATIONS name -> the function."""
  if name not in ACTIVATIONS:
    raise ValueError(f"config.model.activation={name!r} is not one of "
                     f"{sorted(ACTIVATIONS)}.")
  return ACTIVATIONS[name]


def check_remat_policy(name: str) -> str:
  if name not in REMAT_POLICIES:
    raise ValueError(f"config.model.remat_policy={name!r} is not one of "
                     f"{sorted(REMAT_POLICIES)}.")
  return name


def remat_block(block, policy_name: str, **kwargs):
  """nn.remat(block) with the named policy; the block itself for 'none'."""
  if check_remat_policy(policy_name) == "none":
    return block
  return nn.remat(block, policy=REMAT_POLICIES[policy_name], **kwargs)


def layer_norm(dtype, name: str, eps: float = LN_EPS) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=eps, dtype=dtype, name=name)


def attention(heads: int, dtype, name: str) -> nn.MultiHeadDotProductAttention:
  """flax multi-head attention, softmax in float32 whatever `dtype` is."""
  return nn.MultiHeadDotProductAttention(
      num_heads=heads, dtype=dtype, force_fp32_for_softmax=True, name=name)


# Self-attention formulations (config.model.attention); same params, same
# outputs up to float32 rounding:
#   'flax'       flax's MultiHeadDotProductAttention: q, k and v from three
#                [width] -> [heads, head_dim] matmuls;
#   'fused_qkv'  one [width] -> [3, heads, head_dim] matmul against the three
#                kernels concatenated in the forward pass (one bigger matmul
#                instead of three small ones, in the backward pass too), then
#                flax's own dot_product_attention and output projection.
ATTENTIONS = ("flax", "fused_qkv")


def check_attention(name: str) -> str:
  if name not in ATTENTIONS:
    raise ValueError(f"config.model.attention={name!r} is not one of "
                     f"{ATTENTIONS}.")
  return name


class FusedQKVSelfAttention(nn.Module):
  """Self-attention with flax MultiHeadDotProductAttention's params.

  The param tree is flax's (query / key / value kernels [width, heads,
  head_dim] and biases [heads, head_dim], out kernel [heads, head_dim,
  width] and bias [width]), created by the same DenseGeneral modules under
  the same names, so initialisation draws the same values. The forward pass
  stacks the three kernels into one [width, 3, heads, head_dim] matmul; the
  rest (scaling, mask, float32 softmax, output projection) is flax's code.
  """
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):
    width = x.shape[-1]
    head_dim = width // self.num_heads
    names = ("query", "key", "value")
    if self.is_initializing():  # Create the params as flax's module does.
      for name in names:
        nn.DenseGeneral(features=(self.num_heads, head_dim), axis=-1,
                        dtype=self.dtype, name=name)(x)
    params = self.variables["params"]
    kernel = jnp.stack([params[n]["kernel"] for n in names], axis=1)
    bias = jnp.stack([params[n]["bias"] for n in names], axis=0)
    x, kernel, bias = (a.astype(self.dtype) for a in (x, kernel, bias))
    # [..., T, width] x [width, 3, H, D] -> [..., T, 3, H, D], as DenseGeneral.
    qkv = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
    qkv = qkv + bias
    query, key, value = (qkv[..., i, :, :] for i in range(3))
    y = nn.dot_product_attention(query, key, value, mask=mask,
                                 dtype=self.dtype, deterministic=True,
                                 force_fp32_for_softmax=True)
    return nn.DenseGeneral(features=width, axis=(-2, -1), dtype=self.dtype,
                           name="out")(y)


def self_attention(kind: str, heads: int, dtype, name: str):
  """A self-attention module, called as module(x, mask)."""
  if check_attention(kind) == "fused_qkv":
    return FusedQKVSelfAttention(heads, dtype, name=name)
  mha = attention(heads, dtype, name)
  return lambda x, mask=None: mha(x, x, mask=mask)


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
  attention: str = "flax"  # An ATTENTIONS name.
  ln_eps: float = LN_EPS  # SigLIP: 1e-6.

  @nn.compact
  def __call__(self, x, mask=None):
    y = layer_norm(self.dtype, "ln1", self.ln_eps)(x)
    y = self_attention(self.attention, self.heads, self.dtype, "attn")(
        y, mask)
    x = x + y
    y = layer_norm(self.dtype, "ln2", self.ln_eps)(x)
    y = MlpBlock(self.mlp_dim, self.activation, self.dtype, name="mlp")(y)
    return x + y


class _ScanBlock(nn.Module):
  """EncoderBlock with the (carry, x) -> (carry, out) signature of nn.scan."""
  mlp_dim: int
  heads: int
  activation: str
  dtype: Any
  attention: str = "flax"
  ln_eps: float = LN_EPS

  @nn.compact
  def __call__(self, x, mask):
    x = EncoderBlock(self.mlp_dim, self.heads, self.activation, self.dtype,
                     self.attention, self.ln_eps, name="block")(x, mask)
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
  remat_policy: str = "none"  # A REMAT_POLICIES name.
  scan: bool = False
  attention: str = "flax"  # An ATTENTIONS name.
  ln_eps: float = LN_EPS

  @nn.compact
  def __call__(self, x, mask=None):
    if self.scan:
      # Inside scan, CSE cannot merge the recomputation with the forward.
      block = remat_block(_ScanBlock, self.remat_policy, prevent_cse=False)
      x, _ = nn.scan(
          block, variable_axes={"params": 0}, split_rngs={"params": True},
          in_axes=nn.broadcast, length=self.depth)(
              self.mlp_dim, self.heads, self.activation, self.dtype,
              self.attention, self.ln_eps, name="blocks")(x, mask)
      return x
    block = remat_block(EncoderBlock, self.remat_policy)
    for i in range(self.depth):
      x = block(self.mlp_dim, self.heads, self.activation, self.dtype,
                self.attention, self.ln_eps, name=f"block{i}")(x, mask)
    return x
