r"""Distilling the demo model into a smaller student (CLIP-KD, TinyCLIP).

  # The teacher: the demo model (what `make demo` trains), once.
  python -m clip_jax.train --config configs/demo.py --workdir runs/demo
  python -m clip_jax.sweep --config experiments/distillation/config.py \
      --workdir runs/distillation

The student is the demo recipe with width-48 towers and a 48-wide
embedding (the demo model: 96), trained on the same emoji data for the
same 2,400 steps of 256: alone ('none'), with CLIP-KD's contrastive
relational distillation from the demo model ('crd': KL between the
teacher's and the student's image<->text softmax rows over the batch,
each model with its own logit scale), or with that plus feature
distillation ('crd_fd': 1 - cos between the student's embedding, through
a learned 48 -> 96 projection, and the teacher's); 3 seeds each.

Arguments of get_config: kd (none | crd | crd_fd), teacher (its workdir),
width (the student's), steps.
"""

from clip_jax import config as config_lib

KD = {"none": None, "crd": (0.0, 1.0), "crd_fd": (1.0, 1.0)}  # (fd, crd)
SEEDS = (0, 1, 2)


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, kd="none", teacher="runs/demo", width=48,
                             steps=2400)
  if arg.kd not in KD:
    raise ValueError(f"kd={arg.kd!r} is not one of {sorted(KD)}.")
  c = config_lib.load_config_file(
      "../../configs/demo.py", f"steps={arg.steps},eval_every={arg.steps}")
  c.model.embed_dim = arg.width
  for tower in (c.model.image, c.model.text):
    tower.update(width=arg.width, mlp_dim=4 * arg.width)
  c.checkpoint_every_steps = max(arg.steps // 4, 1)
  del c.evals["retrieval"]  # The demo's zero-shot evals only.
  if KD[arg.kd] is not None:
    c.distill.teacher_workdir = arg.teacher
    c.distill.feature_weight, c.distill.relation_weight = KD[arg.kd]
  return c


def get_sweep(arg=None):
  del arg
  return [{"arg.kd": kd, "seed": seed} for kd in KD for seed in SEEDS]
