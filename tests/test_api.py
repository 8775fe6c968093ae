"""clip_jax.load / predict / evaluate on a tiny trained run, checked
against the numbers the evaluator computed during training."""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import ux_data

import clip_jax
from clip_jax.evals import run as eval_run
from clip_jax.evals import templates as templates_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 40
EVAL = "zeroshot_classes"


def _run(module, *args):
  proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=600)
  return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 40-step run on coloured squares, with a zero-shot folder eval added
  from the command line."""
  root = tmp_path_factory.mktemp("ux")
  train_dir, classes, tok = ux_data.make(str(root))
  workdir = str(root / "run")
  rc, stdout, stderr = _run(
      "clip_jax.train", "--config", "configs/clip.py:tiny", "--workdir",
      workdir, "--config.data.source=folder",
      f"--config.data.path={train_dir}", f"--config.data.tokenizer={tok}",
      f"--config.total_steps={STEPS}", "--config.lr=3e-3",
      "--config.batch_size=16", "--config.log_every_steps=10",
      f"--eval_zeroshot_folder={classes}:imagenet")
  assert rc == 0, stderr
  return workdir, classes


def _images(classes):
  names = sorted(os.listdir(classes))
  paths = sorted(glob.glob(os.path.join(classes, "*", "*.png")))
  labels = np.array([names.index(os.path.basename(os.path.dirname(p)))
                     for p in paths])
  return names, paths, labels


def _final_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return {s: r for r in records for s in [r["step"]]
          if f"eval/{EVAL}/top1" in r}


@pytest.mark.slow
def test_train_flag_adds_the_folder_eval(trained):
  workdir, classes = trained
  with open(os.path.join(workdir, "config.json")) as f:
    evals = json.load(f)["evals"]
  assert evals == {EVAL: dict(type="zeroshot", source="image_folder",
                              path=classes, split="test",
                              templates="clip_imagenet")}
  assert sorted(_final_metrics(workdir)) == [0, STEPS]


@pytest.mark.slow
def test_classify_equals_the_evaluator(trained):
  workdir, classes = trained
  model = clip_jax.load(workdir)
  assert model.step == STEPS
  names, paths, labels = _images(classes)
  probs = model.classify(paths, names, templates="imagenet")
  accuracy = float(np.mean(probs.argmax(1) == labels))
  # The training run's own eval of the same checkpoint (another process).
  assert accuracy == _final_metrics(workdir)[STEPS][f"eval/{EVAL}/top1"]
  assert 0.25 < accuracy  # Learned something: above chance (4 classes).
  # And the evaluator's per-class accuracies, in this process.
  results = eval_run.run_all(
      model.config, model.model, model.params, model.mesh,
      evals={EVAL: dict(type="zeroshot", source="image_folder",
                        path=classes, split="test",
                        templates="clip_imagenet", per_class=True)})
  for c, name in enumerate(names):
    mine = float(np.mean(probs[labels == c].argmax(1) == c))
    assert mine == results[f"eval/{EVAL}/per_class/{name}"]


@pytest.mark.slow
def test_probabilities_are_the_prompt_ensemble_softmax(trained):
  workdir, classes = trained
  model = clip_jax.load(workdir)
  names, paths, _ = _images(classes)
  templates = templates_lib.TEMPLATES["clip_imagenet_7"]
  # NumPy reference: CLIP's prompt ensemble from encode_text.
  weights = []
  for name in names:
    emb = model.encode_text([t.format(name) for t in templates])
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    mean = emb.mean(0)
    weights.append(mean / np.linalg.norm(mean))
  logits = model.logit_scale * model.encode_image(paths) @ np.stack(weights).T
  expected = np.exp(logits - logits.max(1, keepdims=True))
  expected /= expected.sum(1, keepdims=True)
  np.testing.assert_allclose(
      model.classify(paths, names, templates="imagenet_7"), expected,
      rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_encode_image_accepts_paths_and_arrays(trained):
  from PIL import Image
  workdir, classes = trained
  model = clip_jax.load(workdir)
  _, paths, _ = _images(classes)
  by_path = model.encode_image(paths)
  np.testing.assert_allclose(np.linalg.norm(by_path, axis=1), 1, rtol=1e-5)
  one = model.encode_image(np.asarray(Image.open(paths[3]).convert("RGB")))
  np.testing.assert_allclose(one[0], by_path[3], rtol=1e-5, atol=1e-6)
  # Decoded and embedded in chunks of batch_size: the same embeddings.
  chunked = clip_jax.load(workdir, batch_size=5).encode_image(paths)
  np.testing.assert_allclose(chunked, by_path, rtol=1e-5, atol=1e-6)
  with pytest.raises(FileNotFoundError, match="nope.png"):
    model.encode_image(["nope.png"])


@pytest.mark.slow
def test_predict_prints_the_api_probabilities(trained):
  workdir, classes = trained
  names, paths, _ = _images(classes)
  rc, stdout, stderr = _run(
      "clip_jax.predict", "--workdir", workdir, "--image", paths[0],
      "--classes", ",".join(names), "--templates", "imagenet")
  assert rc == 0, stderr
  probs = clip_jax.load(workdir).classify(paths[:1], names, "imagenet")[0]
  lines = stdout.strip().splitlines()
  assert lines[0] == paths[0]
  order = np.argsort(-probs, kind="stable")
  assert lines[1:] == [f"  {100 * probs[c]:6.2f}%  {names[c]}"
                       for c in order]


@pytest.mark.slow
def test_evaluate_keeps_every_result_and_lists_steps(trained):
  workdir, classes = trained
  for _ in range(2):
    rc, _, stderr = _run("clip_jax.evaluate", "--workdir", workdir,
                         f"--zeroshot_folder={classes}",
                         "--templates=imagenet")
    assert rc == 0, stderr
  first = json.load(open(os.path.join(workdir, f"eval_{STEPS}.json")))
  second = json.load(open(os.path.join(workdir, f"eval_{STEPS}_2.json")))
  with open(os.path.join(workdir, "evals.jsonl")) as f:
    log = [json.loads(line) for line in f]
  assert [r["file"] for r in log] == [f"eval_{STEPS}.json",
                                      f"eval_{STEPS}_2.json"]
  trained_top1 = _final_metrics(workdir)[STEPS][f"eval/{EVAL}/top1"]
  for record in (first, second, *log):
    assert record["step"] == STEPS
    assert record["evals"][EVAL]["path"] == classes
    assert record["evals"][EVAL]["templates"] == "clip_imagenet"
    assert record["evals"][EVAL]["split"] == "test"
  assert first[f"eval/{EVAL}/top1"] == trained_top1
  assert log[1]["results"][f"eval/{EVAL}/top1"] == trained_top1
  # A step that was not saved: one line listing those that were.
  saved = sorted(int(d) for d in os.listdir(os.path.join(workdir,
                                                         "checkpoints"))
                 if d.isdigit())
  rc, _, stderr = _run("clip_jax.evaluate", "--workdir", workdir,
                       "--step=123")
  assert rc == 2 and stderr.count("\n") == 1
  assert f"steps saved: {', '.join(map(str, saved))}" in stderr
  rc, _, stderr = _run("clip_jax.evaluate", "--workdir", workdir,
                       f"--zeroshot_folder={classes}", "--templates=imagenett")
  assert rc == 2 and stderr.count("\n") == 1
  assert "valid names: clip_imagenet, clip_imagenet_7, emoji" in stderr
