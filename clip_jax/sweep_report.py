r"""`python -m clip_jax.sweep report WORKDIR`: a sweep's table and plot.

  python -m clip_jax.sweep report runs/x [--metrics 'loss,eval/*/top1'] \
      [--x KEY] [--metric NAME] [--seed_key seed] [--out runs/x/report]

Reads each point of WORKDIR (sweep.json, else every sub-folder with a
point.json): its overrides, its final metrics (per key, the value of the
last step that logged it in metrics.jsonl) and the results of its latest
`eval_<step>[_n].json` (clip_jax.evaluate), as 'evaluate/<name>'.

Writes OUT.md and prints it: one row per point (its overrides, the last
step, the metrics matching --metrics), then, when the seed key varies, one
row per setting of the other keys with mean ± standard deviation over the
seeds of its finished points (n in the last column): a point still running,
or stopped, has logged earlier figures (often the step-0 eval) that would
bias a mean. Writes OUT_<metric>.png: --metric (default:
the first metric column) against --x, a sweep key (default: the first
varying key other than the seed key) or another metric (e.g. in-style vs
out-of-style accuracy), one line per setting of the other varying keys
(or of --lines KEYS), mean ± standard deviation over the finished seeds
as error bars. A --metric with one '*' (e.g. 'eval/openmoji/*/top1', the
prompt sets of one eval) plots a family of metrics instead: x is the part
the '*' stands for (one path segment), one line per setting of the sweep
keys.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import re

DEFAULT_METRICS = "loss,eval/*,evaluate/*"
_EVAL_FILE = re.compile(r"^eval_(\d+)(?:_(\d+))?\.json$")


def final_metrics(point_dir: str) -> dict:
  """{name: last logged value} from metrics.jsonl, plus 'step'."""
  path = os.path.join(point_dir, "metrics.jsonl")
  final = {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        line = line.strip()
        if not line:
          continue
        record = json.loads(line)
        for key, value in record.items():
          if isinstance(value, (int, float)) and not isinstance(value, bool):
            final[key] = value
  return final


def latest_eval(point_dir: str) -> dict:
  """{'evaluate/<name>': value} of the newest eval_<step>[_n].json."""
  found = []
  for name in os.listdir(point_dir):
    match = _EVAL_FILE.match(name)
    if match:
      found.append((int(match.group(1)), int(match.group(2) or 1), name))
  if not found:
    return {}
  with open(os.path.join(point_dir, max(found)[2])) as f:
    results = json.load(f).get("results", {})
  return {f"evaluate/{k}": v for k, v in results.items()
          if isinstance(v, (int, float)) and not isinstance(v, bool)}


def collect(workdir: str) -> list[dict]:
  """[{'name', 'overrides', 'done', 'metrics'}] of every point."""
  from clip_jax import sweep  # pylint: disable=g-import-not-at-top
  definition = os.path.join(workdir, sweep.SWEEP_FILE)
  if os.path.exists(definition):
    with open(definition) as f:
      points = [(p["name"], p["overrides"]) for p in json.load(f)["points"]]
  else:
    points = []
    for name in sorted(os.listdir(workdir)):
      path = os.path.join(workdir, name, sweep.POINT_FILE)
      if os.path.exists(path):
        with open(path) as f:
          points.append((name, json.load(f)))
  if not points:
    raise ValueError(f"{workdir} holds no sweep: no {sweep.SWEEP_FILE} and "
                     f"no */{sweep.POINT_FILE}; give the --workdir of "
                     "`python -m clip_jax.sweep`.")
  rows = []
  for name, overrides in points:
    point_dir = os.path.join(workdir, name)
    metrics = {}
    if os.path.isdir(point_dir):
      metrics = {**final_metrics(point_dir), **latest_eval(point_dir)}
    rows.append(dict(name=name, overrides=overrides, metrics=metrics,
                     done=os.path.exists(os.path.join(point_dir,
                                                      sweep.DONE_FILE))))
  return rows


def varying_keys(rows: list[dict]) -> list[str]:
  """Override keys whose value is not the same at every point, in order."""
  keys = []
  for row in rows:
    keys += [k for k in row["overrides"] if k not in keys]
  return [k for k in keys
          if len({json.dumps(r["overrides"].get(k), sort_keys=True)
                  for r in rows}) > 1]


def metric_columns(rows: list[dict], patterns: str,
                   strict: bool = True) -> list[str]:
  """The metric names matching `patterns`, in pattern order. `strict`: a
  pattern that matches nothing, once some point has metrics, is an error
  naming the metrics there are (a typo would otherwise drop a column
  silently)."""
  wanted = [p for p in patterns.split(",") if p]
  names = sorted({k for r in rows for k in r["metrics"] if k != "step"})
  unmatched = [p for p in wanted
               if strict and names
               and not any(fnmatch.fnmatchcase(n, p) for n in names)]
  if unmatched:
    raise ValueError(
        f"--metrics pattern(s) {unmatched} match no metric of this sweep; "
        f"its metrics are {names}.")
  return [n for p in wanted for n in names if fnmatch.fnmatchcase(n, p)]


def mean_std(values: list[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for a single value)."""
  n = len(values)
  mean = sum(values) / n
  if n < 2:
    return mean, 0.0
  return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def _fmt(value) -> str:
  if value is None:
    return "—"
  if isinstance(value, float):
    return f"{value:.4g}"
  return str(value)


def _markdown(header: list[str], body: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(row) + " |" for row in body]
  return "\n".join(lines)


def groups_over_seeds(rows, keys, seed_key):
  """{(values of keys except seed_key): [rows]} in first-seen order."""
  grouped = {}
  for row in rows:
    setting = tuple(json.dumps(row["overrides"].get(k), sort_keys=True)
                    for k in keys if k != seed_key)
    grouped.setdefault(setting, []).append(row)
  return grouped


def table(rows: list[dict], metrics: list[str], seed_key: str = "seed"
          ) -> str:
  """The markdown report: per point, then mean ± std over seeds."""
  keys = varying_keys(rows) or sorted({k for r in rows
                                       for k in r["overrides"]})
  header = keys + ["step", "done"] + metrics
  body = [[_fmt(r["overrides"].get(k)) for k in keys]
          + [_fmt(r["metrics"].get("step")), "yes" if r["done"] else "no"]
          + [_fmt(r["metrics"].get(m)) for m in metrics] for r in rows]
  text = _markdown(header, body)
  if seed_key in keys:
    others = [k for k in keys if k != seed_key]
    summary = []
    for group in groups_over_seeds(rows, keys, seed_key).values():
      cells = [_fmt(group[0]["overrides"].get(k)) for k in others]
      finished = [r for r in group if r["done"]]
      for m in metrics:
        values = [r["metrics"][m] for r in finished if m in r["metrics"]]
        cells.append("—" if not values else
                     "{:.4g} ± {:.2g}".format(*mean_std(values)))
      summary.append(cells + [str(len(finished))])
    text += (f"\n\nMean ± standard deviation over `{seed_key}`, finished "
             "points only:\n\n"
             + _markdown(others + metrics + ["n"], summary))
  return text + "\n"


def _is_number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def plot_series(rows, metric: str, x_key: str, seed_key: str = "seed",
                lines: list[str] | None = None):
  """{line label: [(x, mean, std, n, x std)]} sorted by x.

  x_key is a sweep key, or a metric (then x is that metric's mean over the
  seeds, x std its spread). Points: the settings of every varying key but
  the seed, averaged over the seeds of finished points. Lines: the
  settings of `lines` (default: every varying key but x_key and the seed).
  """
  varying = varying_keys(rows)
  x_is_key = any(x_key in r["overrides"] for r in rows)
  if lines is None:
    lines = [k for k in varying if k not in (x_key, seed_key)]
  setting_keys = [k for k in varying if k not in (x_key, seed_key)]
  grouped = {}
  for row in rows:
    source = row["overrides"] if x_is_key else row["metrics"]
    if (not row["done"] or metric not in row["metrics"]
        or x_key not in source):
      continue
    label = ", ".join(f"{k}={_fmt(row['overrides'].get(k))}" for k in lines)
    setting = json.dumps([row["overrides"].get(k) for k in setting_keys]
                         + ([source[x_key]] if x_is_key else []),
                         sort_keys=True)
    xs, ys = grouped.setdefault(label or metric, {}).setdefault(
        setting, ([], []))
    xs.append(source[x_key])
    ys.append(row["metrics"][metric])
  series = {}
  for label, settings in grouped.items():
    points = []
    for xs, ys in settings.values():
      if all(_is_number(x) for x in xs):
        x, x_std = mean_std(xs)
      else:
        x, x_std = xs[0], 0.0
      points.append((x, *mean_std(ys), len(ys), x_std))
    numeric = all(_is_number(p[0]) for p in points)
    series[label] = sorted(points, key=lambda p: p[0] if numeric
                           else str(p[0]))
  return series


def family_member(pattern: str, name: str) -> str | None:
  """The part of metric `name` that the one '*' of `pattern` stands for
  (one path segment), or None if `name` is not of the family."""
  prefix, _, suffix = pattern.partition("*")
  match = re.fullmatch(re.escape(prefix) + "([^/]+)" + re.escape(suffix),
                       name)
  return match and match.group(1)


def family_rows(rows: list[dict], pattern: str, x_key: str) -> list[dict]:
  """One row per metric of the family `pattern` in each row: its metric
  renamed `pattern`, its member part under `x_key` in the overrides."""
  return [{**row, "overrides": {**row["overrides"], x_key: part},
           "metrics": {pattern: value}}
          for row in rows for name, value in row["metrics"].items()
          if (part := family_member(pattern, name))]


def write_plot(series: dict, path: str, *, metric: str, x_key: str,
               x_is_key: bool = True) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  xs = [p[0] for pts in series.values() for p in pts]
  numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool)
                for x in xs)
  categories = sorted({str(x) for x in xs})
  fig, ax = plt.subplots(figsize=(6, 4))
  for label, points in series.items():
    pos = [p[0] if numeric else categories.index(str(p[0])) for p in points]
    ax.errorbar(pos, [p[1] for p in points], yerr=[p[2] for p in points],
                xerr=[p[4] for p in points] if numeric else None,
                marker="o", capsize=3, label=label)
  if (numeric and x_is_key and xs and min(xs) > 0
      and max(xs) / min(xs) >= 8):
    ax.set_xscale("log", base=2)
  if not numeric:
    ax.set_xticks(range(len(categories)), categories)
  ax.set_xlabel(x_key)
  ax.set_ylabel(metric)
  ax.set_title(f"{metric} vs {x_key} (mean ± std over seeds)", fontsize=9)
  if len(series) > 1:
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv) -> int:
  parser = argparse.ArgumentParser(prog="python -m clip_jax.sweep report",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("workdir")
  parser.add_argument("--metrics", default=None,
                      help="comma-separated shell patterns of metric names "
                      f"(default {DEFAULT_METRICS!r}); each must match one")
  parser.add_argument("--metric", default=None, help="the plotted metric")
  parser.add_argument("--x", default=None, help="the sweep key on the x axis")
  parser.add_argument("--seed_key", default="seed")
  parser.add_argument("--lines", default=None,
                      help="comma-separated sweep keys: one line per "
                      "setting of them (default: every varying key but "
                      "--x and the seed)")
  parser.add_argument("--out", default=None,
                      help="path prefix of the .md and .png "
                      "(default WORKDIR/report)")
  args = parser.parse_args(argv)
  rows = collect(args.workdir)
  metrics = metric_columns(rows, args.metrics or DEFAULT_METRICS,
                           strict=args.metrics is not None)
  family = args.metric is not None and "*" in args.metric
  if family and (args.metric.count("*") > 1 or args.x):
    raise ValueError(f"--metric {args.metric!r} is a family of metrics: one "
                     "'*', which is the x axis (no --x).")
  in_table = ([m for m in metrics if family_member(args.metric, m)] if family
              else [m for m in metrics if m == args.metric])
  if args.metric and not in_table:  # Before writing anything.
    what = ("names no metric of the table ('*' stands for one path segment)"
            if family else "is not a column of the table")
    raise ValueError(f"--metric {args.metric!r} {what}; choose one of "
                     f"{metrics} (or widen --metrics).")
  out = args.out or os.path.join(args.workdir, "report")
  text = table(rows, metrics, args.seed_key)
  with open(out + ".md", "w") as f:
    f.write(text)
  print(text, end="")
  metric = args.metric or (metrics[0] if metrics else None)
  if family:  # x: the part of each metric's name the '*' stands for.
    rows = family_rows(rows, metric, "*")
  keys = [k for k in varying_keys(rows) if k != args.seed_key]
  x_key = "*" if family else args.x or (keys[0] if keys else None)
  if metric is None or x_key is None:
    print("(no plot: no metric or no varying sweep key)")
    return 0
  x_is_key = family or x_key in varying_keys(rows)
  if not x_is_key and not any(x_key in r["metrics"] for r in rows):
    raise ValueError(f"--x {x_key!r} is not a varying key of this sweep "
                     f"nor a metric; choose one of {varying_keys(rows)} "
                     "or a metric name of the table.")
  lines = args.lines.split(",") if args.lines else None
  safe = re.sub(r"[^A-Za-z0-9._-]+", "_", metric.replace("*", "each"))
  path = f"{out}_{safe}.png"
  write_plot(plot_series(rows, metric, x_key, args.seed_key, lines), path,
             metric=metric, x_key=x_key, x_is_key=x_is_key)
  print(f"plot: {path}")
  return 0
