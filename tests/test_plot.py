"""plot.py: which series are drawn from metrics.jsonl, the PNG, the CLI;
demo's table for a config without the emoji evals."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from clip_jax import demo, plot

RUN_A = [
    {"step": 0, "eval/zs/top1": 0.1, "eval/zs/top5": 0.3,
     "eval/zs/seconds": 2.0, "eval/zs/num_skipped": 0,
     "eval/zs/num_images": 12, "eval/seconds": 2.0},
    {"step": 5, "loss": 4.0, "lr": 1e-3, "logit_scale": 14.0,
     "examples_per_sec": 100.0, "grad_norm": 3.0, "data/skipped": 0},
    {"step": 10, "loss": 3.5, "lr": 5e-4, "logit_scale": 15.0,
     "examples_per_sec": None},
    # A resumed run logs step 10 again: the later record wins.
    {"step": 10, "loss": 3.0, "lr": 5e-4, "logit_scale": 15.0,
     "examples_per_sec": 120.0},
    {"step": 10, "eval/zs/top1": 0.4, "eval/zs/top5": 0.8,
     "eval/zs/per_class/cat": 0.5},
]
RUN_B = [
    {"step": 5, "loss": 5.0, "lr": 1e-3, "logit_scale": 10.0,
     "logit_bias": -10.0},
    {"step": 10, "eval/ret/i2t/r@1": 0.2, "eval/ret/i2t/median_rank": 40.0,
     "eval/ret/num_captions": 5323},
]


def _write(workdir, records, tail=""):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.write("".join(json.dumps(r) + "\n" for r in records) + tail)
  return str(workdir)


def test_series_keeps_the_latest_record_of_a_step_and_drops_missing():
  assert plot.series(RUN_A, "loss") == [(5, 4.0), (10, 3.0)]
  assert plot.series(RUN_A, "examples_per_sec") == [(5, 100.0), (10, 120.0)]
  assert plot.series(RUN_A, "eval/zs/top1") == [(0, 0.1), (10, 0.4)]
  assert plot.series(RUN_A, "nothing") == []


def test_default_panels_training_scalars_then_each_eval():
  panels = plot.panels({"a": RUN_A, "b": RUN_B})
  assert list(panels) == ["loss", "lr", "logit_scale", "logit_bias",
                          "examples_per_sec", "eval/ret", "eval/zs"]
  assert panels["loss"] == {("a", "loss"): [(5, 4.0), (10, 3.0)],
                            ("b", "loss"): [(5, 5.0)]}
  assert panels["logit_bias"] == {("b", "logit_bias"): [(5, -10.0)]}
  assert panels["eval/zs"] == {("a", "top1"): [(0, 0.1), (10, 0.4)],
                               ("a", "top5"): [(0, 0.3), (10, 0.8)]}
  assert panels["eval/ret"] == {("b", "i2t/r@1"): [(10, 0.2)]}


def test_metric_patterns_choose_the_keys():
  runs = {"a": RUN_A}
  assert plot.select_keys(runs, ["loss", "*top1"]) == ["loss", "eval/zs/top1"]
  assert plot.select_keys(runs, ["eval/zs/per_class/*"]) == [
      "eval/zs/per_class/cat"]
  assert plot.select_keys(runs, ["nope"]) == []


def test_read_metrics_ignores_a_line_cut_short(tmp_path):
  workdir = _write(tmp_path / "a", RUN_A, tail='{"step": 11, "lo')
  assert plot.read_metrics(workdir) == RUN_A
  assert plot.read_metrics(str(tmp_path / "empty")) == []


def test_write_curves_draws_a_png_with_one_panel_per_series(tmp_path):
  workdir = _write(tmp_path / "run", RUN_A)
  path = plot.write_curves(workdir)
  assert path == os.path.join(workdir, "curves.png")
  image = np.asarray(Image.open(path).convert("L"), np.float32)
  # 5 panels (loss, lr, logit scale, examples/s, eval/zs): 3 columns x 2
  # rows at 4.6 x 3.4 inches, 90 dpi.
  assert image.shape == (round(2 * 3.4 * 90), round(3 * 4.6 * 90))
  # The sixth grid cell is blank, the first is not.
  h, w = image.shape
  assert image[h // 2:, 2 * w // 3:].std() == 0
  assert image[:h // 2, :w // 3].std() > 0
  assert not [f for f in os.listdir(workdir) if ".tmp" in f]


def test_cli_overlays_runs_and_reports_mistakes(tmp_path):
  a, b = _write(tmp_path / "a", RUN_A), _write(tmp_path / "b", RUN_B)
  out = tmp_path / "both.png"
  cmd = [sys.executable, "-m", "clip_jax.plot", a, b, "--out", str(out)]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  # 7 panels: 3 columns x 3 rows.
  assert Image.open(out).size == (round(3 * 4.6 * 90), round(3 * 3.4 * 90))
  proc = subprocess.run(cmd + ["--metrics", "nope*"], capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.count("\n") == 1 and "eval/zs/top1" in proc.stderr
  proc = subprocess.run(cmd[:3] + [str(tmp_path / "none")],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and "no metrics.jsonl" in proc.stderr


def test_run_labels_are_short_and_distinct():
  assert plot.run_labels(["runs/a", "runs/b"]) == ["a", "b"]
  assert plot.run_labels(["x/run", "y/run"]) == ["x/run", "y/run"]


@pytest.mark.parametrize("evals, present, absent", [
    ({"eval/zs/top1": 0.25, "eval/zs/seconds": 1.0, "eval/seconds": 1.0},
     ["eval/zs/top1", "0.2500"], ["seconds", "openmoji"]),
    ({}, ["no evals"], ["openmoji"]),
    ({"eval/openmoji/top1": 0.1, "eval/openmoji/top5": 0.2},
     ["zero-shot openmoji (unseen test style, 7-way)", "10.00%", "20.00%"],
     ["heldout", "retrieval", "symbola"]),
])
def test_demo_table_for_any_config(evals, present, absent):
  table = demo.format_table(evals, {"openmoji": 7}, 60.0)
  for text in present:
    assert text in table
  for text in absent:
    assert text not in table


def test_write_curves_never_stops_a_run(tmp_path):
  workdir = _write(tmp_path / "run", RUN_A)
  blocker = tmp_path / "file"
  blocker.write_text("")
  with pytest.warns(RuntimeWarning, match="Could not write"):
    assert plot.write_curves(workdir, str(blocker / "curves.png")) is None


@pytest.mark.slow
def test_demo_runs_with_a_config_without_emoji_evals(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  workdir = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, "-m", "clip_jax.demo", "--config",
       "configs/clip.py:tiny", "--config.total_steps=5",
       "--workdir", str(workdir)], cwd=root, capture_output=True, text=True,
      timeout=600)
  assert proc.returncode == 0, proc.stderr
  assert "(the config has no evals: no results to show)" in proc.stdout
  image = np.asarray(Image.open(workdir / "curves.png").convert("L"))
  assert image.std() > 0
