r"""Learnable vs fixed temperature (CLIP Section 2.5), in small.

  python -m clip_jax.sweep --config \
      experiments/learnable_temperature/config.py \
      --workdir runs/learnable_temperature

The demo recipe (softmax) with the logit scale learnable from 1/0.07 and
capped at 100 (CLIP), fixed at 1/0.07, or fixed at 1.0; 3 seeds, 600 steps
of 256. The final `logit_scale` column of the report and its curve in each
point's metrics.jsonl show whether the cap binds.

A fixed scale is `config.freeze = '^logit_scale$'`: the optimiser leaves
it alone (and holds no state for it).

Arguments of get_config: scale (initial multiplier), fixed (bool), steps.
"""

from clip_jax import config as config_lib

SETTINGS = ((1 / 0.07, False), (1 / 0.07, True), (1.0, True))
SEEDS = (0, 1, 2)


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, scale=1 / 0.07, fixed=False, steps=600)
  c = config_lib.load_config_file(
      "../../configs/demo.py", f"steps={arg.steps},eval_every={arg.steps}")
  c.model.logit_scale_init = arg.scale
  if arg.fixed:
    c.freeze = r"^logit_scale$"
  c.checkpoint_every_steps = max(arg.steps // 4, 1)
  del c.evals["retrieval"]  # The demo's zero-shot evals only.
  return c


def get_sweep(arg=None):
  del arg
  return [{"arg.scale": s, "arg.fixed": f, "seed": seed}
          for s, f in SETTINGS for seed in SEEDS]
