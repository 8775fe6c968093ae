"""Analytic model FLOPs of a two-tower train step (pure Python).

Counts the matrix multiplies only (2 FLOPs per multiply-add), as papers and
MFU figures do: patch embedding, q/k/v/out projections, attention scores
and values (full T x T, the causal mask does not skip work in XLA or in
PyTorch's dense attention), the MLP, the two projections to the joint
space, and the loss's [B, B] logits. The token lookup is a gather (no
FLOPs). Elementwise work (layer norms, activations, softmax, AdamW) is left
out: XLA's cost analysis counts it, which is why the compiled figure is a
few percent above this one (tests/test_flops.py bounds the gap).

A train step is 3x the forward (the backward of y = x W computes dx and dW,
each as costly as the forward), except the patch embedding, whose input
gradient (w.r.t. the pixels) is never computed: 2x.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Tower:
  width: int
  depth: int
  mlp_dim: int
  tokens: int


def encoder_forward_flops(t: Tower) -> int:
  """Forward FLOPs of `depth` pre-LN blocks over `tokens` tokens."""
  w, m, n = t.width, t.mlp_dim, t.tokens
  projections = 2 * n * 4 * w * w  # q, k, v, out.
  attention = 2 * 2 * n * n * w    # scores q k^T and probabilities @ v.
  mlp = 2 * 2 * n * w * m
  return t.depth * (projections + attention + mlp)


def map_head_forward_flops(width: int, mlp_dim: int, tokens: int) -> int:
  """One learned probe attending over `tokens`, then its MLP."""
  w = width
  return (2 * 2 * w * w            # probe query and output projections.
          + 2 * 2 * tokens * w * w  # keys and values of every token.
          + 2 * 2 * tokens * w      # scores and weighted sum.
          + 2 * 2 * w * mlp_dim)


def train_flops_per_example(*, image_size: int, patch_size: int,
                            image: Tower, text: Tower, embed_dim: int,
                            batch_size: int, pool: str = "cls") -> dict:
  """Matmul FLOPs per example of one train step, by part.

  image.tokens / text.tokens: the sequence lengths the encoders see (image:
  patches, plus 1 with a class token).
  """
  patches = (image_size // patch_size) ** 2
  patch_fwd = 2 * patches * patch_size * patch_size * 3 * image.width
  image_fwd = encoder_forward_flops(image)
  if pool == "map":
    image_fwd += map_head_forward_flops(image.width, image.mlp_dim,
                                        image.tokens)
  text_fwd = encoder_forward_flops(text)
  proj_fwd = 2 * (image.width + text.width) * embed_dim
  loss_fwd = 2 * batch_size * embed_dim  # This example's row of logits.
  parts = {
      "patch_embed": 2 * patch_fwd,
      "image_encoder": 3 * image_fwd,
      "text_encoder": 3 * text_fwd,
      "projections": 3 * proj_fwd,
      "loss_logits": 3 * loss_fwd,
  }
  parts["total"] = sum(parts.values())
  return parts


def config_train_flops_per_example(model_config, batch_size: int) -> dict:
  """train_flops_per_example for a config.model (its variants resolved)."""
  from clip_jax.models import common, text, vit  # pylint: disable=g-import-not-at-top
  img = common.resolve_variant(model_config.image, vit.VARIANTS, "image")
  txt = common.resolve_variant(model_config.text, text.VARIANTS, "text")
  size, patch = model_config.image.image_size, img["patch_size"]
  pool = model_config.image.pool
  image_tokens = (size // patch) ** 2 + (pool == "cls")
  return train_flops_per_example(
      image_size=size, patch_size=patch, pool=pool,
      image=Tower(img["width"], img["depth"], img["mlp_dim"], image_tokens),
      text=Tower(txt["width"], txt["depth"], txt["mlp_dim"],
                 model_config.text.context_length),
      embed_dim=model_config.embed_dim, batch_size=batch_size)


def compiled_flops(compiled) -> float:
  """'flops' of XLA's cost analysis of a compiled program."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older jax: one dict per program.
    cost = cost[0]
  return float(cost["flops"])
