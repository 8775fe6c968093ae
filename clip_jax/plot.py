r"""Training curves from metrics.jsonl: one run, or several overlaid.

  python -m clip_jax.plot WORKDIR [WORKDIR ...] [--metrics m1,m2] \
      [--out curves.png]

Panels (those with data): loss, learning rate, logit scale, logit bias,
examples/s, then one panel per eval ('eval/<name>'), its metrics
('top1', 'top5', 'i2t/r@1', ...) as line styles. Each run is one colour,
labelled by its workdir. --metrics keeps only the keys matching any of the
comma-separated shell patterns ('loss', 'eval/openmoji/*', '*top1'), one
panel per eval still. Without --out, one run writes WORKDIR/curves.png and
several write ./curves.png. Per-class accuracies, timings, image and skip counts
are left out unless --metrics asks for them.

The training loop calls `write_curves(workdir)` at each eval and at the end,
so every run has an up-to-date WORKDIR/curves.png.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import sys
import warnings

# The training scalars, in panel order, with their axis labels.
TRAIN_PANELS = (
    ("loss", "training loss"),
    ("lr", "learning rate"),
    ("logit_scale", "logit scale"),
    ("logit_bias", "logit bias"),
    ("examples_per_sec", "examples / s"),
)
# Eval keys that are bookkeeping, not results (shown only if asked for).
_HIDDEN_EVAL_PARTS = ("seconds", "num_skipped", "num_images", "per_class")


def read_metrics(workdir: str) -> list[dict]:
  """The records of WORKDIR/metrics.jsonl in file order ([] if none).

  A line cut short (a run killed while writing) is ignored.
  """
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  records = []
  with open(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return [r for r in records if isinstance(r, dict) and "step" in r]


def series(records, key: str) -> list[tuple[int, float]]:
  """(step, value) of `key`, sorted by step; the latest record of a step
  wins (a resumed run logs some steps twice); missing/None values dropped."""
  by_step = {}
  for record in records:
    value = record.get(key)
    if isinstance(value, (int, float)) and math.isfinite(value):
      by_step[int(record["step"])] = float(value)
  return sorted(by_step.items())


def _shown_by_default(key: str) -> bool:
  """Training panels, and eval results on a 0-1 scale: not bookkeeping
  (times, counts) and not ranks, whose scale would flatten the recalls."""
  if not key.startswith("eval/"):
    return any(key == k for k, _ in TRAIN_PANELS)
  parts = key.split("/")
  return (len(parts) >= 3
          and not any(p in _HIDDEN_EVAL_PARTS or p.startswith("num_")
                      or p.endswith("_rank") for p in parts[2:]))


def panel_of(key: str) -> tuple[str, str]:
  """(panel title, line name) of a metric key: 'eval/x/top1' ->
  ('eval/x', 'top1'); 'loss' -> ('loss', 'loss')."""
  if key.startswith("eval/") and key.count("/") >= 2:
    _, name, metric = key.split("/", 2)
    return f"eval/{name}", metric
  return key, key


def select_keys(runs: dict[str, list[dict]],
                patterns: list[str] | None = None) -> list[str]:
  """The metric keys to plot, training panels first, then evals by name."""
  keys = {k for records in runs.values() for r in records for k in r
          if k != "step"}
  if patterns:
    chosen = {k for k in keys
              if any(fnmatch.fnmatchcase(k, p) for p in patterns)}
  else:
    chosen = {k for k in keys if _shown_by_default(k)}
  order = {k: i for i, (k, _) in enumerate(TRAIN_PANELS)}
  return sorted(chosen, key=lambda k: (k.startswith("eval/"),
                                       order.get(k, len(order)), k))


def panels(runs: dict[str, list[dict]], patterns: list[str] | None = None
           ) -> dict[str, dict[tuple[str, str], list[tuple[int, float]]]]:
  """{panel title: {(run label, line name): [(step, value)]}}, in order,
  only the panels and lines with data."""
  out = {}
  for key in select_keys(runs, patterns):
    title, line = panel_of(key)
    for label, records in runs.items():
      points = series(records, key)
      if points:
        out.setdefault(title, {})[(label, line)] = points
  return out


def run_labels(workdirs: list[str]) -> list[str]:
  """Short distinct labels: the workdirs' paths relative to their common
  parent (their base names when those differ)."""
  paths = [os.path.abspath(w) for w in workdirs]
  names = [os.path.basename(p.rstrip(os.sep)) for p in paths]
  if len(set(names)) == len(names):
    return names
  if len(paths) == 1:
    return paths
  common = os.path.commonpath(paths)
  return [os.path.relpath(p, common) for p in paths]


def _title(panel: str) -> str:
  return dict(TRAIN_PANELS).get(panel, panel)


def draw(runs: dict[str, list[dict]], path: str,
         patterns: list[str] | None = None) -> str:
  """Writes the panels of `runs` ({label: records}) as a PNG at `path`."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  content = panels(runs, patterns)
  cols = min(3, max(1, len(content)))
  rows = max(1, math.ceil(len(content) / cols))
  fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows),
                           squeeze=False)
  colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  run_colour = {label: colours[i % len(colours)]
                for i, label in enumerate(runs)}
  styles = ("-", "--", ":", "-.")
  for ax, (title, lines) in zip(axes.flat, content.items()):
    line_names = sorted({line for _, line in lines})
    for (label, line), points in lines.items():
      steps, values = zip(*points)
      name = label if len(runs) > 1 else ""
      if len(line_names) > 1 or title.startswith("eval/"):
        name = f"{name} {line}".strip()
      ax.plot(steps, values, color=run_colour[label],
              linestyle=styles[line_names.index(line) % len(styles)],
              marker="o" if len(points) <= 20 else None, markersize=3,
              label=name or None)
    if title == "lr":
      ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.set(title=_title(title), xlabel="step")
    if any(name for name in ax.get_legend_handles_labels()[1]):
      ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(content):]:
    ax.axis("off")
  if not content:
    axes.flat[0].text(0.5, 0.5, "no metrics yet", ha="center", va="center")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}.png"
  fig.savefig(tmp, dpi=90)
  plt.close(fig)
  os.replace(tmp, path)  # A viewer never sees a half-written file.
  return path


def write_curves(workdir: str, path: str | None = None) -> str | None:
  """Writes WORKDIR/curves.png (or `path`) from WORKDIR/metrics.jsonl.

  Call from process 0 only; returns the path written. Never raises: a
  plot that cannot be written must not stop a training run, so a failure
  is a RuntimeWarning and the result None.
  """
  path = path or os.path.join(workdir, "curves.png")
  try:
    return draw({os.path.basename(os.path.abspath(workdir)):
                 read_metrics(workdir)}, path)
  except Exception as e:  # pylint: disable=broad-except
    warnings.warn(f"Could not write {path}: {type(e).__name__}: {e}",
                  RuntimeWarning, stacklevel=2)
    return None


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m clip_jax.plot",
      description="Plot training curves of one or more runs.")
  parser.add_argument("workdirs", nargs="+", metavar="WORKDIR")
  parser.add_argument("--metrics", default=None,
                      help="comma-separated key patterns, e.g. "
                      "'loss,eval/*/top1' (default: the standard panels)")
  parser.add_argument("--out", default=None, help="PNG path")
  args = parser.parse_args(argv)
  missing = [w for w in args.workdirs
             if not os.path.exists(os.path.join(w, "metrics.jsonl"))]
  if missing:
    print(f"error: no metrics.jsonl in {', '.join(missing)}; give run "
          "directories a training run wrote.", file=sys.stderr)
    return 2
  runs = dict(zip(run_labels(args.workdirs),
                  [read_metrics(w) for w in args.workdirs]))
  patterns = ([p.strip() for p in args.metrics.split(",") if p.strip()]
              if args.metrics else None)
  if patterns and not select_keys(runs, patterns):
    keys = sorted({k for rs in runs.values() for r in rs for k in r} - {"step"})
    print(f"error: --metrics={args.metrics!r} matches no metric; the runs "
          f"log: {', '.join(keys)}.", file=sys.stderr)
    return 2
  out = args.out or (os.path.join(args.workdirs[0], "curves.png")
                     if len(args.workdirs) == 1 else "curves.png")
  draw(runs, out, patterns)
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  from clip_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run_plain(main)
