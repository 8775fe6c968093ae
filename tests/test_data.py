"""Input pipeline and transforms: order, sharding, state, bad data."""

import hashlib
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from clip_jax.data import pipeline, sources, transforms
from clip_jax.data import tokenizer as tokenizer_lib

# ------------------------------------------------------------- transforms --


def test_normalize_matches_numpy_formula():
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (2, 5, 5, 3), dtype=np.uint8)
  mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
  expected = (pixels / 255.0 - np.array(mean)) / np.array(std)
  out = transforms.normalize(pixels, mean, std)
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  clip = (pixels / 255.0 - np.array(transforms.CLIP_MEAN)) / np.array(
      transforms.CLIP_STD)
  np.testing.assert_allclose(transforms.normalize(pixels), clip, atol=1e-5)


def _bands(width=30, height=20):
  """Red left third, green middle, blue right third."""
  pixels = np.zeros((height, width, 3), np.uint8)
  pixels[:, :width // 3, 0] = 255
  pixels[:, width // 3:2 * width // 3, 1] = 255
  pixels[:, 2 * width // 3:, 2] = 255
  return pixels


def test_eval_geometry_is_a_centre_square():
  out = transforms.preprocess_image(_bands(), 10)  # 30x20 -> centre 20x20.
  assert out.shape == (10, 10, 3) and out.dtype == np.uint8
  # The centre square spans x in [5, 25): red, green, blue in thirds of
  # 5/20, 10/20 and 5/20 of its width.
  assert out[5, 0, 0] > 200 and out[5, 5, 1] > 200 and out[5, 9, 2] > 200


def test_random_crop_and_flip_are_functions_of_the_rng():
  image = _bands()
  crop = (0.3, 0.6)
  a = transforms.preprocess_image(image, 8, np.random.default_rng(1),
                                  crop_scale=crop)
  b = transforms.preprocess_image(image, 8, np.random.default_rng(1),
                                  crop_scale=crop)
  np.testing.assert_array_equal(a, b)
  outs = {transforms.preprocess_image(image, 8, np.random.default_rng(s),
                                      crop_scale=crop).tobytes()
          for s in range(10)}
  assert len(outs) > 5
  # Flips are off by default: red always stays on the left of blue.
  for s in range(10):
    out = transforms.preprocess_image(image, 30, np.random.default_rng(s))
    assert out[0, 0, 0] > 200 and out[0, -1, 2] > 200
  flipped = [transforms.preprocess_image(image, 30, np.random.default_rng(s),
                                         flip=True)[0, 0, 2] > 200
             for s in range(20)]
  assert 0 < sum(flipped) < 20


def test_zoom_out_shrinks_the_image_onto_its_border_colour():
  """An area fraction of 4 is a window twice the image's side: the 20 px
  red square of a 30 px white image becomes ~10 px, somewhere inside, and
  the rest is white."""
  image = np.full((30, 30, 3), 255, np.uint8)
  image[5:25, 5:25] = (220, 20, 20)
  places = set()
  for seed in range(8):
    out = transforms.preprocess_image(image, 30, np.random.default_rng(seed),
                                      crop_scale=(4.0, 4.0))
    red = (out[..., 0] > 150) & (out[..., 1] < 100)
    assert 70 <= red.sum() <= 130  # ~10 x 10.
    # No black fill anywhere: red and white both have R >= 220, and so
    # has every blend of them.
    assert out[..., 0].min() > 200
    rows, cols = np.nonzero(red)
    places.add((rows.min(), cols.min()))
  assert len(places) > 4  # The image lands at random places.
  # Up to an area fraction of 1 the window stays inside the image.
  for seed in range(20):
    box = transforms.random_resized_crop_box(30, 20,
                                             np.random.default_rng(seed))
    assert 0 <= box[0] < box[2] <= 30 and 0 <= box[1] < box[3] <= 20


def _smooth_image(size=16):
  """Mid-range colours (no clipping under mild jitter), varied per pixel."""
  y, x = np.mgrid[:size, :size]
  return np.stack([90 + 4 * x, 80 + 3 * y, 140 - 2 * x - y], -1).astype(
      np.uint8)


def _enhance_steps(pixels, b, c, s, grey):
  """PIL's ImageEnhance blends step by step in float: Brightness blends
  with black, Contrast with the mean luminance, Color with each pixel's
  luminance (ITU-R 601 weights)."""
  luma = lambda x: x @ np.array([0.299, 0.587, 0.114])
  x = pixels.astype(np.float64) * b
  mean = luma(x).mean()
  x = mean + c * (x - mean)
  x = luma(x)[..., None] + s * (x - luma(x)[..., None])
  return np.repeat(luma(x)[..., None], 3, -1) if grey else x


@pytest.mark.parametrize("grey", [False, True])
def test_color_jitter_matrices_match_pil_enhance(grey):
  """One affine map == the step-by-step blends; and == PIL itself up to
  PIL's rounding to uint8 after each step."""
  from PIL import ImageEnhance  # pylint: disable=g-import-not-at-top
  pixels = _smooth_image()
  b, c, s = 1.1, 0.8, 1.3
  style = np.array([[b, c, s, float(grey), 0.0]], np.float32)
  a, t = transforms.color_jitter_matrices(pixels[None], style)
  got = pixels.astype(np.float32) @ a[0] + t[0]
  np.testing.assert_allclose(got, _enhance_steps(pixels, b, c, s, grey),
                             rtol=1e-5)
  img = Image.fromarray(pixels)
  for enhance, f in ((ImageEnhance.Brightness, b),
                     (ImageEnhance.Contrast, c), (ImageEnhance.Color, s)):
    img = enhance(img).enhance(f)
  if grey:
    img = img.convert("L").convert("RGB")
  expected = np.asarray(img, np.float32)
  assert 5 < expected.min() and expected.max() < 250  # Nothing clipped.
  # PIL rounds after each step (error <= 1); contrast scales the first
  # error by c and adds its own, saturation scales by s + |1 - s| and adds
  # its own: 1 + (1 + c) * (s + |1 - s|) = 4.04 at most.
  np.testing.assert_allclose(got, expected,
                             atol=1 + (1 + c) * (s + abs(1 - s)))


def test_gaussian_blur_matrices_match_the_gaussian_formula():
  sigma, size = 1.3, 21
  k = transforms.gaussian_blur_matrices(size, np.array([sigma, 0.0, 0.4]))
  np.testing.assert_allclose(k.sum(2), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(k[1], np.eye(size))  # sigma 0: identity.
  # Away from the edges, row i holds exp(-(j - i)^2 / 2 sigma^2), cut at
  # ceil(3 sigma) and normalised.
  offsets = np.arange(-4, 5)
  weights = np.exp(-offsets ** 2 / (2 * sigma ** 2))
  np.testing.assert_allclose(k[0, 10, 6:15], weights / weights.sum(),
                             rtol=1e-6)
  assert np.all(k[0, 10, :6] == 0) and np.all(k[0, 10, 15:] == 0)
  assert np.count_nonzero(k[2, 10]) == 5  # sigma 0.4: taps to ceil(1.2).
  # At an edge the taps beyond it land on the edge pixel.
  np.testing.assert_allclose(k[0, 0, 0], weights[:5].sum() / weights.sum(),
                             rtol=1e-6)


def _blur_reference(x, sigma):
  """Separable Gaussian blur with edge padding, by np.convolve."""
  radius = int(np.ceil(3 * sigma))
  offsets = np.arange(-radius, radius + 1)
  w = np.exp(-offsets ** 2 / (2 * sigma ** 2))
  w /= w.sum()
  blur = lambda v: np.convolve(np.pad(v, radius, mode="edge"), w, "valid")
  return np.apply_along_axis(blur, 1, np.apply_along_axis(blur, 0, x))


def test_apply_style_matches_colour_then_blur_references():
  images = np.stack([_smooth_image(), _smooth_image()[::-1],
                     _smooth_image()[:, ::-1]])
  styles = np.array([[1.1, 0.8, 1.3, 0, 0.0], [0.9, 1.2, 0.7, 0, 0.8],
                     [1.0, 1.1, 0.9, 1, 1.5]], np.float32)
  got = transforms.apply_style(images, styles)
  for image, (b, c, s, grey, sigma), out in zip(images, styles, got):
    expected = _enhance_steps(image, b, c, s, bool(grey))
    if sigma:
      expected = _blur_reference(expected, sigma)
    # float32 against float64 can differ by one at the final rounding.
    np.testing.assert_allclose(out, np.clip(np.rint(expected), 0, 255),
                               atol=1)


def test_style_keeps_a_uniform_grey_uniform():
  """Blur keeps constants and saturation leaves greys alone; brightness and
  contrast move all pixels alike: a uniform grey stays uniform."""
  grey = np.full((10, 8, 8, 3), 128, np.uint8)
  styles = np.stack([transforms.draw_style(np.random.default_rng(seed), 0.4)
                     for seed in range(10)])
  assert (styles[:, 4] > 0).any() and (styles[:, 4] == 0).any()
  out = transforms.apply_style(grey, styles)
  assert all(np.ptp(o) == 0 for o in out)


def test_batched_style_equals_per_image_preprocessing():
  """The pipeline draws each example's style with its own rng and applies
  all of them to the batch; preprocess_image does both per image: the
  same pixels for the same rng."""
  opts = pipeline.PreprocessOptions(image_size=8, context_length=4,
                                    crop_scale=(0.5, 1.0), flip=True,
                                    style_strength=0.4, outline_prob=0.5)

  class NoTokens:
    def encode(self, texts, length, policy):
      return np.zeros((len(texts), length), np.int32)

  prep = pipeline.Preprocess(opts, NoTokens())
  image = np.full((16, 16, 3), 250, np.uint8)
  image[4:12, 3:10] = (200, 30, 30)
  record = {"image": image, "captions": ["red"]}  # One caption: no draw.
  outs = [prep.random_map(record, np.random.default_rng(i))
          for i in range(12)]
  batch = transforms.apply_style(np.stack([o["image"] for o in outs]),
                                 np.stack([o["style"] for o in outs]))
  for i in range(12):
    np.testing.assert_array_equal(batch[i], transforms.preprocess_image(
        image, 8, np.random.default_rng(i), crop_scale=(0.5, 1.0),
        flip=True, style_strength=0.4, outline_prob=0.5))
  assert len({b.tobytes() for b in batch}) == 12


def _ring_reference(ink, width):
  """Pixels with ink within the width x width square around them, but not
  with ink all over their 3 x 3 neighbourhood (inside the image)."""
  h, w = ink.shape
  r = width // 2
  ring = np.zeros_like(ink)
  for y in range(h):
    for x in range(w):
      near = ink[max(0, y - r):y + r + 1, max(0, x - r):x + r + 1].any()
      inside = ink[max(0, y - 1):y + 2, max(0, x - 1):x + 2].all()
      ring[y, x] = near and not inside
  return ring


def _dark_border(out):
  """The square's own border pixels are dark."""
  return all(out[y, x].max() < 90 for y, x in ((10, 15), (21, 15), (15, 10)))


def test_outline_rings_the_silhouette():
  image = np.full((32, 32, 3), 255, np.uint8)
  image[10:22, 10:22] = (200, 30, 30)
  image[14:18, 14:18] = 255  # A hole: outlined from inside too.
  image[0:3, 28:32] = (20, 200, 20)  # Ink at the image's edge.
  ink = image.min(-1) < 245
  widths = set()
  for seed in range(12):
    width, shade = transforms.draw_outline_params(
        np.random.default_rng(seed))
    out = transforms.outline_pixels(image[None], [width], [shade])[0]
    changed = np.any(out != image, axis=-1)
    widths.add(int(changed[5:27, 0:10].any(axis=0).sum()))  # Left of it.
    shade = out[changed][0]
    assert np.all(out[changed] == shade) and shade[0] < 80  # One dark grey.
    # Equal to the ring of some width 1, 3 or 5.
    assert any(np.array_equal(changed, _ring_reference(ink, w))
               for w in (1, 3, 5))
    assert _dark_border(out)
  assert widths == {0, 1, 2}  # Widths 1, 3, 5 all drawn: 0-2 px outside.


def test_batched_outline_equals_the_ring_of_each_width():
  """outline_pixels draws each image's own width and shade in one batch."""
  rng = np.random.default_rng(1)
  pixels = np.full((6, 24, 24, 3), 255, np.uint8)
  for image in pixels:
    for _ in range(3):
      y, x = rng.integers(0, 18, 2)
      image[y:y + 6, x:x + 7] = rng.integers(0, 200, 3)
  widths, shades = [1, 3, 5, 5, 1, 3], [0, 10, 20, 30, 40, 79]
  out = transforms.outline_pixels(pixels, widths, shades)
  for image, width, shade, drawn in zip(pixels, widths, shades, out):
    changed = np.any(drawn != image, axis=-1)
    assert np.all(drawn[changed] == shade)
    ring = _ring_reference(image.min(-1) < 245, width)
    # A ring pixel already of the shade's colour shows no change.
    np.testing.assert_array_equal(changed, ring & np.any(image != shade, -1))


def test_decode_formats():
  rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # Transparent -> white.
  buf = io.BytesIO()
  rgba.save(buf, format="PNG")
  assert (np.asarray(transforms.decode(buf.getvalue())) == 255).all()
  gray = np.full((4, 4), 7, np.uint8)
  assert np.asarray(transforms.decode(gray)).shape == (4, 4, 3)
  with pytest.raises(OSError):  # PIL's UnidentifiedImageError.
    transforms.decode(b"not an image")


# --------------------------------------------------------------- pipeline --


def _config(**overrides):
  c = pipeline.default_data_config()
  c.update(source="synthetic", synthetic_size=48, image_size=4,
           context_length=6, vocab_size=1000, prefetch=2)
  c.update(overrides)
  return c


def _ids(batch):
  """Synthetic examples are identified by their (unique) tokens."""
  return [tuple(row) for row in batch["text"]]


def _synthetic_id_to_index(config):
  source = sources.get_source(config, "train")
  return {tuple(source[i]["tokens"]): i for i in range(len(source))}


def _batches(config, n=None, **kwargs):
  kwargs.setdefault("split", "train")
  kwargs.setdefault("batch_size_per_process", 8)
  kwargs.setdefault("seed", 0)
  kwargs.setdefault("tokenizer", None)
  with pipeline.make_dataset(config, **kwargs) as iterator:
    if n is None:
      return list(iterator)
    return [next(iterator) for _ in range(n)]


def _equal(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_order_is_a_function_of_the_seed():
  config = _config()
  first = _batches(config, 8)
  assert all(_equal(a, b) for a, b in zip(first, _batches(config, 8)))
  other = _batches(config, 8, seed=1)
  assert not all(_equal(a, b) for a, b in zip(first, other))
  batch = first[0]
  assert batch["image"].shape == (8, 4, 4, 3)
  assert batch["image"].dtype == np.uint8  # Normalised on the device.
  assert batch["text"].dtype == np.int32 and batch["text"].shape == (8, 6)
  assert batch["num_skipped"].shape == (8,)
  assert (batch["label"] == -1).all()


def test_epochs_cover_the_data_and_reshuffle():
  config = _config()
  index = _synthetic_id_to_index(config)
  batches = _batches(config, num_epochs=2)
  assert len(batches) == 12  # 2 x 48 / 8.
  seen = [index[t] for b in batches for t in _ids(b)]
  first, second = seen[:48], seen[48:]
  assert sorted(first) == list(range(48)) == sorted(second)
  assert first != second and first != list(range(48))


def test_a_finite_stream_without_a_full_batch_is_an_error():
  with pytest.raises(ValueError, match="48 examples.*no full global batch"):
    _batches(_config(), batch_size_per_process=30, shard_count=2,
             num_epochs=1)


def test_process_shards_are_disjoint_cover_and_equal_one_process():
  config = _config()
  index = _synthetic_id_to_index(config)
  single = _batches(config, batch_size_per_process=8, num_epochs=1)
  shards = [_batches(config, batch_size_per_process=4, num_epochs=1,
                     shard_index=p, shard_count=2) for p in range(2)]
  ids = [[index[t] for b in shard for t in _ids(b)] for shard in shards]
  assert not set(ids[0]) & set(ids[1])
  assert sorted(ids[0] + ids[1]) == list(range(48))
  # Process-ordered concatenation of the shards' batches is the
  # single-process global batch, row for row.
  for step, batch in enumerate(single):
    joined = {k: np.concatenate([shards[0][step][k], shards[1][step][k]])
              for k in batch}
    assert _equal(joined, batch)


def test_restored_state_gives_the_same_following_batches():
  config = _config()
  iterator = pipeline.make_dataset(config, split="train",
                                   batch_size_per_process=5, seed=3,
                                   tokenizer=None)
  for _ in range(7):  # Mid-way through the second epoch (48 examples).
    next(iterator)
  state = iterator.get_state()
  assert isinstance(state, bytes)
  expected = [next(iterator) for _ in range(12)]  # Crosses an epoch end.
  iterator.close()
  restored = pipeline.make_dataset(config, split="train",
                                   batch_size_per_process=5, seed=3,
                                   tokenizer=None)
  restored.set_state(state)
  got = [next(restored) for _ in range(12)]
  restored.close()
  assert all(_equal(a, b) for a, b in zip(expected, got))
  other = pipeline.make_dataset(config, split="train",
                                batch_size_per_process=6, seed=3,
                                tokenizer=None)
  with pytest.raises(ValueError, match="batch_size"):
    other.set_state(state)


def test_worker_processes_give_the_same_batches_and_restore():
  # With augmentation: crops and style draws travel through the workers.
  augment = dict(random_resized_crop=(0.5, 2.0), style_strength=0.4)
  config = _config(**augment)
  in_process = _batches(config, 7)
  # The style is applied: the same crops without it give other pixels.
  unstyled = _batches(_config(random_resized_crop=(0.5, 2.0)), 1)[0]
  np.testing.assert_array_equal(unstyled["text"], in_process[0]["text"])
  assert not np.allclose(unstyled["image"], in_process[0]["image"])
  workers = pipeline.make_dataset(_config(worker_count=2, **augment),
                                  split="train",
                                  batch_size_per_process=8, seed=0,
                                  tokenizer=None)
  with workers:
    got = [next(workers) for _ in range(4)]
    state = workers.get_state()
  assert all(_equal(a, b) for a, b in zip(in_process, got))
  # A state saved with workers restores in-process (and vice versa).
  restored = pipeline.make_dataset(config, split="train",
                                   batch_size_per_process=8, seed=0,
                                   tokenizer=None)
  restored.set_state(state)
  with restored:
    after = [next(restored) for _ in range(3)]
  assert all(_equal(a, b) for a, b in zip(in_process[4:], after))


class ListSource:
  """Records given in a list; label = position."""

  def __init__(self, records):
    self.records = records

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    return {**self.records[i], "label": i, "id": f"rec{i}"}


def _png_bytes(value):
  buf = io.BytesIO()
  Image.new("RGB", (4, 4), (value, value, value)).save(buf, format="PNG")
  return buf.getvalue()


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.train(["a photo of a thing", "another caption"] * 5,
                             40)


def _list_config(monkeypatch, records, **overrides):
  source = ListSource(records)
  monkeypatch.setitem(sources.SOURCES, "list", lambda config, split: source)
  return _config(source="list", **overrides)


def _records(n, bad):
  """n records; those in `bad` are broken in one of three ways."""
  records = []
  for i in range(n):
    record = {"image": _png_bytes(i % 256), "captions": [f"caption {i}"]}
    if i in bad:
      kind = i % 3
      if kind == 0:
        record["image"] = b"\x89PNG broken"
      elif kind == 1:
        record["image"] = f"/nonexistent/{i}.png"
      else:
        record["captions"] = ["", "  "]
    records.append(record)
  return records


def test_bad_examples_are_skipped_and_counted(monkeypatch, tok):
  bad = {3, 7, 8, 20, 31}
  config = _list_config(monkeypatch, _records(40, bad),
                        max_skip_fraction=0.5)
  iterator = pipeline.make_dataset(config, split="train",
                                   batch_size_per_process=5, seed=0,
                                   tokenizer=tok, num_epochs=1)
  batches = list(iterator)
  labels = [int(x) for b in batches for x in b["label"]]
  assert len(batches) == 7  # 35 good examples.
  assert not set(labels) & bad and len(set(labels)) == 35
  assert sum(int(b["num_skipped"].sum()) for b in batches) == 5
  assert iterator.num_skipped == 5
  for b in batches:  # The kept images are the records' own.
    np.testing.assert_array_equal(b["image"][:, 0, 0, 0], b["label"] % 256)


def test_too_many_bad_examples_stop_with_their_ids(monkeypatch, tok):
  bad = set(range(0, 150, 4))  # 25%.
  config = _list_config(monkeypatch, _records(150, bad),
                        max_skip_fraction=0.1)
  iterator = pipeline.make_dataset(config, split="train",
                                   batch_size_per_process=5, seed=0,
                                   tokenizer=tok)
  with pytest.raises(RuntimeError, match=r"max_skip_fraction=0\.1.*rec\d+"):
    for _ in range(100):
      next(iterator)
  iterator.close()
  # A small stream with no usable example at all is an error too.
  config = _list_config(monkeypatch, _records(3, {0, 1, 2}))
  with pytest.raises(RuntimeError, match="3 of the 3 examples"):
    _batches(config, tokenizer=tok, num_epochs=1, batch_size_per_process=1)


def test_training_samples_among_captions(monkeypatch, tok):
  records = [{"image": _png_bytes(0),
              "captions": ["a photo of a thing", "another caption"]}] * 4
  config = _list_config(monkeypatch, records, context_length=16)
  texts = {tok.decode(row) for b in _batches(config, 10, tokenizer=tok,
                                             batch_size_per_process=4)
           for row in b["text"]}
  assert texts == {"a photo of a thing", "another caption"}


def test_caption_hash_is_equal_for_equal_captions_only(monkeypatch, tok):
  """caption_hash: blake2b of the caption's UTF-8 bytes (an independent
  computation here), stable across runs, non-negative int32."""
  records = [{"image": _png_bytes(i), "captions": [c]}
             for i, c in enumerate(["a photo of a thing", "another caption",
                                    "a photo of a thing", "café ☕"])]
  config = _list_config(monkeypatch, records, context_length=16)
  batch = _batches(config, 1, tokenizer=tok, batch_size_per_process=4)[0]
  want = {i: int.from_bytes(hashlib.blake2b(
      records[i]["captions"][0].encode("utf-8"), digest_size=4).digest(),
                            "little") % 2**31 for i in range(4)}
  assert batch["caption_hash"].dtype == np.int32
  assert [int(h) for h in batch["caption_hash"]] == [
      want[int(i)] for i in batch["label"]]
  by_label = dict(zip(batch["label"].tolist(),
                      batch["caption_hash"].tolist()))
  assert by_label[0] == by_label[2] != by_label[1] != by_label[3]
  # Pre-tokenised records hash their token ids (int32 little-endian).
  tokens = [[5, 6, 7], [5, 6], [5, 6, 7], [300]]
  config = _list_config(monkeypatch, [
      {"image": _png_bytes(i), "tokens": t} for i, t in enumerate(tokens)])
  batch = _batches(config, 1, batch_size_per_process=4)[0]
  want = [int.from_bytes(hashlib.blake2b(
      np.asarray(tokens[int(i)], "<i4").tobytes(), digest_size=4).digest(),
                         "little") % 2**31 for i in batch["label"]]
  assert batch["caption_hash"].tolist() == want
  assert len(set(want)) == 3


def test_class_name_caption_names_skin_tone_variants_like_their_class(
    tmp_path):
  """With class_name_caption, training also samples the class name: for
  an emoji skin-tone variant its base's name (from the catalogue), which
  its own captions lack. Evaluation never does."""
  cache = str(tmp_path)
  # The first skin-tone variants of 'train' are its records 60-64.
  root = sources.prepare_emoji(cache, limit=70, verbose=False)
  source = sources.EmojiSource(root, "train")
  name_of = {e.emoji: e.name for e in sources.emoji_catalogue()}
  base_of = {e.emoji: e.base for e in sources.emoji_catalogue()}
  seen = []

  class Recorder:
    def encode(self, texts, length, policy):
      seen.extend(texts)
      return np.zeros((len(texts), length), np.int32)

  def sampled(i):
    opts = pipeline.PreprocessOptions(image_size=8, context_length=4,
                                      class_names=tuple(source.class_names))
    prep = pipeline.Preprocess(opts, Recorder())
    seen.clear()
    for seed in range(30):
      prep.random_map(source[i], np.random.default_rng(seed))
    return set(seen)

  variants = [i for i, r in enumerate(source.records)
              if base_of[r["emoji"]] != r["emoji"]]
  assert len(variants) >= 5
  for i in variants:
    base_name = name_of[base_of[source.records[i]["emoji"]]]
    own = set(source[i]["captions"])
    assert base_name not in own and "skin tone" in source[i]["captions"][0]
    assert sampled(i) == own | {base_name}
  base = next(i for i, r in enumerate(source.records)
              if base_of[r["emoji"]] == r["emoji"])
  assert sampled(base) == set(source[base]["captions"])
  # Retrieval reads every caption of every image: with the option set, it
  # still gets the dataset's own (several images sharing a base name would
  # otherwise make text->image ambiguous).
  from clip_jax.evals import run as eval_run  # pylint: disable=g-import-not-at-top
  config = pipeline.default_data_config()
  config.update(source="emoji", cache_dir=cache, emoji_limit=70,
                image_size=8, class_name_caption=True)
  eval_data = eval_run.make_batches_fn(config, batch_size=32)(
      {"split": "train"}, captions=True)
  got = [c for batch in eval_data for c, m in zip(batch["captions"],
                                                   batch["mask"]) if m]
  assert got == [source[i]["captions"] for i in range(len(source))]


def test_class_name_caption_needs_class_names(monkeypatch, tok):
  config = _list_config(monkeypatch, _records(4, set()),
                        class_name_caption=True)
  with pytest.raises(ValueError, match="has no class names"):
    _batches(config, 1, tokenizer=tok, batch_size_per_process=4)


@pytest.mark.skipif(not os.path.exists(sources.NOTO_FONT),
                    reason="needs fonts-noto-color-emoji (make install)")
def test_emoji_training_batches(tmp_path):
  config = _config(source="emoji", cache_dir=str(tmp_path), emoji_limit=40,
                   image_size=16, context_length=8, vocab_size=512,
                   tokenizer="emoji", random_resized_crop=(0.6, 1.0))
  iterator, size = pipeline.make_train_iterator(config, global_batch_size=16,
                                                seed=0)
  assert 30 < size <= 40
  tok = pipeline.get_tokenizer(config)
  names = set(sources.emoji_class_names("train"))
  with iterator:
    batch = next(iterator)
  assert batch["image"].shape == (16, 16, 16, 3)
  assert ((batch["text"] == 1).sum(axis=1) == 1).all()  # One EOS each.
  assert ((0 <= batch["label"]) & (batch["label"] < len(names))).all()
  root = sources.prepare_emoji(str(tmp_path), limit=40)
  with open(os.path.join(root, "train.json")) as f:
    captions = [c for r in json.load(f)["records"] for c in r["captions"]]
  decoded = {tok.decode(row) for row in batch["text"]}
  assert decoded <= {c.lower() for c in captions} | {
      tok.decode(tok.encode([c.lower()], 8)[0]) for c in captions}


def test_caption_templates_and_style_augmentation_are_seeded(tmp_path):
  """Training captions are wrapped in a template; both are per-record
  random, so the same seed gives the same batch and another seed differs."""
  opts = dict(image_size=8, context_length=4, crop_scale=None, flip=False,
              style_strength=0.4, caption_templates=("a {}", "b {} c"))
  seen = set()

  class Recorder:
    def encode(self, texts, length, policy):
      seen.update(texts)
      return np.zeros((len(texts), length), np.int32)

  prep = pipeline.Preprocess(pipeline.PreprocessOptions(**opts), Recorder())
  image = np.full((16, 16, 3), 128, np.uint8)
  image[4:12, 4:12] = (200, 30, 30)
  outs = [prep.random_map({"image": image, "captions": ["red"]},
                          np.random.default_rng(i)) for i in range(20)]
  assert seen == {"a red", "b red c"}
  again = prep.random_map({"image": image, "captions": ["red"]},
                          np.random.default_rng(3))
  np.testing.assert_array_equal(again["style"], outs[3]["style"])
  styled = transforms.apply_style(np.stack([o["image"] for o in outs]),
                                  np.stack([o["style"] for o in outs]))
  assert len({o.tobytes() for o in styled}) > 10


def test_token_cache_is_bounded_and_changes_nothing(monkeypatch):
  """Preprocess caches tokens per clipped caption; the cache empties past
  its bounds, and the tokens and hashes are those of an uncached run."""
  monkeypatch.setattr(pipeline, "TOKEN_CACHE_CHARS", 200)
  monkeypatch.setattr(pipeline, "TOKEN_CACHE_SIZE", 8)

  class Lengths:
    calls = 0

    def encode(self, texts, length, policy):
      del policy
      Lengths.calls += len(texts)
      return np.array([[len(t)] * length for t in texts], np.int32)

  opts = pipeline.PreprocessOptions(image_size=4, context_length=3)
  prep = pipeline.Preprocess(opts, Lengths())
  image = np.full((4, 4, 3), 9, np.uint8)
  captions = [f"caption {i} " + "x" * (i % 7) for i in range(40)]
  captions.append("y " * 5000)  # Clipped to MAX_CAPTION_CHARS first.
  for caption in captions * 2:
    out = prep.random_map({"image": image, "captions": [caption]},
                          np.random.default_rng(0))
    clipped = pipeline.clip_caption(caption, 3)
    np.testing.assert_array_equal(out["text"], [len(clipped)] * 3)
    assert out["caption_hash"] == pipeline.caption_hash(clipped.encode())
    assert len(prep._token_cache) <= 8  # pylint: disable=protected-access
    assert sum(map(len, prep._token_cache)) <= 200 + len(clipped)  # pylint: disable=protected-access
  repeated = Lengths.calls
  for _ in range(5):  # One caption again and again: tokenised once.
    prep.random_map({"image": image, "captions": ["same"]},
                    np.random.default_rng(0))
  assert Lengths.calls == repeated + 1
