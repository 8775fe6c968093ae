"""Compiled train-step memory of full fine-tuning vs LoRA, per device.

  PYTHONPATH=. .venv/bin/python experiments/lora/memory.py [--out FILE]

For the demo model (batch 256) and a CLIP ViT-B/16 (batch 8): XLA's
memory analysis of the compiled step (arguments = params + optimiser
state + batch; temp = activations, gradients, scratch; peak = arguments +
temp + outputs - donated aliases), on one device, from configs/lora.py
(rank 0 = full fine-tuning; LoRA on attention q/k/v/out, logit_scale
trained). Params are freshly initialised: memory does not depend on them.
A compile-time figure, not a measured RSS; ms/step is one step after a
warm-up (noisy on a shared CPU; shown, not compared).
"""

import argparse
import json
import os

from clip_jax import config as config_lib

# (name, configs/clip.py model variant or None for the demo's, batch).
SHAPES = (("demo", None, 256), ("ViT-B/16", "B/16", 8))
RANKS = (0, 8)
CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                       "configs")


def step_config(variant, batch: int, rank: int):
  config = config_lib.load_config_file(os.path.join(CONFIGS, "lora.py"),
                                       f"rank={rank}")
  if variant is not None:
    clip = config_lib.load_config_file(os.path.join(CONFIGS, "clip.py"),
                                       f"model={variant}")
    config.model, config.data = clip.model, clip.data
  config.batch_size = batch
  config.mesh.data, config.mesh.fsdp = -1, 1
  return config


def main():
  # Here, not at the top: clip_jax.bench defines absl flags (--config ...)
  # that clash with clip_jax.train's in a process importing both (tests).
  from clip_jax import bench  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="runs/lora_memory.json")
  args = parser.parse_args()
  rows = []
  print(f"{'model':<10}{'run':<18}{'args MiB':>10}{'temp MiB':>10}"
        f"{'peak MiB':>10}{'x full':>8}{'ms/step':>9}")
  for name, variant, batch in SHAPES:
    full_peak = None
    for rank in RANKS:
      figures = bench.bench_memory(step_config(variant, batch, rank),
                                   repeats=1)
      if rank == 0:  # RANKS starts with full fine-tuning: the reference.
        full_peak = figures["peak_bytes"]
      run = "full fine-tuning" if rank == 0 else f"LoRA r={rank}"
      rows.append({"model": name, "batch": batch, "rank": rank, **figures})
      print(f"{name:<10}{run:<18}"
            f"{figures['argument_bytes'] / 2**20:10.1f}"
            f"{figures['temp_bytes'] / 2**20:10.1f}"
            f"{figures['peak_bytes'] / 2**20:10.1f}"
            f"{figures['peak_bytes'] / full_peak:8.2f}"
            f"{figures['ms_per_step_median']:9.0f}", flush=True)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(rows, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
