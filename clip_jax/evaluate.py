r"""Evaluates a run's latest (or a given) checkpoint.

  python -m clip_jax.evaluate --workdir runs/demo            # config.evals
  python -m clip_jax.evaluate --workdir runs/demo \
      --zeroshot_folder=PATH --templates=none,emoji          # ad hoc
  python -m clip_jax.evaluate --workdir runs/demo --retrieval_path=val.jsonl

--zeroshot_folder reads PATH/<class name>/*.{png,jpg,jpeg} ('_' in a folder
name reads as a space); --templates takes one template-set name or several
(comma-separated) reported side by side. --retrieval_path
takes image-caption pairs (see clip_jax/data/sources.py 'folder'). Ad-hoc
sets replace the config's evals unless --with_config_evals. Template-set
names accept the aliases of evals/templates.py ('imagenet' =
clip_imagenet).

Prints a table and keeps every result: WORKDIR/eval_<step>.json, or
eval_<step>_<n>.json (n = 2, 3, ...) when that exists, and one line appended
to WORKDIR/evals.jsonl. Each records the checkpoint step and what was
evaluated: every eval's config (folder path, templates, split, ...). An
ad-hoc zero-shot folder eval is named after the folder
('zeroshot_<folder name>').
"""

from __future__ import annotations

import json
import os
import time

import jax
from absl import app, flags, logging

from clip_jax import api, cli
from clip_jax.evals import run as eval_run
from clip_jax.evals import templates as templates_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default last).")
_ZEROSHOT_FOLDER = flags.DEFINE_string(
    "zeroshot_folder", None, "Image folder root/<class>/*.png to classify.")
_TEMPLATES = flags.DEFINE_string(
    "templates", "none", "Template set name(s), comma-separated.")
_RETRIEVAL = flags.DEFINE_string(
    "retrieval_path", None,
    "Image-caption pairs for retrieval: a folder, .csv or .jsonl.")
_WITH_CONFIG = flags.DEFINE_bool(
    "with_config_evals", False, "Also run config.evals with ad-hoc sets.")


def adhoc_evals(zeroshot_folder, templates, retrieval_path) -> dict:
  """Eval configs for the command line's ad-hoc sets."""
  evals = {}
  if zeroshot_folder:
    name, eval_config = cli.zeroshot_folder_eval(zeroshot_folder, templates)
    evals[name] = eval_config
  if retrieval_path:
    evals["retrieval"] = dict(type="retrieval", source="folder",
                              path=os.path.abspath(retrieval_path),
                              split="test")
  return evals


def format_table(results: dict) -> str:
  width = max((len(k) for k in results), default=10)
  return "\n".join(f"{k:{width}}  {v:.4f}" if isinstance(v, float) else
                   f"{k:{width}}  {v}" for k, v in sorted(results.items()))


def result_path(workdir: str, step: int) -> str:
  """WORKDIR/eval_<step>.json, or eval_<step>_<n>.json for the first n >= 2
  that does not exist yet: earlier results are never overwritten."""
  path = os.path.join(workdir, f"eval_{step}.json")
  n = 2
  while os.path.exists(path):
    path = os.path.join(workdir, f"eval_{step}_{n}.json")
    n += 1
  return path


def write_results(workdir: str, step: int, evals: dict,
                  results: dict) -> str:
  """Writes a new eval_<step>[_n].json and appends to evals.jsonl."""
  record = {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "workdir": os.path.abspath(workdir), "evals": evals,
            "results": results}
  path = result_path(workdir, step)
  # 'x': fail rather than overwrite if another process took the name.
  with open(path, "x") as f:
    json.dump({**record, **results}, f, indent=2)
  with open(os.path.join(workdir, "evals.jsonl"), "a") as f:
    f.write(json.dumps({**record, "file": os.path.basename(path)}) + "\n")
  return path


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required.")
  config = api.load_run_config(_WORKDIR.value)
  for name in _TEMPLATES.value.split(","):
    templates_lib.resolve_name(name)  # Fails fast, listing the names.
  evals = adhoc_evals(_ZEROSHOT_FOLDER.value, _TEMPLATES.value,
                      _RETRIEVAL.value)
  if not evals or _WITH_CONFIG.value:
    evals.update({k: v.to_dict() if hasattr(v, "to_dict") else dict(v)
                  for k, v in config.evals.items()})
  if not evals:
    raise app.UsageError(
        "The run's config has no evals; give --zeroshot_folder or "
        "--retrieval_path.")
  eval_run.validate(config, evals=evals)  # Before restoring anything.
  model, params, mesh, step = api.restore_params(config, _WORKDIR.value,
                                                 _STEP.value)
  results = eval_run.run_all(config, model, params, mesh, evals=evals)
  print(f"checkpoint {step} of {_WORKDIR.value}")
  print(format_table(results))
  if jax.process_index() == 0:
    path = write_results(_WORKDIR.value, step, evals, results)
    print(f"wrote {path} (and a line of {_WORKDIR.value}/evals.jsonl)")


if __name__ == "__main__":
  cli.run(main)
