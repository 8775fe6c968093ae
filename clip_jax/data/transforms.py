"""Image transforms: decode, resize, random resized crop (zoom in or out),
flip, outline, colour/blur style, normalise.

Pure functions of (image, numpy Generator). The pipeline gives every record
its own Generator, derived by grain from the seed and the record's position
in the stream, so a run is reproducible and a resumed run sees the same
augmentations. `augment_geometry` (per example) returns uint8; the style is
drawn per example (`draw_style`) and applied to whole batches
(`apply_style`), like `normalize`, which turns uint8 into float32.
`preprocess_image` does all of it for one image.

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
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
    w = round(np.sqrt(target * aspect))
    h = round(np.sqrt(target / aspect))
    if 0 < w and 0 < h and (zoom_out or (w <= width and h <= height)):
      x = int(rng.integers(min(0, width - w), max(0, width - w) + 1))
      y = int(rng.integers(min(0, height - h), max(0, height - h) + 1))
      return x, y, x + w, y + h
  aspect = min(max(width / height, ratio[0]), ratio[1])
  w, h = (width, round(width / aspect)) if width / height < aspect else (
      round(height * aspect), height)
  w, h = min(w, width), min(h, height)
  x, y = (width - w) // 2, (height - h) // 2
  return x, y, x + w, y + h


def border_colour(img: Image.Image) -> tuple:
  """Per-channel median of the four corner pixels (white for emoji
  renderings): the fill around a zoomed-out image."""
  w, h = img.size
  corners = [img.getpixel(xy) for xy in ((0, 0), (w - 1, 0), (0, h - 1),
                                         (w - 1, h - 1))]
  middles = (sorted(channel)[1:3] for channel in zip(*corners))
  return tuple((lo + hi) // 2 for lo, hi in middles)


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
  factors = rng.uniform(1 - strength, 1 + strength, size=3)
  grey = float(rng.random() < strength / 2)
  sigma = float(rng.uniform(0.1, 2.0)) * blur_scale
  sigma = sigma if rng.random() < 0.5 else 0.0
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
  """Boolean [H, W] mask grown by a width x width square (width odd)."""
  r = width // 2
  out = mask.copy()
  for axis in (0, 1):
    grown = out.copy()
    for shift in range(1, r + 1):
      lo = [slice(None)] * 2
      hi = [slice(None)] * 2
      lo[axis], hi[axis] = slice(shift, None), slice(None, -shift)
      grown[tuple(lo)] |= out[tuple(hi)]
      grown[tuple(hi)] |= out[tuple(lo)]
    out = grown
  return out


def draw_outline(img: Image.Image, rng: np.random.Generator,
                 max_width: int = 5) -> Image.Image:
  """Draws a dark contour, 1..max_width px wide, around the silhouette of
  what is drawn on a near-white background: line-art styles outline their
  shapes, photographic and shaded ones do not."""
  width = 2 * int(rng.integers(0, max_width // 2 + 1)) + 1  # Odd: 1, 3, 5.
  pixels = np.asarray(img)
  # Not near-white (np.minimum: a reduction over the size-3 axis is slow).
  ink = np.minimum(np.minimum(pixels[..., 0], pixels[..., 1]),
                   pixels[..., 2]) < 245
  inner = ~_dilate(~ink, 3)   # Eroded by one pixel.
  ring = _dilate(ink, width) & ~inner
  shade = int(rng.integers(0, 80))
  return Image.fromarray(np.where(ring[..., None], np.uint8(shade), pixels))


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


def _reduced_jpeg_and_box(image, size, rng, crop_scale, decoder):
  """(RGB image, crop box in its pixels, crop width in source pixels):
  the box drawn from the JPEG's full size (the same draws as decode()
  then a box), the JPEG decoded at the smallest scale that keeps the box
  at least `size` px a side (the full scale for a zoom-out box or an
  image past MAX_DECODE_PIXELS)."""
  w, h = jpeg_size(image, decoder)
  if rng is not None and crop_scale is not None:
    box = random_resized_crop_box(w, h, rng, scale=tuple(crop_scale))
  else:
    box = center_square_box(w, h)
  inside = box[0] >= 0 and box[1] >= 0 and box[2] <= w and box[3] <= h
  if not inside or w * h > MAX_DECODE_PIXELS or 0 in (w, h):
    return decode(image), box, box[2] - box[0]
  box_w, box_h = box[2] - box[0], box[3] - box[1]
  need = (min(w, -(-w * size // box_w)), min(h, -(-h * size // box_h)))
  img = decode_jpeg_at_least(image, need, decoder)
  sx, sy = img.width / w, img.height / h
  # Clamped: rounding must not put the box a hair outside the image.
  scaled = (max(0.0, box[0] * sx), max(0.0, box[1] * sy),
            min(float(img.width), box[2] * sx),
            min(float(img.height), box[3] * sy))
  return img, scaled, box_w


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

  jpeg_decoder (JPEG bytes only): 'pillow' decodes at full size;
  'pillow_draft' / 'simplejpeg' draw the crop from the header's size and
  decode at the smallest DCT scale that keeps the crop >= size px a side
  (the same crops; pixels differ by resampling only)."""
  if rng is None and eval_resize != "center_square":
    img = decode(image)
    pixels = _eval_square(img, size, eval_resize)
    return np.ascontiguousarray(pixels), size / min(img.size)
  if jpeg_decoder != "pillow" and _is_jpeg(image):
    img, box, source_width = _reduced_jpeg_and_box(image, size, rng,
                                                   crop_scale, jpeg_decoder)
  else:
    img = decode(image)
    if rng is not None and crop_scale is not None:
      box = random_resized_crop_box(*img.size, rng, scale=tuple(crop_scale))
    else:
      box = center_square_box(*img.size)
    source_width = box[2] - box[0]
  if rng is not None and outline_prob > 0 and rng.random() < outline_prob:
    img = draw_outline(img, rng)
  img, box = pad_to_box(img, box)
  if tuple(box) != (0, 0, *img.size) or img.size != (size, size):
    img = img.resize((size, size), Image.BICUBIC, box=box)
  pixels = np.asarray(img)
  if rng is not None and flip and rng.random() < 0.5:
    pixels = pixels[:, ::-1]
  return np.ascontiguousarray(pixels), size / source_width


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
