"""Initialise parameters from another clip_jax workdir (`config.init`).

  config.init.workdir  a clip_jax workdir: a trained run, or what
                       `python -m clip_jax.convert` writes (None = off).
  config.init.step     its checkpoint to read; None = the latest.
  config.init.include  regex; the parameters whose '/'-joined path fully
                       matches it are copied ('img/.*': the image tower;
                       'img/.*|txt/.*|img_proj/.*|txt_proj/.*|logit_.*':
                       everything); the others keep their fresh init.

Only the included parameters are read from the source (orbax partial
restore, straight into this run's shardings), never its optimiser state:
the run starts its own optimiser at step 0. Applied only when a run starts
(no checkpoint in its own workdir); a resumed run restores its own
checkpoint. Every included parameter must exist in the source with the
same shape, else a ValueError names it and both shapes.
"""

from __future__ import annotations

import os
import re

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from clip_jax import optim


def source_step(workdir: str, step: int | None,
                key: str = "config.init.") -> int:
  """The checkpoint step of `workdir` to read: `step`, or the latest.

  `key`: the prefix of the config keys the errors name (`{key}workdir`,
  `{key}step`).
  """
  directory = os.path.join(os.path.abspath(os.path.expanduser(workdir)),
                           "checkpoints")
  steps = sorted(int(n) for n in (os.listdir(directory)
                                  if os.path.isdir(directory) else [])
                 if n.isdigit())
  if not steps:
    raise ValueError(
        f"{key}workdir={workdir!r} has no checkpoint in {directory}; "
        "give a clip_jax workdir with a finished checkpoint (a trained run "
        "or `python -m clip_jax.convert`'s output).")
  if step is None:
    # Every process reads the same step: process 0's latest (another
    # process's listing may lag on a shared filesystem).
    if jax.process_count() == 1:
      return steps[-1]
    return int(multihost_utils.broadcast_one_to_all(np.int64(steps[-1])))
  if step not in steps:
    raise ValueError(f"{key}step={step} is not a checkpoint of "
                     f"{directory}; it has steps {steps}.")
  return step


def included_paths(params, include: str) -> list[str]:
  """The '/'-joined paths of `params` that `include` fully matches."""
  pattern = re.compile(include)
  paths = [p for p in optim.flat_by_path(params) if pattern.fullmatch(p)]
  if not paths:
    raise ValueError(
        f"config.init.include={include!r} matches no parameter (it must "
        f"match whole '/'-joined paths such as "
        f"{', '.join(list(optim.flat_by_path(params))[:3])}); e.g. "
        "'img/.*' for the image tower.")
  return paths


def load_params(workdir: str, step: int | None, include: str, params,
                shardings) -> dict:
  """{path: array} of the included parameters, read from the source
  checkpoint in the shardings of the matching leaves of `shardings`.

  `params`: this run's parameters (arrays or ShapeDtypeStructs).
  """
  step = source_step(workdir, step)
  state_dir = os.path.join(os.path.abspath(os.path.expanduser(workdir)),
                           "checkpoints", str(step), "state")
  from etils import epath  # pylint: disable=g-import-not-at-top
  stored = optim.flat_by_path(ocp.StandardCheckpointHandler().metadata(
      epath.Path(state_dir)).tree["params"])
  wanted = optim.flat_by_path(params)
  target_shardings = optim.flat_by_path(shardings)
  paths = included_paths(params, include)
  for path in paths:
    if path not in stored:
      raise ValueError(
          f"config.init: parameter {path} (shape {tuple(wanted[path].shape)})"
          f" is not in {state_dir}, which has e.g. "
          f"{', '.join(list(stored)[:4])}; narrow config.init.include or "
          "check the source model's config.")
    if tuple(stored[path].shape) != tuple(wanted[path].shape):
      raise ValueError(
          f"config.init: parameter {path} has shape "
          f"{tuple(stored[path].shape)} in {state_dir} but "
          f"{tuple(wanted[path].shape)} in this run's model; make "
          "config.model match the source's, or exclude it from "
          "config.init.include.")
  target = {"params": optim.nested_by_path({
      p: jax.ShapeDtypeStruct(wanted[p].shape, wanted[p].dtype,
                              sharding=target_shardings[p]) for p in paths})}
  restore_args = jax.tree_util.tree_map(
      lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, dtype=s.dtype),
      target)
  with ocp.PyTreeCheckpointer() as checkpointer:
    restored = checkpointer.restore(
        state_dir, args=ocp.args.PyTreeRestore(
            item=target, restore_args=restore_args, partial_restore=True))
  return optim.flat_by_path(restored["params"])


def init_params(params, init_config, shardings):
  """`params` with the included leaves replaced by the source's (see the
  module docstring); `params` unchanged when init_config.workdir is None."""
  if not init_config or init_config.get("workdir") is None:
    return params
  loaded = load_params(init_config.workdir, init_config.get("step"),
                       init_config.get("include") or "img/.*", params,
                       shardings)
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: loaded.get(optim.path_str(path), leaf), params)
