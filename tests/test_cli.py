"""Entry points: a user's mistake is one line on stderr with exit status 2;
--verbose / CLIP_JAX_VERBOSE=1 bring the traceback back."""

import os
import subprocess
import sys

import pytest

from clip_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config", "configs/clip.py:tiny"]


def _run(module, *args, env=None):
  given = env or {}
  env = {**os.environ, **given}
  if cli.VERBOSE_ENV not in given:
    env.pop(cli.VERBOSE_ENV, None)
  proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300, env=env)
  return proc.returncode, proc.stdout, proc.stderr


def _one_error_line(rc, stdout, stderr):
  lines = stderr.strip().splitlines()
  assert rc == cli.USAGE_ERROR, (rc, stderr)
  assert len(lines) == 1, stderr
  assert lines[0].startswith("error: ")
  assert "Traceback" not in stderr + stdout
  return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("args, expected", [
    (TINY + ["--workdir", "W", "--config.lrr=1e-3"],
     ["unknown config key 'lrr'", "--config.lrr=1e-3", "did you mean 'lr'",
      "clip_jax.config show"]),
    (TINY + ["--workdir", "W", "--config.model.embed_dimm=3"],
     ["unknown config key 'embed_dimm'", "did you mean 'embed_dim'"]),
    (["--config", "configs/nope.py", "--workdir", "W"],
     ["config file 'configs/nope.py' not found", "configs/clip.py"]),
    (["--config", "configs/clip.py:tinyy", "--workdir", "W"],
     ["Unknown config argument 'tinyy'", "Valid arguments"]),
    (TINY + ["--workdir", "W", "--config.loss=sigmod"],
     ["config.loss='sigmod'", "is not one of ['multi_positive', 'sigmoid',",
      "Did you mean 'sigmoid'?"]),
    (TINY + ["--workdir", "W", "--config.lr=abc"], ["--config.lr=abc"]),
    (TINY + ["--workdirr", "W"], ["'workdirr'", "workdir"]),
    (TINY, ["--config and --workdir are required"]),
])
def test_train_user_errors_are_one_line(tmp_path, args, expected):
  args = [str(tmp_path / "w") if a == "W" else a for a in args]
  line = _one_error_line(*_run("clip_jax.train", *args))
  for text in expected:
    assert text in line


@pytest.mark.slow
def test_a_missing_tokenizer_is_one_line(tmp_path):
  data = tmp_path / "data"
  data.mkdir()
  line = _one_error_line(*_run(
      "clip_jax.train", *TINY, "--workdir", str(tmp_path / "w"),
      "--config.data.source=folder", f"--config.data.path={data}",
      f"--config.data.tokenizer={tmp_path / 'nope.model'}"))
  assert "nope.model' not found (config.data.tokenizer)" in line
  assert "clip_jax.data.tokenizer train" in line


@pytest.mark.slow
@pytest.mark.parametrize("how", [["--verbose"], []])
def test_verbose_shows_the_traceback(tmp_path, how):
  env = {} if how else {cli.VERBOSE_ENV: "1"}
  rc, _, stderr = _run("clip_jax.train", *TINY, "--workdir",
                       str(tmp_path / "w"), "--config.loss=sigmod", *how,
                       env=env)
  assert rc != 0
  assert "Traceback" in stderr and "config.loss='sigmod'" in stderr


def test_errors_raised_inside_libraries_are_not_user_errors():
  import numpy as np
  try:
    np.zeros(3).reshape(2, 2)  # A ValueError raised by NumPy itself.
  except ValueError as e:
    assert cli.user_error_message(e) is None
  try:
    cli.zeroshot_folder_eval("/no/such/folder")
  except cli.UserError as e:
    assert cli.user_error_message(e).startswith("Zero-shot folder")


def test_project_value_errors_are_user_errors_on_one_line():
  from clip_jax import config as config_lib
  try:
    config_lib.parse_arg("x=1", y=2)
  except ValueError as e:
    message = cli.user_error_message(e)
  assert message == "Unknown config argument 'x' in 'x=1'. Valid arguments: y."
  assert cli.one_line("a\n  b\tc") == "a b c"


def test_zeroshot_folder_eval_resolves_aliases(tmp_path):
  name, c = cli.zeroshot_folder_eval(f"{tmp_path}:imagenet,none")
  assert name == f"zeroshot_{tmp_path.name}"
  assert c == dict(type="zeroshot", source="image_folder",
                   path=str(tmp_path), split="test",
                   templates=["clip_imagenet", "none"])
  assert cli.zeroshot_folder_eval(str(tmp_path))[1]["templates"] == "none"
  with pytest.raises(ValueError, match="valid names: clip_imagenet, "):
    cli.zeroshot_folder_eval(f"{tmp_path}:imagenett")
