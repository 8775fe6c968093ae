"""Image transforms: decode, resize, random resized crop (zoom in or out),
flip, outline, colour/blur style, normalise.

Pure functions of (image, numpy Generator). The pipeline gives every record
its own Generator, derived by grain from the seed and the record's position
in the stream, so a run is reproducible and a resumed run sees the same
augmentations. `augment_geometry` (per example) returns uint8; the style is
drawn per example (`draw_style`) and applied to whole batches
(`apply_style`), like `normalize`, which turns uint8 into float32.
`preprocess_image` does all of it for one image. The geometry of small RGB
arrays can be split the same way: `plan_geometry` draws it per example,
`apply_geometry` applies it to a batch (the pipeline does, per chunk).

Geometry: without a crop (and always at evaluation) the shorter side is
resized to `size` and the centre `size` x `size` square kept (square images
are just resized). With `crop_scale=(lo, hi)` a random crop of lo..hi of the
area, aspect 3/4..4/3 (Inception-style), is resized to `size` x `size`;
hi > 1 allows windows larger than the image (zoom out).
Horizontal flips are off by default: captions may say 'left' or 'right', and
text in images reads backwards.
"""

from __future__ import annotations

import io
import math
from typing import NamedTuple

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# Larger images are decoded at a reduced scale (JPEG: 1/2, 1/4 or 1/8 of
# the side, chosen by PIL's draft mode without decoding the full size) or,
# when that is impossible, rejected: a 10,000 x 10,000 PNG would take
# 300 MB and seconds to decode, per worker.
MAX_DECODE_PIXELS = 2**25  # 33.5 M, e.g. 5,792 x 5,792.
DRAFT_PIXELS = 2**23  # 8.4 M, e.g. 2,896 x 2,896.


def _open_bounded(data) -> Image.Image:
  """PIL image of encoded bytes / a path / a file, loaded with at most
  MAX_DECODE_PIXELS pixels (raises ValueError if it cannot be)."""
  img = Image.open(data)  # Reads the header only.
  w, h = img.size
  if w == 0 or h == 0:
    raise ValueError(f"The image is {w}x{h} px.")
  if w * h > MAX_DECODE_PIXELS:
    # The smallest reduction to at most DRAFT_PIXELS (plenty for a crop).
    scale = next((s for s in (2, 4, 8)
                  if (w // s) * (h // s) <= DRAFT_PIXELS), 8)
    if img.format == "JPEG":
      img.draft(img.mode, (-(-w // scale), -(-h // scale)))
    if img.size[0] * img.size[1] > MAX_DECODE_PIXELS:
      raise ValueError(
          f"The {img.format} image is {w}x{h} px, more than "
          f"transforms.MAX_DECODE_PIXELS={MAX_DECODE_PIXELS} and not a JPEG "
          "that decodes at a reduced scale; resize it offline.")
  img.load()
  return img


def _sixteen_bit_to_8(img: Image.Image) -> Image.Image:
  """16-bit greyscale (PIL modes I;16*, and I from 16-bit PNGs) -> L, by
  the top 8 bits of the 0..65535 range (PIL's own convert would clip
  everything above 255 to white)."""
  pixels = np.asarray(img).astype(np.int64)
  return Image.fromarray((np.clip(pixels, 0, 65535) >> 8).astype(np.uint8))


def decode(image) -> Image.Image:
  """uint8 array, encoded bytes or a path -> RGB PIL image (raises on bad).

  Transparent pixels (RGBA, LA, palette transparency) become white; CMYK
  and greyscale (8 or 16 bit) become RGB. Images of more than
  MAX_DECODE_PIXELS are decoded at a reduced scale (JPEG) or rejected.
  """
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
      raise ValueError(f"Expected a uint8 [H, W(, C)] image array, got "
                       f"{image.dtype} {image.shape}.")
    if image.ndim == 3 and image.shape[-1] == 1:
      image = image[..., 0]
    if image.ndim == 3 and image.shape[-1] not in (3, 4):
      raise ValueError(f"Expected 1, 3 or 4 channels, got {image.shape}.")
    if 0 in image.shape[:2]:
      raise ValueError(f"The image is {image.shape[1]}x{image.shape[0]} px.")
    img = Image.fromarray(image)
  else:
    if image is None:
      raise ValueError("The source returned no image.")
    if isinstance(image, (bytes, bytearray, memoryview)):
      image = io.BytesIO(image)
    img = _open_bounded(image)
  if img.mode == "RGB":
    return img
  if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
    img = _sixteen_bit_to_8(img)
  if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
    img = img.convert("RGBA")
    background = Image.new("RGBA", img.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, img).convert("RGB")
  return img.convert("RGB")


def random_resized_crop_box(width: int, height: int,
                            rng: np.random.Generator, scale=(0.5, 1.0),
                            ratio=(3 / 4, 4 / 3)):
  """(left, top, right, bottom) of a crop of `scale` x area, aspect `ratio`.

  With scale[1] > 1 the window may be larger than the image (zoom out: the
  image lands at a random place inside it; augment_geometry fills the rest
  with the border colour). Up to 10 tries; then the largest centred crop
  of an aspect in `ratio`.
  """
  area = width * height
  zoom_out = scale[1] > 1
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(10):
    # One call for the try's four uniforms: a Generator call costs ~1 us.
    u_area, u_aspect, u_x, u_y = rng.random(4)
    target = area * (scale[0] + (scale[1] - scale[0]) * u_area)
    aspect = math.exp(log_lo + (log_hi - log_lo) * u_aspect)
    w = round(math.sqrt(target * aspect))
    h = round(math.sqrt(target / aspect))
    if 0 < w and 0 < h and (zoom_out or (w <= width and h <= height)):
      # x uniform over the min(0, width - w) .. max(0, width - w) places.
      x = min(0, width - w) + int(u_x * (abs(width - w) + 1))
      y = min(0, height - h) + int(u_y * (abs(height - h) + 1))
      return x, y, x + w, y + h
  aspect = min(max(width / height, ratio[0]), ratio[1])
  w, h = (width, round(width / aspect)) if width / height < aspect else (
      round(height * aspect), height)
  w, h = min(w, width), min(h, height)
  x, y = (width - w) // 2, (height - h) // 2
  return x, y, x + w, y + h


def border_colours(pixels: np.ndarray) -> np.ndarray:
  """uint8 [B, H, W, 3] -> int [B, 3]: per channel, the mean of the middle
  two of the four corner pixels (white for emoji renderings): the fill
  around a zoomed-out image."""
  corners = np.sort(pixels[:, [0, 0, -1, -1], [0, -1, 0, -1]].astype(int),
                    axis=1)
  return (corners[:, 1] + corners[:, 2]) // 2


def border_colour(img: Image.Image) -> tuple:
  """border_colours of one PIL image, as a tuple."""
  return tuple(int(v) for v in border_colours(np.asarray(img)[None])[0])


def pad_to_box(img: Image.Image, box):
  """(image, box): when `box` reaches outside `img`, the image on a canvas
  of its border colour that holds the box, and the box moved with it."""
  left, top = max(0, -box[0]), max(0, -box[1])
  right, bottom = max(0, box[2] - img.width), max(0, box[3] - img.height)
  if not (left or top or right or bottom):
    return img, box
  canvas = Image.new("RGB", (img.width + left + right,
                             img.height + top + bottom), border_colour(img))
  canvas.paste(img, (left, top))
  return canvas, (box[0] + left, box[1] + top, box[2] + left, box[3] + top)


def center_square_box(width: int, height: int):
  """The largest centred square."""
  side = min(width, height)
  x, y = (width - side) // 2, (height - side) // 2
  return x, y, x + side, y + side


LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601, as PIL's L.
# Style parameters of one example (draw_style -> apply_style), float32 [5]:
# brightness, contrast, saturation factors, greyscale (0 | 1), blur sigma in
# output pixels (0 = no blur).
NO_STYLE = np.array([1, 1, 1, 0, 0], np.float32)


def draw_style(rng: np.random.Generator, strength: float,
               blur_scale: float = 1.0) -> np.ndarray:
  """Random style parameters (NO_STYLE's layout): brightness, contrast and
  saturation factors in [1 - strength, 1 + strength], greyscale with
  probability strength / 2, Gaussian blur with probability 1/2 (sigma
  0.1..2 source pixels, times `blur_scale` = output / source size).

  They make the shading, palette and line detail of one renderer
  unreliable cues (the emoji demo trains on one style, tests on another).
  All of it commutes with resizing (the blur once its sigma is scaled), so
  it is applied to the small output images, a whole batch at a time
  (apply_style)."""
  u = rng.random(6)  # One Generator call (~1 us each).
  factors = 1 - strength + 2 * strength * u[:3]
  grey = float(u[3] < strength / 2)
  sigma = (0.1 + 1.9 * u[4]) * blur_scale if u[5] < 0.5 else 0.0
  return np.array([*factors, grey, sigma], np.float32)


def color_jitter_matrices(pixels: np.ndarray, style: np.ndarray):
  """(A [B, 3, 3], t [B, 3]) with x -> x @ A + t equal, per image, to PIL's
  ImageEnhance.Brightness, .Contrast, .Color in that order (then optional
  greyscale), up to PIL's rounding and clipping between the steps.

  All four are linear in the pixel values, so they compose into one map:
  brightness scales by b; contrast blends towards the mean luminance m of
  the brightened image, x -> c x + (1 - c) m; saturation blends each pixel
  towards its own luminance, x -> s x + (1 - s) luma(x), which leaves the
  grey (1 - c) m unchanged because the luma weights sum to 1; greyscale
  replaces every channel by the luminance.
  """
  b, c, s, grey = (style[:, i, None] for i in range(4))
  mean_luma = b[:, 0] * (pixels.reshape(len(pixels), -1, 3).mean(1) @ LUMA)
  column = np.where(grey > 0, 1.0, 1 - s)  # [B, 1]: weight of luma(x).
  a = (b * c)[:, :, None] * LUMA[None, :, None] * column[:, None, :]
  a = a + ((b * c * s) * (grey == 0))[:, :, None] * np.eye(3)
  t = np.repeat(((1 - c[:, 0]) * mean_luma)[:, None], 3, axis=1)
  return a.astype(np.float32), t.astype(np.float32)


def gaussian_blur_matrices(size: int, sigmas: np.ndarray) -> np.ndarray:
  """[B, size, size] K with K[i] @ column = that column blurred by a
  Gaussian of standard deviation sigmas[i] px (0: identity), taps out to
  3 sigma, edges extended (rows sum to 1)."""
  sigmas = np.asarray(sigmas, np.float64)
  radius = max(1, int(np.ceil(3 * sigmas.max(initial=0.0))))
  offsets = np.arange(-radius, radius + 1)
  safe = np.maximum(sigmas, 1e-6)[:, None]
  weights = np.exp(-0.5 * (offsets / safe) ** 2)
  weights *= np.abs(offsets) <= np.ceil(3 * safe)
  weights /= weights.sum(1, keepdims=True)
  taps = np.clip(np.arange(size)[:, None] + offsets, 0, size - 1)
  one_hot = (taps[..., None] == np.arange(size)).astype(np.float64)
  return np.einsum("bt,itj->bij", weights, one_hot).astype(np.float32)


def apply_style(images: np.ndarray, style: np.ndarray) -> np.ndarray:
  """uint8 [B, H, W, 3] with style parameters [B, 5] (draw_style) ->
  uint8 [B, H, W, 3]: one colour matrix and two blur matmuls per image,
  batched."""
  n, h, w, _ = images.shape
  a, t = color_jitter_matrices(images, style)
  x = images.astype(np.float32).reshape(n, h * w, 3) @ a + t[:, None]
  x = x.reshape(n, h, w, 3)
  blurred = style[:, 4] > 0
  if blurred.any():
    y, sig = x[blurred], style[blurred, 4]
    k = len(y)
    y = (gaussian_blur_matrices(h, sig) @ y.reshape(k, h, w * 3)).reshape(
        k, h, w, 3)  # Along columns of pixels (rows of the image).
    y = gaussian_blur_matrices(w, sig)[:, None] @ y  # Along each row.
    x[blurred] = y
  return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _dilate(mask: np.ndarray, width: int) -> np.ndarray:
  """Boolean [..., H, W] masks grown by a width x width square (width
  odd); outside the image counts as unset."""
  r = width // 2
  out = mask.copy()
  for axis in (-2, -1):
    grown = out.copy()
    for shift in range(1, r + 1):
      lo = [slice(None)] * mask.ndim
      hi = [slice(None)] * mask.ndim
      lo[axis], hi[axis] = slice(shift, None), slice(None, -shift)
      grown[tuple(lo)] |= out[tuple(hi)]
      grown[tuple(hi)] |= out[tuple(lo)]
    out = grown
  return out


def draw_outline_params(rng: np.random.Generator,
                        max_width: int = 5) -> tuple[int, int]:
  """(width, shade) of an outline: width odd in 1..max_width px, shade a
  dark grey in 0..79."""
  u_width, u_shade = rng.random(2)
  return 2 * int(u_width * (max_width // 2 + 1)) + 1, int(u_shade * 80)


def outline_pixels(pixels: np.ndarray, widths, shades) -> np.ndarray:
  """uint8 [B, H, W, 3] with a dark contour drawn around the silhouette of
  what is drawn on a near-white background, widths[i] px wide (odd) in
  grey shades[i]: line-art styles outline their shapes, photographic and
  shaded ones do not."""
  widths, shades = np.asarray(widths), np.asarray(shades, np.uint8)
  # Not near-white (np.minimum: a reduction over the size-3 axis is slow).
  ink = np.minimum(np.minimum(pixels[..., 0], pixels[..., 1]),
                   pixels[..., 2]) < 245
  inner = ~_dilate(~ink, 3)   # Eroded by one pixel.
  grown, ring = ink, np.zeros_like(ink)
  for width in range(1, int(widths.max(initial=1)) + 1, 2):
    if width > 1:  # A 3x3 square twice is a 5x5 square.
      grown = _dilate(grown, 3)
    ring[widths == width] = grown[widths == width]
  ring &= ~inner
  # Not np.where(ring[..., None], ...): numpy broadcasts over a size-3
  # axis slowly.
  out = pixels.copy()
  drawn = np.flatnonzero(ring)
  out.reshape(-1, 3)[drawn] = shades[drawn // ring[0].size, None]
  return out


class Geometry(NamedTuple):
  """One example's geometric draws: the crop box in source pixels (it may
  reach outside the image: zoom out), the outline's width (0: none) and
  shade, and the horizontal flip (0 | 1). Flat ints, so that
  np.array(geometries) is one [B, 7] array."""
  left: int
  top: int
  right: int
  bottom: int
  outline_width: int = 0
  outline_shade: int = 0
  flip: int = 0

  @property
  def box(self) -> tuple:
    return self[:4]

  def output_scale(self, size: int) -> float:
    """Output / source pixels of the crop at `size` px."""
    return size / (self.right - self.left)


def plan_geometry(width: int, height: int, rng: np.random.Generator | None,
                  *, crop_scale=None, flip: bool = False,
                  outline_prob: float = 0.0) -> Geometry:
  """The draws of augment_geometry for a width x height source, in its
  order: crop box, outline, flip (rng=None: the centre square)."""
  if rng is not None and crop_scale is not None:
    box = random_resized_crop_box(width, height, rng, scale=tuple(crop_scale))
  else:
    box = center_square_box(width, height)
  outline = (0, 0)
  if rng is not None and outline_prob > 0 and rng.random() < outline_prob:
    outline = draw_outline_params(rng)
  flipped = int(rng is not None and flip and rng.random() < 0.5)
  return Geometry(*box, *outline, flipped)


def _bicubic(t: np.ndarray) -> np.ndarray:
  """PIL's bicubic kernel (a = -0.5), support [-2, 2]."""
  t = np.abs(t)
  near = (1.5 * t - 2.5) * t * t + 1
  far = ((-0.5 * t + 2.5) * t - 4) * t + 2
  return np.where(t < 1, near, far) * (t < 2)


def resize_weights(lo, hi, length: int, size: int) -> np.ndarray:
  """float [B, size, length]: row i resamples output pixel i of the window
  [lo, hi) (one per example; integers, may reach outside [0, length)) from
  the source's `length` pixels, as PIL's bicubic resize of an image padded
  to hold the window: the kernel widened by the reduction (antialiasing),
  normalised over the padded image. The padding's own weight is
  1 - row sum."""
  lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
  scale = (hi - lo) / size
  widen = np.maximum(scale, 1.0)[:, None, None]
  centres = (lo[:, None] + (np.arange(size) + 0.5) * scale[:, None])[..., None]
  # The kernel's taps only: 2 x (2 x widen) around each centre.
  reach = int(np.ceil(2 * widen.max())) + 1
  taps = np.floor(centres) + np.arange(-reach, reach + 1)  # [B, size, T]
  weights = _bicubic((taps + 0.5 - centres) / widen)
  weights *= (taps >= np.minimum(lo, 0)[:, None, None]) & (
      taps < np.maximum(hi, length)[:, None, None])  # In the padded image.
  weights /= weights.sum(-1, keepdims=True)
  # Scattered onto the source's pixels; taps outside land in two spare
  # columns, dropped.
  dense = np.zeros((*taps.shape[:2], length + 2))
  np.put_along_axis(dense, np.clip(taps, -1, length).astype(np.int64) + 1,
                    weights, axis=-1)
  return dense[..., 1:-1]


# resize_weights of windows seen before, float32 [size, length] by
# (lo, hi, length, size): a source of one size has few distinct windows
# (~1,400 for the demo's 64 px crops), so after warm-up all are here.
# Emptied when full (at most ~70 MB: batchable_pixels bounds size x
# length).
_WINDOW_WEIGHTS: dict = {}
_WINDOW_WEIGHTS_MAX = 2048


def _cached_resize_weights(lo, hi, length: int, size: int) -> np.ndarray:
  """resize_weights as float32 [B, size, length], from _WINDOW_WEIGHTS.

  Read into a local dict first: grain's read threads share the cache, and
  another thread may empty it meanwhile."""
  keys = [(int(a), int(b), length, size) for a, b in zip(lo, hi)]
  found = {k: _WINDOW_WEIGHTS.get(k) for k in set(keys)}
  missing = [k for k, weights in found.items() if weights is None]
  if missing:
    new = resize_weights([k[0] for k in missing], [k[1] for k in missing],
                         length, size).astype(np.float32)
    if len(_WINDOW_WEIGHTS) + len(missing) > _WINDOW_WEIGHTS_MAX:
      _WINDOW_WEIGHTS.clear()
    for key, weights in zip(missing, new):
      found[key] = _WINDOW_WEIGHTS[key] = weights
  return np.stack([found[k] for k in keys])


def _round_to_uint8(x: np.ndarray) -> np.ndarray:
  return np.clip(np.floor(x + 0.5), 0, 255).astype(np.uint8)


def apply_geometry(pixels: np.ndarray, geometries, size: int) -> np.ndarray:
  """uint8 [B, H, W, 3] sources and their Geometry draws -> uint8
  [B, size, size, 3]: outline, crop (padded with border_colours outside
  the image), bicubic resize, flip, as augment_geometry does with PIL,
  for the whole batch in two batched matmuls: along columns, rounded,
  then along rows (PIL goes along rows first: the pixels are within 2 of
  PIL's resize of the transposed image, over 99% of them equal).

  The padding never materialises: resizing the padded image is resizing
  the image with the weights of its own pixels, plus the border times
  the rest of the weight.
  """
  n, height, width, _ = pixels.shape
  left, top, right, bottom, widths, shades, flips = np.array(
      geometries, np.int64).reshape(n, 7).T
  if widths.any():
    drawn = widths > 0
    pixels = pixels.copy()
    pixels[drawn] = outline_pixels(pixels[drawn], widths[drawn],
                                   shades[drawn])
  border = border_colours(pixels).astype(np.float32)  # [B, 3]
  along_y = _cached_resize_weights(top, bottom, height, size)
  along_x = _cached_resize_weights(left, right, width, size)
  flips = flips.astype(bool)
  along_x[flips] = along_x[flips, ::-1]
  # Along columns first: [B, size, H] @ [B, H, W x 3], no transposes
  # (numpy's strided copies of the source would cost more than the
  # matmuls). Then along rows, through [W x 3, size x 3] weights that keep
  # the channels apart. The padding's share: its weight (1 - the row's
  # sum) times the border.
  pad_y = 1 - along_y.sum(-1)  # [B, size]
  cols = along_y @ pixels.reshape(n, height, width * 3).astype(np.float32)
  cols += pad_y[:, :, None] * np.tile(border, width)[:, None, :]
  cols = _round_to_uint8(cols).astype(np.float32)  # PIL rounds here too.
  per_channel = np.zeros((n, width, 3, size, 3), np.float32)
  for c in range(3):
    per_channel[:, :, c, :, c] = along_x.transpose(0, 2, 1)
  out = cols @ per_channel.reshape(n, width * 3, size * 3)
  pad_x = 1 - along_x.sum(-1)
  out += (pad_x[:, :, None] * border[:, None, :]).reshape(n, 1, size * 3)
  return _round_to_uint8(out).reshape(n, size, size, 3)


# Arrays whose batched resize (apply_geometry) takes at most this many
# multiply-adds per image go through it; larger ones through PIL, whose
# resize touches only the kernel's taps (a dense matmul does S / 4 times
# the arithmetic of a reduction to S px, at ~20x the speed per op).
BATCHED_RESIZE_MAX_MACS = 2**23


def batchable_pixels(image, size: int) -> np.ndarray | None:
  """`image` as uint8 [H, W, 3] when it is an RGB array that apply_geometry
  resizes cheaply (BATCHED_RESIZE_MAX_MACS); None for anything else
  (encoded bytes, paths, grey or RGBA arrays, large arrays: decode())."""
  if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and
          image.ndim == 3 and image.shape[-1] == 3 and 0 not in image.shape):
    return None
  height, width, _ = image.shape
  # Along columns ([S, H] @ [H, 3W]), then rows ([S, 3W] @ [3W, 3S]).
  macs = 3 * size * height * width + 9 * size * width * size
  return image if macs <= BATCHED_RESIZE_MAX_MACS else None


JPEG_DECODERS = ("pillow", "pillow_draft", "simplejpeg")


def _is_jpeg(image) -> bool:
  return (isinstance(image, (bytes, bytearray, memoryview)) and
          bytes(image[:3]) == b"\xff\xd8\xff")


def jpeg_size(data: bytes, decoder: str) -> tuple[int, int]:
  """(width, height) from a JPEG's header."""
  if decoder == "simplejpeg":
    import simplejpeg  # pylint: disable=g-import-not-at-top
    height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    return width, height
  return Image.open(io.BytesIO(data)).size


def decode_jpeg_at_least(data: bytes, min_size, decoder: str):
  """RGB PIL image of a JPEG decoded at a reduced scale (DCT scaling, no
  full-size decode) whose sides are still >= min_size (w, h).

  'pillow_draft': PIL's draft mode (scales 1/1, 1/2, 1/4, 1/8);
  'simplejpeg': libjpeg-turbo's n/8 scales. A JPEG simplejpeg refuses
  (CMYK, or an error it calls recoverable) goes to Pillow: decode()."""
  if decoder == "simplejpeg":
    import simplejpeg  # pylint: disable=g-import-not-at-top
    try:
      pixels = simplejpeg.decode_jpeg(data, colorspace="RGB",
                                      min_width=min_size[0],
                                      min_height=min_size[1])
      return Image.fromarray(pixels)
    except ValueError:
      pass
  img = Image.open(io.BytesIO(data))
  img.draft("RGB", tuple(min_size))
  img.load()
  return img if img.mode == "RGB" else decode(data)


def _reduced_jpeg(image, box, size, decoder):
  """(RGB image, `box` in its pixels): the JPEG decoded at the smallest
  scale that keeps the box (drawn from the header's full size) at least
  `size` px a side (the full scale for a zoom-out box or an image past
  MAX_DECODE_PIXELS)."""
  w, h = jpeg_size(image, decoder)
  inside = box[0] >= 0 and box[1] >= 0 and box[2] <= w and box[3] <= h
  if not inside or w * h > MAX_DECODE_PIXELS or 0 in (w, h):
    return decode(image), box
  box_w, box_h = box[2] - box[0], box[3] - box[1]
  need = (min(w, -(-w * size // box_w)), min(h, -(-h * size // box_h)))
  img = decode_jpeg_at_least(image, need, decoder)
  sx, sy = img.width / w, img.height / h
  # Clamped: rounding must not put the box a hair outside the image.
  return img, (max(0.0, box[0] * sx), max(0.0, box[1] * sy),
               min(float(img.width), box[2] * sx),
               min(float(img.height), box[3] * sy))


# How evaluation (rng=None) makes a square image (config.data.eval_resize):
#   center_square  crop the largest centred square, resize it (the default);
#   shortest_side  resize the shorter side to S, then crop the centre S x S
#                  (OpenAI CLIP's and HF CLIPImageProcessor's preprocessing);
#   squash         resize the whole image to S x S (SigLIP's).
EVAL_RESIZES = ("center_square", "shortest_side", "squash")


def _eval_square(img: Image.Image, size: int, mode: str) -> np.ndarray:
  """uint8 [size, size, 3] by one of EVAL_RESIZES other than the default."""
  if mode == "squash":
    return np.asarray(img.resize((size, size), Image.BICUBIC))
  if mode != "shortest_side":
    raise ValueError(f"config.data.eval_resize={mode!r} is not one of "
                     f"{EVAL_RESIZES}.")
  w, h = img.size
  # The longer side as HF's get_resize_output_image_size rounds it (down).
  new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
  if new != img.size:
    img = img.resize(new, Image.BICUBIC)
  left, top = (new[0] - size) // 2, (new[1] - size) // 2
  return np.asarray(img.crop((left, top, left + size, top + size)))


def augment_geometry(image, size: int, rng: np.random.Generator | None = None,
                     *, crop_scale=None, flip: bool = False,
                     outline_prob: float = 0.0, jpeg_decoder: str = "pillow",
                     eval_resize: str = "center_square"):
  """Decode -> (outline) -> crop (random, or centre square) -> resize ->
  (flip). Returns (uint8 [size, size, 3], output / source scale of the
  crop). `rng=None` (evaluation) means no random crop, outline or flip,
  and the square is made as `eval_resize` says (EVAL_RESIZES).

  Small RGB arrays (batchable_pixels) are resized by apply_geometry, the
  rest by PIL (bicubic both). jpeg_decoder (JPEG bytes only): 'pillow'
  decodes at full size; 'pillow_draft' / 'simplejpeg' draw the crop from
  the header's size and decode at the smallest DCT scale that keeps the
  crop >= size px a side (the same crops; pixels differ by resampling
  only)."""
  if rng is None and eval_resize != "center_square":
    img = decode(image)
    pixels = _eval_square(img, size, eval_resize)
    return np.ascontiguousarray(pixels), size / min(img.size)
  draws = dict(crop_scale=crop_scale, flip=flip, outline_prob=outline_prob)
  pixels = batchable_pixels(image, size)
  if pixels is not None:
    geometry = plan_geometry(pixels.shape[1], pixels.shape[0], rng, **draws)
    return (apply_geometry(pixels[None], [geometry], size)[0],
            geometry.output_scale(size))
  if jpeg_decoder != "pillow" and _is_jpeg(image):
    geometry = plan_geometry(*jpeg_size(image, jpeg_decoder), rng, **draws)
    img, box = _reduced_jpeg(image, geometry.box, size, jpeg_decoder)
  else:
    img = decode(image)
    geometry = plan_geometry(*img.size, rng, **draws)
    box = geometry.box
  if geometry.outline_width:
    img = Image.fromarray(outline_pixels(
        np.asarray(img)[None], [geometry.outline_width],
        [geometry.outline_shade])[0])
  img, box = pad_to_box(img, box)
  if tuple(box) != (0, 0, *img.size) or img.size != (size, size):
    img = img.resize((size, size), Image.BICUBIC, box=box)
  pixels = np.asarray(img)
  if geometry.flip:
    pixels = pixels[:, ::-1]
  return np.ascontiguousarray(pixels), geometry.output_scale(size)


def preprocess_image(image, size: int, rng: np.random.Generator | None = None,
                     *, crop_scale=None, flip: bool = False,
                     style_strength: float = 0.0,
                     outline_prob: float = 0.0,
                     eval_resize: str = "center_square") -> np.ndarray:
  """augment_geometry, then (style): uint8 [size, size, 3].

  One image at a time; the training pipeline makes the same draws from the
  same rng but applies the style to whole batches (apply_style).
  """
  pixels, scale = augment_geometry(image, size, rng, crop_scale=crop_scale,
                                   flip=flip, outline_prob=outline_prob,
                                   eval_resize=eval_resize)
  if rng is not None and style_strength > 0:
    style = draw_style(rng, style_strength, blur_scale=scale)
    pixels = apply_style(pixels[None], style[None])[0]
  return pixels


def normalize(pixels: np.ndarray, mean=CLIP_MEAN, std=CLIP_STD) -> np.ndarray:
  """uint8 [..., 3] -> float32 (pixels / 255 - mean) / std."""
  scale = 1.0 / (255.0 * np.asarray(std, np.float32))
  offset = np.asarray(mean, np.float32) / np.asarray(std, np.float32)
  return pixels.astype(np.float32) * scale - offset
