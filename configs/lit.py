r"""LiT (Zhai et al. 2022, "LiT: Zero-Shot Transfer with Locked-image text
Tuning", arXiv:2111.07991): a pretrained image tower, locked, and a text
tower trained contrastively to read its embeddings.

  python -m clip_jax.train --config configs/lit.py:init=runs/vit_b16 \
      --workdir runs/lit
  python -m clip_jax.train \
      --config configs/lit.py:init=runs/clip_b32,text=pretrained ...

The paper names each setting by two letters, image tower then text tower:
  L  locked: initialised from a pretrained model, never updated;
  U  unlocked: initialised from a pretrained model, trained;
  u  unlocked from scratch: random init, trained.
Its comparison of these settings (the ImageNet zero-shot table / figure of
the paper's design-choices section: Lu, LU, UU, Uu, uu, ...) finds the
locked pretrained image tower best for zero-shot transfer, with the text
tower either from scratch or pretrained; unlocking the image tower hurts
with noisy image-text data. This file follows that:
  text=scratch (default)  'Lu': locked image tower, text tower from scratch.
  text=pretrained         'LU': the text tower (and its projection) also
                          starts from `init`'s checkpoint, and trains.

`init` is a clip_jax workdir (a trained run, or `python -m clip_jax.convert`
output): its image tower config (model.image, model.activation,
model.embed_dim) and preprocessing (data.mean/std, image size) are copied,
its checkpoint's image tower is loaded (config.init) and frozen
(config.freeze). img_head=False (default, as LiT's best released model,
B16B_2, which has no image head) also loads and locks the image projection,
so image embeddings are exactly the source's; img_head=True trains a fresh
image projection on the locked features (LiT's B16B).

The optimiser follows big_vision's LiT config (configs/proj/image_text/
lit_coco.py) where clip_jax has the option: softmax contrastive loss over
the global batch, lr 1e-3, cosine decay after a 3% linear warmup, gradient
clipping at norm 1.0 (over the trained parameters only, see optim.py),
temperature init 10. Weight decay: clip_jax's `wd` is AdamW's (multiplied
by the lr); 1e-4 is this file's choice, not a number from the paper. The
length is clip.py's (32 x 400M examples): set config.total_* for your data.

Arguments (after the colon, comma-separated):
  init      the pretrained workdir (required outside tests; '' = none).
  text      'scratch' (Lu) or 'pretrained' (LU).
  img_head  train a fresh image projection (default False: load, lock).
  model     image tower variant when init has no config (default B/16).
  batch     global batch (default 32768).
  tiny      CPU-sized towers and synthetic data (tests, development).
Text uses the CLIP BPE tokenizer (data.tokenizer='clip_bpe'), which a
pretrained CLIP text tower (text=pretrained) needs; from scratch any
tokenizer works (set data.tokenizer and the model.text ids to match).
"""

from clip_jax import config as config_lib

TEXT_MODES = ("scratch", "pretrained")


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, init="", text="scratch", img_head=False,
                             model="B/16", batch=32768, tiny=False)
  if arg.text not in TEXT_MODES:
    raise ValueError(f"configs/lit.py: text={arg.text!r} is not one of "
                     f"{TEXT_MODES}.")
  c = config_lib.load_config_file(
      "clip.py", f"model={arg.model},batch={arg.batch}"
      + (",tiny" if arg.tiny else ""))
  c.lr = 1e-3
  c.wd = 1e-4
  c.grad_clip_norm = 1.0
  c.schedule = "cosine"
  c.model.logit_scale_init = 10.0
  if not arg.tiny:
    c.warmup_steps = None
    c.warmup_examples = int(0.03 * c.total_examples)
    c.data.tokenizer = "clip_bpe"
    c.model.text.update(vocab_size=49408, eos_id=49407, pad_id=-1)
    c.data.vocab_size = 49408

  locked = "img/.*" if arg.img_head else "img/.*|img_proj/.*"
  c.freeze = c.init.include = locked
  if arg.init:
    source = config_lib.load(arg.init)
    c.model.image = source.model.image
    c.model.activation = source.model.activation
    c.model.embed_dim = source.model.embed_dim
    for key in ("mean", "std"):
      c.data[key] = tuple(source.data[key])
    c.data.image_size = c.model.image.image_size
    include = locked
    if arg.text == "pretrained":
      c.model.text = source.model.text
      for key in ("tokenizer", "bpe_path", "context_length", "vocab_size",
                  "eos_policy", "lowercase"):
        if source.data.get(key) is not None:
          c.data[key] = source.data[key]
      include += "|txt/.*|txt_proj/.*|logit_scale|logit_bias"
    c.init.update(workdir=arg.init, include=include)
  elif arg.text == "pretrained":
    raise ValueError("configs/lit.py: text=pretrained needs init=WORKDIR.")
  return c
