r"""Sigmoid vs softmax loss across batch sizes, at a fixed number of examples.

  python -m clip_jax.sweep --config \
      experiments/sigmoid_vs_softmax_batch/config.py \
      --workdir runs/sigmoid_vs_softmax_batch

The demo recipe (configs/demo.py) with loss softmax | sigmoid (SigLIP's
scale 10 / bias -10 init for sigmoid) and batch 32 ... 512, each run seeing
the same number of examples (`examples`, default 153,600 = 600 steps of
256), so a smaller batch takes more steps. lr and weight decay are kept
(no lr scaling with batch). Evals: zero-shot on heldout_concepts and
openmoji at the end.

Arguments of get_config: loss, batch, examples. get_sweep(arg): 3 seeds
(config.seed) per point; arg 'quick': one seed of batch 32 and 256 only.
"""

from clip_jax import config as config_lib

BATCHES = (32, 64, 128, 256, 512)
LOSSES = ("softmax", "sigmoid")
SEEDS = (0, 1, 2)


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, loss="softmax", batch=256,
                             examples=153_600)
  steps = -(-arg.examples // arg.batch)
  c = config_lib.load_config_file(
      "../../configs/demo.py",
      f"steps={steps},loss={arg.loss},batch={arg.batch},eval_every={steps}")
  c.checkpoint_every_steps = max(steps // 4, 1)
  del c.evals["retrieval"]  # The demo's zero-shot evals only.
  return c


def get_sweep(arg=None):
  from clip_jax import sweep  # pylint: disable=g-import-not-at-top
  if arg == "quick":
    return sweep.product(**{"arg.loss": list(LOSSES),
                            "arg.batch": [32, 256], "seed": [0]})
  # Seed outermost: a sweep stopped part-way (30 runs take hours) has
  # every (loss, batch) at seed 0 before any at seed 1.
  return sweep.product(**{"seed": list(SEEDS), "arg.loss": list(LOSSES),
                          "arg.batch": list(BATCHES)})
