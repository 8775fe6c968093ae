r"""The demo: a small CLIP trained on the built-in emoji dataset, on a CPU.

  python -m clip_jax.demo                      # what `make demo` runs
  python -m clip_jax.train --config configs/demo.py --workdir runs/demo

Trains on Noto renderings of ~90% of the emoji with their Unicode names;
evaluates zero-shot on OpenMoji renderings (a style never seen, N-way over
all 1,923 base emoji names) and on the held-out ~10% of names, and
image<->text retrieval on OpenMoji.

Choices (see the README for what they gave): 16 px images in 4x4 patches
(16 tokens: cheap enough for ~20 epochs on 2 CPU cores in ~10 minutes),
3-layer width-96 towers, a sentencepiece tokenizer trained on the training
captions, captions wrapped in the `emoji` templates so that the zero-shot
prompt ensemble is in distribution, random resized crops and colour/blur
"style" augmentation, softmax loss, batch 256.
Arguments: steps, loss (softmax | sigmoid), batch, eval_every.
"""

import ml_collections

from clip_jax import config as config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, steps=2000, loss="softmax", batch=256,
                             eval_every=500)
  c = config_lib.load_config_file("clip.py", f"loss={arg.loss}")
  c.batch_size = arg.batch
  c.total_examples = None
  c.total_steps = arg.steps
  c.warmup_steps = min(100, arg.steps // 10)
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.lr = 2e-3
  c.wd = 0.1
  c.grad_clip_norm = 1.0
  c.model.dtype = "float32"
  c.model.embed_dim = 96
  c.model.activation = "gelu"
  c.model.image.update(variant="tiny", image_size=16, patch_size=4,
                       width=96, depth=3, mlp_dim=384, heads=4)
  c.model.text.update(variant="tiny", vocab_size=1024, context_length=16,
                      width=96, depth=3, mlp_dim=384, heads=4)
  c.data.update(source="emoji", split="train", tokenizer="emoji",
                image_size=16, context_length=16, vocab_size=1024,
                random_resized_crop=(0.5, 1.0), style_strength=0.4,
                caption_templates="emoji", worker_count=0)
  evals = dict(batch_size=512, every_steps=arg.eval_every)
  c.evals = ml_collections.ConfigDict({
      "openmoji": dict(type="zeroshot", split="openmoji", templates="emoji",
                       **evals),
      "heldout_concepts": dict(type="zeroshot", split="heldout_concepts",
                               templates="emoji", **evals),
      "retrieval": dict(type="retrieval", split="openmoji", **evals),
  })
  return c
