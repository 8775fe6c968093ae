"""Metric writers: stdout progress, `metrics.jsonl`, TensorBoard.

Only process 0 writes; the others get a writer that drops everything, so the
loop can call it unconditionally. `metrics.jsonl` holds one JSON object per
logged step: {"step": S, "<name>": value, ...}; eval results use names like
"eval/<eval name>/<metric>".

A run passes `resume_step` (the checkpoint it starts from, -1 for none):
lines of later steps (written after the
checkpoint it resumes from) are dropped from metrics.jsonl first (a new
file renamed over the old one, so a crash never leaves half a log), and
TensorBoard is told to purge its events from the step after, so each step
is logged exactly once in both.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time


def _to_float(value):
  value = float(value)
  return value if math.isfinite(value) else None  # JSON has no nan/inf.


class MetricWriter:
  """Writes scalars to stdout, DIR/metrics.jsonl and DIR/tensorboard/."""

  def __init__(self, workdir: str, *, total_steps: int | None = None,
               enabled: bool = True, tensorboard: bool = True,
               stream=None, resume_step: int | None = None):
    self.enabled = enabled
    self.total_steps = total_steps
    self.stream = stream or sys.stdout  # Looked up now: capturable.
    self._start = time.time()
    self._jsonl = None
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "metrics.jsonl")
    if resume_step is not None:
      truncate_jsonl(path, resume_step)
    self._jsonl = open(path, "a")
    if tensorboard:
      from tensorboardX import SummaryWriter  # Pure Python, no TensorFlow.
      # purge_step: TensorBoard drops the earlier events of steps >= it.
      self._tb = SummaryWriter(
          os.path.join(workdir, "tensorboard"),
          purge_step=None if resume_step is None else resume_step + 1)

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    scalars = {k: _to_float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for name, value in scalars.items():
        if value is not None:
          self._tb.add_scalar(name, value, int(step))
      self._tb.flush()
    self.stream.write(self._format(step, scalars) + "\n")
    self.stream.flush()

  def _format(self, step, scalars) -> str:
    head = f"[step {step}"
    if self.total_steps:
      head += f"/{self.total_steps} {100 * step / self.total_steps:.0f}%"
    head += f" {time.time() - self._start:.0f}s]"
    body = " ".join(f"{k}={_fmt(v)}" for k, v in scalars.items())
    return f"{head} {body}"

  def log(self, message: str, *, all_processes: bool = False) -> None:
    """Prints a message (on process 0 only, unless `all_processes`)."""
    if self.enabled or all_processes:
      self.stream.write(message + "\n")
      self.stream.flush()

  def close(self) -> None:
    if self._jsonl:
      self._jsonl.close()
    if self._tb:
      self._tb.close()


def truncate_jsonl(path: str, last_step: int) -> int:
  """Keeps the lines of steps <= `last_step` (and drops a torn last line);
  atomic: a temporary file replaces `path`. Returns the lines dropped."""
  if not os.path.exists(path):
    return 0
  kept, dropped = [], 0
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
        keep = line.endswith("\n") and int(record["step"]) <= last_step
      except (ValueError, KeyError, TypeError):
        keep = False  # A line cut short by a crash.
      if keep:
        kept.append(line)
      else:
        dropped += 1
  if dropped:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
      f.writelines(kept)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  return dropped


def _fmt(value) -> str:
  if value is None:
    return "nan"
  if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3):
    return f"{value:.3e}"
  return f"{value:.4g}"
