r"""The few-shot OpenMoji data of experiments/lora (run once, ~1 minute):

  .venv/bin/python experiments/lora/make_data.py --out runs/lora_data --shots 2

Splits the 1,923 base emoji (by an MD5 hash of the name, so the split is
the same everywhere) into ADAPT_FRACTION 'adapt' classes and the rest, and
writes from the prepared OpenMoji renderings (clip_jax.data.sources):
  OUT/train_k{shots}/  up to `shots` OpenMoji images of every adapt class
                       (the base glyph first, then skin-tone variants) as
                       x.png + x.txt (the class name): a `folder` source;
  OUT/rest/<class>/    every OpenMoji image of the other classes: an
                       image-folder zero-shot eval (classes never seen in
                       OpenMoji style during fine-tuning).
Class names containing '/' are left out (not a folder name); the count is
printed.
"""

import argparse
import hashlib
import os
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from clip_jax.data import sources  # noqa: E402

ADAPT_FRACTION = 0.25


def is_adapt(name: str) -> bool:
  digest = hashlib.md5(("lora-adapt:" + name).encode("utf-8")).hexdigest()
  return int(digest[:8], 16) / 2**32 < ADAPT_FRACTION


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--shots", type=int, default=2)
  parser.add_argument("--cache_dir", default=None)
  args = parser.parse_args(argv)
  source = sources.EmojiSource(sources.prepare_emoji(args.cache_dir),
                               "openmoji")
  names = sources.emoji_class_names("openmoji")
  train_dir = os.path.join(args.out, f"train_k{args.shots}")
  rest_dir = os.path.join(args.out, "rest")
  taken, skipped, counts = {}, set(), {"train": 0, "rest": 0}
  for index in range(len(source)):
    example = source[index]
    name = names[example["label"]]
    if "/" in name:
      skipped.add(name)
      continue
    stem = f"{index:05d}"
    if is_adapt(name):
      if taken.get(name, 0) >= args.shots:
        continue
      taken[name] = taken.get(name, 0) + 1
      folder = train_dir
      with open(os.path.join(_mkdir(folder), stem + ".txt"), "w",
                encoding="utf-8") as f:
        f.write(name + "\n")
      counts["train"] += 1
    else:
      folder = _mkdir(os.path.join(rest_dir, name.replace(" ", "_")))
      counts["rest"] += 1
    Image.fromarray(np.asarray(example["image"])).save(
        os.path.join(_mkdir(folder), stem + ".png"))
  print(f"{counts['train']} training images of {len(taken)} adapt classes "
        f"in {train_dir}; {counts['rest']} eval images in {rest_dir}; "
        f"{len(skipped)} classes with '/' left out.")
  return 0


def _mkdir(path: str) -> str:
  os.makedirs(path, exist_ok=True)
  return path


if __name__ == "__main__":
  raise SystemExit(main())
