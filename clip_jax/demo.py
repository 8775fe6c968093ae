"""`make demo`: prepare the emoji data, train configs/demo.py, print results.

  python -m clip_jax.demo [--workdir runs/demo]
      [--config configs/demo.py:steps=N]

Re-running on a finished workdir trains nothing (it resumes at the end) and
prints the recorded results again; use a new --workdir for a new run.
"""

from __future__ import annotations

import time

from absl import flags, logging

from clip_jax import cli, train  # train defines --config and --workdir.
from clip_jax import config as config_lib
from clip_jax import plot as plot_lib

DEFAULT_CONFIG = "configs/demo.py"
DEFAULT_WORKDIR = "runs/demo"

ROWS = [
    ("zero-shot symbola (validation style, %d-way)", "symbola",
     ("top1", "top5")),
    ("zero-shot openmoji (unseen test style, %d-way)", "openmoji",
     ("top1", "top5")),
    ("zero-shot heldout_concepts (unseen names, %d-way)", "heldout_concepts",
     ("top1", "top5")),
]


def read_metrics(workdir: str):
  """The metrics.jsonl records of a run, in order."""
  return plot_lib.read_metrics(workdir)


def final_evals(records) -> dict:
  """Latest value of every eval/ key."""
  out = {}
  for record in records:
    out.update({k: v for k, v in record.items()
                if k.startswith("eval/") and v is not None})
  return out


def _pct(value) -> str:
  return f"{100 * value:6.2f}%" if value is not None else f"{'-':>7}"


def format_table(evals: dict, class_counts: dict, wall_seconds: float) -> str:
  """The demo's zero-shot and retrieval tables; a config with other evals
  gets every eval metric it logged instead."""
  lines = []
  rows = [(title, name) for title, name, _ in ROWS
          if f"eval/{name}/top1" in evals]
  if rows:
    lines += ["", f"{'':52} {'top-1':>7} {'top-5':>7}"]
    for title, name in rows:
      title = title % class_counts.get(name, 0)
      lines.append(f"{title:52} {_pct(evals.get(f'eval/{name}/top1'))} "
                   f"{_pct(evals.get(f'eval/{name}/top5'))}")
  if "eval/retrieval/i2t/r@1" in evals:
    lines.append(f"\n{'retrieval on openmoji':52} {'R@1':>7} {'R@5':>7} "
                 f"{'R@10':>7}")
    for direction, title in (("i2t", "image -> text"),
                             ("t2i", "text -> image")):
      vals = [evals.get(f"eval/retrieval/{direction}/r@{k}")
              for k in (1, 5, 10)]
      lines.append(f"  {title:50} " + " ".join(_pct(v) for v in vals))
  if not rows and "eval/retrieval/i2t/r@1" not in evals:
    shown = {k: v for k, v in sorted(evals.items())
             if plot_lib.select_keys({"": [{k: v}]}) and k != "eval/seconds"}
    lines.append("")
    lines += [f"{k:52} {v:.4f}" for k, v in shown.items()] or [
        "(the config has no evals: no results to show)"]
  lines.append(f"\nwall time (preparation + training + evals): "
               f"{wall_seconds / 60:.1f} min")
  return "\n".join(lines)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  start = time.time()
  config = flags.FLAGS.config or config_lib.load_config_file(DEFAULT_CONFIG)
  workdir = flags.FLAGS.workdir or DEFAULT_WORKDIR
  from clip_jax.data import sources  # pylint: disable=g-import-not-at-top
  if config.data.source == "emoji":
    sources.emoji_source(config.data, "train")  # Prepares the cache once.
  train.train(config, workdir)
  records = read_metrics(workdir)
  class_counts = {}
  if config.data.source == "emoji":
    class_counts = {name: len(sources.emoji_class_names(config.data, name))
                    for _, name, _ in ROWS}
  png = plot_lib.write_curves(workdir)
  print(format_table(final_evals(records), class_counts, time.time() - start))
  print(f"metrics: {workdir}/metrics.jsonl, curves: {png}")


if __name__ == "__main__":
  cli.run(main)
