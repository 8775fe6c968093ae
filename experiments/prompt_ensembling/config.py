r"""Prompt engineering and ensembling (CLIP Section 3.1.4), in small.

  python -m clip_jax.sweep --config experiments/prompt_ensembling/config.py \
      --workdir runs/prompt_ensembling

Two training recipes, 3 seeds each, 1,200 steps of 256: the demo's (its
captions wrapped in the `emoji` templates) and the same with bare-name
captions (caption_templates='none'). Each model is scored zero-shot, side
by side, with the bare class name, one template ('a photo of a {}.'),
CLIP's 80 ImageNet templates, and the `emoji` ensemble
('eval/<split>/<set>/top1').

The 16-token context of the demo cuts many templated prompts (and with
them the end of the class name); `:context=32` runs the same sweep with a
32-token text tower and tokenizer (into its own workdir):
  python -m clip_jax.sweep --config \
      experiments/prompt_ensembling/config.py:context=32 \
      --workdir runs/prompt_ensembling_ctx32

Arguments of get_config: train_templates ('emoji' | 'none'), steps,
context (text tokens, the demo's 16 by default).
"""

import ml_collections

from clip_jax import config as config_lib

PROMPTS = {"bare": "none", "photo": ["a photo of a {}."],
           "clip80": "clip_imagenet", "emoji": "emoji"}
SEEDS = (0, 1, 2)


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, train_templates="emoji", steps=1200,
                             context=16)
  c = config_lib.load_config_file(
      "../../configs/demo.py", f"steps={arg.steps},eval_every={arg.steps}")
  c.model.text.context_length = c.data.context_length = arg.context
  c.data.caption_templates = arg.train_templates
  c.checkpoint_every_steps = max(arg.steps // 4, 1)
  common = dict(batch_size=512, every_steps=arg.steps, templates=PROMPTS)
  c.evals = ml_collections.ConfigDict({
      "openmoji": dict(type="zeroshot", split="openmoji", **common),
      "heldout_concepts": dict(type="zeroshot", split="heldout_concepts",
                               **common)})
  return c


def get_sweep(arg=None):
  del arg
  return [{"arg.train_templates": t, "seed": seed}
          for t in ("emoji", "none") for seed in SEEDS]
