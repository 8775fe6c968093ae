"""What the demo's train loop loses to its input pipeline, and to which part.

  PYTHONPATH=. .venv/bin/python experiments/loop_share.py --variant as_is

`bench step`'s loop figure (bench.bench_loop_against_step: the demo's
train step, batch 256, fed a fixed batch and fed by the pipeline in
alternated windows) with parts of the pipeline made free. Run the
variants in turn, several times: on a noisy machine one run moves by
several points.

Variants take host work out of the pipeline, to show where the share
comes from:
  as_is        the demo's pipeline.
  no_geometry  transforms.apply_geometry and apply_style cost nothing
               (zeros, unstyled): the most that moving them anywhere, the
               device included, could save.
  grain_only   as no_geometry, and Preprocess.random_map hands out one
               cached example: what is left is grain's per-example layers
               (source, shuffle, map), the chunking and the batching.
  workers      the demo's pipeline in one grain worker process
               (data.worker_count=1).
"""

import statistics

import numpy as np
from absl import app, flags

from clip_jax import bench, host_malloc
from clip_jax.data import pipeline, transforms

VARIANTS = ("as_is", "no_geometry", "grain_only", "workers")
_VARIANT = flags.DEFINE_enum("variant", "as_is", VARIANTS, "See above.")
_ROUNDS = flags.DEFINE_integer("rounds", 7, "Alternated rounds.",
                               lower_bound=1)
_STEPS = flags.DEFINE_integer("steps", 24, "Steps per window.", lower_bound=1)


def strip_host_work(variant: str) -> None:
  """Replaces pipeline stages by free ones, per the variant."""
  if variant in ("no_geometry", "grain_only"):
    transforms.apply_geometry = lambda pixels, geometries, size: np.zeros(
        (len(pixels), size, size, 3), np.uint8)
    transforms.apply_style = lambda images, style: images
  if variant == "grain_only":
    first = {}
    real_map = pipeline.Preprocess.random_map

    def cached_map(self, record, rng):
      if "example" not in first:
        first["example"] = real_map(self, record, rng)
      return dict(first["example"])

    pipeline.Preprocess.random_map = cached_map


def main(argv):
  del argv
  strip_host_work(_VARIANT.value)
  config = bench.step_config("demo", None, 256)
  config.data.worker_count = 1 if _VARIANT.value == "workers" else 0
  rates = bench.bench_loop_against_step(config, _ROUNDS.value, _STEPS.value)
  step, loop = (statistics.median(rates[k]) for k in ("step", "loop"))
  print(f"{_VARIANT.value}: bare step {step:,.0f} ex/s, loop {loop:,.0f} "
        f"ex/s (medians of {_ROUNDS.value} alternated {_STEPS.value}-step "
        f"windows): the input costs {100 * (1 - loop / step):.1f}% of the "
        "loop's time")


if __name__ == "__main__":
  host_malloc.reexec_if_wanted()  # As the trainer: huge-page host buffers.
  app.run(main)
