"""Image transforms: decode, resize, random resized crop, flip, normalise.

Pure functions of (image, numpy Generator). The pipeline gives every record
its own Generator, derived by grain from the seed and the record's position
in the stream, so a run is reproducible and a resumed run sees the same
augmentations. `preprocess_image` returns uint8; `normalize` (applied to
whole batches, in the main process) turns it into float32.

Geometry: without a crop (and always at evaluation) the shorter side is
resized to `size` and the centre `size` x `size` square kept (square images
are just resized). With `crop_scale=(lo, hi)` a random crop of lo..hi of the
area, aspect 3/4..4/3 (Inception-style), is resized to `size` x `size`.
Horizontal flips are off by default: captions may say 'left' or 'right', and
text in images reads backwards.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def decode(image) -> Image.Image:
  """uint8 array, encoded bytes or a path -> RGB PIL image (raises on bad).

  Transparent pixels (RGBA, LA, palette transparency) become white.
  """
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
      raise ValueError(f"Expected a uint8 [H, W(, C)] image array, got "
                       f"{image.dtype} {image.shape}.")
    if image.ndim == 3 and image.shape[-1] == 1:
      image = image[..., 0]
    img = Image.fromarray(image)
  else:
    if image is None:
      raise ValueError("The source returned no image.")
    if isinstance(image, (bytes, bytearray, memoryview)):
      image = io.BytesIO(image)
    img = Image.open(image)
    img.load()
  if img.mode == "RGB":
    return img
  if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
    img = img.convert("RGBA")
    background = Image.new("RGBA", img.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, img).convert("RGB")
  return img.convert("RGB")


def random_resized_crop_box(width: int, height: int,
                            rng: np.random.Generator, scale=(0.5, 1.0),
                            ratio=(3 / 4, 4 / 3)):
  """(left, top, right, bottom) of a crop of `scale` x area, aspect `ratio`.

  Up to 10 tries; then the largest centred crop of an aspect in `ratio`.
  """
  area = width * height
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
    w = round(np.sqrt(target * aspect))
    h = round(np.sqrt(target / aspect))
    if 0 < w <= width and 0 < h <= height:
      x = int(rng.integers(0, width - w + 1))
      y = int(rng.integers(0, height - h + 1))
      return x, y, x + w, y + h
  aspect = min(max(width / height, ratio[0]), ratio[1])
  w, h = (width, round(width / aspect)) if width / height < aspect else (
      round(height * aspect), height)
  w, h = min(w, width), min(h, height)
  x, y = (width - w) // 2, (height - h) // 2
  return x, y, x + w, y + h


def center_square_box(width: int, height: int):
  """The largest centred square."""
  side = min(width, height)
  x, y = (width - side) // 2, (height - side) // 2
  return x, y, x + side, y + side


def style_augment(img: Image.Image, rng: np.random.Generator,
                  strength: float) -> Image.Image:
  """Random brightness/contrast/saturation in [1 - strength, 1 + strength],
  greyscale with probability strength / 2, Gaussian blur with probability
  1/2: the shading, palette and line detail of one renderer stop being
  reliable cues (the emoji demo trains on one style, tests on another)."""
  for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast,
                  ImageEnhance.Color):
    img = enhance(img).enhance(float(rng.uniform(1 - strength, 1 + strength)))
  if rng.random() < strength / 2:
    img = img.convert("L").convert("RGB")
  if rng.random() < 0.5:
    img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.1, 2.0))))
  return img


def preprocess_image(image, size: int, rng: np.random.Generator | None = None,
                     *, crop_scale=None, flip: bool = False,
                     style_strength: float = 0.0) -> np.ndarray:
  """Decode -> crop (random, or centre square) -> resize -> (flip).

  Returns uint8 [size, size, 3]. `rng=None` (evaluation) means no random
  crop and no flip.
  """
  img = decode(image)
  if rng is not None and crop_scale is not None:
    box = random_resized_crop_box(*img.size, rng, scale=tuple(crop_scale))
  else:
    box = center_square_box(*img.size)
  if rng is not None and style_strength > 0:
    img = style_augment(img, rng, style_strength)
  if box != (0, 0, *img.size) or img.size != (size, size):
    img = img.resize((size, size), Image.BICUBIC, box=box)
  pixels = np.asarray(img)
  if rng is not None and flip and rng.random() < 0.5:
    pixels = pixels[:, ::-1]
  return np.ascontiguousarray(pixels)


def normalize(pixels: np.ndarray, mean=CLIP_MEAN, std=CLIP_STD) -> np.ndarray:
  """uint8 [..., 3] -> float32 (pixels / 255 - mean) / std."""
  scale = 1.0 / (255.0 * np.asarray(std, np.float32))
  offset = np.asarray(mean, np.float32) / np.asarray(std, np.float32)
  return pixels.astype(np.float32) * scale - offset
