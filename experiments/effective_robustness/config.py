r"""Effective robustness to style (CLIP Fig. 13), in miniature.

  python -m clip_jax.sweep --config \
      experiments/effective_robustness/config.py \
      --workdir runs/effective_robustness

The demo recipe at three tower widths (48, 96, 144; 3 layers, 4 heads,
MLP 4x) and three training lengths (300, 600, 1,200 steps of 256), one
seed each. Zero-shot accuracy in the training style (Noto renderings of
the held-out names, `heldout_concepts`, 163-way) against accuracy in the
unseen style (`openmoji`, 1,923-way), plotted against each other (one
line per width):
  python -m clip_jax.sweep report runs/effective_robustness \
      --x eval/heldout_concepts/top1 --metric eval/openmoji/top1 \
      --lines arg.width
The two tasks differ in their class lists (163 vs 1,923 names), so only
the shape of the relation is comparable with CLIP's figure, not its
slope.

Arguments of get_config: width, steps.
"""

from clip_jax import config as config_lib

WIDTHS = (48, 96, 144)
STEPS = (300, 600, 1200)


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, width=96, steps=600)
  c = config_lib.load_config_file(
      "../../configs/demo.py", f"steps={arg.steps},eval_every={arg.steps}")
  tower = dict(width=arg.width, mlp_dim=4 * arg.width, heads=4, depth=3)
  c.model.embed_dim = arg.width
  c.model.image.update(**tower)
  c.model.text.update(**tower)
  c.checkpoint_every_steps = max(arg.steps // 4, 1)
  del c.evals["retrieval"]  # The demo's zero-shot evals only.
  return c


def get_sweep(arg=None):
  from clip_jax import sweep  # pylint: disable=g-import-not-at-top
  del arg
  return sweep.product(**{"arg.width": list(WIDTHS),
                          "arg.steps": list(STEPS)})
