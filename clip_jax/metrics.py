"""Metric writers: stdout progress, `metrics.jsonl`, TensorBoard.

Only process 0 writes; the others get a writer that drops everything, so the
loop can call it unconditionally. `metrics.jsonl` holds one JSON object per
logged step: {"step": S, "<name>": value, ...}; eval results use names like
"eval/<eval name>/<metric>".
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
               stream=sys.stdout):
    self.enabled = enabled
    self.total_steps = total_steps
    self.stream = stream
    self._start = time.time()
    self._jsonl = None
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    if tensorboard:
      from tensorboardX import SummaryWriter  # Pure Python, no TensorFlow.
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

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

  def log(self, message: str) -> None:
    if self.enabled:
      self.stream.write(message + "\n")
      self.stream.flush()

  def close(self) -> None:
    if self._jsonl:
      self._jsonl.close()
    if self._tb:
      self._tb.close()


def _fmt(value) -> str:
  if value is None:
    return "nan"
  if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3):
    return f"{value:.3e}"
  return f"{value:.4g}"
