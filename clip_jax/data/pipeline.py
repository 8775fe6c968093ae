"""grain input pipeline: source -> shuffle -> per-process shard -> preprocess
-> drop and count bad examples -> batch -> worker processes.

Each process reads every `process_count`-th example of one globally shuffled
stream (reshuffled every epoch), so the processes' batches are disjoint and
together cover the data. The order is a function of the seed alone, and the
iterator's position is checkpointed with the model.

Data config keys (`config.data`):
  source            sources.SOURCES name: 'emoji', 'folder', 'synthetic'.
  split             split to train on (emoji: 'train').
  path              folder / .csv / .jsonl for source 'folder'.
  cache_dir         where prepared data and tokenizers live
                    (default $CLIP_JAX_CACHE or ~/.cache/clip_jax).
  emoji_limit       render only this many emoji per split (tests).
  synthetic_size    number of examples of source 'synthetic'.
  image_size        side of the square model input.
  random_resized_crop  (min, max) area fraction of the random crop; None =
                    no crop (just resize).
  flip              random horizontal flips (off: left/right words exist).
  mean, std         per-channel normalisation (CLIP's by default).
  tokenizer         path to a sentencepiece .model, or 'emoji' = train one on
                    the emoji training captions (cached).
  vocab_size        size of a tokenizer trained here; checked against the
                    model's embedding table.
  context_length    tokens per caption (truncated, EOS kept).
  eos_policy        'eos' (EOS then pad) | 'last' (sticky EOS to the end).
  lowercase         lower-case captions before tokenizing.
  worker_count      worker processes for decode/augment/tokenize (0 = none).
  prefetch_buffer   batches each worker prepares ahead.
  max_skip_fraction stop with an error when more than this fraction of the
                    examples seen so far was bad (after 100 examples).
"""

from __future__ import annotations

import json
import os

import grain
import ml_collections
import numpy as np

from clip_jax.data import sources, tokenizer as tokenizer_lib, transforms

MIN_EXAMPLES_FOR_SKIP_CHECK = 100


def default_data_config() -> ml_collections.ConfigDict:
  from ml_collections import config_dict
  return ml_collections.ConfigDict(dict(
      source="synthetic", split="train",
      path=config_dict.placeholder(str),
      cache_dir=config_dict.placeholder(str),
      emoji_limit=config_dict.placeholder(int),
      synthetic_size=4096,
      image_size=224,
      random_resized_crop=config_dict.placeholder(tuple),
      flip=False,
      mean=transforms.CLIP_MEAN, std=transforms.CLIP_STD,
      tokenizer="emoji", vocab_size=49408, context_length=77,
      eos_policy="eos", lowercase=True,
      worker_count=0, prefetch_buffer=2,
      max_skip_fraction=0.01,
  ))


def get_tokenizer(data_config):
  """The config's tokenizer, or None for pre-tokenised (synthetic) data."""
  if data_config.source == "synthetic":
    return None
  if data_config.tokenizer != "emoji":
    return tokenizer_lib.load(data_config.tokenizer,
                              lowercase=data_config.lowercase)
  path = os.path.join(sources.cache_root(data_config.get("cache_dir")),
                      f"emoji-tokenizer-{data_config.vocab_size}.model")
  if os.path.exists(path):
    return tokenizer_lib.load(path, lowercase=data_config.lowercase)
  train = sources.emoji_source(data_config, "train")
  captions = [c for r in train.records for c in r["captions"]]
  return tokenizer_lib.train(captions, data_config.vocab_size, path,
                             lowercase=data_config.lowercase)


class Preprocess(grain.transforms.RandomMap):
  """Raw record -> {'image', 'text', 'label', 'valid'}; never raises on data.

  A bad record (undecodable or missing image, no caption) comes out with
  valid=False and zero arrays, to be dropped and counted downstream.
  """

  def __init__(self, data_config, tokenizer, *, train: bool):
    self.config, self.tokenizer, self.train = data_config, tokenizer, train

  def random_map(self, record, rng):
    c = self.config
    size, length = c.image_size, c.context_length
    out = {"image": np.zeros((size, size, 3), np.float32),
           "text": np.zeros((length,), np.int32),
           "label": np.int32(record.get("label", -1)),
           "valid": np.bool_(False), "id": str(record.get("id", ""))}
    try:
      if "tokens" in record:
        out["text"] = np.asarray(record["tokens"], np.int32)[:length]
      else:
        captions = [t for t in record.get("captions", []) if t.strip()]
        if not captions:
          return out
        caption = captions[rng.integers(len(captions))] if self.train else (
            captions[0])
        out["text"] = self.tokenizer.encode([caption], length,
                                            c.eos_policy)[0]
      out["image"] = transforms.preprocess_image(
          record["image"], size, rng if self.train else None,
          crop_scale=c.random_resized_crop, flip=c.flip, mean=c.mean,
          std=c.std)
    except (OSError, ValueError, SyntaxError):  # PIL's errors for bad files.
      return out
    out["valid"] = np.bool_(True)
    return out


class _DropInvalid(grain.IterDataset):
  """Drops records with valid=False; each kept record carries `num_skipped`,
  the number dropped just before it, so batches report what was skipped."""

  def __init__(self, parent, max_skip_fraction: float):
    super().__init__(parent)
    self.max_skip_fraction = max_skip_fraction

  def __iter__(self):
    return _DropInvalidIterator(self._parent.__iter__(),
                                self.max_skip_fraction)


class _DropInvalidIterator(grain.DatasetIterator):

  def __init__(self, parent, max_skip_fraction):
    super().__init__(parent)
    self.max_skip_fraction = max_skip_fraction
    self.seen = self.skipped = self.pending = 0
    self.recent_bad = []

  def __next__(self):
    while True:
      record = next(self._parent)
      self.seen += 1
      if record.pop("valid"):
        record.pop("id")
        record["num_skipped"] = np.int32(self.pending)
        self.pending = 0
        return record
      self.skipped += 1
      self.pending += 1
      self.recent_bad = (self.recent_bad + [record["id"]])[-5:]
      if (self.seen >= MIN_EXAMPLES_FOR_SKIP_CHECK and
          self.skipped > self.max_skip_fraction * self.seen):
        raise RuntimeError(
            f"{self.skipped} of the first {self.seen} examples could not be "
            f"read (> config.data.max_skip_fraction="
            f"{self.max_skip_fraction}); recent bad examples: "
            f"{self.recent_bad}. Fix the data or raise the limit.")

  def get_state(self):
    return {"parent": self._parent.get_state(), "seen": self.seen,
            "skipped": self.skipped, "pending": self.pending}

  def set_state(self, state):
    self._parent.set_state(state["parent"])
    self.seen, self.skipped = state["seen"], state["skipped"]
    self.pending = state["pending"]


class CheckpointableIterator:
  """A grain iterator whose state is bytes (what checkpoint.py stores)."""

  def __init__(self, dataset: grain.IterDataset):
    self.iterator = iter(dataset)

  def __iter__(self):
    return self

  def __next__(self):
    return next(self.iterator)

  def get_state(self) -> bytes:
    return json.dumps(self.iterator.get_state()).encode()

  def set_state(self, state: bytes) -> None:
    self.iterator.set_state(json.loads(state.decode()))


def make_train_iterator(data_config, *, global_batch_size: int, seed: int,
                        process_index: int = 0, process_count: int = 1):
  """(iterator of per-process batches, examples per epoch).

  Batches are {'image' float32 [b, S, S, 3], 'text' int32 [b, L],
  'label' int32 [b], 'num_skipped' int32 [b]}, b = global / processes.
  """
  if global_batch_size % process_count:
    raise ValueError(
        f"Global batch {global_batch_size} is not divisible by the "
        f"{process_count} processes.")
  tokenizer = get_tokenizer(data_config)
  source = sources.get_source(data_config, data_config.split)
  ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat(None)
  ds = ds[process_index::process_count]
  ds = ds.random_map(Preprocess(data_config, tokenizer, train=True))
  ids = _DropInvalid(ds.to_iter_dataset(), data_config.max_skip_fraction)
  ids = ids.batch(global_batch_size // process_count, drop_remainder=True)
  if data_config.worker_count > 0:
    ids = ids.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=data_config.worker_count,
        per_worker_buffer_size=data_config.prefetch_buffer))
  return CheckpointableIterator(ids), len(source)


def eval_batches(data_config, split: str, batch_size: int):
  """Every example of a split once, in order, in batches of `batch_size`.

  The last batch is padded to full size; 'mask' (float32 [b]) is 1 for real
  rows, 'index' the row's position in the source. Bad examples are kept with
  mask 0 (and counted by the caller).
  """
  tokenizer = get_tokenizer(data_config)
  source = sources.get_source(data_config, split)
  prep = Preprocess(data_config, tokenizer, train=False)
  for start in range(0, len(source), batch_size):
    rows = [prep.random_map(source[i], None)
            for i in range(start, min(start + batch_size, len(source)))]
    mask = np.array([float(r["valid"]) for r in rows], np.float32)
    pad = batch_size - len(rows)
    rows += [rows[-1]] * pad
    batch = {k: np.stack([r[k] for r in rows])
             for k in ("image", "text", "label")}
    batch["index"] = np.arange(start, start + batch_size, dtype=np.int32)
    batch["mask"] = np.concatenate([mask, np.zeros(pad, np.float32)])
    yield batch
