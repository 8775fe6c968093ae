r"""Fine-tune (or evaluate) a converted checkpoint: its own config.

  python -m clip_jax.convert --from hf --in clip-vit-base-patch32 \
      --out runs/clip_b32
  python -m clip_jax.train --config configs/converted.py:runs/clip_b32 \
      --workdir runs/clip_b32 --allow_config_change \
      --config.data.source=folder --config.data.path=train.jsonl \
      --config.total_steps=2000 --config.lr=1e-5

The argument is the workdir clip_jax.convert wrote: this returns the config
it saved there (model, preprocessing, tokenizer, and fine-tuning defaults:
AdamW lr 1e-5, wd 0.1, 1,000 steps, 100 warmup, batch 256). Training in
that workdir resumes its step-0 checkpoint (the converted weights, fresh
optimiser state) with the schedule given here. Point config.data at your
image-text data (convert writes the built-in 'emoji' source as a
placeholder).
"""

from clip_jax import api


def get_config(arg=None):
  if not arg:
    raise ValueError("configs/converted.py needs the converted workdir: "
                     "--config configs/converted.py:WORKDIR.")
  return api.load_run_config(arg)
