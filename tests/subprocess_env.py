"""The environment of the processes the tests start."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def subprocess_env(devices=None):
  """os.environ for a process the tests start: PYTHONPATH is the repo and
  XLA_FLAGS keeps the tests' compile flags (conftest.py) without the 8
  fake devices; `devices` fake devices if given, else the process has one
  (or sets its own count, as tests/_train_worker.py does)."""
  flags = [flag for flag in os.environ.get("XLA_FLAGS", "").split()
           if not flag.startswith(DEVICE_COUNT_FLAG)]
  if devices is not None:
    flags.append(f"{DEVICE_COUNT_FLAG}={devices}")
  return {**os.environ, "PYTHONPATH": ROOT, "XLA_FLAGS": " ".join(flags)}
