"""The environment of the processes the tests start."""

import os
import socket

from clip_jax import host_malloc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def subprocess_env(devices=None):
  """os.environ for a process the tests start: PYTHONPATH is the repo and
  XLA_FLAGS keeps the tests' compile flags (conftest.py) without the 8
  fake devices; `devices` fake devices if given, else the process has one
  (or sets its own count, as tests/_train_worker.py does). The huge-page
  malloc tunable is set, as `make test` sets it for pytest, so that entry
  points do not re-exec themselves to add it (clip_jax/host_malloc.py)."""
  flags = [flag for flag in os.environ.get("XLA_FLAGS", "").split()
           if not flag.startswith(DEVICE_COUNT_FLAG)]
  if devices is not None:
    flags.append(f"{DEVICE_COUNT_FLAG}={devices}")
  return host_malloc.environment_with_tunable(
      {**os.environ, "PYTHONPATH": ROOT, "XLA_FLAGS": " ".join(flags)})


def free_port() -> int:
  """A TCP port free now on 127.0.0.1 (a jax.distributed coordinator's)."""
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]
