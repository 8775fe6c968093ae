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
import difflib
import json
import math
import os
import re

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


def check_slices(slices: int, data: int, device_count: int) -> None:
  """config.mesh.slices: the 'data' axis (resolved size `data`) spans
  `slices` equal groups of devices (TPU slices)."""
  if int(slices) != slices or slices < 1:
    raise ValueError(f"config.mesh.slices={slices!r} must be an integer "
                     ">= 1 (the number of TPU slices; 1 = one slice).")
  if data % slices or device_count % slices:
    raise ValueError(
        f"config.mesh.slices={slices} must divide the 'data' axis "
        f"(mesh.data={data}) and the {device_count} devices: 'data' spans "
        "the slices; choose mesh.data as a multiple of the slice count.")


# --------------------------------------------------------- validation ----
#
# validate() runs every function of CHECKS, in order, before anything is
# built or compiled. Each raises ValueError naming the key (config.a.b), its
# value and what is allowed. To add a check, add a row to CHECKS; new
# top-level or data keys are known once base_config() / default_data_config()
# define them (the type is the default's).

# config.model (models/two_towers.py, vit.py, text.py document each key):
# key -> allowed types (None: may be None).
_TOWER_DIMS = {"width": (int, None), "depth": (int, None),
               "mlp_dim": (int, None), "heads": (int, None)}
MODEL_KEYS = {
    "embed_dim": (int,), "logit_scale_init": (float,),
    "logit_scale_max": (float, None), "logit_bias_init": (float, None),
    "dtype": (str,), "activation": (str,), "remat": (bool,),
    "remat_policy": (str, None),
    "scan": (bool,), "attention": (str, None),
    # Optional, for converted checkpoints (HF / open_clip / SigLIP).
    "ln_eps": (float, None), "image_projection": (bool, None),
    "text_projection_bias": (bool, None),
    "image": {"variant": (str,), "image_size": (int,), "pool": (str,),
              "ln_pre": (bool, None), "patch_size": (int, None),
              "patch_bias": (bool, None), "patch_embed": (str, None),
              **_TOWER_DIMS},
    "text": {"variant": (str,), "vocab_size": (int,),
             "context_length": (int,), "pool": (str,), "causal": (bool,),
             "eos_id": (int,), "pad_id": (int,), "mask_pad": (bool, None),
             "embed_lookup": (str, None),
             **_TOWER_DIMS},
}
# Keys whose default's type is narrower than what they accept.
_WIDER_TYPES = {"data.caption_templates": (str, list, tuple, None),
                "sharding_rules": (tuple, list)}


def _did_you_mean(name, valid) -> str:
  close = difflib.get_close_matches(str(name), [str(v) for v in valid], n=1)
  return f" Did you mean {close[0]!r}?" if close else ""


def _unknown_key(path: str, key: str, valid) -> ValueError:
  return ValueError(
      f"Unknown config key config.{path}{key}.{_did_you_mean(key, valid)} "
      f"Valid keys of config.{path.rstrip('.') or '<top level>'}: "
      f"{', '.join(sorted(valid))}.")


def _not_one_of(key: str, value, valid) -> ValueError:
  return ValueError(
      f"config.{key}={value!r} is not one of {sorted(valid)}."
      f"{_did_you_mean(value, valid)}")


def _type_name(t) -> str:
  return "None" if t is None else t.__name__


def _type_ok(value, allowed) -> bool:
  if value is None:
    return None in allowed
  for t in allowed:
    if t is None:
      continue
    if t is float and isinstance(value, (int, float)) and not isinstance(
        value, bool):
      return True
    if t is int and isinstance(value, bool):
      continue  # True is an int to Python, not a count to us.
    if t in (tuple, list) and isinstance(value, (tuple, list)):
      return True  # JSON turns tuples into lists.
    if isinstance(value, t):
      return True
  return False


def _schema_of(reference) -> dict:
  """{key: allowed types, or a nested schema} from a reference ConfigDict:
  each default's type; a placeholder (default None) may stay None."""
  schema = {}
  for key in reference:
    value = reference[key]
    if isinstance(value, ml_collections.ConfigDict):
      schema[key] = _schema_of(value)
    else:
      t = reference.get_type(key)
      schema[key] = (t,) if value is not None else (t, None)
  return schema


def _check_tree(tree, schema: dict, path: str = "") -> None:
  """Unknown, missing and mistyped keys, recursively; an empty reference
  dict (evals) is not checked here."""
  for key, allowed in schema.items():
    if key not in tree and (isinstance(allowed, dict) or None not in allowed):
      raise ValueError(
          f"config.{path}{key} is missing; start the config from "
          "config.base_config() (and data from "
          "pipeline.default_data_config()), which define every key.")
  for key in tree:
    if key not in schema:
      raise _unknown_key(path, key, schema)
    value, allowed = tree[key], schema[key]
    allowed = _WIDER_TYPES.get(path + key, allowed)
    if isinstance(allowed, dict):
      if not hasattr(value, "keys"):
        raise ValueError(f"config.{path}{key}={value!r}: expected a dict of "
                         f"keys {sorted(allowed)}.")
      if allowed:
        _check_tree(value, allowed, f"{path}{key}.")
    elif not _type_ok(value, allowed):
      raise ValueError(
          f"config.{path}{key}={value!r} is a {type(value).__name__}; "
          f"expected {' or '.join(_type_name(t) for t in allowed)}.")


def _config_schema() -> dict:
  from clip_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  schema = _schema_of(base_config())
  schema["data"] = _schema_of(pipeline.default_data_config())
  schema["model"] = MODEL_KEYS
  schema["evals"] = {}  # Checked by _check_evals.
  return schema


def _check_keys_and_types(config, **_) -> None:
  _check_tree(config, _config_schema())


def _check_batch(config, *, device_count: int, process_count: int) -> None:
  batch = config.batch_size
  if batch <= 0:
    raise ValueError(f"config.batch_size={batch} must be > 0.")
  if batch % device_count:
    raise ValueError(
        f"config.batch_size={batch} is not divisible by the {device_count} "
        f"devices; use a multiple of {device_count}.")
  if batch % process_count:
    raise ValueError(
        f"config.batch_size={batch} is not divisible by the "
        f"{process_count} processes; use a multiple of {process_count}.")


def _check_loss_keys_and_margin(config, **_) -> None:
  from clip_jax import losses  # pylint: disable=g-import-not-at-top
  loss_key = config.get("loss_key", "label")
  if loss_key not in losses.LOSS_KEYS:
    raise ValueError(
        f"config.loss_key={loss_key!r} is not a batch field the keyed "
        f"losses can use; expected one of {list(losses.LOSS_KEYS)} ('label'"
        ": the class index; 'caption_hash': equal caption texts).")
  margin = config.get("vse_margin", losses.VSE_MARGIN)
  if not isinstance(margin, (int, float)) or not 0 <= margin < 2:
    raise ValueError(
        f"config.vse_margin={margin!r}: expected a number in [0, 2) (a "
        "margin between cosine similarities, which differ by at most 2; "
        "VSE++ uses 0.2).")


def _check_mesh(config, *, device_count: int, **_) -> None:
  data, _ = mesh_shape(config.mesh, device_count)
  check_slices(config.mesh.get("slices", 1), data, device_count)
  if config.mesh.get("dcn_granule", "slice") not in ("slice", "process"):
    raise ValueError(f"config.mesh.dcn_granule={config.mesh.dcn_granule!r}: "
                     "expected 'slice' or 'process'.")


def _registered_names():
  """(config key, its registry of valid names), for _check_names."""
  # Imported here: they import jax; parsing a config should not.
  from clip_jax import losses, optim  # pylint: disable=g-import-not-at-top
  from clip_jax.data import sources, tokenizer, transforms  # pylint: disable=g-import-not-at-top
  from clip_jax.models import common, text, vit  # pylint: disable=g-import-not-at-top
  return (("loss", losses.LOSSES), ("schedule", optim.SCHEDULES),
          ("wd_convention", optim.WD_CONVENTIONS),
          ("model.dtype", common.DTYPES),
          ("model.activation", common.ACTIVATIONS),
          ("model.image.variant", vit.VARIANTS),
          ("model.image.pool", vit.POOLS),
          ("model.text.variant", text.VARIANTS),
          ("model.text.pool", text.POOLS),
          ("data.source", sources.SOURCES),
          ("data.eos_policy", tokenizer.POLICIES),
          ("data.jpeg_decoder", transforms.JPEG_DECODERS))


def _get(config, dotted: str, default=None):
  for part in dotted.split("."):
    if not hasattr(config, "get"):
      return default
    config = config.get(part, default)
  return config


def _check_names(config, **_) -> None:
  for key, valid in _registered_names():
    value = _get(config, key)
    if value not in valid:
      raise _not_one_of(key, value, valid)
  templates = config.data.get("caption_templates")
  if isinstance(templates, str):
    from clip_jax.evals import templates as templates_lib  # pylint: disable=g-import-not-at-top
    if templates not in templates_lib.TEMPLATES:
      raise _not_one_of("data.caption_templates", templates,
                        templates_lib.TEMPLATES)


def _check_model(config, **_) -> None:
  from clip_jax.models import two_towers, vit  # pylint: disable=g-import-not-at-top
  image = config.model.image
  patch = image.get("patch_size") or vit.VARIANTS[image.variant]["patch_size"]
  if image.image_size <= 0 or image.image_size % patch:
    fits = [k * patch for k in range(max(1, image.image_size // patch),
                                     image.image_size // patch + 2)]
    raise ValueError(
        f"config.model.image.image_size={image.image_size} is not a positive "
        f"multiple of the patch size {patch} (model.image.patch_size or "
        f"variant {image.variant!r}); use e.g. "
        f"{' or '.join(map(str, fits))}.")
  two_towers.validate_model_config(config.model)  # Sizes, heads, scale cap.


def _tokenizer_vocab(data):
  """(what, vocab size) of the token ids the data holds, or None."""
  if data.source == "synthetic":
    return "config.data.vocab_size (synthetic token ids)", data.vocab_size
  if data.tokenizer == "emoji":
    return ("config.data.vocab_size (the tokenizer trained on the emoji "
            "captions)", data.vocab_size)
  if data.tokenizer == "clip_bpe":
    from clip_jax.data import clip_bpe  # pylint: disable=g-import-not-at-top
    return ("config.data.tokenizer='clip_bpe' (49408 tokens)",
            clip_bpe.VOCAB_SIZE)
  if data.tokenizer and os.path.exists(data.tokenizer):
    from clip_jax.data import tokenizer  # pylint: disable=g-import-not-at-top
    size = tokenizer.load(data.tokenizer).vocab_size
    return f"config.data.tokenizer={data.tokenizer!r} ({size} tokens)", size
  return None


def _check_data_matches_model(config, **_) -> None:
  data, model = config.data, config.model
  for data_key, model_key in (("image_size", "image.image_size"),
                              ("context_length", "text.context_length")):
    if data[data_key] != _get(model, model_key):
      raise ValueError(
          f"config.data.{data_key}={data[data_key]} differs from "
          f"config.model.{model_key}={_get(model, model_key)}; set both to "
          "the same value.")
  vocab = _tokenizer_vocab(data)
  if vocab is not None and vocab[1] > model.text.vocab_size:
    raise ValueError(
        f"{vocab[0]}: ids up to {vocab[1] - 1}, but "
        f"config.model.text.vocab_size={model.text.vocab_size} rows; set "
        f"config.model.text.vocab_size >= {vocab[1]} (usually equal).")
  if data.source != "synthetic" and data.tokenizer == "clip_bpe":
    _check_clip_bpe_model(model.text)


def _check_clip_bpe_model(text) -> None:
  """The text tower must read clip_bpe's ids: EOS pooling at its EOT, and
  no real token (its padding 0 is the token '!') masked as padding."""
  from clip_jax.data import clip_bpe  # pylint: disable=g-import-not-at-top
  if text.pool == "eos" and text.eos_id != clip_bpe.EOT_ID:
    raise ValueError(
        f"config.model.text.eos_id={text.eos_id} but "
        f"config.data.tokenizer='clip_bpe' ends text with {clip_bpe.EOT_ID} "
        f"(<|endoftext|>); set config.model.text.eos_id={clip_bpe.EOT_ID}.")
  # mask_pad=False (converted OpenAI / HF towers) masks no key: any pad_id.
  if text.get("mask_pad") is not False and 0 <= text.pad_id < (
      clip_bpe.VOCAB_SIZE):
    raise ValueError(
        f"config.model.text.pad_id={text.pad_id} is a real clip_bpe token "
        "(its padding 0 is also '!'), so the text tower would mask it out "
        "of attention; set config.model.text.pad_id=-1 (OpenAI's CLIP masks "
        "no key; the causal mask hides the padding from the EOT).")


def _check_data(config, **_) -> None:
  data = config.data
  needs = {"folder": "path", "tfds": "tfds_name", "shards": "path",
           "wds": "path"}.get(data.source)
  if needs and not data.get(needs):
    raise ValueError(f"config.data.source={data.source!r} needs "
                     f"config.data.{needs}, which is {data.get(needs)!r}.")
  for key in ("image_size", "context_length", "vocab_size"):
    if data[key] <= 0:
      raise ValueError(f"config.data.{key}={data[key]} must be > 0.")
  for key in ("worker_count", "read_threads", "prefetch"):
    if (data.get(key) or 0) < 0:
      raise ValueError(f"config.data.{key}={data[key]} must be >= 0.")
  if data.shuffle_buffer < 1:
    raise ValueError(f"config.data.shuffle_buffer={data.shuffle_buffer} "
                     "must be >= 1 (1 = no shuffling of the 'wds' source).")
  fraction = data.max_skip_fraction
  if not 0 <= fraction <= 1:
    raise ValueError(f"config.data.max_skip_fraction={fraction} must be in "
                     "[0, 1].")
  crop = data.get("random_resized_crop")
  if crop is not None and not (len(crop) == 2 and 0 < crop[0] <= crop[1]):
    raise ValueError(
        f"config.data.random_resized_crop={crop!r}: expected (min, max) "
        "area fractions with 0 < min <= max, or None (no crop).")
  from clip_jax.data import transforms  # pylint: disable=g-import-not-at-top
  resize = data.get("eval_resize") or "center_square"
  if resize not in transforms.EVAL_RESIZES:
    raise _not_one_of("data.eval_resize", resize, transforms.EVAL_RESIZES)
  for key in ("mean", "std"):
    value = tuple(data[key])
    if len(value) != 3 or (key == "std" and min(value) <= 0):
      raise ValueError(f"config.data.{key}={value!r}: expected 3 numbers (R, "
                       f"G, B){', all > 0' if key == 'std' else ''}.")


def _check_optimizer(config, **_) -> None:
  if config.lr <= 0:
    raise ValueError(f"config.lr={config.lr} must be > 0.")
  steps("total", config, batch_size=config.batch_size, dataset_size=1)
  for rule in config.sharding_rules:
    if len(rule) != 2 or rule[1] not in ("replicate", "fsdp"):
      raise ValueError(
          f"config.sharding_rules entry {rule!r}: expected "
          "(regex, 'replicate' | 'fsdp').")


def _check_regex(key: str, pattern) -> None:
  try:
    re.compile(pattern)
  except re.error as e:
    raise ValueError(f"config.{key}={pattern!r} is not a regex ({e}); give "
                     "a Python regex over '/'-joined parameter paths, e.g. "
                     "'img/.*'.") from None


def _check_freeze_and_init(config, **_) -> None:
  if config.get("freeze"):
    _check_regex("freeze", config.freeze)
  init = config.get("init") or {}
  if init.get("workdir") is None:
    return
  _check_regex("init.include", init.get("include") or "")
  checkpoints = os.path.join(os.path.expanduser(init.workdir), "checkpoints")
  if not os.path.isdir(checkpoints):
    raise ValueError(
        f"config.init.workdir={init.workdir!r} has no checkpoints/ folder; "
        "give a clip_jax workdir (a trained run, or the output of "
        "`python -m clip_jax.convert`), or None to train from scratch.")
  if init.get("step") is not None and init.step < 0:
    raise ValueError(f"config.init.step={init.step} must be >= 0, or None "
                     "(the latest checkpoint).")


def _check_distill(config, **_) -> None:
  from clip_jax import distill  # pylint: disable=g-import-not-at-top
  distill.check_config(config)


def _check_lora(config, **_) -> None:
  from clip_jax import lora  # pylint: disable=g-import-not-at-top
  lora.check_config(config.get("lora"), config.get("freeze"))


def _check_accumulation(config, *, device_count: int, **_) -> None:
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


def _check_smoothing_optimizer_slip(config, **_) -> None:
  from clip_jax import optim, slip  # pylint: disable=g-import-not-at-top
  smoothing = config.get("label_smoothing", 0.0)
  if not 0 <= smoothing < 1:
    raise ValueError(f"config.label_smoothing={smoothing} must be in [0, 1) "
                     "(ALIGN: 0.1; 0 = none).")
  if smoothing and config.loss != "softmax":
    raise ValueError(
        f"config.label_smoothing={smoothing} needs config.loss='softmax' "
        f"(got {config.loss!r}); the sigmoid losses have no softmax "
        "targets to smooth. Set label_smoothing=0.")
  name = config.get("optimizer", "adamw")
  if name not in optim.OPTIMIZERS:
    raise _not_one_of("optimizer", name, optim.OPTIMIZERS)
  if name == "lamb" and config.get("wd_convention") == "decoupled":
    raise ValueError(
        "config.optimizer='lamb' with config.wd_convention='decoupled': "
        "LAMB adds wd x weights to the update before its trust ratio (the "
        "paper's and optax's LAMB), so wd is passed as it is; set "
        "wd_convention='coupled'.")
  slip.check_config(config)


def _check_evals(config, **_) -> None:
  from clip_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from clip_jax.evals import run as eval_run  # pylint: disable=g-import-not-at-top
  data_keys = set(pipeline.default_data_config())
  for name, eval_config in (config.get("evals") or {}).items():
    kind = eval_config.get("type")
    if kind in eval_run.EVALUATORS:  # (Else eval_run.validate says so.)
      # The keys evals/run.py documents for this type.
      valid = eval_run._COMMON_KEYS | eval_run._KEYS[kind]  # pylint: disable=protected-access
      for key in eval_config:
        if key not in valid:
          raise _unknown_key(f"evals.{name}.", key, valid)
  eval_run.validate(config)  # Types, periods, templates, splits.
  for name, eval_config in (config.get("evals") or {}).items():
    for part in ("dataset", "train_split", "val_split", "test_split"):
      overrides = eval_config.get(part)
      if not hasattr(overrides, "keys"):
        continue  # A split name, or no overrides.
      for key in overrides:
        if key not in data_keys:
          raise _unknown_key(f"evals.{name}.{part}.", key, data_keys)


# (what is checked, check(config, *, device_count, process_count)). The
# README's table lists the same rows; add a row for a new check.
CHECKS = (
    ("unknown keys, wrong types", _check_keys_and_types),
    ("registered names", _check_names),
    ("loss options: loss_key, vse_margin", _check_loss_keys_and_margin),
    ("batch vs devices and processes", _check_batch),
    ("accumulation steps and mode, non-finite limit", _check_accumulation),
    ("mesh axis sizes", _check_mesh),
    ("model sizes, patch size", _check_model),
    ("data vs model: image size, context, vocabulary",
     _check_data_matches_model),
    ("data keys", _check_data),
    ("optimiser, durations, sharding rules", _check_optimizer),
    ("freeze and init regexes, init workdir", _check_freeze_and_init),
    ("loss options: label smoothing, optimiser, SLIP",
     _check_smoothing_optimizer_slip),
    ("distillation: weights, teacher workdir, teacher's inputs",
     _check_distill),
    ("LoRA rank, alpha, regexes; not with freeze", _check_lora),
    ("evals", _check_evals),
)


def validate(config, *, device_count: int, process_count: int = 1) -> None:
  """Runs every check of CHECKS, before anything is built or compiled.

  Raises ValueError naming the key, its value and what is allowed.
  """
  for _, check in CHECKS:
    check(config, device_count=device_count, process_count=process_count)


# Keys that may change when a run resumes, without --allow_config_change:
# they change what is measured, logged or kept, or how fast the data is
# read, never the model, the optimiser, the schedule or the data order.
# A key listed here covers the keys below it (`evals` covers evals.*).
RESUMABLE_KEYS = (
    "evals", "log_every_steps", "checkpoint_every_steps",
    "keep_checkpoints", "max_consecutive_nonfinite",
    "data.worker_count", "data.read_threads", "data.prefetch",
    "data.cache_dir", "data.max_skip_fraction",
    # Read at step 0 only: a resumed run keeps its own checkpoint.
    "init",
    "data.eval_resize",  # Evaluation only (and absent from older runs).
)
MISSING = "<unset>"  # A key one of two configs does not have (in diffs).
SEGMENTS_DIR = "configs"


def to_flat_dict(config) -> dict:
  """{'a.b.c': value} with JSON types (tuples become lists), as saved."""
  tree = json.loads(config.to_json_best_effort(sort_keys=True))

  def flatten(prefix, node, out):
    if isinstance(node, dict) and node:
      for key, value in node.items():
        flatten(f"{prefix}{key}.", value, out)
    else:
      out[prefix[:-1]] = node
    return out

  return flatten("", tree, {})


def config_diff(old, new) -> dict:
  """{key: (old value, new value)} for every key that differs; MISSING for
  a key only one of the two configs has."""
  old, new = to_flat_dict(old), to_flat_dict(new)
  return {k: (old.get(k, MISSING), new.get(k, MISSING))
          for k in sorted(set(old) | set(new))
          if old.get(k, MISSING) != new.get(k, MISSING)}


def format_diff(diff: dict) -> str:
  return "\n".join(f"  {k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())


# Optional model keys the recipes set later, each at the value its absence
# means in models/ (older runs' config.json lack them).
OPTIONAL_MODEL_DEFAULTS = {"model.attention": "flax",
                           "model.image.patch_embed": "conv",
                           "model.text.embed_lookup": "gather",
                           "model.logit_bias_init": None}


def new_key_at_default(key: str, old, new) -> bool:
  """True if the stored config predates `key` (MISSING) and the new value
  is the default (base_config's, or OPTIONAL_MODEL_DEFAULTS'): the run
  trains as before (wd_convention, added later, defaults to the behaviour
  older runs had)."""
  default = OPTIONAL_MODEL_DEFAULTS.get(
      key, to_flat_dict(base_config()).get(key, MISSING))
  return old == MISSING and new == default


def resumable_key(key: str) -> bool:
  """True if `key` may change on resume without --allow_config_change."""
  return any(key == k or key.startswith(k + ".") for k in RESUMABLE_KEYS)


def _write_atomically(path: str, text: str) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)  # Never a half-written config.


def save(config, workdir: str, *, start_step: int = 0) -> str:
  """Writes the config of a run segment that starts at `start_step`.

  `workdir/config.json` is the config of the latest segment (what
  `load` and `python -m clip_jax.evaluate` read); every segment also keeps
  its own `workdir/configs/segment_<n>_step_<start_step>.json`, n = 1, 2,
  ... in order, so the history of a resumed run is never overwritten.
  Returns the segment file's path.
  """
  text = config.to_json_best_effort(indent=2, sort_keys=True)
  history = os.path.join(workdir, SEGMENTS_DIR)
  os.makedirs(history, exist_ok=True)
  n = 1 + len(segment_files(workdir))
  segment = os.path.join(history, f"segment_{n}_step_{start_step}.json")
  _write_atomically(segment, text)
  _write_atomically(os.path.join(workdir, "config.json"), text)
  _write_atomically(os.path.join(workdir, "config.txt"), str(config))
  return segment


def segment_files(workdir: str) -> list[str]:
  """The saved segment configs of a run, oldest first."""
  history = os.path.join(workdir, SEGMENTS_DIR)
  if not os.path.isdir(history):
    return []
  names = [n for n in os.listdir(history)
           if n.startswith("segment_") and n.endswith(".json")]
  names.sort(key=lambda n: int(n.split("_")[1]))
  return [os.path.join(history, n) for n in names]


def load(workdir: str) -> ml_collections.ConfigDict:
  """Reads the config a run saved with `save` (its latest segment)."""
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
  c.checkpoint_every_steps = 1000  # Steps between checkpoints.
  c.keep_checkpoints = 3        # Older checkpoints are deleted.

  c.loss = "softmax"            # Key of losses.LOSSES.
  # multi_positive: which batch field says which pairs are positives (equal
  # keys; -1 = none): 'label' (class index, e.g. the emoji base name) or
  # 'caption_hash' (equal caption texts, for web data). Other losses: unused.
  c.loss_key = "label"
  c.vse_margin = 0.2            # vse_max / vse_sum hinge margin (cosine).
  # Label smoothing of the softmax loss's targets (ALIGN: 0.1); 0 = none.
  c.label_smoothing = 0.0
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
  c.optimizer = "adamw"         # 'adamw' | 'lamb' (ALIGN), see optim.py.
  c.lr = 5e-4
  c.wd = 0.2
  c.wd_convention = "coupled"   # 'coupled' (x lr, PyTorch) | 'decoupled'.
  c.wd_exclude = config_dict.placeholder(str)
  c.adam = ml_collections.ConfigDict(dict(b1=0.9, b2=0.98, eps=1e-6))
  # True: clipping and Adam's moments over one flat vector (optax.flatten);
  # replicated params only. See clip_jax/optim.py.
  c.adam.flatten = False
  c.grad_clip_norm = config_dict.placeholder(float)
  c.schedule = "cosine"
  c.min_lr_ratio = 0.0
  # Regex over '/'-joined param paths (re.fullmatch, e.g. 'img/.*'): those
  # params are never updated and get no optimiser state (LiT); None = none.
  c.freeze = config_dict.placeholder(str)
  # LoRA adapters (clip_jax/lora.py): targets = regex over Dense module
  # paths (re.fullmatch, e.g. '.*/attn/(query|value)'; None = off), rank r,
  # alpha (update = alpha / r x A B), train = regex of base params trained
  # beside the adapters (None = adapters only). With LoRA on, every other
  # param is frozen and config.freeze must be None.
  c.lora = ml_collections.ConfigDict(dict(
      targets=config_dict.placeholder(str), rank=8, alpha=8.0,
      train=config_dict.placeholder(str)))

  # Start from another clip_jax workdir's checkpoint (e.g. one written by
  # clip_jax.convert), at step 0 only: the params whose path fully matches
  # init.include are copied from init.workdir's checkpoint init.step
  # (None = its latest); the others are freshly initialised. See
  # clip_jax/pretrained.py. workdir None = train from scratch.
  c.init = ml_collections.ConfigDict(dict(
      workdir=config_dict.placeholder(str),
      step=config_dict.placeholder(int),
      include="img/.*"))

  # Distillation from a frozen clip_jax teacher workdir (see
  # clip_jax/distill.py for each key); teacher_workdir None = off.
  c.distill = ml_collections.ConfigDict(dict(
      teacher_workdir=config_dict.placeholder(str),
      teacher_step=config_dict.placeholder(int),
      feature_weight=1.0, feature_loss="cosine", relation_weight=1.0,
      relation_temperature=config_dict.placeholder(float)))

  # Mesh axis sizes; -1 = all remaining devices. The batch is split over
  # both axes; parameters follow sharding_rules (see clip_jax/sharding.py).
  # slices > 1: 'data' spans that many TPU slices (DCN between them), the
  # devices grouped by slice_index, or by process with dcn_granule='process'.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, slices=1,
                                          dcn_granule="slice"))
  c.sharding_rules = ((".*", "replicate"),)  # A tuple: overridable by flag.

  # SLIP: a SimCLR loss between two augmented views of each image, through
  # the image tower and an MLP head; weight 0 = off. See clip_jax/slip.py.
  c.slip = ml_collections.ConfigDict(dict(
      weight=0.0, temperature=0.1,
      mlp_dim=config_dict.placeholder(int),
      out_dim=config_dict.placeholder(int),
      view_crop_scale=(0.08, 1.0), view_style_strength=0.4, view_flip=True))

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


# ------------------------------------------------ `show`: keys and docs ----
#
# The docs are read from where each key is documented (one source of truth):
# base_config's comments, and the key lists in the docstrings of optim.py
# (optimiser keys), data/pipeline.py (data.*), models/two_towers.py
# (model.*) and evals/run.py (evals.<name>.*).

# '  key  doc', '  key: doc', '  a, b  doc', '  a | b', '  adam.b1/b2: doc'.
_DOC_ENTRY = re.compile(
    r"^  ([\w.*/]+(?:\s*[,|]\s*[\w.*/]+)*):?(?:\s+(\S.*))?$")


def parse_key_docs(text: str, header: str) -> dict[str, str]:
  """{key: doc} of the '  key   doc...' list after `header` in `text`.

  Continuation lines are indented deeper; the list ends at a blank line.
  'a, b' and 'a | b' document several keys; 'adam.b1/b2/eps' is adam.b1,
  adam.b2, adam.eps. Subsection lines at column 0 ('zeroshot:') are skipped.
  """
  if header not in text:
    raise ValueError(f"No {header!r} in the docstring to parse.")
  docs, current = {}, None
  for line in text.split(header, 1)[1].splitlines()[1:]:
    if not line.strip():
      if docs:
        break
      continue
    match = _DOC_ENTRY.match(line)
    if match:
      current = []
      for key in re.split(r"\s*[,|]\s*", match.group(1).strip()):
        first, *rest = key.split("/")
        prefix = first.rsplit(".", 1)[0] + "." if "." in first else ""
        for name in [first] + [prefix + r for r in rest]:
          docs[name] = current
      if match.group(2):
        current.append(match.group(2).strip())
    elif line.startswith("   ") and current is not None:
      current.append(line.strip())
  return {k: " ".join(v) for k, v in docs.items()}


def _base_config_comments() -> dict[str, str]:
  """{key: comment} of base_config's `c.key = ...  # comment` lines; a
  comment block above a group of assignments documents the group (up to a
  blank line or the next comment block)."""
  import inspect
  docs, block, in_block = {}, None, False
  for line in inspect.getsource(base_config).splitlines():
    stripped = line.strip()
    if not stripped:
      block, in_block = None, False
    elif stripped.startswith("#"):
      block = (block + " " if in_block else "") + stripped.lstrip("# ")
      in_block = True
    else:
      in_block = False
      match = re.match(r"c\.(\w+)\s*=.*?(?:#\s*(.*))?$", stripped)
      if match:
        docs[match.group(1)] = match.group(2) or block or ""
  return docs


def key_docs() -> dict[str, str]:
  """{key pattern: one-line doc}; patterns as `doc_for` matches them."""
  from clip_jax import optim
  from clip_jax.data import pipeline
  from clip_jax.evals import run as eval_run
  from clip_jax.models import two_towers
  docs = dict(_base_config_comments())
  for key, doc in parse_key_docs(optim.__doc__, "Config keys").items():
    if doc:
      docs[key] = doc
  for key, doc in parse_key_docs(pipeline.__doc__,
                                 "Data config keys").items():
    docs[f"data.{key}"] = doc
  for key, doc in parse_key_docs(two_towers.__doc__,
                                 "Model config keys").items():
    docs[f"model.{key}"] = doc
  for key, doc in parse_key_docs(eval_run.__doc__, "`config.evals`").items():
    docs[f"evals.*.{key}"] = doc
  return docs


def doc_for(key: str, docs: dict[str, str]) -> str:
  """The doc of a dotted key: exact, else a matching pattern ('warmup_*',
  'evals.*.type'), else its parent's doc."""
  import fnmatch
  while key:
    if docs.get(key):
      return docs[key]
    for pattern, doc in docs.items():
      if doc and "*" in pattern and fnmatch.fnmatchcase(key, pattern):
        return doc
    key = key.rsplit(".", 1)[0] if "." in key else ""
  return ""


def flatten(config, prefix: str = "") -> list[tuple[str, object]]:
  """[(dotted key, value)] of every leaf, in the config's key order; an
  empty sub-config is one entry ({})."""
  items = []
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      items.extend(flatten(value, f"{name}.") if len(value) else
                   [(name, {})])
    else:
      items.append((name, value))
  return items


def show(config, pattern: str | None = None) -> str:
  """Every key (or those matching the shell `pattern`) as
  'key = value  # doc', one a line."""
  import fnmatch
  docs = key_docs()
  rows = [(k, repr(v)) for k, v in flatten(config)
          if not pattern or fnmatch.fnmatchcase(k, pattern)
          or k.startswith(pattern + ".")]
  if not rows:
    raise ValueError(f"No config key matches {pattern!r}.")
  width = max(len(f"{k} = {v}") for k, v in rows if len(f"{k} = {v}") < 48)
  lines = []
  for key, value in rows:
    left = f"{key} = {value}"
    doc = doc_for(key, docs)
    lines.append(f"{left:{width}}  # {doc}" if doc else left)
  if any(k == "evals" or k.startswith("evals.") for k, _ in rows):
    lines.append("# Keys of one eval, config.evals.<name>.<key> (e.g. "
                 "--config.evals.mine.type=zeroshot), see evals/run.py:")
    lines += [f"#   {k[len('evals.*.'):]}: {d}" for k, d in docs.items()
              if k.startswith("evals.*.")]
  return "\n".join(lines)


def main(argv=None) -> int:
  """`python -m clip_jax.config show FILE[:arg] [KEY_PATTERN]`."""
  import argparse
  import sys
  parser = argparse.ArgumentParser(
      prog="python -m clip_jax.config",
      description="Print every key of a config file with its value and doc.")
  sub = parser.add_subparsers(dest="command", required=True)
  cmd = sub.add_parser("show", help="keys, values and one-line docs")
  cmd.add_argument("config", help="config file, optionally with ':arg', "
                   "e.g. configs/clip.py:tiny")
  cmd.add_argument("pattern", nargs="?", default=None,
                   help="only keys matching this shell pattern or under "
                   "this prefix, e.g. 'data' or '*lr*'")
  args = parser.parse_args(argv)
  path, _, arg = args.config.partition(":")
  if not os.path.isfile(path):
    print(f"error: config file {path!r} not found; give the path of a .py "
          "file defining get_config(), e.g. configs/clip.py.",
          file=sys.stderr)
    return 2
  try:
    config = load_config_file(os.path.abspath(path), arg or None)
    print(show(config, args.pattern))
  except ValueError as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  from clip_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run_plain(main)
