"""Config parsing, durations, mesh sizes and validation errors."""

import ml_collections
import numpy as np
import pytest

from clip_jax import config as config_lib


def test_parse_arg_types_and_unknown_key():
  arg = config_lib.parse_arg("model=B/16,batch=4096,tiny,lr=0.5",
                             model="B/32", batch=32768, tiny=False, lr=1.0)
  assert (arg.model, arg.batch, arg.tiny, arg.lr) == ("B/16", 4096, True, 0.5)
  with pytest.raises(ValueError, match=r"Unknown config argument 'modle'.*"
                     r"Valid arguments: batch, model"):
    config_lib.parse_arg("modle=B/16", model="B/32", batch=1)
  with pytest.raises(ValueError, match=r"batch='big': expected an integer"):
    config_lib.parse_arg("batch=big", batch=1)


def _durations(**kw):
  c = ml_collections.ConfigDict(
      {f"total_{s}": None for s in config_lib.DURATION_SUFFIXES})
  c.update(kw)
  return c


@pytest.mark.parametrize("kw, expected", [
    (dict(total_steps=7), 7),
    (dict(total_examples=1000), 8),      # ceil(1000 / 128)
    (dict(total_epochs=2.0), 32),        # ceil(2 * 2000 / 128)
])
def test_durations(kw, expected):
  got = config_lib.steps("total", _durations(**kw), batch_size=128,
                         dataset_size=2000)
  assert got == expected


def test_duration_errors():
  with pytest.raises(ValueError, match="Duration 'total' is not set"):
    config_lib.steps("total", _durations(), batch_size=8)
  with pytest.raises(ValueError, match="given more than once"):
    config_lib.steps("total", _durations(total_steps=1, total_examples=8),
                     batch_size=8)
  with pytest.raises(ValueError, match="needs the dataset size"):
    config_lib.steps("total", _durations(total_epochs=1.0), batch_size=8)


@pytest.mark.parametrize("data, fsdp, expected", [
    (-1, 1, (8, 1)), (2, -1, (2, 4)), (-1, 8, (1, 8)), (4, 2, (4, 2))])
def test_mesh_shape(data, fsdp, expected):
  mesh = ml_collections.ConfigDict(dict(data=data, fsdp=fsdp))
  assert config_lib.mesh_shape(mesh, 8) == expected


@pytest.mark.parametrize("data, fsdp, message", [
    (3, -1, "does not divide the 8 devices"),
    (2, 2, r"data\*fsdp = 2\*2 = 4 but there are 8 devices"),
    (-1, -1, "at most one may be -1"),
    (0, 1, "must be positive or -1"),
])
def test_mesh_shape_errors(data, fsdp, message):
  mesh = ml_collections.ConfigDict(dict(data=data, fsdp=fsdp))
  with pytest.raises(ValueError, match=message):
    config_lib.mesh_shape(mesh, 8)


def _tiny_config():
  return config_lib.load_config_file("configs/clip.py", "tiny")


def _set(config, dotted, value):
  """A copy of `config` (as plain dicts, like a config read from JSON)
  with config.<dotted> = value, or the key removed if value is _DELETE."""
  tree = config.to_dict()
  *parents, last = dotted.split(".")
  node = tree
  for part in parents:
    node = node[part]
  if value is _DELETE:
    del node[last]
  else:
    node[last] = value
  return ml_collections.ConfigDict(tree)


_DELETE = object()
_EVAL = dict(type="zeroshot", split="openmoji")

# (config.<key> = value, fragments the error must contain): the key, the
# value and what is allowed. Every check of config.CHECKS has a row.
_BAD_CONFIGS = [
    # Unknown keys anywhere in the tree, with a suggestion.
    ("lrr", 1.0, ["config.lrr", "Did you mean 'lr'", "total_steps"]),
    ("data.image_sise", 32,
     ["config.data.image_sise", "Did you mean 'image_size'"]),
    ("model.embed_dims", 32,
     ["config.model.embed_dims", "Did you mean 'embed_dim'"]),
    ("model.image.patchsize", 4,
     ["config.model.image.patchsize", "Did you mean 'patch_size'"]),
    ("evals", {"z": {**_EVAL, "dataset": {"splt": "x"}}},
     ["config.evals.z.dataset.splt", "Did you mean 'split'"]),
    ("evals", {"z": {**_EVAL, "templtes": "emoji"}},
     ["config.evals.z.templtes", "Did you mean 'templates'", "every_steps"]),
    # Wrong types.
    ("model.embed_dim", "32", ["config.model.embed_dim='32'", "expected int"]),
    ("batch_size", 64.0, ["config.batch_size=64.0", "expected int"]),
    ("model.remat", 1, ["config.model.remat=1", "expected bool"]),
    ("data.image_size", True, ["config.data.image_size=True", "int"]),
    ("data.max_skip_fraction", "0.1",
     ["config.data.max_skip_fraction='0.1'", "expected float"]),
    ("model.image", "mu", ["config.model.image='mu'", "expected a dict"]),
    ("data.image_size", _DELETE, ["config.data.image_size is missing"]),
    # Impossible combinations.
    ("batch_size", 60, ["config.batch_size=60", "8 devices",
                        "multiple of 8"]),
    ("model.image.image_size", 30,
     ["config.model.image.image_size=30", "patch size 8", "24 or 32"]),
    ("data.image_size", 64,
     ["config.data.image_size=64", "config.model.image.image_size=32"]),
    ("data.context_length", 16,
     ["config.data.context_length=16", "config.model.text.context_length=8"]),
    ("data.vocab_size", 100,
     ["config.data.vocab_size", "99", "config.model.text.vocab_size=64",
      ">= 100"]),
    ("mesh.data", 3, ["config.mesh", "'data': 3", "8 devices"]),
    # Unknown names.
    ("loss", "softmx", ["config.loss='softmx'", "Did you mean 'softmax'",
                        "'sigmoid'"]),
    ("schedule", "cosin", ["config.schedule='cosin'", "'linear'"]),
    ("model.image.variant", "B/33", ["config.model.image.variant='B/33'",
                                     "'B/32'"]),
    ("model.text.variant", "bse", ["config.model.text.variant='bse'",
                                   "Did you mean 'base'"]),
    ("model.image.pool", "mapp", ["config.model.image.pool='mapp'",
                                  "'cls'"]),
    ("model.text.pool", "eoss", ["config.model.text.pool='eoss'", "'mean'"]),
    ("model.dtype", "float16", ["config.model.dtype='float16'",
                                "'bfloat16'"]),
    ("model.activation", "relu", ["config.model.activation='relu'",
                                  "'quick_gelu'"]),
    ("data.source", "imagenet", ["config.data.source='imagenet'", "'tfds'"]),
    ("data.eos_policy", "sticky", ["config.data.eos_policy='sticky'",
                                   "'last'"]),
    ("data.caption_templates", "emojii",
     ["config.data.caption_templates='emojii'", "Did you mean 'emoji'"]),
    ("evals", {"z": {**_EVAL, "type": "zeroshoot"}},
     ["config.evals.z.type='zeroshoot'", "'retrieval'"]),
    ("evals", {"z": {**_EVAL, "templates": "imagenet81"}},
     ["imagenet81", "valid names"]),
    # Data keys.
    ("data.source", "folder", ["config.data.source='folder'",
                               "config.data.path", "None"]),
    ("data.max_skip_fraction", 1.5, ["config.data.max_skip_fraction=1.5",
                                     "[0, 1]"]),
    ("data.random_resized_crop", (0.8, 0.5),
     ["config.data.random_resized_crop=(0.8, 0.5)", "0 < min <= max"]),
    ("data.std", (0.2, 0.0, 0.3), ["config.data.std=(0.2, 0.0, 0.3)",
                                   "all > 0"]),
    ("data.worker_count", -1, ["config.data.worker_count=-1", ">= 0"]),
    ("data.source", "shards", ["config.data.source='shards'",
                               "config.data.path", "None"]),
    ("data.source", "wds", ["config.data.source='wds'", "config.data.path",
                            "None"]),
    ("data.shuffle_buffer", 0, ["config.data.shuffle_buffer=0", ">= 1"]),
    ("data.jpeg_decoder", "turbo", ["config.data.jpeg_decoder='turbo'",
                                    "'simplejpeg'"]),
    # Optimiser and durations.
    ("lr", -1.0, ["config.lr=-1.0", "must be > 0"]),
    ("total_steps", None, ["Duration 'total' is not set",
                           "config.total_steps"]),
    ("batch_size", 0, ["config.batch_size=0", "must be > 0"]),
    ("max_consecutive_nonfinite", 0,
     ["config.max_consecutive_nonfinite=0", ">= 1"]),
    # Loss options.
    ("loss_key", "caption", ["config.loss_key='caption'", "'label'",
                             "'caption_hash'"]),
    ("vse_margin", -0.1, ["config.vse_margin=-0.1", "[0, 2)", "0.2"]),
    # Freeze and init.
    ("freeze", "img/(.*", ["config.freeze='img/(.*'", "not a regex",
                           "'img/.*'"]),
    ("init.workdir", "/nonexistent/run",
     ["config.init.workdir='/nonexistent/run'", "no checkpoints/ folder"]),
    # Loss options.
    ("label_smoothing", 1.0, ["config.label_smoothing=1.0", "[0, 1)"]),
    ("optimizer", "lamd", ["config.optimizer='lamd'", "Did you mean 'lamb'"]),
    ("slip.temperature", 0.0, ["config.slip.temperature=0.0", "> 0"]),
    # Distillation (tests/test_distill.py has the teacher mismatches).
    ("distill.teacher_workdir", "/nonexistent/teacher",
     ["config.distill.teacher_workdir='/nonexistent/teacher'",
      "no config.json"]),
    # LoRA.
    ("lora.rank", 0, ["config.lora.rank=0", "integer >= 1"]),
    ("lora.targets", "img/(", ["config.lora.targets='img/('",
                               "not a regex"]),
]


def _case_id(key, value) -> str:
  """The same on every pytest-xdist worker (no object address)."""
  return f"{key}={'<deleted>' if value is _DELETE else repr(value)}"[:40]


@pytest.mark.parametrize("key, value, fragments", _BAD_CONFIGS,
                         ids=[_case_id(k, v) for k, v, _ in _BAD_CONFIGS])
def test_validate_names_the_key_the_value_and_what_is_allowed(
    key, value, fragments):
  config = _set(_tiny_config(), key, value)
  with pytest.raises(ValueError) as error:
    config_lib.validate(config, device_count=8)
  for fragment in fragments:
    assert fragment in str(error.value)


def test_every_check_rejects_some_bad_config():
  """Each row of config.CHECKS is the first to reject at least one bad
  config above (so no check is dead or shadowed)."""
  first = set()
  for key, value, _ in _BAD_CONFIGS:
    config = _set(_tiny_config(), key, value)
    for name, check in config_lib.CHECKS:
      try:
        check(config, device_count=8, process_count=1)
      except ValueError:
        first.add(name)
        break
  assert first == {name for name, _ in config_lib.CHECKS}


def test_accumulation_steps_divide_the_per_device_batch():
  """Each micro-batch takes per_device / accum_steps rows of every device."""
  config = _set(_tiny_config(), "accum_steps", 3)  # 64 / 8 = 8 rows, 8 % 3.
  with pytest.raises(ValueError, match=r"config.accum_steps=3 does not divide "
                     r"the per-device batch 8 \(batch_size 64 / 8 devices\)"):
    config_lib.validate(config, device_count=8)
  config_lib.validate(_set(config, "accum_steps", 4), device_count=8)
  with pytest.raises(ValueError, match=r"config.accum_steps=0 must be"):
    config_lib.validate(_set(config, "accum_steps", 0), device_count=8)
  with pytest.raises(ValueError, match=r"config.accum_mode='fast' is not one"):
    config_lib.validate(_set(config, "accum_mode", "fast"), device_count=8)


def test_batch_divisible_by_processes():
  config = _set(_tiny_config(), "batch_size", 8 * 3 * 5)
  config_lib.validate(config, device_count=8, process_count=3)
  with pytest.raises(ValueError, match=r"batch_size=120 is not divisible "
                     r"by the 7 processes"):
    config_lib.validate(config, device_count=8, process_count=7)


def test_tokenizer_file_larger_than_the_embedding_table(tmp_path):
  from clip_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "tok.model")
  rng = np.random.default_rng(0)
  words = ["".join(rng.choice(list("abcdefghijklmnop"), 6)) for _ in range(400)]
  size = tokenizer_lib.train(words, 100, output=path).vocab_size
  assert size > 64
  config = _set(_tiny_config(), "data.source", "folder")
  config = _set(_set(config, "data.path", str(tmp_path)), "data.tokenizer",
                path)
  with pytest.raises(ValueError, match=rf"tok.model' \({size} tokens\).*"
                     r"config.model.text.vocab_size=64"):
    config_lib.validate(config, device_count=8)
  config_lib.validate(_set(config, "model.text.vocab_size", size),
                      device_count=8)


def test_wider_valid_types_are_accepted():
  """JSON turns tuples into lists, ints may stand for floats, template
  lists stand for set names, placeholders may stay None."""
  config = _tiny_config()
  for key, value in (("lr", 1), ("data.mean", [0.5, 0.5, 0.5]),
                     ("data.caption_templates", ["a {}", "the {}"]),
                     ("model.logit_scale_max", None),
                     ("sharding_rules", [[".*", "replicate"]])):
    config = _set(config, key, value)
  config_lib.validate(config, device_count=8)


@pytest.mark.parametrize("path, arg", [
    ("configs/clip.py", None), ("configs/clip.py", "model=L/14,loss=sigmoid"),
    ("configs/siglip.py", None), ("configs/siglip.py", "chunked"),
    ("configs/clip.py", "tiny"), ("configs/siglip.py", "tiny"),
    ("configs/demo.py", None), ("configs/demo.py", "loss=sigmoid")])
def test_shipped_configs_validate(path, arg):
  config = config_lib.load_config_file(path, arg)
  config_lib.validate(config, device_count=8)


_OVERRIDE_SCRIPT = """
from absl import app
from ml_collections import config_flags
config = config_flags.DEFINE_config_file("config")
app.run(lambda _: print(repr(config.value.model[{key!r}])))
"""


@pytest.mark.parametrize("config_arg, override, key, expected", [
    # Defaults that are None still carry a type, so the command line can set
    # them (a plain None would make ml_collections refuse the override).
    ("configs/clip.py:tiny", "model.logit_bias_init=-5", "logit_bias_init",
     "-5.0"),
    ("configs/siglip.py", "model.logit_scale_max=50", "logit_scale_max",
     "50.0"),
])
def test_none_defaults_can_be_overridden_on_the_command_line(
    config_arg, override, key, expected):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  proc = subprocess.run(
      [sys.executable, "-c", _OVERRIDE_SCRIPT.format(key=key),
       f"--config={config_arg}", f"--config.{override}"],
      capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip() == expected
