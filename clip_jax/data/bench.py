r"""Input-pipeline benchmark: emoji preparation time and examples/s, and
JPEG shards at 224 px (decoders, shard writing, tar reading, the pipeline).

  python -m clip_jax.data.bench [--cache_dir DIR] [--fresh]
      [--image_sizes 32,64] [--worker_counts 0,1,2] [--batch 256]
      [--batches 40] [--jpeg] [--jpeg_images 512] [--repeats 5]
      [--out runs/data_bench.json]

Prints one line per setting and writes JSON (a list of dicts). `--fresh`
prepares the emoji dataset into a new temporary cache (deleted afterwards)
and reports the time; otherwise the cached one is used.
`pipeline_examples_per_sec(...)` is also what clip_jax.bench can call next to
the train step's consumption.

`--jpeg` (no downloads): synthetic web-like JPEGs (quality 90, sides 384 to
1024 px, smooth content plus noise, ~10-word captions) in 8 WebDataset
tars, then
  - decode + centre crop + resize to 224 px of the same JPEGs by each
    decoder that installs as a PyPI wheel (Pillow full decode, Pillow draft
    mode, simplejpeg with DCT scaling, OpenCV full decode), one thread,
    interleaved, median of --repeats: ratios to Pillow;
  - reading the tars' samples (no decoding): tarfile (data/wds.py) vs the
    webdataset package, median ratio;
  - writing ArrayRecord shards (python -m clip_jax.data.shards write):
    examples/s;
  - the training pipeline (source 'shards': decode, random resized crop
    (0.9, 1), resize to 224, tokenize 77 tokens with a sentencepiece model)
    with each worker_count and jpeg_decoder: examples/s, and per core
    (examples/s / max(1, worker_count));
  - the same for source 'wds' (worker_count = threads).
The machine is usually shared: compare ratios measured in one run.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import tarfile
import tempfile
import time
import warnings

import numpy as np

from clip_jax.data import pipeline, shards, sources, transforms, wds


def pipeline_examples_per_sec(data_config, *, batch_size: int,
                              batches: int = 40, warmup: int = 3,
                              seed: int = 0) -> dict:
  """Training batches/s of `data_config` in this process (no model).

  Start-up (worker processes, first batches) is timed separately.
  """
  start = time.perf_counter()
  iterator = pipeline.make_dataset(
      data_config, split=data_config.split, batch_size_per_process=batch_size,
      seed=seed, tokenizer=pipeline.get_tokenizer(data_config))
  with iterator:
    for _ in range(warmup):
      next(iterator)
    startup = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(batches):
      next(iterator)
    elapsed = time.perf_counter() - start
  return {"examples_per_sec": batches * batch_size / elapsed,
          "startup_sec": startup}


# ------------------------------------------------------------- JPEG ----

_WORDS = ("a photo of the red blue small large old new dog cat house car "
          "tree street city beach mountain people man woman child on in at "
          "with near under over sunset night view close up portrait").split()


def synthetic_jpeg(rng: np.random.Generator, width: int, height: int) -> bytes:
  """A web-photo-like JPEG: smooth random colour fields plus noise."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  coarse = rng.integers(0, 256, (height // 32 + 2, width // 32 + 2, 3))
  smooth = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize(
      (width, height), Image.BICUBIC)).astype(np.int16)
  noisy = smooth + rng.integers(-6, 7, smooth.shape, dtype=np.int16)
  buf = io.BytesIO()
  Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(
      buf, format="JPEG", quality=90)
  return buf.getvalue()


def write_jpeg_tars(folder: str, num_images: int, num_tars: int = 8,
                    seed: int = 0) -> list[str]:
  """WebDataset tars of synthetic JPEGs + captions; returns their paths."""
  rng = np.random.default_rng(seed)
  paths = []
  for t in range(num_tars):
    path = os.path.join(folder, f"{t:05d}.tar")
    with tarfile.open(path, "w") as tar:
      for i in range(t * num_images // num_tars,
                     (t + 1) * num_images // num_tars):
        width, height = (int(v) for v in rng.integers(384, 1025, 2))
        caption = " ".join(rng.choice(_WORDS, int(rng.integers(6, 15))))
        for ext, data in (("jpg", synthetic_jpeg(rng, width, height)),
                          ("txt", caption.encode())):
          info = tarfile.TarInfo(f"{i:08d}.{ext}")
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))
    paths.append(path)
  return paths


def _decoders(size: int) -> dict:
  """name -> function(JPEG bytes) -> uint8 [size, size, 3], centre crop."""
  fns = {name: (lambda d, n=name: transforms.augment_geometry(
      d, size, jpeg_decoder=n)[0]) for name in transforms.JPEG_DECODERS}
  try:
    import cv2  # pylint: disable=g-import-not-at-top
  except ImportError:
    return fns
  cv2.setNumThreads(1)

  def opencv(data):
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    h, w = bgr.shape[:2]
    side = min(h, w)
    y, x = (h - side) // 2, (w - side) // 2
    small = cv2.resize(bgr[y:y + side, x:x + side], (size, size),
                       interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(small, cv2.COLOR_BGR2RGB)

  fns["opencv"] = opencv
  return fns


def _interleaved_medians(fns: dict, items, repeats: int) -> dict:
  """{name: median seconds over `repeats` passes over items}; the
  functions take turns, so load on the machine hits them alike."""
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      for item in items:
        fn(item)
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def decoder_ratios(jpegs, *, size: int = 224, repeats: int = 5) -> dict:
  """{decoder: (examples/s, speed / Pillow's)} for decode + crop + resize."""
  medians = _interleaved_medians(_decoders(size), jpegs, repeats)
  return {name: (len(jpegs) / t, medians["pillow"] / t)
          for name, t in medians.items()}


def tar_reading_ratio(tars, repeats: int = 5) -> dict | None:
  """Samples/s reading tars with tarfile vs the webdataset package."""
  try:
    import webdataset  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None

  def with_tarfile(path):
    return sum(1 for _ in wds.iter_tar_samples(path))

  def with_webdataset(path):
    return sum(1 for _ in webdataset.WebDataset(path, shardshuffle=False))

  medians = _interleaved_medians({"tarfile": with_tarfile,
                                  "webdataset": with_webdataset},
                                 tars, repeats)
  count = sum(with_tarfile(t) for t in tars)
  return {name: count / t for name, t in medians.items()}


def jpeg_suite(args, results: list) -> None:
  """The --jpeg benchmarks (see the module docstring)."""
  from clip_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  folder = tempfile.mkdtemp(prefix="clip_jax_jpeg_bench_")
  try:
    tars = write_jpeg_tars(folder, args.jpeg_images)
    jpegs = [members["jpg"] for t in tars[:2]
             for _, _, _, members in wds.iter_tar_samples(t)]
    sizes = [len(j) for j in jpegs]
    print(f"{args.jpeg_images} synthetic JPEGs, median "
          f"{statistics.median(sizes) / 1024:.0f} KiB", flush=True)
    for name, (rate, ratio) in decoder_ratios(
        jpegs, repeats=args.repeats).items():
      results.append({"name": "jpeg_decode_crop_resize_224", "decoder": name,
                      "examples_per_sec": rate, "ratio_to_pillow": ratio})
      print(f"decode+crop+resize 224 px, {name:>12}: {rate:6.0f}/s, "
            f"{ratio:.2f}x Pillow (one thread, median of {args.repeats})",
            flush=True)
    reading = tar_reading_ratio(tars, repeats=args.repeats)
    if reading:
      results.append({"name": "tar_reading", **reading})
      print(f"tar reading: tarfile {reading['tarfile']:,.0f} samples/s, "
            f"webdataset {reading['webdataset']:,.0f} samples/s "
            f"({reading['tarfile'] / reading['webdataset']:.2f}x)",
            flush=True)
    out = os.path.join(folder, "shards")
    start = time.perf_counter()
    # One process (no start-up of worker processes in the figure): the
    # rate per core; --workers W runs W of these.
    meta = shards.write(tars, out, num_shards=len(tars), workers=1,
                        verbose=False)
    rate = meta["count"] / (time.perf_counter() - start)
    results.append({"name": "shards_write_per_core", "examples_per_sec": rate})
    print(f"shards write (one process): {rate:,.0f} examples/s", flush=True)
    captions = [c for t in tars for _, _, _, m in wds.iter_tar_samples(t)
                for c in [m["txt"].decode()]]
    with warnings.catch_warnings():  # ~40 words make fewer than 256.
      warnings.simplefilter("ignore")
      tok = tokenizer_lib.train(captions, 256)
    config = pipeline.default_data_config()
    config.update(image_size=224, context_length=77, tokenizer="unused",
                  random_resized_crop=(0.9, 1.0))
    for name, rate in preprocess_rates(config, out, tok,
                                       repeats=args.repeats).items():
      results.append({"name": "jpeg_preprocess_per_core_224",
                      "decoder": name, "examples_per_sec": rate})
      print(f"per core (one thread): read record + decode + crop + resize "
            f"224 + tokenize, {name:>12}: {rate:6.0f} examples/s", flush=True)
    for source, path in (("shards", out),
                         ("wds", os.path.join(folder, "*.tar"))):
      for decoder in ("pillow", "simplejpeg"):
        for workers in [int(w) for w in args.worker_counts.split(",")]:
          config.update(source=source, path=path, worker_count=workers,
                        jpeg_decoder=decoder)
          r = _pipeline_rate(config, tok, args)
          r.update(name=f"jpeg_{source}_pipeline_224", decoder=decoder,
                   runs=[round(x, 1) for x in r["runs"]],
                   worker_count=workers,
                   per_core=r["examples_per_sec"] / max(1, workers))
          results.append(r)
          print(f"{source} pipeline 224 px, {decoder}, worker_count="
                f"{workers}: {r['examples_per_sec']:,.0f} examples/s "
                f"(median of {args.pipeline_repeats}), {r['per_core']:,.0f} "
                "per worker", flush=True)
  finally:
    shutil.rmtree(folder, ignore_errors=True)


def preprocess_rates(config, shards_dir: str, tok, *, repeats: int,
                     count: int = 128) -> dict:
  """{jpeg_decoder: examples/s} of one core doing a record's whole work
  (read from the shards, decode, random crop, resize, tokenize), the
  decoders interleaved, median of `repeats`."""
  source = shards.ShardsSource(shards_dir)
  indices = range(min(count, len(source)))
  fns = {}
  for decoder in transforms.JPEG_DECODERS:
    c = config.copy_and_resolve_references()
    c.jpeg_decoder = decoder
    prep = pipeline.Preprocess(pipeline._preprocess_options(c, source, "train"),  # pylint: disable=protected-access
                               tok)
    fns[decoder] = (lambda i, p=prep: p.random_map(
        source[i], np.random.default_rng(i)))
  medians = _interleaved_medians(fns, indices, repeats)
  return {name: len(indices) / t for name, t in medians.items()}


def _pipeline_rate(config, tok, args) -> dict:
  """Median over --pipeline_repeats runs of the pipeline's examples/s."""
  runs = [_pipeline_rate_once(config, tok, args)
          for _ in range(args.pipeline_repeats)]
  rates = [r["examples_per_sec"] for r in runs]
  return {"examples_per_sec": statistics.median(rates), "runs": rates,
          "startup_sec": statistics.median(r["startup_sec"] for r in runs)}


def _pipeline_rate_once(config, tok, args) -> dict:
  batch = min(args.batch, 64)
  start = time.perf_counter()
  iterator = pipeline.make_dataset(config, split="train",
                                   batch_size_per_process=batch, seed=0,
                                   tokenizer=tok)
  with iterator:
    next(iterator)
    startup = time.perf_counter() - start
    start = time.perf_counter()
    batches = max(2, min(args.batches, args.jpeg_images // batch))
    for _ in range(batches):
      next(iterator)
    elapsed = time.perf_counter() - start
  return {"examples_per_sec": batches * batch / elapsed,
          "startup_sec": startup}


def emoji_suite(args, results: list) -> None:
  """Emoji preparation (--fresh) and the emoji training pipeline."""
  cache_dir = args.cache_dir
  if args.fresh:
    cache_dir = tempfile.mkdtemp(prefix="clip_jax_bench_")
    start = time.perf_counter()
    sources.prepare_emoji(cache_dir)
    seconds = time.perf_counter() - start
    results.append({"name": "emoji_prepare", "seconds": seconds})
    print(f"emoji preparation (fresh cache): {seconds:.1f} s")
  config = pipeline.default_data_config()
  config.update(source="emoji", split="train", tokenizer="emoji",
                vocab_size=1024, context_length=16, cache_dir=cache_dir)
  if args.crop != "none":
    config.random_resized_crop = tuple(float(x) for x in args.crop.split(","))
  pipeline.get_tokenizer(config)  # Train / cache it outside the timing.
  sources.get_source(config, "train")
  for size in [int(s) for s in args.image_sizes.split(",")]:
    for workers in [int(w) for w in args.worker_counts.split(",")]:
      config.image_size, config.worker_count = size, workers
      r = pipeline_examples_per_sec(config, batch_size=args.batch,
                                    batches=args.batches)
      r.update(name="emoji_train_pipeline", image_size=size,
               worker_count=workers, batch_size=args.batch,
               cpu_count=os.cpu_count(),
               per_core=r["examples_per_sec"] / max(1, workers))
      results.append(r)
      print(f"emoji train pipeline {size}px, worker_count={workers}: "
            f"{r['examples_per_sec']:,.0f} examples/s, "
            f"{r['per_core']:,.0f} per core "
            f"(start-up {r['startup_sec']:.1f} s)", flush=True)
  if args.fresh:
    shutil.rmtree(cache_dir, ignore_errors=True)


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m clip_jax.data.bench")
  parser.add_argument("--cache_dir", default=None)
  parser.add_argument("--fresh", action="store_true",
                      help="time a fresh emoji preparation")
  parser.add_argument("--image_sizes", default="32,64,224")
  parser.add_argument("--worker_counts", default="0,1,2")
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--batches", type=int, default=40)
  parser.add_argument("--crop", default="0.6,1.0",
                      help="random_resized_crop scale range, or 'none'")
  parser.add_argument("--jpeg", action="store_true",
                      help="also the JPEG-shard benchmarks at 224 px")
  parser.add_argument("--jpeg_only", action="store_true",
                      help="only the JPEG-shard benchmarks")
  parser.add_argument("--jpeg_images", type=int, default=512)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--pipeline_repeats", type=int, default=3)
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  results = []
  if args.jpeg or args.jpeg_only:
    jpeg_suite(args, results)
  if not args.jpeg_only:
    emoji_suite(args, results)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
