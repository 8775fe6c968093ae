"""grain input pipeline: per-process numpy batches, checkpointable.

  source -> shuffle (reshuffled every epoch) -> repeat -> preprocess
  (decode, crop/resize, draw the colour/blur style, tokenize; a grain
  RandomMap) -> this process's share -> chunks of CHUNK examples (small
  array images are cropped and resized here, a chunk at a time) ->
  [worker processes] -> drop and count bad examples -> batch -> apply the
  style draws -> normalise

The style (transforms.apply_style) is a 3x3 colour matrix and two blur
matmuls per image: done per batch it costs a few microseconds an example,
per example (NumPy call overheads on 16x16 arrays) a hundred. Likewise the
geometry of in-memory RGB arrays (the emoji source): Preprocess draws it,
and transforms.apply_geometry crops, outlines and resizes the chunk's
images in two batched matmuls, at a fraction of PIL's cost per example.

Order. Everything up to "this process's share" is a grain MapDataset, a
pure function of (seed, position in the global stream): the shuffle and
each example's random crop / caption choice depend on nothing else.
Process p of k reads rows [p*b, (p+1)*b) of every global batch of k*b
(b = batch_size_per_process), so concatenating the processes' batches in
process order (what jax.make_array_from_process_local_data does) gives
exactly the single-process global batch. Worker processes each prepare
every worker_count-th chunk of CHUNK examples and grain interleaves them
back in order, so the batches do not depend on worker_count either. Bad
examples (an image that cannot be decoded, a missing file, no non-empty
caption) are dropped in the main process, which shifts that process's later
batches by as many examples; `num_skipped` counts them.

grain does the dataset ops (source, shuffle, repeat, random map, slicing,
chunking, worker processes, read threads). Hand-written, because grain has
no equivalent: the block sharding above (grain shards by stride, which
reorders the global batch), and dropping + counting bad examples with an
exact count in the checkpointed state, a per-batch `num_skipped` and an
error naming examples (grain's filter guard checks windows of 1,000 and
names none). Bad examples never raise: see Preprocess, and the sources.

Source 'wds' (WebDataset tars, data/wds.py) is streamed rather than read
at random: _WdsDataIterator batches a wds.WdsReader (per-process shards, a
shuffle buffer) with the same preprocessing, skip accounting and
checkpointed, bit-exact position; its order is not the one-process order.

State. `get_state()` -> bytes (JSON: how many examples this process has
consumed, and the skip counters); `set_state()` rebuilds the stream from
that position, so a restored iterator yields exactly the batches the
original would have (with any worker_count).

Batches (dicts of numpy arrays, leading dim b):
  image        uint8 [b, S, S, 3] pixels (uint8_images, the default: the
               model normalises them with mean/std on the device, see
               models/two_towers), or float32 normalised here;
  text         int32 [b, L], tokenised with the EOS policy;
  label        int32 [b], the source's class index, -1 if it has none;
  caption_hash int32 [b], caption_hash() of the caption the text tower sees
               (after templates; of the token ids for pre-tokenised
               records): equal captions, equal hashes, in every process
               and run (multi_positive's config.loss_key='caption_hash');
  image_views  only with `ssl_views` (SLIP, clip_jax/slip.py): two more
               independently augmented views of each image, [b, 2, S, S,
               3], uint8 or float32 like `image` (crop, flip and style
               drawn from the example's generator after its other draws,
               so `image` and `text` are the same with or without them);
  num_skipped  int32 [b]; its sum is the number of bad examples dropped
               while making this batch.
Batches are full (the remainder of a finite stream is dropped). Evaluation
reads its data with clip_jax/evals/readers.py, not through this pipeline.

Data config keys (`config.data`, defaults in `default_data_config()`):
  source            sources.SOURCES name: 'emoji', 'tfds', 'folder',
                    'synthetic', 'shards' (ArrayRecord, data/shards.py),
                    'wds' (WebDataset tars streamed, data/wds.py).
  split             split to train on (emoji: 'train'; tfds: e.g. 'train').
  path              folder / .csv / .jsonl for source 'folder'; the shards
                    folder (or a .array_record glob) for 'shards'; tar
                    shards ('dir/{00000..00099}.tar' or a glob) for 'wds'.
  shuffle_buffer    samples in the 'wds' source's shuffle buffer (other
                    sources shuffle globally and ignore it).
  tfds_name         TFDS dataset name for source 'tfds' (e.g.
                    'coco_captions'), prepared as array_record in data_dir.
  data_dir          TFDS data_dir (local or a bucket); None = TFDS default.
  image_key         feature holding the image (tfds), default 'image'.
  text_key          feature holding the caption(s), '/' for nesting (tfds),
                    e.g. 'captions/text' for coco_captions.
  label_key         optional class-label feature (tfds), for zero-shot.
  cache_dir         where the emoji data and tokenizers are cached
                    (None = $CLIP_JAX_CACHE or ~/.cache/clip_jax).
  emoji_limit       only the first N emoji of each split (tests).
  emoji_render_size side of the cached emoji renderings, px.
  synthetic_size    number of examples of source 'synthetic'.
  synthetic_seed    seed of the synthetic examples.
  image_size        side S of the square model input, px.
  eval_resize       how evaluation makes the S x S input (transforms.
                    EVAL_RESIZES): 'center_square' (centre square, resized;
                    the default), 'shortest_side' (shorter side to S, then
                    centre crop: OpenAI CLIP / HF CLIPImageProcessor),
                    'squash' (whole image to S x S: SigLIP). Training's
                    geometry does not use it.
  random_resized_crop  (min, max) area fraction of the training crop;
                    max > 1 also zooms out (a window larger than the image,
                    filled with its border colour); None = no crop (centre
                    square, resized).
  jpeg_decoder      how training decodes JPEG bytes: 'pillow' (full size),
                    'pillow_draft' or 'simplejpeg' (DCT-scaled to the
                    smallest size that keeps the crop >= image_size px: the
                    same crops; 1.6x / 1.9x the per-core examples/s of
                    'pillow' in `python -m clip_jax.data.bench --jpeg`).
  flip              random horizontal flips in training (off: captions
                    say left/right, text in images would read backwards).
  style_strength    colour jitter / greyscale / blur in training
                    (transforms.draw_style); 0 = off.
  outline_prob      probability of drawing a dark contour around the
                    silhouette in training (transforms.outline_pixels:
                    line-art styles outline shapes); 0 = off.
  class_name_caption  training also samples the example's class name
                    (source.class_names[label]) as a caption; emoji: a
                    skin-tone variant's base name ('waving hand' for 'waving
                    hand medium-dark skin tone'), the name zero-shot classes
                    use. Evaluation reads the dataset's own captions.
  caption_templates training captions become a random template of this
                    set (evals/templates.py name or list) filled with the
                    caption, so prompt ensembles at test time are in
                    distribution; None = captions as they are.
  mean, std         per-channel normalisation of [0, 1] pixels (CLIP's).
  uint8_images      ship uint8 pixels, normalised on the device by the
                    model (4x fewer host-to-device bytes; the same values
                    to one float32 rounding); False = float32 normalised
                    on the host.
  tokenizer         a sentencepiece .model path, 'emoji' = train one on
                    the emoji train captions (cached in cache_dir), or
                    'clip_bpe' = OpenAI CLIP's BPE (49,408 tokens, SOT/EOT,
                    data/clip_bpe.py; set model.text eos_id=49407,
                    pad_id=-1, vocab_size=49408; always lower-cases).
  bpe_path          clip_bpe's merges file (bpe_simple_vocab_16e6.txt.gz);
                    None = the copy in an installed open_clip_torch.
  vocab_size        vocabulary of a tokenizer trained here (the model's
                    embedding table is checked against the tokenizer).
  context_length    tokens per caption L (truncated, EOS kept).
  eos_policy        'eos' (one EOS then padding) | 'last' (sticky EOS).
  lowercase         lower-case captions before tokenizing.
  worker_count      worker processes for decode/augment/tokenize (0 = in
                    this process, in the prefetch thread; source 'wds':
                    threads). Does not change the batches; a saved state
                    restores with any value.
  read_threads      with worker_count=0, grain threads reading examples
                    (0 = none; more only helps slow reads, e.g. a bucket).
  prefetch          batches a background thread assembles ahead (0 = none:
                    each batch is made when asked for).
  max_skip_fraction stop with an error naming examples once more than this
                    fraction of the examples read was bad (checked from
                    100 examples read on; a stream with no usable example
                    at all is always an error).
"""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import hashlib
import json
import math
import queue
import sys
import threading

import grain
import ml_collections
import numpy as np

from clip_jax.data import sources, transforms, wds
from clip_jax.data import tokenizer as tokenizer_lib

MIN_EXAMPLES_FOR_SKIP_CHECK = 100
CLIP_BPE = "clip_bpe"  # config.data.tokenizer naming OpenAI CLIP's BPE.
MAX_CAPTION_CHARS = 4096  # Longer captions are cut (clip_caption).
CHUNK = 32  # Examples a worker prepares per message to the main process.
TOKEN_CACHE_SIZE = 2**15  # Captions whose tokens a Preprocess keeps,
TOKEN_CACHE_CHARS = 2**22  # and their characters, at most.
_STATE_VERSION = 1


def default_data_config() -> ml_collections.ConfigDict:
  """config.data with every key (see the module docstring)."""
  from ml_collections import config_dict  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict({
      "source": "synthetic", "split": "train",
      "path": config_dict.placeholder(str),
      "shuffle_buffer": 1000,
      "tfds_name": config_dict.placeholder(str),
      "data_dir": config_dict.placeholder(str),
      "image_key": "image", "text_key": "caption",
      "label_key": config_dict.placeholder(str),
      "cache_dir": config_dict.placeholder(str),
      "emoji_limit": config_dict.placeholder(int),
      "emoji_render_size": sources.DEFAULT_RENDER_SIZE,
      "synthetic_size": 4096, "synthetic_seed": 0,
      "image_size": 224,
      "random_resized_crop": config_dict.placeholder(tuple),
      "flip": False, "style_strength": 0.0, "outline_prob": 0.0,
      "jpeg_decoder": "pillow",
      "class_name_caption": False,
      "caption_templates": config_dict.placeholder(str),
      "mean": transforms.CLIP_MEAN, "std": transforms.CLIP_STD,
      "eval_resize": "center_square",
      "uint8_images": True,
      "tokenizer": "emoji", "vocab_size": 49408, "context_length": 77,
      "eos_policy": "eos", "lowercase": True,
      "bpe_path": config_dict.placeholder(str),
      "worker_count": 0, "read_threads": 0, "prefetch": 2,
      "max_skip_fraction": 0.01,
  })


def get_tokenizer(data_config):
  """The config's tokenizer, or None for pre-tokenised (synthetic) data."""
  if data_config.source == "synthetic":
    return None
  name = data_config.get("tokenizer")
  if not name:
    raise ValueError("config.data.tokenizer is empty: give a sentencepiece "
                     ".model path, 'emoji' or 'clip_bpe'.")
  if name == "emoji":
    return tokenizer_lib.emoji_tokenizer(
        data_config.vocab_size, cache_dir=data_config.get("cache_dir"),
        lowercase=data_config.lowercase)
  if name == CLIP_BPE:
    if not data_config.lowercase:
      raise ValueError(
          "config.data.tokenizer='clip_bpe' always lower-cases (its "
          "vocabulary is lower-case) but config.data.lowercase=False; set "
          "config.data.lowercase=True.")
    from clip_jax.data import clip_bpe  # pylint: disable=g-import-not-at-top
    return clip_bpe.ClipBpeTokenizer(data_config.get("bpe_path"))
  return tokenizer_lib.load(name, lowercase=data_config.lowercase)


def _caption_templates(name_or_list):
  if not name_or_list:
    return None
  from clip_jax.evals import templates  # pylint: disable=g-import-not-at-top
  return tuple(templates.get_templates(name_or_list))


@dataclasses.dataclass(frozen=True)
class PreprocessOptions:
  image_size: int
  context_length: int
  eos_policy: str = "eos"
  crop_scale: tuple | None = None
  flip: bool = False
  style_strength: float = 0.0
  outline_prob: float = 0.0
  class_names: tuple | None = None  # Sampled as captions too (training).
  caption_templates: tuple | None = None
  jpeg_decoder: str = "pillow"
  ssl_views: object | None = None  # slip.ViewOptions: SLIP's two views.


class Preprocess(grain.transforms.RandomMap):
  """Raw record -> fixed-shape example; never raises on bad data.

  Output: image uint8 [S, S, 3], text int32 [L], label (int32),
  caption_hash (int32, of the caption tokenised), style float32 [5]
  (transforms.draw_style: this example's colour / blur draw, applied to
  whole batches by the iterator; NO_STYLE if none), valid (False
  for a bad record: zero arrays, `error` says why), id (str). One caption
  is sampled at random.

  With `chunk_geometry`, small RGB array images (transforms.
  batchable_pixels) only get their geometry drawn: `geometry` holds
  (source pixels, transforms.Geometry) and `image` stays zeros until
  _stack_chunk resizes the whole chunk in one apply_geometry (the same
  pixels as augment_geometry's, at a fraction of the per-image cost).
  """

  def __init__(self, options: PreprocessOptions, tokenizer,
               chunk_geometry: bool = False):
    self.options, self.tokenizer = options, tokenizer
    self.chunk_geometry = chunk_geometry
    # clipped caption -> (tokens, caption_hash): templated class names
    # repeat (the demo has < 32,000 distinct captions); web captions do
    # not, so the cache is emptied past TOKEN_CACHE_CHARS.
    self._token_cache, self._token_cache_chars = {}, 0

  def _tokens(self, caption: str):
    """(int32 [L] tokens, caption_hash) of a caption, clipped first."""
    o = self.options
    caption = clip_caption(caption, o.context_length)
    cached = self._token_cache.get(caption)
    if cached is None:
      self._token_cache_chars += len(caption)
      if (len(self._token_cache) >= TOKEN_CACHE_SIZE or
          self._token_cache_chars > TOKEN_CACHE_CHARS):
        self._token_cache.clear()
        self._token_cache_chars = len(caption)
      cached = (self.tokenizer.encode([caption], o.context_length,
                                      o.eos_policy)[0],
                caption_hash(caption.encode("utf-8")))
      self._token_cache[caption] = cached
    return cached

  def random_map(self, record, rng):
    o = self.options
    out = {"image": np.zeros((o.image_size, o.image_size, 3), np.uint8),
           "text": np.zeros((o.context_length,), np.int32),
           "style": transforms.NO_STYLE,
           "label": np.int32(-1), "caption_hash": np.int32(-1),
           "valid": False,
           "id": str(record.get("id", "")), "error": ""}
    if o.ssl_views is not None:  # Same keys for bad records (chunking).
      out["image_views"] = np.zeros((2, *out["image"].shape), np.uint8)
      out["view_style"] = np.stack([transforms.NO_STYLE] * 2)
    try:
      out["label"] = np.int32(record.get("label", -1))
      if record.get("error"):
        raise ValueError(record["error"])
      if "tokens" in record:
        tokens = np.asarray(record["tokens"], np.int32)[:o.context_length]
        out["text"][:len(tokens)] = tokens
        out["caption_hash"] = caption_hash(tokens.astype("<i4").tobytes())
      else:
        captions = [c for c in record.get("captions") or [] if c.strip()]
        if o.class_names and record.get("label", -1) >= 0:
          name = o.class_names[record["label"]]
          captions += [name] if name not in captions else []
        if not captions:
          raise ValueError("no caption")
        # rng.random(), not rng.integers(): a third of the time.
        caption = (captions[int(rng.random() * len(captions))]
                   if len(captions) > 1 else captions[0])
        if o.caption_templates:
          template = o.caption_templates[
              int(rng.random() * len(o.caption_templates))]
          caption = template.format(caption)
        out["text"], out["caption_hash"] = self._tokens(caption)
      pixels = (transforms.batchable_pixels(record.get("image"),
                                            o.image_size)
                if self.chunk_geometry else None)
      if pixels is not None:  # Resized with its chunk (_stack_chunk).
        geometry = transforms.plan_geometry(
            pixels.shape[1], pixels.shape[0], rng, crop_scale=o.crop_scale,
            flip=o.flip, outline_prob=o.outline_prob)
        out["geometry"] = (pixels, geometry)
        scale = geometry.output_scale(o.image_size)
      else:
        out["image"], scale = transforms.augment_geometry(
            record.get("image"), o.image_size, rng,
            crop_scale=o.crop_scale, flip=o.flip,
            outline_prob=o.outline_prob, jpeg_decoder=o.jpeg_decoder)
      if o.style_strength > 0:  # Applied batch-wise, later.
        out["style"] = transforms.draw_style(rng, o.style_strength, scale)
      if o.ssl_views is not None:  # After every other draw (see above).
        out["image_views"], out["view_style"] = ssl_views(
            record.get("image"), o, rng)
    except Exception as e:  # noqa: BLE001  pylint: disable=broad-except
      # Bad data (PIL raises OSError, ValueError, SyntaxError, ...) must not
      # crash a run; the error text goes into the skip report.
      out["error"] = f"{type(e).__name__}: {e}"
      return out
    out["valid"] = True
    return out


def caption_hash(data: bytes) -> np.int32:
  """A stable non-negative int32 of a caption's bytes (blake2b's first 31
  bits; not Python's hash(), which is salted per process). Two different
  captions collide with probability 2^-31: in a batch of N, N^2 / 2^32
  pairs are expected to (0.25 at N = 32,768), each a false positive."""
  digest = hashlib.blake2b(data, digest_size=4).digest()
  return np.int32(int.from_bytes(digest, "little") & 0x7FFFFFFF)


def ssl_views(image, o: PreprocessOptions, rng):
  """(uint8 [2, S, S, 3], style [2, 5]): SLIP's two views of `image`, each
  its own random resized crop and flip, and style draw (applied per batch,
  as the main image's)."""
  v = o.ssl_views
  pixels, styles = [], []
  for _ in range(2):
    view, scale = transforms.augment_geometry(
        image, o.image_size, rng, crop_scale=v.crop_scale, flip=v.flip,
        jpeg_decoder=o.jpeg_decoder)
    pixels.append(view)
    styles.append(transforms.draw_style(rng, v.style_strength, scale)
                  if v.style_strength > 0 else transforms.NO_STYLE)
  return np.stack(pixels), np.stack(styles)


def clip_caption(caption: str, context_length: int) -> str:
  """The caption cut at its last space before max(MAX_CAPTION_CHARS,
  32 * context_length) characters (at the limit if it has none there).

  A 10 MB caption takes seconds to tokenise, for L tokens that a few
  hundred characters give: sentencepiece pieces are at most 16 characters
  and do not cross whitespace, so the words kept tokenise as before. (A
  single word longer than the limit is cut inside, where its first pieces
  may in principle change.)
  """
  limit = max(MAX_CAPTION_CHARS, 32 * context_length)
  if len(caption) <= limit:
    return caption
  cut = caption.rfind(" ", limit // 2, limit)
  return caption[:cut if cut > 0 else limit]


class _GuardedSource:
  """A source whose failures are bad records (skipped and counted) rather
  than a crash of the input pipeline; records must be dicts."""

  def __init__(self, source):
    self.source = source

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    try:
      record = self.source[index]
    except Exception as e:  # noqa: BLE001  pylint: disable=broad-except
      return {"id": f"#{index}", "error": f"{type(e).__name__}: {e}"}
    if not isinstance(record, dict):
      return {"id": f"#{index}",
              "error": f"the source returned a {type(record).__name__}"}
    return record


class _TrainShard(grain.MapDataset):
  """Process `index` of `count`: rows [index*b, (index+1)*b) of every
  global batch of count*b examples (b = `block`)."""

  def __init__(self, parent, *, block: int, index: int, count: int):
    super().__init__(parent)
    self._block, self._index, self._count = block, index, count
    n = len(parent)
    self._length = n if n >= sys.maxsize else (
        n // (block * count) * block)

  def __len__(self):
    return self._length

  def __getitem__(self, i):
    if isinstance(i, slice):
      return self.slice(i)
    b = self._block
    return self._parent[(i // b) * b * self._count + self._index * b + i % b]

  def __str__(self):
    return f"_TrainShard({self._index}/{self._count}, block={self._block})"


_CHUNK_ARRAYS = ("image", "text", "label", "caption_hash", "style")
_OPTIONAL_ARRAYS = ("image_views", "view_style")  # SLIP's, when asked for.
_CHUNK_LISTS = ("valid", "id", "error")


def _stack_chunk(rows):
  """grain batch_fn: examples -> one chunk (arrays stacked, the rest in
  lists: ids and errors are strings of any length). Images whose geometry
  Preprocess left to the chunk are resized here, one batched
  apply_geometry per source shape."""
  arrays = _CHUNK_ARRAYS + tuple(k for k in _OPTIONAL_ARRAYS if k in rows[0])
  chunk = {k: np.stack([r[k] for r in rows]) for k in arrays}
  chunk.update({k: [r[k] for r in rows] for k in _CHUNK_LISTS})
  by_shape = {}
  for i, r in enumerate(rows):
    if "geometry" in r:
      by_shape.setdefault(r["geometry"][0].shape, []).append(i)
  for index in by_shape.values():
    chunk["image"][index] = transforms.apply_geometry(
        np.stack([rows[i]["geometry"][0] for i in index]),
        [rows[i]["geometry"][1] for i in index], chunk["image"].shape[1])
  return chunk


def _unchunk(chunks, skip: int):
  """Examples (dicts) of an iterator of chunks, after the first `skip`."""
  for chunk in chunks:
    keys = _CHUNK_ARRAYS + _CHUNK_LISTS + tuple(
        k for k in _OPTIONAL_ARRAYS if k in chunk)
    for r in range(skip, len(chunk["valid"])):
      yield {k: chunk[k][r] for k in keys}
    skip = 0


def _ensure_flags_parsed() -> None:
  """grain's worker processes read absl flags; outside an absl app (tests,
  notebooks) mark them parsed so their defaults are used."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _leave_stop_signals_to_main(worker_index: int, worker_count: int):
  """In a grain worker process: ignore SIGINT and SIGTERM.

  Ctrl-C reaches the whole process group, and some schedulers signal every
  process: the main process checkpoints and stops the workers itself
  (clip_jax/preemption.py); a worker killed first would fail that step.
  """
  del worker_index, worker_count
  import signal  # pylint: disable=g-import-not-at-top
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)


class DataIterator:
  """Batches from a process-local MapDataset of preprocessed examples.

  Iterate it; `get_state()` / `set_state()` checkpoint its position (bytes);
  `close()` stops its thread and worker processes. With prefetch > 0 a
  background thread assembles up to `prefetch` batches ahead (the state is
  that of the last batch handed out). `num_skipped` is this process's total
  of bad examples so far (at the end of a finite stream, including those
  in the incomplete last batch, which is dropped); `num_batches` the
  number of batches of a finite stream (None if endless).
  """

  def __init__(self, examples: grain.MapDataset, *, batch_size: int,
               worker_count: int, read_threads: int,
               prefetch: int, max_skip_fraction: float, mean, std,
               fingerprint: dict, uint8_images: bool = False):
    self._examples, self.batch_size = examples, batch_size
    self._worker_count, self._read_threads = worker_count, read_threads
    self._prefetch = max(0, prefetch)
    self._max_skip_fraction = max_skip_fraction
    self._mean, self._std = mean, std
    self._uint8_images = uint8_images
    self._fingerprint = fingerprint
    n = sys.maxsize if examples is None else len(examples)
    self.num_batches = None if n >= sys.maxsize else n // batch_size
    self.num_examples, self.class_names = None, None
    # The grain iterator of chunks and the examples unpacked from it (used
    # by one thread at a time).
    self._stream = self._rows = None
    # Producer-side counters, and their value after the last batch handed
    # out (what get_state saves). 'bad': the first few [id, error].
    self._counters = {"consumed": 0, "seen": 0, "skipped": 0, "bad": []}
    self._delivered = copy.deepcopy(self._counters)
    self._thread = self._queue = self._stop = self._final = None

  @property
  def num_skipped(self) -> int:
    return self._delivered["skipped"]

  def __iter__(self):
    return self

  def _open_stream(self):
    """A generator of preprocessed examples from the current position.

    Examples travel in chunks of CHUNK (one worker prepares a whole chunk:
    one message between processes instead of CHUNK), in stream order.
    """
    if self._rows is None:
      consumed = self._counters["consumed"]
      ds = self._examples.batch(CHUNK, batch_fn=_stack_chunk)
      if consumed // CHUNK:
        ds = ds[consumed // CHUNK:]
      chunks_ahead = math.ceil(max(1, self._prefetch) * self.batch_size /
                               CHUNK)
      if self._worker_count > 0:
        _ensure_flags_parsed()
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0))
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=self._worker_count,
            per_worker_buffer_size=math.ceil(chunks_ahead /
                                             self._worker_count)),
            worker_init_fn=_leave_stop_signals_to_main)
      else:
        ds = ds.to_iter_dataset(grain.ReadOptions(
            num_threads=self._read_threads,
            prefetch_buffer_size=chunks_ahead))
      self._stream = iter(ds)
      self._rows = _unchunk(self._stream, skip=consumed % CHUNK)
    return self._rows

  def _too_many_bad(self) -> bool:
    c = self._counters
    return c["skipped"] > self._max_skip_fraction * c["seen"]

  def _skip_error(self) -> RuntimeError:
    c = self._counters
    examples = "; ".join(f"{i} ({e})" for i, e in c["bad"])
    return RuntimeError(
        f"{c['skipped']} of the {c['seen']} examples read so far could "
        f"not be used, more than config.data.max_skip_fraction="
        f"{self._max_skip_fraction}. First bad examples: {examples}. Fix or "
        "remove them, or raise config.data.max_skip_fraction.")

  def _next_batch(self):
    """Reads examples until a batch is full; raises StopIteration at the
    end of a finite stream and RuntimeError past max_skip_fraction."""
    stream, c = self._open_stream(), self._counters
    rows, skipped, pending = [], [], 0
    while len(rows) < self.batch_size:
      try:
        row = next(stream)
      except StopIteration:
        break
      c["consumed"] += 1
      c["seen"] += 1
      if not row["valid"]:
        c["skipped"] += 1
        if len(c["bad"]) < 5:
          c["bad"].append([row["id"], row["error"]])
        if c["seen"] >= MIN_EXAMPLES_FOR_SKIP_CHECK and self._too_many_bad():
          raise self._skip_error()
        pending += 1
        continue
      rows.append(row)
      skipped.append(pending)
      pending = 0
    if len(rows) < self.batch_size:
      if c["skipped"] and c["skipped"] == c["seen"]:
        raise self._skip_error()  # Not a single usable example.
      raise StopIteration
    images = np.stack([r["image"] for r in rows])
    styles = np.stack([r["style"] for r in rows])  # Each example's own draw.
    if np.any(styles != transforms.NO_STYLE):
      images = transforms.apply_style(images, styles)
    if not self._uint8_images:
      images = transforms.normalize(images, self._mean, self._std)
    batch = {"image": images,
             "text": np.stack([r["text"] for r in rows]).astype(np.int32),
             "label": np.array([r["label"] for r in rows], np.int32),
             "caption_hash": np.array([r["caption_hash"] for r in rows],
                                      np.int32),
             "num_skipped": np.array(skipped, np.int32)}
    if "image_views" in rows[0]:
      batch["image_views"] = self._views(rows)
    return batch

  def _views(self, rows):
    """SLIP's views [b, 2, S, S, 3], styled and (maybe) normalised."""
    views = np.stack([r["image_views"] for r in rows])
    flat = views.reshape(-1, *views.shape[2:])
    styles = np.concatenate([r["view_style"] for r in rows])
    if np.any(styles != transforms.NO_STYLE):
      flat = transforms.apply_style(flat, styles)
    if not self._uint8_images:
      flat = transforms.normalize(flat, self._mean, self._std)
    return flat.reshape(*views.shape[:2], *flat.shape[1:])

  def _produce(self, output: queue.Queue, stop: threading.Event):
    """The prefetch thread: batches (with the state after each) -> output."""
    while not stop.is_set():
      try:
        item = ("batch", self._next_batch(), copy.deepcopy(self._counters))
      except StopIteration:  # With the bad examples of the cut-off tail.
        item = ("end", None, copy.deepcopy(self._counters))
      except BaseException as e:  # noqa: BLE001  Re-raised by __next__.
        item = ("error", e, None)
      while not stop.is_set():
        try:
          output.put(item, timeout=0.1)
          break
        except queue.Full:
          pass
      if item[0] != "batch":
        return

  def __next__(self):
    if self._final is not None:  # The stream ended or failed: say it again.
      if self._final[0] == "error":
        raise self._final[1]
      raise StopIteration
    if self._prefetch == 0:
      try:
        batch = self._next_batch()
      except StopIteration:
        self._final = ("end", None)
        self._delivered = copy.deepcopy(self._counters)
        raise
      self._delivered = copy.deepcopy(self._counters)
      return batch
    if self._thread is None:
      self._queue, self._stop = queue.Queue(self._prefetch), threading.Event()
      self._thread = threading.Thread(
          target=self._produce, args=(self._queue, self._stop), daemon=True,
          name="clip_jax-data-prefetch")
      self._thread.start()
    kind, payload, state = self._queue.get()
    if kind == "batch":
      self._delivered = state
      return payload
    self._final = (kind, payload)
    if kind == "end":
      self._delivered = state
    return next(self)

  def get_state(self) -> bytes:
    return json.dumps({"version": _STATE_VERSION, **self._delivered,
                       "fingerprint": self._fingerprint}).encode()

  def set_state(self, state: bytes) -> None:
    state = json.loads(state.decode() if isinstance(state, bytes) else state)
    if state.get("fingerprint") != self._fingerprint:
      raise ValueError(
          f"The data iterator state was saved by a pipeline with "
          f"{state.get('fingerprint')}; this one has {self._fingerprint}. "
          "Resume with the same data, seed, batch size and process count.")
    self.close()
    self._counters = {k: state[k] for k in ("consumed", "seen", "skipped",
                                            "bad")}
    self._delivered = copy.deepcopy(self._counters)
    self._final = None

  def close(self) -> None:
    """Stops the prefetch thread and worker processes; a later `next`
    restarts them from the last batch handed out."""
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._thread = self._queue = self._stop = None
    if self._stream is not None and hasattr(self._stream, "close"):
      self._stream.close()
      # grain's close shuts its read-thread pool down without waiting
      # (shutdown(wait=False)): join it, so no grain thread is still running
      # when the caller (or the interpreter) goes on. Idempotent.
      executor = getattr(self._stream, "_executor", None)
      if executor is not None:
        executor.shutdown(wait=True)
    self._stream = self._rows = None
    self._counters = copy.deepcopy(self._delivered)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _preprocess_options(c, source, split: str,
                        ssl_views=None) -> PreprocessOptions:
  crop = c.get("random_resized_crop")
  class_names = None
  if c.get("class_name_caption"):
    class_names = getattr(source, "class_names", None)
    if not class_names:
      raise ValueError(
          f"config.data.class_name_caption is set, but source "
          f"{c.source!r} split {split!r} has no class names; unset it.")
    class_names = tuple(class_names)
  return PreprocessOptions(
      image_size=c.image_size, context_length=c.context_length,
      eos_policy=c.eos_policy, crop_scale=tuple(crop) if crop else None,
      flip=bool(c.get("flip")),
      style_strength=float(c.get("style_strength") or 0.0),
      outline_prob=float(c.get("outline_prob") or 0.0),
      class_names=class_names,
      caption_templates=_caption_templates(c.get("caption_templates")),
      jpeg_decoder=c.get("jpeg_decoder") or "pillow", ssl_views=ssl_views)


class _WdsDataIterator(DataIterator):
  """A DataIterator over a wds.WdsReader (no grain MapDataset: tars are
  read in order, not at random).

  Examples are read CHUNK at a time and preprocessed by `threads` threads
  (in order; example n of this process draws from the generator of (seed,
  process, n)). The saved position is the reader's state at the start of
  the chunk being consumed and how many of its examples were consumed:
  a restore reads that chunk again and drops them, so batches are the same
  bit for bit, with any thread count.
  """

  def __init__(self, reader, preprocess, *, seed: int, process_index: int,
               threads: int, **kwargs):
    super().__init__(None, **kwargs)
    self._reader, self._preprocess = reader, preprocess
    self._seed, self._process_index = seed, process_index
    self._threads, self._pool, self._chunk_start = threads, None, None
    self._counters["position"] = {"reader": reader.state(), "skip": 0}
    self._delivered = copy.deepcopy(self._counters)

  def _open_stream(self):
    if self._rows is None:
      position = self._counters["position"]
      self._reader.restore(position["reader"])
      if self._threads > 0 and self._pool is None:
        self._pool = concurrent.futures.ThreadPoolExecutor(
            self._threads, thread_name_prefix="clip_jax-wds")
      self._rows = self._wds_rows(
          position["skip"], self._counters["consumed"] - position["skip"])
    return self._rows

  def _preprocessed(self, records, first: int) -> list:
    rngs = [np.random.default_rng([self._seed, self._process_index, n])
            for n in range(first, first + len(records))]
    if self._pool is None:
      return [self._preprocess.random_map(r, g) for r, g in zip(records,
                                                                 rngs)]
    return list(self._pool.map(self._preprocess.random_map, records, rngs))

  def _wds_rows(self, skip: int, index: int):
    while True:
      state = self._reader.state()
      records = wds.take(self._reader, CHUNK)
      if not records:
        return
      self._chunk_start = (state, index)
      rows = self._preprocessed(records, index)
      index += len(records)
      yield from rows[skip:]
      skip = 0

  def _next_batch(self):
    try:
      return super()._next_batch()
    finally:
      if self._chunk_start is not None:
        state, index = self._chunk_start
        self._counters["position"] = {
            "reader": state, "skip": self._counters["consumed"] - index}

  def set_state(self, state) -> None:
    super().set_state(state)
    parsed = json.loads(state.decode() if isinstance(state, bytes) else state)
    self._counters["position"] = parsed["position"]
    self._delivered = copy.deepcopy(self._counters)

  def close(self) -> None:
    super().close()
    self._chunk_start = None
    self._reader.close()
    if self._pool is not None:
      self._pool.shutdown(wait=True)
      self._pool = None


def _make_wds_dataset(c, *, split, batch_size_per_process, seed, tokenizer,
                      shard_index, shard_count, num_epochs, ssl_views=None):
  """make_dataset for source 'wds' (see data/wds.py)."""
  if not c.get("path"):
    raise ValueError("config.data.source='wds' needs config.data.path (tar "
                     "shards: 'dir/{00000..00099}.tar' or a glob).")
  tars = wds.expand_patterns(c.path)
  reader = wds.WdsReader(tars, seed=seed, process_index=shard_index,
                         process_count=shard_count,
                         buffer_size=c.get("shuffle_buffer") or 1,
                         num_epochs=num_epochs)
  preprocess = Preprocess(_preprocess_options(c, None, split, ssl_views),
                          tokenizer)
  fingerprint = {"source": "wds", "shards": wds.shard_list_digest(tars),
                 "seed": seed, "batch_size": batch_size_per_process,
                 "shard": [shard_index, shard_count],
                 "shuffle_buffer": reader.buffer_size}
  return _WdsDataIterator(
      reader, preprocess, seed=seed, process_index=shard_index,
      threads=c.get("worker_count") or 0,
      batch_size=batch_size_per_process, worker_count=0, read_threads=0,
      prefetch=c.get("prefetch") or 1,
      max_skip_fraction=c.get("max_skip_fraction") or 0.0,
      mean=tuple(c.mean), std=tuple(c.std), fingerprint=fingerprint,
      uint8_images=bool(c.get("uint8_images")))


def make_dataset(data_config, *, split: str, batch_size_per_process: int,
                 seed: int, tokenizer, shard_index: int = 0,
                 shard_count: int = 1,
                 num_epochs: int | None = None,
                 ssl_views=None) -> DataIterator:
  """This process's batches of `split` (see the module docstring).

  `tokenizer`: a tokenizer.Tokenizer (None for pre-tokenised sources);
  shard_index / shard_count: jax.process_index() / jax.process_count().
  Training: shuffled with `seed`, `num_epochs` passes (None = forever),
  full batches. `ssl_views` (slip.view_options): batches also hold SLIP's
  two views of each image (`image_views`).
  """
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index={shard_index} is not in [0, "
                     f"shard_count={shard_count}).")
  if batch_size_per_process < 1:
    raise ValueError(f"batch_size_per_process={batch_size_per_process} must "
                     "be >= 1.")
  c = data_config
  seed = int(seed) % 2**32
  if c.source == "wds":
    return _make_wds_dataset(
        c, split=split, batch_size_per_process=batch_size_per_process,
        seed=seed, tokenizer=tokenizer, shard_index=shard_index,
        shard_count=shard_count, num_epochs=num_epochs, ssl_views=ssl_views)
  source = sources.get_source(c, split)
  if len(source) == 0:  # pylint: disable=g-explicit-length-test
    raise ValueError(f"config.data.source={c.source!r} split {split!r} has "
                     "no examples.")
  preprocess = Preprocess(_preprocess_options(c, source, split, ssl_views),
                          tokenizer, chunk_geometry=True)
  ds = grain.MapDataset.source(_GuardedSource(source)).seed(seed)
  ds = ds.shuffle().repeat(num_epochs).random_map(preprocess)
  ds = _TrainShard(ds, block=batch_size_per_process, index=shard_index,
                   count=shard_count)
  if len(ds) == 0:  # pylint: disable=g-explicit-length-test
    raise ValueError(
        f"{num_epochs} epoch(s) of the {len(source)} examples of split "
        f"{split!r} make no full global batch of {shard_count} x "
        f"{batch_size_per_process}; use a smaller batch or more epochs.")
  fingerprint = {"split": split, "seed": seed, "train": True,
                 "batch_size": batch_size_per_process,
                 "shard": [shard_index, shard_count],
                 "num_examples": len(source)}
  iterator = DataIterator(
      ds, batch_size=batch_size_per_process,
      worker_count=c.get("worker_count") or 0,
      read_threads=c.get("read_threads") or 0,
      prefetch=c.get("prefetch") or 1,
      max_skip_fraction=c.get("max_skip_fraction") or 0.0,
      mean=tuple(c.mean), std=tuple(c.std), fingerprint=fingerprint,
      uint8_images=bool(c.get("uint8_images")))
  iterator.num_examples = len(source)
  iterator.class_names = getattr(source, "class_names", None)
  return iterator


def make_train_iterator(data_config, *, global_batch_size: int, seed: int,
                        process_index: int = 0, process_count: int = 1,
                        tokenizer=None, ssl_views=None):
  """(this process's endless training iterator, examples per epoch).

  `tokenizer` defaults to get_tokenizer(data_config); `ssl_views`: see
  make_dataset.
  """
  if global_batch_size % process_count:
    raise ValueError(
        f"The global batch {global_batch_size} is not divisible by the "
        f"{process_count} processes.")
  iterator = make_dataset(
      data_config, split=data_config.split,
      batch_size_per_process=global_batch_size // process_count, seed=seed,
      tokenizer=tokenizer or get_tokenizer(data_config),
      shard_index=process_index,
      shard_count=process_count, ssl_views=ssl_views)
  return iterator, iterator.num_examples
