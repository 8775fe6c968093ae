"""Pre-emption with real processes and real signals.

Two processes (4 fake devices each) where only ONE gets SIGTERM: both stop
at the same step, one checkpoint is written, and re-running the same
commands resumes to per-step losses equal, bit for bit, to an uninterrupted
two-process run. Also: SIGKILL while orbax is committing a checkpoint.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "_train_worker.py")
EXIT_RESUMABLE = 75  # clip_jax.train.EXIT_RESUMABLE (not imported: no jax).
TWO_PROCESSES = ("mesh.data=2", "mesh.fsdp=4",
                 "sharding_rules=(('.*', 'fsdp'),)",
                 "checkpoint_every_steps=1000")


def free_port() -> int:
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_workers(workdir, steps, num_processes, local_devices, *args):
  """Starts the processes of one run; process p's output goes to
  workdir.p.log (appended). Returns (processes, log paths)."""
  port = free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = ROOT
  procs, logs = [], []
  for pid in range(num_processes):
    log = f"{workdir}.{pid}.log"
    with open(log, "a") as out:
      procs.append(subprocess.Popen(
          [sys.executable, WORKER, str(workdir), str(steps), str(pid),
           str(num_processes), str(port), str(local_devices), *args],
          cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT))
    logs.append(log)
  return procs, logs


def finish(procs, logs, timeout=420):
  """Waits for every process; returns (exit codes, outputs)."""
  codes = [p.wait(timeout=timeout) for p in procs]
  outputs = []
  for log in logs:
    with open(log) as f:
      outputs.append(f.read())
  return codes, outputs


def wait_for_text(path, text, procs, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline:
    with open(path) as f:
      if text in f.read():
        return
    assert all(p.poll() is None for p in procs), open(path).read()[-3000:]
    time.sleep(0.05)
  raise AssertionError(f"{text!r} not in {path} after {timeout} s")


def run(workdir, steps, num_processes, local_devices, *args):
  codes, outputs = finish(*start_workers(workdir, steps, num_processes,
                                         local_devices, *args))
  return codes, outputs


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def checkpoint_steps(workdir):
  return sorted(int(n) for n in os.listdir(os.path.join(workdir,
                                                        "checkpoints"))
                if n.isdigit())


def stop_step(output):
  marker = "Stopped early ("
  assert marker in output, output[-3000:]
  line = output[output.index(marker):].splitlines()[0]
  return int(line.split(" at step ")[1].split()[0])


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes(tmp_path):
  total = 14
  codes, outputs = run(tmp_path / "straight", total, 2, 4, *TWO_PROCESSES)
  assert codes == [0, 0], outputs[0][-3000:]

  # SIGTERM to process 1 only, once process 0 has logged step 3.
  workdir = tmp_path / "stopped"
  procs, logs = start_workers(workdir, total, 2, 4, "--step_sleep=0.25",
                              *TWO_PROCESSES)
  wait_for_text(logs[0], f"[step 3/{total}", procs)
  procs[1].send_signal(signal.SIGTERM)
  codes, outputs = finish(procs, logs)
  assert codes == [EXIT_RESUMABLE] * 2, outputs[1][-3000:]
  stopped = stop_step(outputs[0])
  assert stop_step(outputs[1]) == stopped  # Agreed by both processes.
  assert 3 <= stopped < total
  assert checkpoint_steps(workdir) == [stopped]  # One checkpoint, together.
  assert "To resume, run" in outputs[0]

  # The same commands again resume from it and finish.
  codes, outputs = run(workdir, total, 2, 4, *TWO_PROCESSES)
  assert codes == [0, 0], outputs[0][-3000:]
  assert f"Resuming from checkpoint {stopped}" in outputs[0]
  straight = read_metrics(tmp_path / "straight")
  resumed = read_metrics(workdir)
  assert [r["step"] for r in resumed] == list(range(1, total + 1))
  np.testing.assert_array_equal([r["loss"] for r in resumed],
                                [r["loss"] for r in straight])
  # Process p reports p + 1 skips per batch: the sum over both processes,
  # restored from the checkpoint, is the run total.
  assert [r["data/skipped"] for r in resumed] == [
      3 * s for s in range(1, total + 1)]


@pytest.mark.slow
def test_sigkill_while_committing_keeps_the_previous_checkpoint(tmp_path):
  total, args = 8, ("checkpoint_every_steps=2",)
  codes, outputs = run(tmp_path / "straight", total, 1, 8, *args)
  assert codes == [0], outputs[0][-3000:]

  workdir = tmp_path / "killed"
  procs, logs = start_workers(workdir, total, 1, 8, "--slow_commit_step=4",
                              *args)
  wait_for_text(logs[0], "delaying the commit of checkpoint 4", procs)
  wait_for_text(logs[0], f"[step 5/{total}", procs)
  procs[0].send_signal(signal.SIGKILL)
  procs[0].wait(timeout=60)
  names = os.listdir(workdir / "checkpoints")
  assert "2" in names and "4" not in names, names
  assert any(n.startswith("4.") for n in names), names  # Half-written.

  codes, outputs = run(workdir, total, 1, 8, *args)
  assert codes == [0], outputs[0][-3000:]
  assert "Resuming from checkpoint 2 " in outputs[0]
  # The half-written directory is cleaned up, never used.
  assert not any(n.startswith("4.") for n in
                 os.listdir(workdir / "checkpoints"))
  straight, resumed = (read_metrics(tmp_path / "straight"),
                       read_metrics(workdir))
  assert [r["step"] for r in resumed] == list(range(1, total + 1))
  np.testing.assert_array_equal([r["loss"] for r in resumed],
                                [r["loss"] for r in straight])


@pytest.mark.slow
def test_full_disk_at_the_first_save_stops_naming_the_path(tmp_path):
  # Files larger than 64 KB fail to write (EFBIG), like a full disk: the
  # write probe passes, the first checkpoint's arrays do not.
  # The output goes to a pipe: a log file would hit the size limit too.
  workdir = tmp_path / "full"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = ROOT
  proc = subprocess.run(
      [sys.executable, WORKER, str(workdir), "6", "0", "1", "0", "8",
       "--max_file_bytes=65536", "checkpoint_every_steps=2"],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True, timeout=600)
  output = proc.stdout
  assert proc.returncode == 1, output[-3000:]
  # The message, not its "CheckpointError: " prefix: orbax's threads may
  # print between the two on the shared stream.
  assert (f"Writing a checkpoint to {workdir}/checkpoints failed"
          in output), output[-3000:]
  assert "[step 6/" not in output  # Stopped at the next save, step 4.
