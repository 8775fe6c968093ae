r"""Input-pipeline benchmark: emoji preparation time and examples/s.

  python -m clip_jax.data.bench [--cache_dir DIR] [--fresh]
      [--image_sizes 32,64] [--worker_counts 0,1,2] [--batch 256]
      [--batches 40] [--out runs/data_bench.json]

Prints one line per setting and writes JSON (a list of dicts). `--fresh`
prepares the emoji dataset into a new temporary cache (deleted afterwards)
and reports the time; otherwise the cached one is used.
`pipeline_examples_per_sec(...)` is also what clip_jax.bench can call next to
the train step's consumption.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

from clip_jax.data import pipeline, sources


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


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m clip_jax.data.bench")
  parser.add_argument("--cache_dir", default=None)
  parser.add_argument("--fresh", action="store_true",
                      help="time a fresh emoji preparation")
  parser.add_argument("--image_sizes", default="32,64")
  parser.add_argument("--worker_counts", default="0,1,2")
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--batches", type=int, default=40)
  parser.add_argument("--crop", default="0.6,1.0",
                      help="random_resized_crop scale range, or 'none'")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  results = []
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
               cpu_count=os.cpu_count())
      results.append(r)
      print(f"emoji train pipeline {size}px, worker_count={workers}: "
            f"{r['examples_per_sec']:,.0f} examples/s "
            f"(start-up {r['startup_sec']:.1f} s)", flush=True)
  if args.fresh:
    shutil.rmtree(cache_dir, ignore_errors=True)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
