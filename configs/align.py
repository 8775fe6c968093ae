r"""ALIGN (Jia et al. 2021): normalised softmax, learnable temperature, LAMB.

  python -m clip_jax.train --config configs/align.py --workdir runs/align
  python -m clip_jax.train --config configs/align.py:tiny --workdir runs/a

Arguments: batch (16384), tiny (CPU-sized towers and synthetic data, see
configs/clip.py; keeps the loss and the optimiser).

STAND-INS. ALIGN's towers are EfficientNet-L2 (image, 289 px) and BERT-Large
(text); clip_jax has neither. Here a ViT-L/14 at 280 px (the multiple of
its patch size nearest below 289; ~300M parameters against EfficientNet-
L2's ~480M) stands in for the image tower, and a 24-layer, 1024-wide,
16-head, non-causal transformer pooled at its first token (BERT-Large's
shape, [CLS] pooling) for the text tower, trained from scratch like ALIGN's.
So this is ALIGN's training recipe, not its model: figures will differ.

The recipe (Jia et al. 2021, arXiv 2102.05918), value by value, with where
it comes from:
  Loss: the normalised softmax (InfoNCE over L2-normalised embeddings, both
      directions, in-batch negatives): Section 4 (pre-training); the
      softmax loss of losses.py.
  Temperature: learned with the other parameters, not fixed: Section 4
      (the paper compares fixed values with a learned one; the learned one
      is what the main models use). Initial value 1 (logit scale 1.0):
      Hugging Face's AlignConfig.temperature_init_value, "as per the
      original ALIGN implementation" (the paper gives no init). No cap on
      the scale (none is described).
  Label smoothing 0.1: Hugging Face's ALIGN (modeling_align.py, the
      Kakao Brain reproduction) smooths both directions' targets by 0.1;
      the paper's equations have plain one-hot targets. Kept because the
      issue asks for it; set label_smoothing=0 for the equations as written.
  Embedding width 640 (EfficientNet-L2's pooled width; the text tower
      gets a linear projection to it): Section 4 / 5.
  LAMB, weight decay 1e-5, lr warmed up linearly from 0 to 1e-3 over 10k
      steps then decayed linearly to 0 at 1.2M steps (~12 epochs): Section
      5 (training details). Batch 16,384 (1024 TPUv3 cores x 16 pairs):
      Section 5.
  LAMB moments b1 0.9, b2 0.999, eps 1e-6: LAMB's defaults (You et al.
      2019; optax.lamb's), not stated in the ALIGN paper.
  Text: 64 tokens, BERT's uncased 30,522 vocabulary: Hugging Face's ALIGN
      processor and config; the paper's own wordpiece vocabulary is not
      reproduced here.
Citations of sections are from the arXiv text as remembered when this was
written (no copy is stored in the repository to check them); the
Hugging Face values were read from its source.
"""

from clip_jax import config as config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, batch=16384, tiny=False)
  c = config_lib.load_config_file(
      "clip.py", f"model=L/14,loss=softmax,batch={arg.batch},tiny={arg.tiny}")
  c.total_examples = None
  c.total_steps = 20 if arg.tiny else 1_200_000
  c.warmup_steps = 2 if arg.tiny else 10_000
  c.optimizer = "lamb"
  c.lr = 1e-3
  c.wd = 1e-5
  c.wd_convention = "coupled"  # LAMB takes wd as it is (see optim.py).
  c.adam.update(b1=0.9, b2=0.999, eps=1e-6)
  c.schedule = "linear"
  c.min_lr_ratio = 0.0
  c.grad_clip_norm = None
  c.label_smoothing = 0.1
  c.model.logit_scale_init = 1.0
  c.model.logit_scale_max = None
  c.model.logit_bias_init = None
  c.model.activation = "gelu"
  if arg.tiny:
    return c
  c.model.embed_dim = 640
  c.model.image.update(variant="L/14", image_size=280, pool="cls")
  c.model.text.update(variant="large", width=1024, depth=24, heads=16,
                      mlp_dim=4096, vocab_size=30522, context_length=64,
                      pool="first", causal=False)
  c.data.image_size = c.model.image.image_size
  c.data.context_length = c.model.text.context_length
  c.data.vocab_size = c.model.text.vocab_size
  return c
