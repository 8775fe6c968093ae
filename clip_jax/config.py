"""Config helpers: `file.py:k=v,...` arguments, durations, validation.

Config files define `get_config(arg: str | None) -> ConfigDict`. The part after
the colon in `--config configs/clip.py:model=B/16,loss=sigmoid` reaches
`get_config` as a string; `parse_arg` turns it into a ConfigDict of typed
values checked against the file's defaults.

Durations (total length, warmup, logging/checkpoint intervals, eval period)
are given as exactly one of `<name>_steps`, `<name>_examples` or
`<name>_epochs`; `steps()` converts any of them to optimiser steps.
"""

from __future__ import annotations

import ast
import json
import math
import os

import ml_collections

DURATION_SUFFIXES = ("steps", "examples", "epochs")


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses 'k=v,k2=v2' into a ConfigDict, typed by `defaults`.

  Every key must appear in `defaults`; values are converted to the default's
  type (bools accept true/false/1/0). Example:
    parse_arg('model=B/16,batch=4096', model='B/32', batch=32768, tiny=False)
  """
  result = ml_collections.ConfigDict(dict(defaults))
  if not arg:
    return result
  for item in arg.split(","):
    if not item:
      continue
    if "=" not in item:
      # A bare word sets a boolean flag: `configs/clip.py:tiny`.
      key, value = item, "true"
    else:
      key, value = item.split("=", 1)
    if key not in defaults:
      raise ValueError(
          f"Unknown config argument {key!r} in {arg!r}. "
          f"Valid arguments: {', '.join(sorted(defaults))}.")
    result[key] = _convert(key, value, defaults[key])
  return result


def _convert(key, value: str, default):
  if isinstance(default, bool):
    if value.lower() in ("true", "1", "yes"):
      return True
    if value.lower() in ("false", "0", "no"):
      return False
    raise ValueError(f"Config argument {key}={value!r}: expected true/false.")
  if isinstance(default, int):
    try:
      return int(value)
    except ValueError:
      raise ValueError(
          f"Config argument {key}={value!r}: expected an integer.") from None
  if isinstance(default, float):
    try:
      return float(value)
    except ValueError:
      raise ValueError(
          f"Config argument {key}={value!r}: expected a number.") from None
  if default is None:
    try:
      return ast.literal_eval(value)
    except (ValueError, SyntaxError):
      return value
  return value


def steps(name: str, config, *, batch_size: int,
          dataset_size: int | None = None, default=None) -> int:
  """Number of optimiser steps of duration `name` (e.g. 'total', 'warmup').

  Looks up `{name}_steps`, `{name}_examples` and `{name}_epochs` in `config`;
  exactly one of them may be set (not None). Examples round up to whole steps.
  """
  given = {s: config.get(f"{name}_{s}") for s in DURATION_SUFFIXES}
  given = {s: v for s, v in given.items() if v is not None}
  if not given:
    if default is not None:
      return default
    raise ValueError(
        f"Duration {name!r} is not set: set one of "
        f"{', '.join(f'config.{name}_{s}' for s in DURATION_SUFFIXES)}.")
  if len(given) > 1:
    raise ValueError(
        f"Duration {name!r} is given more than once "
        f"({', '.join(f'{name}_{s}={v}' for s, v in given.items())}); "
        "set exactly one of them.")
  (suffix, value), = given.items()
  if value < 0:
    raise ValueError(f"config.{name}_{suffix}={value} must be >= 0.")
  if suffix == "steps":
    return int(value)
  if suffix == "examples":
    return int(math.ceil(value / batch_size))
  if dataset_size is None:
    raise ValueError(
        f"config.{name}_epochs={value} needs the dataset size, which this "
        f"source does not report; give {name}_steps or {name}_examples.")
  return int(math.ceil(value * dataset_size / batch_size))


def mesh_shape(mesh_config, device_count: int) -> tuple[int, int]:
  """Resolves the ('data', 'fsdp') sizes; one of them may be -1 (the rest)."""
  sizes = [int(mesh_config.data), int(mesh_config.fsdp)]
  for name, size in zip(("data", "fsdp"), sizes):
    if size == 0 or size < -1:
      raise ValueError(
          f"config.mesh.{name}={size}: mesh axis sizes must be positive or -1 "
          "(= all remaining devices).")
  if sizes.count(-1) > 1:
    raise ValueError(
        f"config.mesh has -1 for both axes ({sizes}); at most one may be -1.")
  known = math.prod(s for s in sizes if s != -1)
  if device_count % known:
    raise ValueError(
        f"config.mesh {dict(data=sizes[0], fsdp=sizes[1])} does not divide "
        f"the {device_count} devices; choose sizes whose product divides it.")
  sizes = [device_count // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != device_count:
    raise ValueError(
        f"config.mesh data*fsdp = {sizes[0]}*{sizes[1]} = {math.prod(sizes)} "
        f"but there are {device_count} devices; use -1 for one axis to take "
        "the remaining devices.")
  return sizes[0], sizes[1]


def validate(config, *, device_count: int, process_count: int = 1) -> None:
  """Checks a config before anything is compiled; raises ValueError."""
  # Imported here: losses/models import jax, config parsing should not need to.
  from clip_jax import losses
  from clip_jax.models import two_towers

  if config.batch_size <= 0:
    raise ValueError(f"config.batch_size={config.batch_size} must be > 0.")
  if config.batch_size % device_count:
    raise ValueError(
        f"config.batch_size={config.batch_size} is not divisible by the "
        f"{device_count} devices; use a multiple of {device_count}.")
  if config.batch_size % process_count:
    raise ValueError(
        f"config.batch_size={config.batch_size} is not divisible by the "
        f"{process_count} processes.")
  mesh_shape(config.mesh, device_count)
  _validate_accumulation(config, device_count)
  losses.get_loss(config.loss)  # Raises with the list of valid names.
  two_towers.validate_model_config(config.model)
  if config.lr <= 0:
    raise ValueError(f"config.lr={config.lr} must be > 0.")
  steps("total", config, batch_size=config.batch_size, dataset_size=1)
  for rule in config.sharding_rules:
    if len(rule) != 2 or rule[1] not in ("replicate", "fsdp"):
      raise ValueError(
          f"config.sharding_rules entry {rule!r}: expected "
          "(regex, 'replicate' | 'fsdp').")


def _validate_accumulation(config, device_count: int) -> None:
  accum, mode = config.get("accum_steps", 1), config.get("accum_mode", "exact")
  if mode not in ("exact", "naive"):
    raise ValueError(
        f"config.accum_mode={mode!r} is not one of ('exact', 'naive').")
  if not isinstance(accum, int) or accum < 1:
    raise ValueError(f"config.accum_steps={accum!r} must be an integer >= 1.")
  per_device = config.batch_size // device_count
  if per_device % accum:
    raise ValueError(
        f"config.accum_steps={accum} does not divide the per-device batch "
        f"{per_device} (batch_size {config.batch_size} / {device_count} "
        "devices): each micro-batch takes per_device / accum_steps rows of "
        "every device. Choose accum_steps among the divisors of "
        f"{per_device}, or a batch_size that is a multiple of "
        f"{device_count * accum}.")
  limit = config.get("max_consecutive_nonfinite", 1)
  if not isinstance(limit, int) or limit < 1:
    raise ValueError(
        f"config.max_consecutive_nonfinite={limit!r} must be an integer >= 1.")


def save(config, workdir: str) -> str:
  """Writes the resolved config to `workdir/config.json` (and .yaml-ish str)."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  with open(path, "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  with open(os.path.join(workdir, "config.txt"), "w") as f:
    f.write(str(config))
  return path


def load(workdir: str) -> ml_collections.ConfigDict:
  """Reads the config a run saved with `save`."""
  with open(os.path.join(workdir, "config.json")) as f:
    return ml_collections.ConfigDict(json.load(f))


def base_config() -> ml_collections.ConfigDict:
  """Every experiment config key, with its default and its one meaning.

  Config files start from this and change what their recipe needs.
  """
  from ml_collections import config_dict
  c = ml_collections.ConfigDict()
  c.seed = 0                    # Parameter init and data order.
  c.batch_size = 32768          # Global batch (all devices, all processes).
  # Durations: exactly one of *_steps / *_examples / *_epochs (see steps()).
  c.total_steps = config_dict.placeholder(int)
  c.total_examples = config_dict.placeholder(int)
  c.total_epochs = config_dict.placeholder(float)
  c.warmup_steps = config_dict.placeholder(int)
  c.warmup_examples = config_dict.placeholder(int)
  c.warmup_epochs = config_dict.placeholder(float)
  c.log_every_steps = 50        # Metrics to stdout/jsonl/TensorBoard.
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3        # Older checkpoints are deleted.

  c.loss = "softmax"            # Key of losses.LOSSES.
  # Gradient accumulation (see clip_jax/train_state.py): each step runs the
  # global batch as accum_steps micro-batches, each spread over all devices.
  # 'exact': the full-batch contrastive gradient (GradCache); 'naive': each
  # micro-batch's own loss, gradients averaged (an ablation baseline).
  c.accum_steps = 1
  c.accum_mode = "exact"
  # Stop the run after this many consecutive non-finite (skipped) steps.
  c.max_consecutive_nonfinite = 10

  # Model: see clip_jax/models/two_towers.py for each key.
  c.model = ml_collections.ConfigDict()

  # Optimiser: see clip_jax/optim.py for each key.
  c.lr = 5e-4
  c.wd = 0.2
  c.wd_exclude = config_dict.placeholder(str)
  c.adam = ml_collections.ConfigDict(dict(b1=0.9, b2=0.98, eps=1e-6))
  c.grad_clip_norm = config_dict.placeholder(float)
  c.schedule = "cosine"
  c.min_lr_ratio = 0.0

  # Mesh axis sizes; -1 = all remaining devices. The batch is split over
  # both axes; parameters follow sharding_rules (see clip_jax/sharding.py).
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  c.sharding_rules = ((".*", "replicate"),)  # A tuple: overridable by flag.

  # Input: see clip_jax/data/pipeline.py for each key.
  c.data = ml_collections.ConfigDict()

  # Evaluators run during training: {name: ConfigDict(type=..., ...)}.
  c.evals = ml_collections.ConfigDict()
  return c


def load_config_file(path: str, arg: str | None = None):
  """Calls `get_config(arg)` of a config file (as `--config path:arg` does).

  Relative paths are resolved against the calling config file's folder when
  they exist there, so recipes can build on each other.
  """
  import importlib.util
  import inspect
  if not os.path.isabs(path):
    caller = inspect.stack()[1].filename
    sibling = os.path.join(os.path.dirname(os.path.abspath(caller)), path)
    if os.path.exists(sibling):
      path = sibling
  name = "clip_jax_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)
