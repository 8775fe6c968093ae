r"""LoRA vs full fine-tuning of the demo model toward a new style (OpenMoji)
from a few examples; experiments/lora/README.md has the question and setup.

  .venv/bin/python experiments/lora/make_data.py --out runs/lora_data
  python -m clip_jax.sweep --config experiments/lora/config.py \
      --workdir runs/lora

Every point starts from the demo model (config.init from `init`, default
runs/demo: `make demo`'s workdir) and fine-tunes on up to `shots` OpenMoji
images of each 'adapt' class (a quarter of the emoji); evals: zero-shot on
the OpenMoji images of the other classes ('openmoji_rest', the transfer)
and the demo's Noto held-out concepts ('heldout_concepts', what is kept of
the source style).

Arguments of get_config: rank (0 = full fine-tuning), lr, steps, shots,
init (the pretrained workdir), data (make_data.py's --out).
"""

import os

import ml_collections

from clip_jax import config as config_lib
from clip_jax import lora

# (rank, learning rates): full fine-tuning at rank 0.
SETTINGS = ((0, (1e-4, 3e-4)), (4, (1e-3, 3e-3)), (8, (1e-3, 3e-3)))
SEEDS = (0, 1, 2)


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, rank=8, lr=1e-3, steps=300, shots=2,
                             init="runs/demo", data="runs/lora_data")
  c = config_lib.load_config_file(
      "../../configs/lora.py",
      f"rank={arg.rank},lr={arg.lr},steps={arg.steps},batch=256")
  c.init.update(workdir=arg.init,
                include=lora.BASE_PARAMS if arg.rank else ".*")
  # The captions are the class names already (make_data.py).
  c.data.update(source="folder", path=os.path.join(arg.data,
                                                   f"train_k{arg.shots}"),
                class_name_caption=False)
  held = c.evals["heldout_concepts"]
  held.source = "emoji"  # The training data is a folder now.
  c.evals = ml_collections.ConfigDict({
      "openmoji_rest": dict(type="zeroshot", source="image_folder",
                            path=os.path.join(arg.data, "rest"),
                            split="test", templates="emoji",
                            batch_size=held.batch_size,
                            every_steps=arg.steps),
      "heldout_concepts": held,
  })
  return c


def get_sweep(arg=None):
  """Seed-major: a sweep stopped part-way has every setting at the seeds
  it finished."""
  del arg
  return [{"arg.rank": rank, "arg.lr": lr, "seed": seed}
          for seed in SEEDS for rank, lrs in SETTINGS for lr in lrs]
