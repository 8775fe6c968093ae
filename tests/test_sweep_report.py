"""`python -m clip_jax.sweep report` on fabricated run folders with known
numbers: the table, the mean ± std over seeds (NumPy) and the plot."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from clip_jax import sweep, sweep_report

LOSSES = ("softmax", "sigmoid")
BATCHES = (32, 128)
SEEDS = (0, 1, 2)
FINISHED = (0, 1)  # Seed 2's points have no DONE file: still running.


def top1(loss, batch, seed):
  """A known, distinct number per point."""
  return 0.1 * BATCHES.index(batch) + 0.3 * LOSSES.index(loss) + 0.01 * seed


def fabricate(root):
  """A 2 x 2 x 3-seed sweep: metrics.jsonl with an older and a final
  value per key, and eval files of which eval_20_2.json is the latest."""
  points = []
  for loss in LOSSES:
    for batch in BATCHES:
      for seed in SEEDS:
        overrides = {"loss": loss, "batch_size": batch, "seed": seed}
        point_dir = os.path.join(root, sweep.point_name(overrides))
        os.makedirs(point_dir)
        with open(os.path.join(point_dir, sweep.POINT_FILE), "w") as f:
          json.dump(overrides, f)
        lines = [{"step": 10, "loss": 9.0, "eval/openmoji/top1": 0.0},
                 {"step": 20, "loss": 1.0 + seed},
                 {"step": 20, "eval/openmoji/top1": top1(loss, batch, seed)}]
        with open(os.path.join(point_dir, "metrics.jsonl"), "w") as f:
          f.write("\n".join(json.dumps(ln) for ln in lines) + "\n")
        for name, value in (("eval_10.json", -1.0), ("eval_20.json", -2.0),
                            ("eval_20_2.json", batch / 1000)):
          with open(os.path.join(point_dir, name), "w") as f:
            json.dump({"step": 20, "results": {"x/top1": value}}, f)
        if seed in FINISHED:
          open(os.path.join(point_dir, sweep.DONE_FILE), "w").close()
        points.append(overrides)
  return points


def test_collect_reads_final_metrics_and_latest_eval(tmp_path):
  fabricate(str(tmp_path))
  rows = sweep_report.collect(str(tmp_path))
  assert len(rows) == 12
  for row in rows:
    o = row["overrides"]
    assert row["metrics"]["loss"] == 1.0 + o["seed"]
    assert row["metrics"]["step"] == 20
    assert row["metrics"]["eval/openmoji/top1"] == pytest.approx(
        top1(o["loss"], o["batch_size"], o["seed"]))
    assert row["metrics"]["evaluate/x/top1"] == o["batch_size"] / 1000
    assert row["done"] == (o["seed"] in FINISHED)


def test_table_and_plot_series_match_numpy(tmp_path):
  """Every point in the table; the means and the plot over the finished
  points only (seed 2's, unfinished, would shift them)."""
  fabricate(str(tmp_path))
  rows = sweep_report.collect(str(tmp_path))
  metric = "eval/openmoji/top1"
  text = sweep_report.table(rows, [metric])
  lines = text.splitlines()
  assert lines[0] == ("| loss | batch_size | seed | step | done | "
                      f"{metric} |")
  assert "| sigmoid | 128 | 2 | 20 | no | 0.42 |" in lines
  series = sweep_report.plot_series(rows, metric, "batch_size")
  assert set(series) == {"loss=softmax", "loss=sigmoid"}
  for loss in LOSSES:
    got = series[f"loss={loss}"]
    assert [p[0] for p in got] == list(BATCHES)
    for batch, (_, mean, std, n, x_std) in zip(BATCHES, got):
      assert x_std == 0
      values = [top1(loss, batch, s) for s in FINISHED]
      assert n == 2
      np.testing.assert_allclose(mean, np.mean(values), rtol=1e-12)
      np.testing.assert_allclose(std, np.std(values, ddof=1), rtol=1e-12)
      row = (f"| {loss} | {batch} | {np.mean(values):.4g} ± "
             f"{np.std(values, ddof=1):.2g} | 2 |")
      assert row in lines


def test_a_metric_on_the_x_axis_one_line_per_chosen_key(tmp_path):
  """Metric against metric (effective robustness): x = evaluate/x/top1
  (batch / 1000 at every point), lines by loss only."""
  fabricate(str(tmp_path))
  rows = sweep_report.collect(str(tmp_path))
  series = sweep_report.plot_series(rows, "eval/openmoji/top1",
                                    "evaluate/x/top1", lines=["loss"])
  assert set(series) == {"loss=softmax", "loss=sigmoid"}
  for loss in LOSSES:
    got = series[f"loss={loss}"]
    assert [p[0] for p in got] == [b / 1000 for b in BATCHES]
    for batch, point in zip(BATCHES, got):
      values = [top1(loss, batch, s) for s in FINISHED]
      np.testing.assert_allclose(point[1], np.mean(values), rtol=1e-12)
      assert point[3] == 2


def test_report_main_writes_markdown_and_png(tmp_path, capsys):
  fabricate(str(tmp_path))
  assert sweep.main(["report", str(tmp_path), "--metrics",
                     "eval/*", "--x", "batch_size"]) == 0
  out = capsys.readouterr().out
  assert (tmp_path / "report.md").read_text() in out
  png = tmp_path / "report_eval_openmoji_top1.png"
  with Image.open(png) as image:
    assert image.size[0] > 100 and image.size[1] > 100
  with pytest.raises(ValueError, match="not a varying key"):
    sweep.main(["report", str(tmp_path), "--x", "lr"])


def test_a_family_of_metrics_on_the_x_axis(tmp_path):
  """--metric 'eval/openmoji/*/top1': x = each prompt set's name, a line
  per loss x batch setting, means over the finished seeds (NumPy)."""
  fabricate(str(tmp_path))
  offsets = {"bare": 0.0, "photo": 0.05}
  for point_dir in tmp_path.iterdir():
    overrides = json.loads((point_dir / sweep.POINT_FILE).read_text())
    line = {"step": 20}
    for prompts, offset in offsets.items():
      line[f"eval/openmoji/{prompts}/top1"] = offset + top1(
          overrides["loss"], overrides["batch_size"], overrides["seed"])
    line["eval/openmoji/deeper/set/top1"] = 9.0  # Two segments: not one.
    with open(point_dir / "metrics.jsonl", "a") as f:
      f.write(json.dumps(line) + "\n")
  rows = sweep_report.collect(str(tmp_path))
  family = sweep_report.family_rows(rows, "eval/openmoji/*/top1", "*")
  series = sweep_report.plot_series(family, "eval/openmoji/*/top1", "*")
  assert len(series) == len(LOSSES) * len(BATCHES)
  for loss in LOSSES:
    for batch in BATCHES:
      got = series[f"loss={loss}, batch_size={batch}"]
      assert [p[0] for p in got] == sorted(offsets)
      for prompts, point in zip(sorted(offsets), got):
        values = [top1(loss, batch, s) + offsets[prompts] for s in FINISHED]
        np.testing.assert_allclose(point[1], np.mean(values), rtol=1e-12)
        assert point[3] == len(FINISHED)
  assert sweep.main(["report", str(tmp_path), "--metrics", "eval/*",
                     "--metric", "eval/openmoji/*/top1"]) == 0
  assert (tmp_path / "report_eval_openmoji_each_top1.png").exists()
  with pytest.raises(ValueError, match="one '\\*', which is the x axis"):
    sweep.main(["report", str(tmp_path), "--metrics", "eval/*", "--metric",
                "eval/openmoji/*/top1", "--x", "loss"])
  # '*' = 'openmoji/deeper' is two segments: no member, refused before
  # report.md is written.
  (tmp_path / "report.md").unlink()
  with pytest.raises(ValueError, match="names no metric of the table"):
    sweep.main(["report", str(tmp_path), "--metrics", "eval/*", "--metric",
                "eval/*/set/top1"])
  assert not (tmp_path / "report.md").exists()


def test_report_names_a_metric_pattern_that_matches_nothing(tmp_path):
  fabricate(str(tmp_path))
  # The retrieval keys are eval/retrieval/i2t/r@1: '/r1' is a typo.
  with pytest.raises(ValueError) as error:
    sweep.main(["report", str(tmp_path), "--metrics",
                "eval/*/top1,eval/retrieval/r1"])
  assert "['eval/retrieval/r1']" in str(error.value)
  assert "eval/openmoji/top1" in str(error.value)  # What there is.
  with pytest.raises(ValueError, match="'loss' is not a column"):
    sweep.main(["report", str(tmp_path), "--metrics", "eval/*",
                "--metric", "loss"])
  assert not (tmp_path / "report.md").exists()  # Refused before writing.


def test_report_of_a_folder_without_a_sweep(tmp_path):
  with pytest.raises(ValueError, match="holds no sweep"):
    sweep_report.collect(str(tmp_path))
