r"""CLIP vs CLIP + SLIP's SimCLR term (Mu et al. 2022), on the emoji demo.

  python -m clip_jax.sweep --config experiments/slip/config.py \
      --workdir runs/slip

The demo recipe (configs/demo.py, softmax, 2,400 steps of 256), 3 seeds:
  clip  slip.weight=0 (the demo itself);
  slip  slip.weight=1 (SLIP's ssl_scale), temperature 0.1, the head and
        views at clip_jax/slip.py's defaults (hidden 512, out 32 for the
        width-96 tower; SimCLR crops of 0.08-1 of the area, flips, colour
        jitter 0.4, blur).
Both keep the demo's lr 2e-3 and wd 0.1 (SLIP tuned its own: lr 3e-3,
wd 0.1 for SLIP against 5e-4, 0.5 for CLIP; not swept here).

Arguments of get_config: steps.
"""

from clip_jax import config as config_lib

SEEDS = (0, 1, 2)
POINTS = (
    {"slip.weight": 0.0},
    {"slip.weight": 1.0},
)


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, steps=2400)
  c = config_lib.load_config_file(
      "../../configs/demo.py", f"steps={arg.steps},eval_every={arg.steps}")
  c.checkpoint_every_steps = max(arg.steps // 4, 1)
  return c


def get_sweep(arg=None):
  del arg
  return [{**p, "seed": seed} for p in POINTS for seed in SEEDS]
