"""A tiny coloured-squares dataset for the user-facing entry-point tests:
a caption folder (x.png + x.txt), a class folder and a tokenizer."""

import os

import numpy as np
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40),
           "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def _square(rgb, rng, size=32):
  image = np.full((size, size, 3), 255, np.uint8)
  lo, hi = sorted(rng.integers(2, size - 2, 2))
  hi = max(hi, lo + 8)
  noise = rng.integers(-20, 21, 3)
  image[lo:hi, lo:hi] = np.clip(np.asarray(rgb) + noise, 0, 255)
  return image


def make(root: str, *, train_per_class: int = 8, eval_per_class: int = 3):
  """(caption folder, class folder, tokenizer path) under root."""
  from clip_jax.data import tokenizer as tokenizer_lib
  rng = np.random.default_rng(0)
  train, classes = os.path.join(root, "train"), os.path.join(root, "classes")
  os.makedirs(train, exist_ok=True)
  captions = []
  for name, rgb in COLOURS.items():
    os.makedirs(os.path.join(classes, name), exist_ok=True)
    for i in range(train_per_class):
      stem = os.path.join(train, f"{name}_{i}")
      Image.fromarray(_square(rgb, rng)).save(stem + ".png")
      caption = f"a {name} square"
      captions.append(caption)
      with open(stem + ".txt", "w") as f:
        f.write(caption + "\n")
    for i in range(eval_per_class):
      Image.fromarray(_square(rgb, rng)).save(
          os.path.join(classes, name, f"{i}.png"))
  tok = os.path.join(root, "tok.model")
  tokenizer_lib.train(captions * 4, 20, tok)  # All the corpus yields.
  return train, classes, tok
