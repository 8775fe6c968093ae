r"""SigLIP's bias and temperature initialisation (SigLIP Table 4), in small.

  python -m clip_jax.sweep --config \
      experiments/siglip_bias_temperature_init/config.py \
      --workdir runs/siglip_bias_temperature_init

The demo recipe with the sigmoid loss; the initial logit bias b (or no
bias parameter at all) and the initial logit scale exp(t') vary, each row
with 3 seeds, 600 steps of 256.

Arguments of get_config: bias ('none' or a number), scale (the multiplier
exp(t'): 10 = t' log 10, 1 = t' log 1), steps.
"""

from clip_jax import config as config_lib

# (bias, scale) rows: the paper's best (b=-10, t'=log 10) and worst (b=0,
# t'=log 1) rows and the crossings; 'none' = no bias parameter.
ROWS = (("-10", 10.0), ("-10", 1.0), ("-5", 10.0), ("0", 10.0), ("0", 1.0),
        ("none", 10.0))
SEEDS = (0, 1, 2)


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, bias="-10", scale=10.0, steps=600)
  c = config_lib.load_config_file(
      "../../configs/demo.py",
      f"steps={arg.steps},loss=sigmoid,eval_every={arg.steps}")
  c.model.logit_bias_init = (None if arg.bias.lower() == "none"
                             else float(arg.bias))
  c.model.logit_scale_init = arg.scale
  c.checkpoint_every_steps = max(arg.steps // 4, 1)
  del c.evals["retrieval"]  # The demo's zero-shot evals only.
  return c


def get_sweep(arg=None):
  del arg
  return [{"arg.bias": b, "arg.scale": s, "seed": seed}
          for b, s in ROWS for seed in SEEDS]
