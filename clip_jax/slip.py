"""SLIP (Mu et al. 2022): CLIP's loss plus SimCLR between two image views.

  loss = contrastive(zimg, ztxt) + weight * NT-Xent(h1, h2; temperature)

h1, h2: L2-normalised outputs of an MLP head (models/two_towers.SslHead) on
the image tower's pooled features (before the CLIP projection) of two
independently augmented views of each training image; NT-Xent is
losses.nt_xent_loss over the global batch (2N x 2N, self-pairs masked).
The CLIP term keeps the pipeline's usual `image`; the views are extra
(`image_views`, uint8 [B, 2, S, S, 3]), drawn per example from the
example's own seeded generator after its usual draws, so turning SLIP on
changes neither `image` nor `text`, and a resumed run sees the same views.

How it follows the paper and facebookresearch/SLIP (losses.py SIMCLRLoss,
models.py SLIP, main.py defaults), and where it does not:
  - the views go through the same image tower as the CLIP image, SLIP's
    head is Linear-BN-ReLU-Linear-BN-ReLU-Linear (4096 hidden, 256 out for
    every ViT size). Here LayerNorm replaces SyncBatchNorm (the model has
    no batch statistics; see SslHead), and the widths default to SLIP's
    ViT-B/16 ratios, 4096/768 and 256/768 of the image width (ViT-B: 4096
    and 256 exactly; the demo's width 96: 512 and 32), so a small tower
    does not get a head 50x its size. Give mlp_dim / out_dim to set them.
  - temperature 0.1 and weight (SLIP's ssl_scale) 1.0: SLIP's defaults.
  - SimCLR's augmentation (SLIP's main.py): random resized crop of 0.08-1
    of the area, flip, colour jitter (0.4, 0.4, 0.4, hue 0.1) with p 0.8,
    greyscale p 0.2, Gaussian blur p 0.5 (sigma 0.1-2). Here: the same
    crop, flip and blur; brightness / contrast / saturation jitter of
    `view_style_strength` (0.4) always applied, greyscale with probability
    strength / 2 (= 0.2) (transforms.draw_style); no hue jitter (the
    transforms have none).
  - exact gradient accumulation (accum_steps > 1, accum_mode 'exact') is
    refused with SLIP (a config error): it would need the NT-Xent gradient
    cached too; 'naive' accumulation works.

Config keys (`config.slip`, defaults in config.base_config()):
  weight               multiplier of the NT-Xent term; 0 = off (the model
                       has no head, the pipeline makes no views, the step
                       is the program it is without SLIP).
  temperature          NT-Xent's temperature (SLIP: 0.1).
  mlp_dim              hidden width of the head; None = 4096/768 x the
                       image tower's width.
  out_dim              output width of the head; None = 256/768 x width.
  view_crop_scale      (min, max) area fraction of the views' random crop.
  view_style_strength  colour jitter strength of the views (0 = none).
  view_flip            random horizontal flips of the views.

Metrics (when on): 'slip/ssl_loss' (NT-Xent, unweighted) and
'contrastive_loss' (the CLIP term); 'loss' is their weighted sum.
"""

from __future__ import annotations

import dataclasses

from clip_jax import losses

# SLIP's ViT-B/16 head: 4096 hidden and 256 out on a 768-wide tower.
MLP_PER_WIDTH = 4096 / 768
OUT_PER_WIDTH = 256 / 768
VIEWS_KEY = "image_views"


def enabled(config) -> bool:
  slip = config.get("slip")
  return bool(slip) and (slip.get("weight") or 0) > 0


def head_dims(config) -> tuple[int, int] | None:
  """(mlp_dim, out_dim) of the SSL head, or None when SLIP is off."""
  if not enabled(config):
    return None
  from clip_jax.models import common, vit  # pylint: disable=g-import-not-at-top
  width = common.resolve_variant(config.model.image, vit.VARIANTS,
                                 "image")["width"]
  slip = config.slip
  mlp = slip.get("mlp_dim") or max(1, round(MLP_PER_WIDTH * width))
  out = slip.get("out_dim") or max(1, round(OUT_PER_WIDTH * width))
  return int(mlp), int(out)


@dataclasses.dataclass(frozen=True)
class ViewOptions:
  """How the pipeline augments SLIP's two views (data/pipeline.py)."""
  crop_scale: tuple = (0.08, 1.0)
  style_strength: float = 0.4
  flip: bool = True


def view_options(config) -> ViewOptions | None:
  """The pipeline's view options, or None (no views) when SLIP is off."""
  if not enabled(config):
    return None
  slip = config.slip
  return ViewOptions(crop_scale=tuple(float(x) for x in
                                      slip.view_crop_scale),
                     style_strength=float(slip.view_style_strength),
                     flip=bool(slip.view_flip))


def make_extra_loss(model, config, mesh):
  """The train step's train_state.ExtraLoss: weight x NT-Xent of the
  batch's two views (its targets; no step input). It runs the image tower
  on the views itself, so exact accumulation is refused (naive works)."""
  from clip_jax import train_state  # pylint: disable=g-import-not-at-top
  weight = float(config.slip.weight)
  temperature = float(config.slip.temperature)

  def views_of(_, batch):
    if VIEWS_KEY not in batch:
      raise ValueError(
          f"config.slip.weight={weight} (SLIP) but the batch has no "
          f"{VIEWS_KEY!r} (keys: {sorted(batch)}); make the data with "
          "pipeline.make_train_iterator(..., ssl_views="
          "slip.view_options(config)), as train.make_train_data does.")
    return batch[VIEWS_KEY]  # [B, 2, S, S, 3], sharded over B.

  def loss(params, zimg, ztxt, out, views, inputs):
    del zimg, ztxt, out, inputs
    rows = views.shape[0]
    # [B, 2, ...] -> [2B, ...] keeps each device's rows on it (row 2i is
    # view 1 of example i, 2i + 1 its view 2): one tower pass, no copy.
    both = model.apply({"params": params},
                       views.reshape(2 * rows, *views.shape[2:]),
                       train=True, method="encode_ssl")
    both = both.reshape(rows, 2, both.shape[-1])
    ssl = losses.nt_xent_loss(both[:, 0], both[:, 1], temperature,
                              mesh=mesh)
    return weight * ssl, {"slip/ssl_loss": ssl}

  return train_state.ExtraLoss(views_of, loss, exact_accumulation=False)


def check_config(config, **_) -> None:
  """config.slip's values (a config.CHECKS row)."""
  slip = config.get("slip")
  if not slip:
    return
  if slip.weight < 0:
    raise ValueError(f"config.slip.weight={slip.weight} must be >= 0 (0 = "
                     "SLIP off; SLIP's ssl_scale is 1.0).")
  if slip.temperature <= 0:
    raise ValueError(f"config.slip.temperature={slip.temperature} must be "
                     "> 0 (SLIP: 0.1).")
  for key in ("mlp_dim", "out_dim"):
    value = slip.get(key)
    if value is not None and value <= 0:
      raise ValueError(f"config.slip.{key}={value} must be > 0, or None "
                       "(scaled from the image tower's width).")
  crop = tuple(slip.view_crop_scale)
  if not (len(crop) == 2 and 0 < crop[0] <= crop[1]):
    raise ValueError(
        f"config.slip.view_crop_scale={crop!r}: expected (min, max) area "
        "fractions with 0 < min <= max (SimCLR: (0.08, 1.0)).")
  if not 0 <= slip.view_style_strength <= 1:
    raise ValueError(
        f"config.slip.view_style_strength={slip.view_style_strength} must "
        "be in [0, 1] (SimCLR's jitter: 0.4).")
  if (enabled(config) and config.get("accum_steps", 1) > 1
      and config.get("accum_mode", "exact") == "exact"):
    raise ValueError(
        f"config.slip.weight={slip.weight} (SLIP) with config.accum_steps="
        f"{config.accum_steps} and accum_mode='exact': exact accumulation "
        "does not support SLIP's extra term yet. Set accum_steps=1 (a "
        "smaller batch_size if memory is short), accum_mode='naive', or "
        "slip.weight=0.")
