r"""LoRA fine-tuning of a pretrained clip_jax workdir (Hu et al. 2021,
arXiv:2106.09685; clip_jax/lora.py has the method and the param names).

  python -m clip_jax.train --config configs/lora.py:init=runs/demo \
      --workdir runs/demo_lora
  python -m clip_jax.lora merge --workdir runs/demo_lora \
      --out runs/demo_lora_merged
  python -m clip_jax.evaluate --workdir runs/demo_lora_merged

`init` is a clip_jax workdir (a trained run, or `python -m clip_jax.convert`
output). Its model, data and evals configs are copied and all its params
are loaded (config.init, the adapters excepted: they start as LoRA's init,
so the run starts exactly at the pretrained model); only the adapters (and
`train`'s params) are trained. Fine-tune on other data with
--config.data.* overrides (experiments/lora/ does, on a few OpenMoji
images).

Arguments (after the colon, comma-separated):
  init     the pretrained workdir (required to train; '' = the demo
           model's shape from configs/demo.py, freshly initialised: for
           `python -m clip_jax.lora count` and tests).
  rank     LoRA rank r (default 8); 0 = full fine-tuning (no adapters,
           every param trained), the baseline.
  alpha    update scale numerator, alpha / r (default 8).
  targets  a TARGETS name (default 'attn') or a regex over Dense module
           paths.
  train    regex of base params trained beside the adapters (default
           'logit_scale'; 'none' = adapters only).
  steps, lr, batch   the fine-tuning run (default 300 steps, lr 1e-3,
           batch 256; cosine decay after a 10% warmup).
Weight decay is 0: this file's choice (decay on A and B pulls the update
towards zero, i.e. towards the pretrained model).
"""

from clip_jax import config as config_lib
from clip_jax import lora

TARGETS = {
    # q, k, v, out of every encoder block, both towers.
    "attn": lora.DEFAULT_TARGETS,
    # q and v only (the paper's GPT-3 setting).
    "qv": r"(img|txt)/encoder/.*/attn/(query|value)",
    # attention and both MLP layers of every encoder block.
    "attn_mlp": r"(img|txt)/encoder/.*/(attn/(query|key|value|out)|mlp/fc[12])",
}


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, init="", rank=8, alpha=8.0, targets="attn",
                             train="logit_scale", steps=300, lr=1e-3,
                             batch=256)
  c = config_lib.load_config_file(
      "demo.py", f"steps={arg.steps},batch={arg.batch},eval_every="
      f"{arg.steps}")
  if arg.init:
    source = config_lib.load(arg.init)
    for key in ("model", "data", "evals"):
      c[key] = source[key]
    for name in c.evals:
      c.evals[name].every_steps = arg.steps
      for other in ("every_examples", "every_epochs"):
        if other in c.evals[name]:
          c.evals[name][other] = None
  c.lr = arg.lr
  c.wd = 0.0
  c.warmup_steps = max(arg.steps // 10, 1)
  c.checkpoint_every_steps = arg.steps
  if arg.rank > 0:
    c.lora.update(targets=TARGETS.get(arg.targets, arg.targets),
                  rank=arg.rank, alpha=arg.alpha,
                  train=None if arg.train == "none" else arg.train)
  if arg.init:
    c.init.update(workdir=arg.init,
                  include=lora.BASE_PARAMS if arg.rank > 0 else ".*")
  return c
