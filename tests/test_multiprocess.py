"""Several processes (standing in for hosts) train exactly like one.

Two local processes with 4 CPU devices each, joined by
jax.distributed.initialize, each feeding its half of every global batch,
against one process with 8 devices on the same global batches.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "_train_worker.py")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_workers(workdir, steps, num_processes, local_devices, *overrides):
  port = free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = ROOT
  procs = [subprocess.Popen(
      [sys.executable, WORKER, str(workdir), str(steps), str(pid),
       str(num_processes), str(port), str(local_devices), *overrides],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True) for pid in range(num_processes)]
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  return outputs


def read_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


def test_two_processes_equal_one(tmp_path):
  run_workers(tmp_path / "one", 3, 1, 8)
  run_workers(tmp_path / "two", 3, 2, 4, "mesh.data=2", "mesh.fsdp=4",
              "sharding_rules=(('.*', 'fsdp'),)")
  one, two = read_losses(tmp_path / "one"), read_losses(tmp_path / "two")
  assert sorted(one) == [1, 2, 3]
  np.testing.assert_allclose([two[s] for s in one], list(one.values()),
                             rtol=1e-5)
