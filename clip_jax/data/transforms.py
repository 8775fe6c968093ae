"""Image transforms: decode, resize, random resized crop, flip, normalise.

Pure functions of (image, numpy Generator): the pipeline gives each record
its own Generator derived from the seed and the record's position, so a run
is reproducible and a resumed run sees the same augmentations.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def decode(image) -> Image.Image:
  """uint8 array, encoded bytes or a path -> RGB PIL image (raises on bad)."""
  if isinstance(image, np.ndarray):
    return Image.fromarray(image).convert("RGB")
  if isinstance(image, (bytes, bytearray)):
    image = io.BytesIO(image)
  with Image.open(image) as img:
    img.load()
    return img.convert("RGB")


def random_resized_crop(img: Image.Image, rng: np.random.Generator,
                        scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)):
  """A crop of `scale` x area and aspect `ratio` (Inception-style)."""
  width, height = img.size
  area = width * height
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
    w = int(round(np.sqrt(target * aspect)))
    h = int(round(np.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      x = int(rng.integers(0, width - w + 1))
      y = int(rng.integers(0, height - h + 1))
      return img.crop((x, y, x + w, y + h))
  return img


def normalize(pixels: np.ndarray, mean=CLIP_MEAN, std=CLIP_STD) -> np.ndarray:
  """uint8 [H, W, 3] -> float32 (pixels / 255 - mean) / std."""
  x = pixels.astype(np.float32) / 255.0
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def preprocess_image(image, size: int, rng: np.random.Generator | None, *,
                     crop_scale=None, flip: bool = False, mean=CLIP_MEAN,
                     std=CLIP_STD) -> np.ndarray:
  """Decode -> (crop) -> resize to size x size -> (flip) -> normalise."""
  img = decode(image)
  if rng is not None and crop_scale is not None:
    img = random_resized_crop(img, rng, scale=tuple(crop_scale))
  if img.size != (size, size):
    img = img.resize((size, size), Image.BICUBIC)
  pixels = np.asarray(img)
  if rng is not None and flip and rng.random() < 0.5:
    pixels = pixels[:, ::-1]
  return normalize(pixels, mean, std)
