r"""Exact vs naive gradient accumulation (GradCache, Gao et al. 2021), small.

  python -m clip_jax.sweep --config \
      experiments/gradient_accumulation/config.py \
      --workdir runs/gradient_accumulation

The demo recipe (softmax), each run seeing 153,600 examples, 3 seeds:
  full   batch 256 in one piece;
  exact  batch 256 as 4 micro-batches of 64, the full-batch contrastive
         gradient (accum_mode='exact');
  naive  batch 256 as 4 micro-batches of 64, each with its own loss and
         negatives, gradients averaged (accum_mode='naive');
  small  batch 64 (4x the steps).
Expected: exact equals full to noise; naive and small below.

Arguments of get_config: batch, examples.
"""

from clip_jax import config as config_lib

SEEDS = (0, 1, 2)
POINTS = (
    {"arg.batch": 256},
    {"arg.batch": 256, "accum_steps": 4, "accum_mode": "exact"},
    {"arg.batch": 256, "accum_steps": 4, "accum_mode": "naive"},
    {"arg.batch": 64},
)


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, batch=256, examples=153_600)
  steps = -(-arg.examples // arg.batch)
  c = config_lib.load_config_file(
      "../../configs/demo.py",
      f"steps={steps},batch={arg.batch},eval_every={steps}")
  c.checkpoint_every_steps = max(steps // 4, 1)
  del c.evals["retrieval"]  # The demo's zero-shot evals only.
  return c


def get_sweep(arg=None):
  del arg
  return [{**p, "seed": seed} for p in POINTS for seed in SEEDS]
