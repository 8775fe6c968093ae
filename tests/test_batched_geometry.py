"""Batched geometry (transforms.apply_geometry) against PIL, and chunked
against per example."""

import io

import numpy as np
import pytest
from PIL import Image

from clip_jax.data import pipeline, transforms


def _shapes(rng, size=40):
  """A white image with coloured rectangles and a dark line: sharp edges
  (where bicubic overshoots and clips) and flat areas."""
  image = np.full((size, size, 3), 255, np.uint8)
  for _ in range(4):
    y, x = rng.integers(0, size - 8, 2)
    h, w = rng.integers(4, size // 2, 2)
    image[y:y + h, x:x + w] = rng.integers(0, 256, 3)
  image[rng.integers(size), :] = 10
  return image


def _pil_transposed(pixels, geometry, size):
  """PIL's resize of the transposed image (PIL resizes along rows first,
  apply_geometry along columns first), padded by pad_to_box, transposed
  back and flipped: the reference for apply_geometry's resize."""
  if geometry.outline_width:
    pixels = transforms.outline_pixels(pixels[None], [geometry.outline_width],
                                       [geometry.outline_shade])[0]
  img = Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 0, 2)))
  left, top, right, bottom = geometry.box
  img, box = transforms.pad_to_box(img, (top, left, bottom, right))
  out = np.asarray(img.resize((size, size), Image.BICUBIC, box=box))
  out = out.transpose(1, 0, 2)
  return out[:, ::-1] if geometry.flip else out


@pytest.mark.parametrize("size,draws", [
    (12, dict(crop_scale=(0.35, 2.0), flip=True, outline_prob=0.5)),
    (12, {}),  # The centre square.
    (64, dict(crop_scale=(0.3, 1.0), flip=True)),  # Upsampling.
])
def test_apply_geometry_matches_pil(size, draws):
  """Crop (zooming out onto the border colour), antialiased bicubic
  resize and flip of a whole batch equal PIL's per image, up to rounding:
  PIL's fixed-point weights move intermediate values that sit near .5 by
  one level. Within 2 levels, and over 99% of values exactly."""
  rng = np.random.default_rng(size)
  pixels = np.stack([_shapes(rng) for _ in range(24)])
  geometries = [transforms.plan_geometry(40, 40, rng, **draws)
                for _ in range(24)]
  if draws.get("crop_scale", (0, 0))[1] > 1:  # Zoom-outs are in the batch.
    assert any(g.left < 0 or g.bottom > 40 for g in geometries)
  got = transforms.apply_geometry(pixels, geometries, size)
  expected = np.stack([_pil_transposed(p, g, size)
                       for p, g in zip(pixels, geometries)])
  diff = np.abs(got.astype(int) - expected)
  assert diff.max() <= 2
  assert (diff > 0).mean() < 1e-2


def test_augment_geometry_routes_small_arrays_through_apply_geometry():
  """An RGB array within BATCHED_RESIZE_MAX_MACS takes the batched path;
  encoded bytes, grey arrays and large arrays take PIL's."""
  rng = np.random.default_rng(0)
  image = _shapes(rng)
  assert transforms.batchable_pixels(image, 12) is image
  assert transforms.batchable_pixels(image[..., 0], 12) is None
  assert transforms.batchable_pixels(image.tobytes(), 12) is None
  assert transforms.batchable_pixels(np.zeros((2000, 2000, 3), np.uint8),
                                     224) is None
  draws = dict(crop_scale=(0.5, 2.0), flip=True, outline_prob=0.5)
  for seed in range(5):
    got, scale = transforms.augment_geometry(
        image, 12, np.random.default_rng(seed), **draws)
    geometry = transforms.plan_geometry(40, 40, np.random.default_rng(seed),
                                        **draws)
    np.testing.assert_array_equal(
        got, transforms.apply_geometry(image[None], [geometry], 12)[0])
    assert scale == 12 / (geometry.right - geometry.left)


def test_window_weights_cache_survives_overflow(monkeypatch):
  monkeypatch.setattr(transforms, "_WINDOW_WEIGHTS", {})
  monkeypatch.setattr(transforms, "_WINDOW_WEIGHTS_MAX", 5)
  lo, hi = np.array([-7, 0, 3, 0, 2, 9, -1]), np.array([30, 20, 25, 40, 8,
                                                       40, 12])
  for part in (slice(0, 3), slice(2, 7), slice(0, 7)):
    got = transforms._cached_resize_weights(lo[part], hi[part], 40, 12)  # pylint: disable=protected-access
    expected = transforms.resize_weights(lo[part], hi[part], 40, 12)
    np.testing.assert_allclose(got, expected, atol=1e-7)
    assert len(transforms._WINDOW_WEIGHTS) <= 7  # pylint: disable=protected-access


class _NoTokens:
  def encode(self, texts, length, policy):
    del policy
    return np.array([[len(t)] * length for t in texts], np.int32)


def test_chunk_geometry_equals_per_example_geometry():
  """Preprocess(chunk_geometry=True) leaves small arrays' geometry to
  _stack_chunk, which resizes them per source shape; the chunk equals
  per-example preprocessing with the same generators, bad records and
  encoded images included."""
  opts = pipeline.PreprocessOptions(image_size=12, context_length=4,
                                    crop_scale=(0.35, 2.0), flip=True,
                                    outline_prob=0.4, style_strength=0.5)
  rng = np.random.default_rng(2)
  records = [{"image": _shapes(rng, 40 if i % 3 else 24),
              "captions": [f"c{i}"]} for i in range(14)]
  records[5] = {"image": np.zeros((0, 4, 3), np.uint8), "captions": ["x"]}
  raw = _shapes(rng).tobytes()  # Not an encoded image: a bad record.
  records[7] = {"image": raw, "captions": ["y"]}
  buf = io.BytesIO()
  Image.fromarray(_shapes(rng)).save(buf, "PNG")
  records[9] = {"image": buf.getvalue(), "captions": ["z"]}
  chunked = pipeline.Preprocess(opts, _NoTokens(), chunk_geometry=True)
  single = pipeline.Preprocess(opts, _NoTokens())
  rows = [chunked.random_map(r, np.random.default_rng(i))
          for i, r in enumerate(records)]
  assert sum("geometry" in r for r in rows) == 11  # Not the bytes, bad.
  chunk = pipeline._stack_chunk(rows)  # pylint: disable=protected-access
  for i, record in enumerate(records):
    expected = single.random_map(record, np.random.default_rng(i))
    assert chunk["valid"][i] == expected["valid"]
    np.testing.assert_array_equal(chunk["style"][i], expected["style"])
    if expected["valid"]:
      np.testing.assert_array_equal(chunk["image"][i], expected["image"])
  assert not chunk["valid"][5] and not chunk["valid"][7]
  assert "geometry" not in chunk
