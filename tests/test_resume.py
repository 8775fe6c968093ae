"""Resume hygiene, in this process: what a changed config does to a resume,
the config history, finished runs, unwritable workdirs, honest metrics."""

import json
import math
import os

import pytest
from _train_worker import synthetic_stream

from clip_jax import checkpoint as checkpoint_lib
from clip_jax import config as config_lib
from clip_jax import metrics as metrics_lib
from clip_jax import train


def tiny_config(**overrides):
  config = config_lib.load_config_file("configs/clip.py", "tiny,batch=32")
  config.total_steps = 2
  config.warmup_steps = 1
  config.log_every_steps = 1
  config.update_from_flattened_dict(overrides)
  return config


def run(config, workdir, **kwargs):
  stream = synthetic_stream(config, 0, 1)
  return train.train(config, str(workdir), data=(stream, None), **kwargs)


def snapshot(workdir):
  """Every file of a workdir with its bytes (to show nothing changed)."""
  files = {}
  for root, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        files[os.path.relpath(path, workdir)] = f.read()
  return files


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished 2-step run; tests copy it before changing anything."""
  workdir = tmp_path_factory.mktemp("trained") / "run"
  result = run(tiny_config(), workdir)
  assert result.exit_code == 0 and result.step == 2
  return workdir


def test_every_run_writes_its_curves(trained):
  """Not only the demo: the loop refreshes curves.png at evals and the end,
  from metrics.jsonl."""
  with open(trained / "curves.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def copy_of(trained, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  target = tmp_path / "run"
  shutil.copytree(trained, target)
  return target


def test_changed_shapes_fail_naming_keys_and_change_nothing(trained,
                                                            tmp_path):
  workdir = copy_of(trained, tmp_path)
  before = snapshot(workdir)
  config = tiny_config(**{"model.embed_dim": 64, "total_steps": 4})
  with pytest.raises(ValueError) as error:
    run(config, workdir, allow_config_change=True)
  message = str(error.value)
  assert "model.embed_dim: 32 -> 64" in message
  assert "total_steps: 2 -> 4" in message
  assert "other shapes" in message and "Nothing was changed" in message
  assert snapshot(workdir) == before  # config.json is still the run's.


@pytest.mark.parametrize("overrides", [
    {"freeze": "img/.*"},                      # Frozen params lose opt state.
    {"grad_clip_norm": None, "adam.b2": 0.95},  # Same structure: resumes.
])
def test_an_optimiser_state_of_another_structure_fails_before_writing(
    trained, tmp_path, overrides):
  workdir = copy_of(trained, tmp_path)
  before = snapshot(workdir)
  config = tiny_config(total_steps=3, **overrides)
  if "freeze" not in overrides:  # Clipping has no state: nothing differs.
    assert run(config, workdir, allow_config_change=True).step == 3
    return
  with pytest.raises(ValueError) as error:
    run(config, workdir, allow_config_change=True)
  message = str(error.value)
  assert "optimiser state has another structure" in message
  assert "opt/inner_state/" in message and "freeze: None -> 'img/.*'" in message
  assert "Nothing was changed" in message
  assert snapshot(workdir) == before


def test_training_change_needs_the_flag(trained, tmp_path, capsys):
  workdir = copy_of(trained, tmp_path)
  before = snapshot(workdir)
  config = tiny_config(lr=1e-2, total_steps=3)
  with pytest.raises(ValueError, match=r"lr: 0.0005 -> 0.01") as error:
    run(config, workdir)
  assert "--allow_config_change" in str(error.value)
  assert snapshot(workdir) == before
  capsys.readouterr()

  result = run(config, workdir, allow_config_change=True)
  assert result.exit_code == 0 and result.step == 3
  out = capsys.readouterr().out
  assert "Resuming from checkpoint 2" in out
  assert "lr: 0.0005 -> 0.01" in out and "total_steps: 2 -> 3" in out
  assert config_lib.load(workdir).lr == 1e-2
  history = [os.path.basename(p) for p in config_lib.segment_files(workdir)]
  assert history == ["segment_1_step_0.json", "segment_2_step_2.json"]
  with open(config_lib.segment_files(workdir)[0]) as f:
    assert json.load(f)["lr"] == 5e-4  # The first segment's, kept.


def test_extending_a_run_reports_the_lr_jump(trained, tmp_path, capsys):
  workdir = copy_of(trained, tmp_path)
  capsys.readouterr()
  run(tiny_config(total_steps=5), workdir, allow_config_change=True)
  out = capsys.readouterr().out

  def cosine_lr(step, total, warmup=1, peak=5e-4):  # optax's formula.
    t = (step - warmup) / (total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * t))

  assert (f"lr at step 2 goes from {cosine_lr(2, 2):.3g} to "
          f"{cosine_lr(2, 5):.3g}") in out


def test_resumable_keys_change_freely(trained, tmp_path, capsys):
  workdir = copy_of(trained, tmp_path)
  capsys.readouterr()
  result = run(tiny_config(total_steps=2, log_every_steps=5), workdir)
  out = capsys.readouterr().out
  assert result.exit_code == 0
  assert "log_every_steps: 1 -> 5" in out and "already complete" in out


def test_rerunning_a_finished_run_says_so_and_writes_nothing(trained,
                                                            tmp_path, capsys):
  workdir = copy_of(trained, tmp_path)
  before = snapshot(workdir)
  capsys.readouterr()
  result = run(tiny_config(), workdir)
  assert result.exit_code == 0
  assert "is already complete (checkpoint 2 of 2 steps)" in (
      capsys.readouterr().out)
  assert snapshot(workdir) == before


def test_unwritable_workdir_fails_before_training(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  workdir = blocker / "run"
  with pytest.raises(checkpoint_lib.CheckpointError, match=str(workdir)):
    run(tiny_config(), workdir)


def test_resume_drops_metrics_past_the_checkpoint(tmp_path):
  path = tmp_path / "metrics.jsonl"
  lines = [json.dumps({"step": s, "loss": float(s)}) + "\n"
           for s in (0, 1, 2, 3, 4, 5)]
  path.write_text("".join(lines) + '{"step": 6, "lo')  # Torn by a crash.
  writer = metrics_lib.MetricWriter(str(tmp_path), resume_step=3,
                                    tensorboard=False)
  writer.write(4, {"loss": 40.0})
  writer.close()
  records = [json.loads(line) for line in path.read_text().splitlines()]
  assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
  assert records[-1]["loss"] == 40.0
  assert os.listdir(tmp_path) == ["metrics.jsonl"]  # No temporary left.
  # Starting over (no checkpoint): nothing of the old log survives.
  assert metrics_lib.truncate_jsonl(str(path), -1) == 5
  assert path.read_text() == ""


def test_too_many_consecutive_nonfinite_steps_stop_naming_the_checkpoint(
    tmp_path, monkeypatch):
  """The loop reads the step's non-finite counters (faked here: steps 4 and
  on are 'bad') and stops at the log step where the streak reaches
  config.max_consecutive_nonfinite, naming the last checkpoint before it."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from clip_jax import train_state  # pylint: disable=g-import-not-at-top
  make_step = train_state.make_train_step

  def make_faked_step(*args, **kwargs):
    step_fn = make_step(*args, **kwargs)

    def faked(state, batch):
      state, metrics = step_fn(state, batch)
      bad = jnp.maximum(state["step"] - 3, 0)  # Steps 4, 5, ... are bad.
      metrics = {**metrics, "train/nonfinite_consecutive": bad,
                 "train/nonfinite_steps": bad}
      return state, metrics
    return faked

  monkeypatch.setattr(train_state, "make_train_step", make_faked_step)
  config = tiny_config(total_steps=10, checkpoint_every_steps=2)
  config.max_consecutive_nonfinite = 3
  with pytest.raises(train.NonFiniteError) as error:
    run(config, tmp_path / "run")
  # Steps 4, 5, 6 make 3 in a row: the stop is at step 6; the checkpoints
  # before step 4 are 2 (step 4's was written inside the streak).
  message = str(error.value)
  assert "3 consecutive steps up to step 6" in message
  assert f"step 2 in {tmp_path / 'run' / 'checkpoints'}" in message
  steps = [json.loads(line)["step"] for line in
           (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert steps == [1, 2, 3, 4, 5, 6]
