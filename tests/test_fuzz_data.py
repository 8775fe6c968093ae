"""Property-based fuzzing of the data path (hypothesis): bad images, bad
captions and malformed records in folder / CSV / JSONL / WebDataset
sources never crash the pipeline, every bad example is counted exactly,
the good ones arrive in the order they would have without the bad ones,
and past max_skip_fraction the run stops naming the bad examples.

The reference for order is the pipeline's own order on an all-good source
of the same length: the order of a shuffled stream does not depend on
the records' contents. Examples are identified by their grey level.
Derandomised with modest example counts: the whole file takes ~20 s.
"""

import functools
import io
import json
import os
import tarfile
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from clip_jax.data import pipeline, sources, transforms
from clip_jax.data import tokenizer as tokenizer_lib

# The 10,000 x 10,000 PNG is refused; PIL warns about its header first.
pytestmark = pytest.mark.filterwarnings(
    "ignore::PIL.Image.DecompressionBombWarning")
FUZZ = settings(max_examples=12, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
GREY_STEP = 6  # Example i is grey level GREY_STEP * (i + 1) (JPEG-safe).
MAX_EXAMPLES = 40  # 6 * 41 < 256.
SIZE = 4  # Output image side.

# Good images: (PIL mode, format, extension). All decode to grey levels.
GOOD_FORMATS = [("RGB", "PNG", "png"), ("RGB", "JPEG", "jpg"),
                ("L", "PNG", "png"), ("L", "JPEG", "jpeg"),
                ("LA", "PNG", "png"), ("RGBA", "PNG", "png"),
                ("P", "GIF", "gif"), ("P", "PNG", "png"),
                ("CMYK", "JPEG", "jpg"), ("I;16", "PNG", "png"),
                ("RGB", "BMP", "bmp"), ("RGBA", "WEBP", "webp")]
GOOD_CAPTIONS = ["a grey square", "日本語 émoji 🙂 ünïcödé",
                 "word " * 40_000]  # 200 k characters: cut, still good.
# Bad examples, by what is wrong. Which sources can express which:
IMAGE_FAULTS = ["random_bytes", "truncated_png", "truncated_jpeg",
                "empty_file", "huge_png", "corrupt_header"]
CAPTION_FAULTS = ["no_caption", "blank_caption", "non_utf8_caption"]
RECORD_FAULTS = {
    "folder": [],
    "csv": ["missing_image_file", "csv_missing_field", "csv_extra_field",
            "csv_no_image_path", "csv_nul_byte"],
    "jsonl": ["missing_image_file", "bad_json", "json_not_object",
              "image_mistyped", "captions_mistyped", "no_image_key"],
    "wds": [],
}


def _grey(i: int) -> int:
  return GREY_STEP * (i + 1)


def _encode(value: int, mode: str, fmt: str, size) -> bytes:
  """A solid grey image of `value` in `mode`, encoded as `fmt`."""
  w, h = size
  if mode == "I;16":
    img = Image.fromarray(np.full((h, w), value * 257, np.uint16))
  else:
    img = Image.new("L", (w, h), value)
    img = img.convert("P") if mode == "P" else img.convert(mode)
  if mode in ("LA", "RGBA"):
    img.putalpha(255)  # Opaque: transparency becomes white (unit test).
  buf = io.BytesIO()
  img.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}),
           **({"lossless": True} if fmt == "WEBP" else {}))
  return buf.getvalue()


@functools.lru_cache(maxsize=1)
def _huge_png() -> bytes:
  """10,000 x 10,000 px (300 MB decoded; 0.3 MB encoded)."""
  buf = io.BytesIO()
  Image.new("L", (10_000, 10_000), 128).save(buf, format="PNG")
  return buf.getvalue()


def _bad_image(fault: str, rng) -> bytes:
  valid = _encode(100, "RGB", "PNG", (16, 16))
  if fault == "random_bytes":
    return rng.integers(0, 256, int(rng.integers(1, 300)),
                        dtype=np.uint8).tobytes()
  if fault == "truncated_png":
    return valid[:int(rng.integers(1, len(valid) - 12))]
  if fault == "truncated_jpeg":
    jpeg = _encode(100, "RGB", "JPEG", (16, 16))
    return jpeg[:int(rng.integers(1, len(jpeg) // 2))]
  if fault == "empty_file":
    return b""
  if fault == "huge_png":
    return _huge_png()
  assert fault == "corrupt_header"
  return valid[:12] + bytes(20) + valid[32:]


# One example: ("good", format index, caption index, (w, h)) or
# ("bad", fault name, seed).
def _example_strategy(kind: str):
  good = st.tuples(st.just("good"),
                   st.integers(0, len(GOOD_FORMATS) - 1),
                   st.integers(0, len(GOOD_CAPTIONS) - 1),
                   st.tuples(st.integers(1, 24), st.integers(1, 24)))
  faults = IMAGE_FAULTS + CAPTION_FAULTS + RECORD_FAULTS[kind]
  bad = st.tuples(st.just("bad"), st.sampled_from(faults),
                  st.integers(0, 2**16))
  return st.lists(st.one_of(good, good, bad), min_size=1,
                  max_size=MAX_EXAMPLES)


# --------------------------------------------------------- writing them --


def _files(i, example):
  """(image bytes or None (absent), caption bytes or None, extension)."""
  if example[0] == "good":
    _, f, c, size = example
    mode, fmt, ext = GOOD_FORMATS[f]
    return _encode(_grey(i), mode, fmt, size), GOOD_CAPTIONS[c].encode(), ext
  _, fault, seed = example
  rng = np.random.default_rng(seed)
  image, caption = _encode(_grey(i), "RGB", "PNG", (8, 8)), b"a caption"
  if fault in IMAGE_FAULTS:
    image = _bad_image(fault, rng)
  elif fault == "no_caption":
    caption = None
  elif fault == "blank_caption":
    caption = b"  \n\t\n"
  elif fault == "non_utf8_caption":
    caption = b"caf\xe9 au lait"  # Latin-1.
  return image, caption, "png"


def _write_folder(root, examples):
  for i, example in enumerate(examples):
    image, caption, ext = _files(i, example)
    with open(os.path.join(root, f"{i:04d}.{ext}"), "wb") as f:
      f.write(image)
    if caption is not None:
      with open(os.path.join(root, f"{i:04d}.txt"), "wb") as f:
        f.write(caption)
  return root


def _write_images(root, examples):
  """Image files of CSV / JSONL rows; returns [(path, caption bytes)]."""
  rows = []
  for i, example in enumerate(examples):
    image, caption, ext = _files(i, example)
    path = os.path.join("img", f"{i:04d}.{ext}")
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    with open(os.path.join(root, path), "wb") as f:
      f.write(image)
    if example[0] == "bad" and example[1] == "missing_image_file":
      os.remove(os.path.join(root, path))
    rows.append((path, b"" if caption is None else caption.strip()))
  return rows


def _csv_field(text: bytes) -> bytes:
  return b'"' + text.replace(b'"', b'""') + b'"'


def _write_csv(root, examples):
  lines = [b"image,caption"]
  for example, (path, caption) in zip(examples,
                                      _write_images(root, examples)):
    fault = example[1] if example[0] == "bad" else None
    caption = caption.split(b"\n")[0]
    if fault == "csv_missing_field":
      lines.append(path.encode())
    elif fault == "csv_extra_field":
      lines.append(path.encode() + b",a caption,another field")
    elif fault == "csv_nul_byte":
      lines.append(path.encode() + b",a \x00 caption")
    elif fault == "csv_no_image_path":
      lines.append(b"," + _csv_field(caption or b"x"))
    else:
      lines.append(path.encode() + b"," + _csv_field(caption))
  with open(os.path.join(root, "data.csv"), "wb") as f:
    f.write(b"\n".join(lines) + b"\n")
  return os.path.join(root, "data.csv")


def _write_jsonl(root, examples):
  lines = []
  for example, (path, caption) in zip(examples,
                                      _write_images(root, examples)):
    fault = example[1] if example[0] == "bad" else None
    if fault == "non_utf8_caption":  # Raw bytes inside the JSON string.
      lines.append(b'{"image": "' + path.encode() + b'", "caption": "' +
                   caption + b'"}')
      continue
    record = {"image": path, "captions": caption.decode().split("\n")}
    if fault == "bad_json":
      lines.append(json.dumps(record).encode()[:-3])
      continue
    record = {"json_not_object": [record],
              "image_mistyped": {**record, "image": 17},
              "captions_mistyped": {**record, "captions": [1, 2]},
              "no_image_key": {"caption": "x"}}.get(fault, record)
    lines.append(json.dumps(record, ensure_ascii=False).encode())
  with open(os.path.join(root, "data.jsonl"), "wb") as f:
    f.write(b"\n".join(lines) + b"\n\n")  # A blank line is no example.
  return os.path.join(root, "data.jsonl")


def _add(tar, name, data: bytes):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def _write_wds(root, examples):
  """Two shards; converted. Returns (JSONL path, indices converted)."""
  os.makedirs(os.path.join(root, "shards"))
  half = (len(examples) + 1) // 2
  for shard, part in enumerate((range(half), range(half, len(examples)))):
    with tarfile.open(os.path.join(root, "shards", f"{shard:05d}.tar"),
                      "w") as tar:
      for i in part:
        image, caption, ext = _files(i, examples[i])
        _add(tar, f"{i:04d}.{ext}", image)
        if caption is not None:
          _add(tar, f"{i:04d}.txt", caption)
  result = sources.convert_wds(os.path.join(root, "shards", "*.tar"),
                               os.path.join(root, "out"), verbose=False)
  left_out = {int(k.split("/")[-1]) for keys in result.skipped.values()
              for k in keys}
  return result, [i for i in range(len(examples)) if i not in left_out]


# ------------------------------------------------------------ checking --


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.train(["a grey square", "a caption", "word"] * 5, 30)


def _config(path, **overrides):
  c = pipeline.default_data_config()
  c.update(source="folder", path=path, image_size=SIZE, context_length=6,
           random_resized_crop=(0.5, 2.0), max_skip_fraction=1.0,
           prefetch=2)
  c.update(overrides)
  return c


def _run(config, tok, batch_size):
  """(grey ids of the delivered examples, per-batch skip counts, the
  iterator's num_skipped)."""
  with pipeline.make_dataset(config, split="train",
                             batch_size_per_process=batch_size, seed=7,
                             tokenizer=tok, num_epochs=1) as iterator:
    batches = list(iterator)
    total = iterator.num_skipped
  ids, skipped = [], []
  for b in batches:
    grey = b["image"].astype(np.float64)  # uint8 pixels (uint8_images).
    # Solid grey images (JPEG / CMYK: within a few levels).
    assert (np.ptp(grey, axis=(1, 2, 3)) < 12).all()
    ids += [int(round(v / GREY_STEP)) - 1 for v in grey.mean((1, 2, 3))]
    skipped += list(b["num_skipped"])
  return ids, skipped, total


@functools.lru_cache(maxsize=None)
def _reference_order(n: int, batch_size: int):
  """Positions 0..n-1 in the pipeline's order on n good records."""
  class Records:
    def __len__(self):
      return n

    def __getitem__(self, i):
      return {"image": np.full((2, 2, 3), 128, np.uint8),
              "captions": ["a caption"], "label": i, "id": str(i)}

  old = sources.SOURCES.get("reference")
  sources.SOURCES["reference"] = lambda config, split: Records()
  try:
    config = _config(None, source="reference", random_resized_crop=None)
    with pipeline.make_dataset(config, split="train",
                               batch_size_per_process=1, seed=7,
                               tokenizer=_reference_tok(),
                               num_epochs=1) as iterator:
      order = [int(b["label"][0]) for b in iterator]
  finally:
    sources.SOURCES.pop("reference")
    if old is not None:
      sources.SOURCES["reference"] = old
  assert sorted(order) == list(range(n))
  return tuple(order)


@functools.lru_cache(maxsize=1)
def _reference_tok():
  return tokenizer_lib.train(["a grey square", "a caption", "word"] * 5, 30)


def _check(examples, positions, tok, config, batch_size):
  """positions: the example index at each position of the source."""
  if len(positions) < batch_size:
    with pytest.raises(ValueError, match="no full global batch"):
      _run(config, tok, batch_size)
    return
  # One epoch reads the first len // batch_size * batch_size positions of
  # the shuffled order (the remainder is dropped by index, unread).
  order = _reference_order(len(positions), batch_size)
  order = order[:len(order) // batch_size * batch_size]
  good = [p for p in order if examples[positions[p]][0] == "good"]
  if not good:
    with pytest.raises(RuntimeError, match=r"\d+ of the \d+ examples .*"
                       r"First bad examples: \S"):
      _run(config, tok, batch_size)
    return
  ids, skipped, total = _run(config, tok, batch_size)
  delivered = len(good) // batch_size * batch_size
  assert ids == [positions[p] for p in good][:delivered]  # In order.
  assert total == len(order) - len(good)  # Every bad one, exactly.
  if delivered:  # Each batch counts the bad ones read while filling it.
    last = order.index(good[delivered - 1])
    assert sum(skipped) == last + 1 - delivered


def _fuzz(kind, examples, tok, batch_size):
  with tempfile.TemporaryDirectory() as root:
    positions = list(range(len(examples)))
    if kind == "folder":
      path = _write_folder(root, examples)
    elif kind == "csv":
      path = _write_csv(root, examples)
    elif kind == "jsonl":
      path = _write_jsonl(root, examples)
    else:
      result, positions = _write_wds(root, examples)
      path = result.path
      # Samples without a caption file, or whose caption is not UTF-8, are
      # left out by the conversion and reported by reason; everything else
      # reaches the pipeline.
      reasons = {"no_caption": "no image or no .txt",
                 "non_utf8_caption": "caption not UTF-8"}
      assert {k: sorted(v) for k, v in result.skipped.items()} == {
          r: [f"{i // ((len(examples) + 1) // 2):05d}/{i:04d}"
              for i, e in enumerate(examples) if e[1] == fault]
          for fault, r in reasons.items()
          if any(e[1] == fault for e in examples)}
      if not positions:
        return
    _check(examples, positions, tok, _config(path), batch_size)


@pytest.mark.parametrize("kind", ["folder", "csv", "jsonl", "wds"])
def test_fuzzed_sources_count_bad_examples_and_keep_good_order(kind, tok):
  @FUZZ
  @given(examples=_example_strategy(kind), batch_size=st.integers(1, 4))
  def run(examples, batch_size):
    _fuzz(kind, examples, tok, batch_size)

  run()


# ------------------------------------------------- max_skip_fraction --


class _Flagged:
  """In-memory records; those in `bad` have no caption."""

  def __init__(self, bad, n):
    self.bad, self.n = bad, n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {"image": np.full((2, 2, 3), _grey(i % MAX_EXAMPLES), np.uint8),
            "captions": [] if i in self.bad else ["a caption"],
            "id": f"rec{i}"}


@FUZZ
@given(n=st.integers(100, 200), seed=st.integers(0, 2**16),
       bad_rate=st.floats(0.0, 0.5),
       margin=st.sampled_from([-0.05, -0.01, 0.0, 0.01, 0.05]))
def test_run_stops_past_max_skip_fraction_naming_examples(n, seed, bad_rate,
                                                          margin):
  """Reference: walk the stream's order in NumPy; the run must stop at the
  first example (from the 100th on) where skipped > fraction * seen, and
  name the first bad examples. The fraction is near the bad rate, so runs
  stop early, late or never."""
  bad_mask = np.random.default_rng(seed).random(n) < bad_rate
  fraction = float(np.clip(bad_rate + margin, 0.0, 1.0))
  n = len(bad_mask)
  bad = {i for i, b in enumerate(bad_mask) if b}
  source = _Flagged(bad, n)
  sources.SOURCES["flagged"] = lambda config, split: source
  try:
    order = [i for i in _stream_order(n)]
    is_bad = np.array([i in bad for i in order])
    seen = np.arange(1, n + 1)
    skipped = np.cumsum(is_bad)
    stop = (seen >= pipeline.MIN_EXAMPLES_FOR_SKIP_CHECK) & is_bad & (
        skipped > fraction * seen)
    config = _config(None, source="flagged", max_skip_fraction=fraction,
                     random_resized_crop=None)
    if stop.any() or not (~is_bad).any():
      first_bad = [f"rec{i}" for i in np.array(order)[is_bad][:5]]
      k = int(np.argmax(stop)) if stop.any() else n - 1
      with pytest.raises(RuntimeError) as error:
        _run(config, _reference_tok(), 1)
      message = str(error.value)
      assert (f"{skipped[k]} of the {seen[k]} examples" in message)
      assert f"max_skip_fraction={fraction}" in message
      assert all(f"{b} (" in message for b in first_bad)
    else:
      _, _, total = _run(config, _reference_tok(), 1)
      assert total == len(bad)
  finally:
    sources.SOURCES.pop("flagged")


def _stream_order(n):
  return [int(i) for i in _reference_order(n, 1)]


# ---------------------------------------------- image decoding, alone --


@FUZZ
@given(f=st.integers(0, len(GOOD_FORMATS) - 1),
       size=st.tuples(st.integers(1, 40), st.integers(1, 40)),
       value=st.integers(0, 255), cut=st.floats(0.0, 1.0))
def test_any_image_decodes_to_its_colour_or_is_a_counted_error(
    f, size, value, cut):
  """Whole files decode to their grey level (PIL's own conversion is the
  reference for modes; 16-bit keeps its top 8 bits); truncated ones decode
  the same or fail in Preprocess, which never raises."""
  mode, fmt, _ = GOOD_FORMATS[f]
  data = _encode(value, mode, fmt, size)
  pixels = transforms.preprocess_image(data, SIZE)
  tolerance = 3 if fmt in ("JPEG",) else 0
  assert pixels.shape == (SIZE, SIZE, 3) and pixels.dtype == np.uint8
  assert np.abs(pixels.astype(int) - value).max() <= tolerance
  truncated = data[:int(cut * len(data))]
  prep = pipeline.Preprocess(pipeline.PreprocessOptions(SIZE, 4),
                             _reference_tok())
  out = prep.random_map({"image": truncated, "captions": ["a caption"]},
                        np.random.default_rng(0))
  assert out["image"].shape == (SIZE, SIZE, 3)
  assert out["valid"] == (out["error"] == "")
  if not out["valid"]:
    assert out["error"]


def test_transparent_pixels_become_white_and_16_bit_keeps_its_range():
  buf = io.BytesIO()
  Image.new("RGBA", (5, 5), (255, 0, 0, 0)).save(buf, format="PNG")
  assert (transforms.preprocess_image(buf.getvalue(), SIZE) == 255).all()
  ramp = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)
  buf = io.BytesIO()
  Image.fromarray(ramp).save(buf, format="PNG")
  pixels = np.asarray(transforms.decode(buf.getvalue()))
  np.testing.assert_array_equal(pixels[..., 0], np.arange(256).reshape(16, 16))


def test_huge_images_are_rejected_or_decoded_small_cheaply():
  """10,000 x 10,000: a PNG is refused from its header; a JPEG decodes at
  1/4 scale (PIL's draft mode), never at 300 MB."""
  import time  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match=r"10000x10000 px, more than "
                     r"transforms.MAX_DECODE_PIXELS"):
    transforms.decode(_huge_png())
  buf = io.BytesIO()
  Image.new("RGB", (10_000, 10_000), (30, 140, 220)).save(
      buf, format="JPEG", quality=90)
  start = time.perf_counter()
  img = transforms.decode(buf.getvalue())
  assert img.size == (2500, 2500)
  assert time.perf_counter() - start < 2.0
  np.testing.assert_allclose(np.asarray(img)[1000, 1000], (30, 140, 220),
                             atol=3)


@pytest.mark.parametrize("shape", [(0, 0, 3), (0, 5, 3), (5, 0), (4, 4, 2)])
def test_empty_and_odd_arrays_are_errors(shape):
  with pytest.raises(ValueError, match="px|channels"):
    transforms.decode(np.zeros(shape, np.uint8))


def test_long_captions_are_cut_at_a_word_without_changing_tokens(tok):
  words = " ".join(f"w{i}" for i in range(30_000))
  cut = pipeline.clip_caption(words, 8)
  assert len(cut) <= pipeline.MAX_CAPTION_CHARS and words.startswith(cut)
  assert not cut.endswith(" ") and words[len(cut)] == " "
  np.testing.assert_array_equal(tok.encode([cut], 8), tok.encode([words], 8))
  assert pipeline.clip_caption("short", 8) == "short"
