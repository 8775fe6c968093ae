r"""Evaluates a run's latest (or a given) checkpoint.

  python -m clip_jax.evaluate --workdir runs/demo            # config.evals
  python -m clip_jax.evaluate --workdir runs/demo \
      --zeroshot_folder=PATH --templates=none,emoji          # ad hoc
  python -m clip_jax.evaluate --workdir runs/demo --retrieval_path=val.jsonl

--zeroshot_folder reads PATH/<class name>/*.{png,jpg,jpeg} ('_' in a folder
name reads as a space); --templates takes one template-set name or several
(comma-separated) reported side by side. --retrieval_path
takes image-caption pairs (see clip_jax/data/sources.py 'folder'). Ad-hoc
sets replace the config's evals unless --with_config_evals. Prints a table
and writes WORKDIR/eval_<step>.json.
"""

from __future__ import annotations

import json
import os

import jax
from absl import app, flags, logging

from clip_jax import checkpoint as checkpoint_lib
from clip_jax import config as config_lib
from clip_jax import optim, train_state
from clip_jax import sharding as sharding_lib
from clip_jax.evals import run as eval_run
from clip_jax.models import two_towers

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
    names = [t for t in templates.split(",") if t]
    evals["zeroshot_folder"] = dict(
        type="zeroshot", source="image_folder", path=zeroshot_folder,
        split="test", templates=names if len(names) > 1 else names[0])
  if retrieval_path:
    evals["retrieval"] = dict(type="retrieval", source="folder",
                              path=retrieval_path, split="test")
  return evals


def restore_params(config, workdir: str, step: int | None):
  """(model, params on the mesh, mesh, step) of a run's checkpoint."""
  mesh = sharding_lib.make_mesh(config.mesh)
  model = two_towers.build_model(
      config.model, pixel_mean=config.data.get("mean"),
      pixel_std=config.data.get("std"))
  # The optimiser's state structure does not depend on the schedule's
  # length, so any length rebuilds the tree the run saved.
  tx, _ = optim.make_optimizer(config, train_state.param_shapes(model, config),
                               total_steps=1, warmup_steps=0)
  shapes, shardings, _ = train_state.abstract_state(model, tx, config, mesh)
  ckpt = checkpoint_lib.Checkpointer(workdir, every_steps=0, keep=10**6,
                                     async_save=False)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(
        f"No checkpoint in {ckpt.directory}; train first or pass a workdir "
        "that has checkpoints.")
  state = ckpt.restore(
      step, checkpoint_lib.abstract_with_shardings(shapes, shardings))
  ckpt.close()
  return model, state["params"], mesh, step


def format_table(results: dict) -> str:
  width = max((len(k) for k in results), default=10)
  return "\n".join(f"{k:{width}}  {v:.4f}" if isinstance(v, float) else
                   f"{k:{width}}  {v}" for k, v in sorted(results.items()))


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required.")
  config = config_lib.load(_WORKDIR.value)
  model, params, mesh, step = restore_params(config, _WORKDIR.value,
                                             _STEP.value)
  evals = adhoc_evals(_ZEROSHOT_FOLDER.value, _TEMPLATES.value,
                      _RETRIEVAL.value)
  if not evals or _WITH_CONFIG.value:
    evals.update({k: v.to_dict() if hasattr(v, "to_dict") else dict(v)
                  for k, v in config.evals.items()})
  if not evals:
    raise app.UsageError(
        "The run's config has no evals; give --zeroshot_folder or "
        "--retrieval_path.")
  results = eval_run.run_all(config, model, params, mesh, evals=evals)
  print(f"checkpoint {step} of {_WORKDIR.value}")
  print(format_table(results))
  if jax.process_index() == 0:
    path = os.path.join(_WORKDIR.value, f"eval_{step}.json")
    with open(path, "w") as f:
      json.dump({"step": step, **results}, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
