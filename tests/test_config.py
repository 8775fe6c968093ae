"""Config parsing, durations, mesh sizes and validation errors."""

import ml_collections
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


@pytest.mark.parametrize("key, value, message", [
    ("batch_size", 60, r"batch_size=60 is not divisible by the 8 devices"),
    ("batch_size", 0, r"batch_size=0 must be > 0"),
    ("loss", "softmx", r"softmx.*sigmoid"),
    ("lr", -1.0, r"lr=-1.0 must be > 0"),
    ("total_steps", None, r"Duration 'total' is not set"),
])
def test_validate_errors(key, value, message):
  config = _tiny_config()
  config[key] = value
  with pytest.raises(ValueError, match=message):
    config_lib.validate(config, device_count=8)


def test_validate_model_errors():
  config = _tiny_config()
  config.model.image.variant = "B/33"
  with pytest.raises(ValueError, match="B/33"):
    config_lib.validate(config, device_count=8)


@pytest.mark.parametrize("path, arg", [
    ("configs/clip.py", None), ("configs/clip.py", "model=L/14,loss=sigmoid"),
    ("configs/siglip.py", None), ("configs/siglip.py", "chunked"),
    ("configs/clip.py", "tiny"), ("configs/siglip.py", "tiny"),
    ("configs/demo.py", None), ("configs/demo.py", "loss=sigmoid")])
def test_shipped_configs_validate(path, arg):
  config = config_lib.load_config_file(path, arg)
  config_lib.validate(config, device_count=8)
