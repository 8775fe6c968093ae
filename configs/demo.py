r"""The demo: a small CLIP trained on the built-in emoji dataset, on a CPU.

  python -m clip_jax.demo                      # what `make demo` runs
  python -m clip_jax.train --config configs/demo.py --workdir runs/demo

Trains on Noto renderings of ~90% of the emoji with their Unicode names;
evaluates zero-shot on two styles never seen, N-way over all 1,923 base
emoji names: Symbola's monochrome line art (the validation style, to choose
recipes on) and OpenMoji (the test style); zero-shot on the held-out ~10%
of names; and image<->text retrieval on OpenMoji.

Choices (experiments/emoji_demo.md has the runs behind them):
- 12 px images in 3x3 patches (16 tokens), 3-layer width-96 towers: ~2,400
  steps of 256 fit in ~12 minutes on 2 CPU cores. 12 px learns faster
  than 16 px, and coarse colour layout is what the two styles share.
- Skin-tone variants are also captioned with their base's name
  (class_name_caption), the name zero-shot classes use: half the OpenMoji
  images are skin-tone variants.
- Strong augmentation, so that one renderer's look stops being a cue:
  crops from 0.35 of the area out to a 2x zoom-out (OpenMoji draws its
  glyphs smaller in the frame than Noto), colour/greyscale/blur style at
  strength 0.6, dark outlines around the silhouette with probability 0.3.
- Captions wrapped in the `emoji` templates, so the zero-shot prompt
  ensemble is in distribution; a sentencepiece tokenizer trained on the
  training captions; softmax loss, AdamW lr 2e-3, batch 256.
Arguments: steps, loss (softmax | sigmoid), batch, eval_every.
"""

import ml_collections

from clip_jax import config as config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, steps=2400, loss="softmax", batch=256,
                             eval_every=800)
  c = config_lib.load_config_file("clip.py", f"loss={arg.loss}")
  c.batch_size = arg.batch
  c.total_examples = None
  c.total_steps = arg.steps
  c.warmup_steps = min(100, arg.steps // 10)
  c.log_every_steps = 50
  c.checkpoint_every_steps = 800
  c.lr = 2e-3
  c.wd = 0.1
  c.grad_clip_norm = 1.0
  c.model.dtype = "float32"
  c.model.embed_dim = 96
  c.model.activation = "gelu"
  c.model.image.update(variant="tiny", image_size=12, patch_size=3,
                       width=96, depth=3, mlp_dim=384, heads=4)
  c.model.text.update(variant="tiny", vocab_size=1024, context_length=16,
                      width=96, depth=3, mlp_dim=384, heads=4)
  c.data.update(source="emoji", split="train", tokenizer="emoji",
                image_size=12, context_length=16, vocab_size=1024,
                class_name_caption=True, random_resized_crop=(0.35, 2.0),
                style_strength=0.6, outline_prob=0.3,
                caption_templates="emoji", worker_count=0)
  evals = dict(batch_size=512, every_steps=arg.eval_every)
  c.evals = ml_collections.ConfigDict({
      # symbola: the validation style (choose recipes on it); openmoji: the
      # test style. Neither is seen in training.
      "symbola": dict(type="zeroshot", split="symbola", templates="emoji",
                      **evals),
      "openmoji": dict(type="zeroshot", split="openmoji", templates="emoji",
                       **evals),
      "heldout_concepts": dict(type="zeroshot", split="heldout_concepts",
                               templates="emoji", **evals),
      "retrieval": dict(type="retrieval", split="openmoji", **evals),
  })
  return c
