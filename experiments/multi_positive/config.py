r"""Multi-positive contrastive loss (UniCL) vs CLIP's softmax, on the demo.

  python -m clip_jax.sweep --config experiments/multi_positive/config.py \
      --workdir runs/multi_positive

The demo recipe (configs/demo.py) with loss softmax or multi_positive
(config.loss_key='label': the emoji base index, shared by a base emoji and
its skin-tone variants, which the demo also captions with the base name),
3 seeds each, full demo length.

Arguments of get_config: loss, steps.
"""

from clip_jax import config as config_lib

LOSSES = ("softmax", "multi_positive")
SEEDS = (0, 1, 2)


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, loss="softmax", steps=2400)
  c = config_lib.load_config_file(
      "../../configs/demo.py",
      f"steps={arg.steps},loss={arg.loss},eval_every={arg.steps}")
  c.loss_key = "label"
  c.checkpoint_every_steps = max(arg.steps // 4, 1)
  return c


def get_sweep(arg=None):
  del arg
  return [{"arg.loss": loss, "seed": seed} for loss in LOSSES
          for seed in SEEDS]
