r"""SigLIP (Zhai et al. 2023): sigmoid loss, scale init 10, bias init -10.

  python -m clip_jax.train --config configs/siglip.py --workdir runs/siglip
  python -m clip_jax.train --config configs/siglip.py:model=B/16,chunked ...

Arguments: model (B/16 default), batch (32768), chunked (ring-chunked
sigmoid loss: no device holds more than a local x local block of logits),
tiny (CPU-sized, see configs/clip.py).
Recipe (paper, B/16 from scratch): AdamW-style lr 1e-3, wd 1e-4, b2 0.95,
grad clipping at 1.0, warmup then cosine, MAP image head, text pooled at the
last token, no temperature cap.
"""

from clip_jax import config as config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, model="B/16", batch=32768, chunked=False,
                             tiny=False)
  loss = "sigmoid_chunked" if arg.chunked else "sigmoid"
  c = config_lib.load_config_file(
      "clip.py",
      f"model={arg.model},loss={loss},batch={arg.batch},tiny={arg.tiny}")
  c.lr = 1e-3
  c.wd = 1e-4
  c.adam.b2 = 0.95
  c.grad_clip_norm = 1.0
  c.warmup_steps = 2 if arg.tiny else 5000
  c.model.activation = "gelu"
  c.model.image.pool = "map"
  c.model.text.update(pool="last", causal=False, vocab_size=32000,
                      context_length=8 if arg.tiny else 16)
  if arg.tiny:
    c.model.text.vocab_size = 64
  c.data.context_length = c.model.text.context_length
  c.data.vocab_size = c.model.text.vocab_size
  c.data.eos_policy = "last"
  return c
