"""`make demo`: prepare the emoji data, train configs/demo.py, print results.

  python -m clip_jax.demo [--workdir runs/demo]
      [--config configs/demo.py:steps=N]

Re-running on a finished workdir trains nothing (it resumes at the end) and
prints the recorded results again; use a new --workdir for a new run.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags, logging

from clip_jax import config as config_lib
from clip_jax import train  # Defines --config and --workdir.

DEFAULT_CONFIG = "configs/demo.py"
DEFAULT_WORKDIR = "runs/demo"

ROWS = [
    ("zero-shot openmoji (unseen style, %d-way)", "openmoji",
     ("top1", "top5")),
    ("zero-shot heldout_concepts (unseen names, %d-way)", "heldout_concepts",
     ("top1", "top5")),
]


def read_metrics(workdir: str):
  """The metrics.jsonl records of a run, in order."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def final_evals(records) -> dict:
  """Latest value of every eval/ key."""
  out = {}
  for record in records:
    out.update({k: v for k, v in record.items() if k.startswith("eval/")})
  return out


def format_table(evals: dict, class_counts: dict, wall_seconds: float) -> str:
  lines = ["", f"{'':52} {'top-1':>7} {'top-5':>7}"]
  for title, name, _ in ROWS:
    title = title % class_counts.get(name, 0)
    lines.append(f"{title:52} {100 * evals[f'eval/{name}/top1']:6.2f}% "
                 f"{100 * evals[f'eval/{name}/top5']:6.2f}%")
  lines.append(f"\n{'retrieval on openmoji':52} {'R@1':>7} {'R@5':>7} "
               f"{'R@10':>7}")
  for direction, title in (("i2t", "image -> text"), ("t2i", "text -> image")):
    vals = [100 * evals[f"eval/retrieval/{direction}/r@{k}"]
            for k in (1, 5, 10)]
    lines.append(f"  {title:50} " + " ".join(f"{v:6.2f}%" for v in vals))
  lines.append(f"\nwall time (preparation + training + evals): "
               f"{wall_seconds / 60:.1f} min")
  return "\n".join(lines)


def plot(records, path: str) -> None:
  """Loss and zero-shot accuracy against step, as a PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
  train = [r for r in records if "loss" in r]
  ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train])
  ax_loss.set(xlabel="step", ylabel="training loss", title="loss")
  for name in ("openmoji", "heldout_concepts"):
    for k in ("top1", "top5"):
      key = f"eval/{name}/{k}"
      pts = [(r["step"], 100 * r[key]) for r in records if key in r]
      if pts:
        ax_acc.plot(*zip(*pts), marker="o", label=f"{name} {k}")
  ax_acc.set(xlabel="step", ylabel="accuracy (%)", title="zero-shot")
  ax_acc.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  start = time.time()
  config = flags.FLAGS.config or config_lib.load_config_file(DEFAULT_CONFIG)
  workdir = flags.FLAGS.workdir or DEFAULT_WORKDIR
  from clip_jax.data import sources  # pylint: disable=g-import-not-at-top
  sources.emoji_source(config.data, "train")  # Prepares the cache once.
  train.train(config, workdir)
  records = read_metrics(workdir)
  class_counts = {name: len(sources.emoji_class_names(config.data, name))
                  for _, name, _ in ROWS}
  png = os.path.join(workdir, "curves.png")
  plot(records, png)
  print(format_table(final_evals(records), class_counts, time.time() - start))
  print(f"metrics: {workdir}/metrics.jsonl, curves: {png}")


if __name__ == "__main__":
  app.run(main)
