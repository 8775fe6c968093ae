"""Every experiments/*/config.py sweep expands into valid configs.

The ablations run for hours, in a later session; this catches a broken
sweep definition in a second: each point's config loads, takes its
overrides and passes config.validate.
"""

import glob
import os

import pytest

from clip_jax import config as config_lib
from clip_jax import lora, sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = sorted(glob.glob(os.path.join(ROOT, "experiments", "*",
                                            "config.py")))


def with_overrides(config, overrides):
  for key, value in overrides.items():
    if not key.startswith(sweep.ARG_PREFIX):
      parent, _, leaf = key.rpartition(".")
      node = config_lib._get(config, parent) if parent else config  # pylint: disable=protected-access
      node[leaf] = value
  return config


ABLATIONS = {"sigmoid_vs_softmax_batch", "siglip_bias_temperature_init",
             "learnable_temperature", "prompt_ensembling",
             "gradient_accumulation", "effective_robustness"}  # Issue 11.
METHODS = {"multi_positive", "slip", "distillation", "lora"}  # Issue 13.


def test_every_experiment_is_listed():
  names = {os.path.basename(os.path.dirname(p)) for p in EXPERIMENTS}
  assert names == ABLATIONS | METHODS


def test_slip_sweep_compares_clip_with_clip_plus_slip():
  path = os.path.join(ROOT, "experiments", "slip", "config.py")
  points = sweep.load_sweep(path)
  weights = sorted({p["slip.weight"] for p in points})
  assert weights == [0.0, 1.0]
  assert sorted(p["seed"] for p in points) == [0, 0, 1, 1, 2, 2]
  for overrides in points:
    config = with_overrides(sweep.load_point_config(path, overrides),
                            overrides)
    from clip_jax import slip  # pylint: disable=g-import-not-at-top
    assert slip.enabled(config) == (overrides["slip.weight"] > 0)
    assert (config.total_steps, config.batch_size) == (2400, 256)


def test_lora_memory_script_builds_valid_full_and_lora_configs():
  """experiments/lora/memory.py's configs: valid, the shapes it names, and
  LoRA on only where its rank says."""
  import importlib.util  # pylint: disable=g-import-not-at-top

  # Beside clip_jax.train, as in a test worker: its absl flags must not
  # clash with what the script imports.
  from clip_jax import train  # pylint: disable=g-import-not-at-top,unused-import  # noqa: F401
  path = os.path.join(ROOT, "experiments", "lora", "memory.py")
  spec = importlib.util.spec_from_file_location("lora_memory", path)
  memory = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(memory)
  for name, variant, batch in memory.SHAPES:
    for rank in memory.RANKS:
      config = memory.step_config(variant, batch, rank)
      config_lib.validate(config, device_count=1)
      assert config.batch_size == batch
      assert (config.lora.get("targets") is not None) == (rank > 0)
      assert config.model.image.image_size == (224 if variant else 12), name


def with_stand_in_teacher(config, tmp_path):
  """A distilled point's teacher (the demo model, trained beforehand) as
  a workdir holding the demo's config.json and an empty checkpoint 1:
  enough for config.validate, which compares the two configs' inputs."""
  if config.distill.get("teacher_workdir") is None:
    return config
  teacher = tmp_path / "teacher"
  if not teacher.exists():
    config_lib.save(config_lib.load_config_file(
        os.path.join(ROOT, "configs", "demo.py")), str(teacher))
    os.makedirs(teacher / "checkpoints" / "1")
  config.distill.teacher_workdir = str(teacher)
  return config


@pytest.mark.parametrize("path", EXPERIMENTS,
                         ids=lambda p: os.path.basename(os.path.dirname(p)))
def test_every_point_is_a_valid_config(path, tmp_path):
  points = sweep.load_sweep(path)
  names = {sweep.point_name(p) for p in points}
  assert len(names) == len(points)
  for overrides in points:
    if overrides.get("arg.fixed") and "freeze" not in config_lib.base_config():
      with pytest.raises(sweep.SweepError, match="config.freeze"):
        sweep.load_point_config(path, overrides)
      continue
    config = with_overrides(sweep.load_point_config(path, overrides),
                            overrides)
    if config.init.get("workdir") and not os.path.isdir(config.init.workdir):
      # A pretrained workdir the experiment needs (made by `make demo`):
      # validation checks only that it has checkpoints/.
      config.init.workdir = str(tmp_path / "pretrained")
      os.makedirs(os.path.join(config.init.workdir, "checkpoints"),
                  exist_ok=True)
    config_lib.validate(with_stand_in_teacher(config, tmp_path),
                        device_count=1)


def test_lora_sweep_compares_full_and_lora_fine_tuning_of_the_demo():
  path = os.path.join(ROOT, "experiments", "lora", "config.py")
  configs = [sweep.load_point_config(path, p) for p in sweep.load_sweep(path)]
  full = [c for c in configs if not c.lora.targets]
  adapted = [c for c in configs if c.lora.targets]
  assert full and adapted and len(full) + len(adapted) == len(configs)
  assert {c.lora.rank for c in adapted} == {4, 8}
  demo = config_lib.load_config_file(os.path.join(ROOT, "configs", "demo.py"))
  for c in configs:
    assert c.model.to_dict() == demo.model.to_dict()  # Fits runs/demo.
    assert c.init.workdir == "runs/demo" and c.freeze is None
  # Full fine-tuning loads every param; LoRA every param but the adapters.
  assert {c.init.include for c in full} == {".*"}
  assert {c.init.include for c in adapted} == {lora.BASE_PARAMS}


def test_prompt_sweep_context_argument_sets_tower_and_tokenizer():
  """`:context=32` (the prompt sweep without the 16-token cut) reaches both
  the text tower and the tokenizer of every point; the default is the
  demo's 16."""
  path = os.path.join(ROOT, "experiments", "prompt_ensembling", "config.py")
  for spec, context in ((path, 16), (f"{path}:context=32", 32)):
    for overrides in sweep.load_sweep(spec):
      config = sweep.load_point_config(spec, overrides)
      config_lib.validate(config, device_count=1)
      assert (config.model.text.context_length,
              config.data.context_length) == (context, context)
