"""`python -m clip_jax.config show`: every key, its value and its doc, the
docs read from where each key is documented."""

import ast
import os
import subprocess
import sys

from clip_jax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _leaves(d, prefix=""):
  """Independent flattening of a plain dict (ConfigDict.to_dict())."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict) and v:
      out.update(_leaves(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = {} if isinstance(v, dict) else v
  return out


def _show(*args):
  proc = subprocess.run([sys.executable, "-m", "clip_jax.config", "show",
                         *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=120)
  return proc.returncode, proc.stdout, proc.stderr


def _rows(stdout):
  rows = {}
  for line in stdout.splitlines():
    if line.startswith("#"):
      continue
    left, _, doc = line.partition("  # ")
    key, _, value = left.partition(" = ")
    rows[key] = (value.strip(), doc.strip())
  return rows


def test_show_prints_every_key_with_its_value_and_a_doc():
  rc, stdout, stderr = _show("configs/clip.py:tiny")
  assert rc == 0, stderr
  config = config_lib.load_config_file(os.path.join(ROOT, "configs/clip.py"),
                                       "tiny")
  expected = _leaves(config.to_dict())
  rows = _rows(stdout)
  assert set(rows) == set(expected)
  for key, value in expected.items():
    shown = rows[key][0]
    parsed = ast.literal_eval(shown)
    assert parsed == value, key
    assert rows[key][1], f"{key} has no doc"
  # Docs come from the module that defines each group of keys.
  assert rows["lr"][1] == "peak learning rate."
  assert rows["adam.b2"][1].startswith("AdamW moments")
  assert rows["total_steps"][1].startswith("Durations: exactly one of")
  assert rows["data.tokenizer"][1].startswith("a sentencepiece .model path")
  assert rows["data.caption_templates"][1].startswith("training captions")
  assert rows["model.embed_dim"][1] == "width of the joint embedding space."
  assert rows["model.text.pool"][1].startswith("'eos' | 'last'")
  assert rows["batch_size"][1] == ("Global batch (all devices, all "
                                   "processes).")
  # Eval keys are listed even when config.evals is empty.
  assert "#   type: EVALUATORS key" in stdout
  assert "'image_folder'" in stdout


def test_show_filters_by_prefix_and_reports_a_missing_file():
  rc, stdout, _ = _show("configs/demo.py", "evals.openmoji")
  assert rc == 0
  rows = _rows(stdout)
  assert set(rows) == {f"evals.openmoji.{k}" for k in (
      "batch_size", "every_steps", "split", "templates", "type")}
  assert rows["evals.openmoji.type"][1].startswith("EVALUATORS key")
  rc, stdout, stderr = _show("configs/nope.py")
  assert rc == 2 and stdout == ""
  assert stderr.count("\n") == 1 and "'configs/nope.py' not found" in stderr


def test_parse_key_docs_forms():
  doc = """Intro.

Keys:
  a         first line
            continued.
  b, c      shared.
  d.x/y/z:  slash form.
  e one space.
  f.g, f.h

  after_blank  not a key.
"""
  assert config_lib.parse_key_docs(doc, "Keys:") == {
      "a": "first line continued.", "b": "shared.", "c": "shared.",
      "d.x": "slash form.", "d.y": "slash form.", "d.z": "slash form.",
      "e": "one space.", "f.g": "", "f.h": ""}


def test_a_comment_block_documents_only_the_assignments_below_it():
  # base_config: a block, loss_key; vse_margin with its own comment; a
  # block, label_smoothing; a block, accum_steps and accum_mode.
  docs = config_lib._base_config_comments()  # pylint: disable=protected-access
  assert docs["loss_key"].startswith("multi_positive: which batch field")
  assert docs["vse_margin"].startswith("vse_max / vse_sum hinge margin")
  assert docs["label_smoothing"].startswith("Label smoothing")
  assert docs["accum_steps"].startswith("Gradient accumulation")
  assert docs["accum_mode"] == docs["accum_steps"]
  assert "Label smoothing" not in docs["accum_steps"]


def test_doc_for_falls_back_to_patterns_and_parents():
  docs = {"evals.*.type": "eval type", "model": "model keys",
          "model.x": ""}
  assert config_lib.doc_for("evals.zs.type", docs) == "eval type"
  assert config_lib.doc_for("model.x", docs) == "model keys"
  assert config_lib.doc_for("other", docs) == ""
