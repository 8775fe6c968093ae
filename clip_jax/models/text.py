"""Text tower: tokens -> pre-LN transformer -> one pooled vector.

Matches OpenAI CLIP's text tower (token + learned position embedding, causal
attention, final LayerNorm, feature at the EOS token). Pooling options:
  eos    the first position holding `eos_id` (the last position if none);
  argmax the first position holding the highest token id (OpenAI CLIP and
         open_clip: their EOS is the highest id of the vocabulary);
  last   the last position (the tokenizer then repeats EOS to the end);
  first  position 0;
  mean   the mean over non-pad positions.
Pad keys (token == pad_id) are masked out of attention, causal or not, so
the outputs at real tokens do not depend on how much padding follows;
mask_pad=False attends to every key, as OpenAI CLIP (whose pad id 0 is
also the token '!'), HF CLIP without an attention mask, and SigLIP do.

Config (`config.model.text`):
  variant         a VARIANTS name; width / depth / mlp_dim / heads keys, when
                  present and not None, override the variant's value.
  vocab_size      rows of the token embedding.
  context_length  rows of the position embedding; longer inputs are an error,
                  shorter ones use the first rows.
  pool            one of POOLS (above).
  causal          causal self-attention (CLIP: True; SigLIP: False).
  eos_id, pad_id  the tokenizer's ids (clip_jax.data.tokenizer: 1 and 0).
  mask_pad        optional, default True: mask pad keys out of attention.
  embed_lookup    optional, default 'gather': how token rows are read from
                  the embedding, an EMBED_LOOKUPS name: 'gather' (jnp.take;
                  its gradient is a scatter-add over the vocabulary) or
                  'one_hot' (a [tokens, vocab] one-hot matmul; its gradient
                  is a matmul too). Same params and outputs; gradients equal
                  up to float32 summation order. One-hot costs 2 x vocab x
                  width FLOPs per token each way: for small vocabularies.

Params: token_embed/embedding [vocab, width], pos_embed [context, width],
encoder/..., ln_final.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.models import common

# width, depth, mlp_dim, heads.
VARIANTS = {
    "mu": dict(width=32, depth=1, mlp_dim=64, heads=2),
    "tiny": dict(width=96, depth=3, mlp_dim=384, heads=4),
    "base": dict(width=512, depth=12, mlp_dim=2048, heads=8),
    "large": dict(width=768, depth=12, mlp_dim=3072, heads=12),
}
POOLS = ("eos", "last", "first", "mean", "argmax")
EMBED_LOOKUPS = ("gather", "one_hot")


def check_embed_lookup(name: str) -> str:
  if name not in EMBED_LOOKUPS:
    raise ValueError(f"config.model.text.embed_lookup={name!r} is not one "
                     f"of {EMBED_LOOKUPS}.")
  return name


def pool_tokens(x, tokens, pool: str, *, eos_id: int, pad_id: int):
  """x [B, L, W], tokens [B, L] -> [B, W]."""
  if pool == "first":
    return x[:, 0]
  if pool == "last":
    return x[:, -1]
  if pool == "eos":
    is_eos = tokens == eos_id
    index = jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1),
                      tokens.shape[1] - 1)
    return jnp.take_along_axis(x, index[:, None, None], axis=1)[:, 0]
  if pool == "argmax":
    index = jnp.argmax(tokens, axis=1)
    return jnp.take_along_axis(x, index[:, None, None], axis=1)[:, 0]
  if pool == "mean":
    keep = (tokens != pad_id)[..., None].astype(x.dtype)
    return (x * keep).sum(axis=1) / jnp.maximum(keep.sum(axis=1), 1)
  raise ValueError(f"text pool {pool!r} is not one of {POOLS}.")


class TextTransformer(nn.Module):
  """tokens [B, L] int -> features [B, width]."""
  width: int
  depth: int
  mlp_dim: int
  heads: int
  vocab_size: int
  context_length: int
  pool: str = "eos"
  causal: bool = True
  eos_id: int = 1
  pad_id: int = 0
  mask_pad: bool = True
  ln_eps: float = common.LN_EPS
  activation: str = "quick_gelu"
  dtype: Any = jnp.float32
  remat_policy: str = "none"  # common.REMAT_POLICIES name.
  scan: bool = False
  attention: str = "flax"  # common.ATTENTIONS name.
  embed_lookup: str = "gather"  # An EMBED_LOOKUPS name.

  @nn.compact
  def __call__(self, tokens, *, train: bool = False):
    del train
    length = tokens.shape[1]
    if length > self.context_length:
      raise ValueError(
          f"Text of {length} tokens given to a text tower with context "
          f"length {self.context_length}; truncate in the tokenizer or raise "
          "config.model.text.context_length.")
    embed = nn.Embed(self.vocab_size, self.width, dtype=self.dtype,
                     embedding_init=nn.initializers.normal(0.02),
                     name="token_embed")
    if check_embed_lookup(self.embed_lookup) == "one_hot":
      # Ids outside [0, vocab) get a zero row here (jnp.take: NaN).
      one_hot = jax.nn.one_hot(tokens, self.vocab_size, dtype=self.dtype)
      x = jnp.dot(one_hot, embed.embedding.astype(self.dtype))
    else:
      x = embed(tokens)
    pos = self.param("pos_embed", nn.initializers.normal(0.01),
                     (self.context_length, self.width))
    x = x + pos[:length].astype(self.dtype)
    mask = None
    if self.mask_pad:
      mask = nn.make_attention_mask(jnp.ones_like(tokens, bool),
                                    tokens != self.pad_id)
    if self.causal:
      mask = nn.combine_masks(mask, nn.make_causal_mask(tokens))
    x = common.Encoder(self.depth, self.mlp_dim, self.heads, self.activation,
                       self.dtype, self.remat_policy, self.scan,
                       self.attention, self.ln_eps, name="encoder")(
                           x, mask)
    x = common.layer_norm(self.dtype, "ln_final", self.ln_eps)(x)
    return pool_tokens(x, tokens, self.pool, eos_id=self.eos_id,
                       pad_id=self.pad_id)


def build(text_config, *, activation, dtype, remat_policy,
          scan, attention="flax", ln_eps=common.LN_EPS) -> TextTransformer:
  dims = common.resolve_variant(text_config, VARIANTS, "text")
  if text_config.pool not in POOLS:
    raise ValueError(
        f"config.model.text.pool={text_config.pool!r} is not one of {POOLS}.")
  for key in ("vocab_size", "context_length"):
    if text_config[key] <= 0:
      raise ValueError(
          f"config.model.text.{key}={text_config[key]} must be > 0.")
  return TextTransformer(
      **dims, vocab_size=text_config.vocab_size,
      context_length=text_config.context_length, pool=text_config.pool,
      causal=text_config.causal, eos_id=text_config.eos_id,
      pad_id=text_config.pad_id,
      mask_pad=text_config.get("mask_pad") is not False,  # None: default.
      ln_eps=ln_eps, activation=activation, dtype=dtype,
      remat_policy=remat_policy, scan=scan, attention=attention,
      embed_lookup=check_embed_lookup(
          text_config.get("embed_lookup") or "gather"))
