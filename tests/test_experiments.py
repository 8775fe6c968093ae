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


def test_there_are_seven_experiments():
  names = {os.path.basename(os.path.dirname(p)) for p in EXPERIMENTS}
  assert names == {"sigmoid_vs_softmax_batch", "siglip_bias_temperature_init",
                   "learnable_temperature", "prompt_ensembling",
                   "gradient_accumulation", "effective_robustness", "lora"}


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
    config_lib.validate(config, device_count=1)


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
