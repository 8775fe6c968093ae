r"""CLIP (Radford et al. 2021): softmax InfoNCE, learnable temperature.

  python -m clip_jax.train --config configs/clip.py --workdir runs/clip
  python -m clip_jax.train --config configs/clip.py:model=B/16,batch=4096 ...
  python -m clip_jax.train --config configs/clip.py:tiny --workdir runs/t

Arguments (after the colon, comma-separated):
  model   image tower variant: B/32 (default), B/16, L/14, S/16, tiny, mu.
  loss    softmax (default), sigmoid, sigmoid_chunked, or another
          losses.LOSSES name (multi_positive, vse_max, vse_sum).
  batch   global batch size (default 32768, the paper's).
  tiny    CPU-sized towers, 32 px synthetic data, a few steps (for smoke
          tests and development).
Point config.data at your image-text data.

The recipe, value by value, with where it comes from (Radford et al. 2021,
arXiv 2103.00020, Appendix F; table numbers of that version):
  batch 32,768; 32 epochs of 400M pairs; 2,000 warmup iterations; weight
      decay 0.2; max temperature (logit scale cap) 100; vocabulary 49,408:
      Table 19 (common hyperparameters).
  Adam b1 0.9, b2 0.98, eps 1e-6 (the ViT values; ResNets used b2 0.999,
      eps 1e-8): Table 19.
  Weight decay convention: PyTorch AdamW (decoupled from the gradient but
      multiplied by the lr: w -= lr(t) * wd * w per step), config
      wd_convention='coupled'; tests/test_recipes.py pins it.
  lr 5e-4 (B/32, B/16), 4e-4 (L/14); embed dim 512 (768 for L/14); text
      tower 12 layers x 512 wide x 8 heads (768 x 12 for L/14): Table 21.
  Cosine schedule to 0 after the warmup: Section 2.5.
  Temperature init 0.07 (logit scale 1/0.07), learnable, clipped so the
      logits are scaled by at most 100: Section 2.5.
  Image pooling: the class token (ViT, Section 2.4); text: the activation
      at the [EOS] token of the last layer, causal (masked) self-attention:
      Section 2.4. Context 77 = the paper's 76 + [SOS].
  Activation quick_gelu (x * sigmoid(1.702 x)): not in the paper; OpenAI's
      released code (model.py QuickGELU).
With loss=sigmoid (or sigmoid_chunked) the SigLIP scale/bias init is used
(see configs/siglip.py for the rest of that recipe); the other losses keep
CLIP's.
"""

import ml_collections
from ml_collections import config_dict

from clip_jax import config as config_lib

TEXT_FOR_IMAGE = {"L/14": "large"}  # CLIP's L/14 has a 768-wide text tower.
PEAK_LR = {"L/14": 4e-4}  # Table 21; B/32 and B/16: 5e-4.


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, model="B/32", loss="softmax", batch=32768,
                             tiny=False)
  c = config_lib.base_config()
  c.loss = arg.loss
  c.batch_size = arg.batch
  c.total_examples = 32 * 400_000_000
  c.warmup_steps = 2000
  c.lr = PEAK_LR.get(arg.model, 5e-4)
  c.wd = 0.2
  c.wd_convention = "coupled"  # PyTorch AdamW: decay wd * lr(t) per step.
  c.adam.b2 = 0.98
  c.adam.eps = 1e-6

  c.model = ml_collections.ConfigDict(dict(
      embed_dim=768 if arg.model == "L/14" else 512,
      logit_scale_init=1 / 0.07,
      logit_scale_max=100.0,
      # A typed None, so --config.model.logit_bias_init=-10 can set it.
      logit_bias_init=config_dict.placeholder(float),
      dtype="bfloat16",
      activation="quick_gelu",
      remat=False,
      remat_policy="none",  # 'full' / 'dots_saveable': see two_towers.py.
      scan=False,
      # The performance levers at their defaults, so --config flags reach
      # them (README "Performance"): fused_qkv / matmul / one_hot.
      attention="flax",
      image=dict(variant=arg.model, image_size=224, pool="cls",
                 patch_embed="conv"),
      text=dict(variant=TEXT_FOR_IMAGE.get(arg.model, "base"),
                vocab_size=49408, context_length=77, pool="eos",
                causal=True, eos_id=1, pad_id=0, embed_lookup="gather"),
  ))
  if arg.loss in ("sigmoid", "sigmoid_chunked"):
    c.model.logit_scale_init = 10.0
    c.model.logit_scale_max = config_dict.placeholder(float)  # No cap.
    c.model.logit_bias_init = -10.0

  from clip_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  c.data = pipeline.default_data_config()
  c.data.image_size = c.model.image.image_size
  c.data.context_length = c.model.text.context_length
  c.data.vocab_size = c.model.text.vocab_size

  if arg.tiny:
    make_tiny(c, arg.batch if arg.batch != 32768 else 64)
  return c


def make_tiny(c, batch):
  """Shrinks a recipe to CPU size, keeping its loss and optimiser."""
  c.batch_size = batch
  c.total_examples = None
  c.total_steps = 20
  c.warmup_steps = 2
  c.log_every_steps = 5
  c.checkpoint_every_steps = 10
  c.model.embed_dim = 32
  c.model.dtype = "float32"
  c.model.image.update(variant="mu", image_size=32, patch_size=8)
  c.model.text.update(variant="mu", vocab_size=64, context_length=8)
  c.data.source = "synthetic"
  c.data.image_size = 32
  c.data.context_length = 8
  c.data.vocab_size = 64
