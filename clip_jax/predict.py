r"""Zero-shot classification of images with a trained run, from the shell.

  python -m clip_jax.predict --workdir runs/demo --image x.png \
      --classes "a cat,a dog" [--templates imagenet] [--step N] [--top 5]

Prints, for each image, the classes by probability (softmax over the
classes given, as `clip_jax.load(workdir).classify` computes them; see
clip_jax/api.py). --image is repeatable; --classes is comma-separated or
@FILE (one class a line).
"""

from __future__ import annotations

from absl import flags, logging

from clip_jax import api, cli
from clip_jax.evals import templates as templates_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.")
_IMAGES = flags.DEFINE_multi_string("image", [], "Image file (repeatable).")
_CLASSES = flags.DEFINE_string(
    "classes", None, "Comma-separated class names, or @FILE, one a line.")
_TEMPLATES = flags.DEFINE_string(
    "templates", "none", "Template-set name or alias (evals/templates.py).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default last).")
_TOP = flags.DEFINE_integer("top", 5, "Classes printed per image.")


def parse_classes(spec: str) -> list[str]:
  """'a,b' -> ['a', 'b']; '@file' -> its non-empty lines."""
  if spec.startswith("@"):
    with open(spec[1:], encoding="utf-8") as f:
      names = [line.strip() for line in f]
  else:
    names = [name.strip() for name in spec.split(",")]
  names = [n for n in names if n]
  if len(names) < 2:
    raise cli.UserError(f"--classes={spec!r}: give at least two class "
                        "names, comma-separated (or @FILE).")
  return names


def format_predictions(image: str, class_names, probs, top: int) -> str:
  order = sorted(range(len(class_names)), key=lambda c: (-probs[c], c))
  lines = [image]
  lines += [f"  {100 * probs[c]:6.2f}%  {class_names[c]}"
            for c in order[:top]]
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise cli.UserError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  if not _WORKDIR.value or not _IMAGES.value or not _CLASSES.value:
    raise cli.UserError("--workdir, --image and --classes are required.")
  class_names = parse_classes(_CLASSES.value)
  templates_lib.resolve_name(_TEMPLATES.value)  # Before loading anything.
  model = api.load(_WORKDIR.value, step=_STEP.value)
  probs = model.classify(_IMAGES.value, class_names, _TEMPLATES.value)
  for image, row in zip(_IMAGES.value, probs):
    print(format_predictions(image, class_names, row, _TOP.value))


if __name__ == "__main__":
  cli.run(main)
