"""Real processes: several hosts train like one, resume, pre-emption.

Every run is tests/_train_worker.py in new processes on the same synthetic
global batches. Two processes with 4 CPU devices each (joined by
jax.distributed.initialize, each feeding its half of every batch) train
like one process with 8. A run resumed in a new process, or stopped by
SIGTERM to ONE of two processes, or SIGKILLed while orbax commits a
checkpoint, continues with per-step losses equal, bit for bit, to an
uninterrupted run. Zero-shot and retrieval over a mesh whose devices
alternate between the two processes equal one process.

The uninterrupted runs (one process, two processes) are module fixtures,
built once and shared: each costs a process start and a compilation.
"""

import json
import os
import signal
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest
from subprocess_env import free_port, subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "_train_worker.py")
EXIT_RESUMABLE = 75  # clip_jax.train.EXIT_RESUMABLE (not imported: no jax).
TWO_PROCESSES = ("mesh.data=2", "mesh.fsdp=4",
                 "sharding_rules=(('.*', 'fsdp'),)",
                 "checkpoint_every_steps=1000")
# Steps of the shared uninterrupted runs. The schedule is constant after a
# 2-step warmup, so step s's loss does not depend on the run's length.
ONE_STEPS, TWO_STEPS = 8, 14


def start_workers(workdir, steps, num_processes, local_devices, *args):
  """Starts the processes of one run; process p's output goes to
  workdir.p.log (appended). Returns (processes, log paths)."""
  port = free_port()
  env = subprocess_env()
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


def run_ok(workdir, steps, num_processes, local_devices, *args):
  """run(), asserting every process exited 0; returns the outputs."""
  codes, outputs = run(workdir, steps, num_processes, local_devices, *args)
  failed = [out for code, out in zip(codes, outputs) if code != 0]
  assert not failed, f"exit codes {codes}: {failed[0][-3000:]}"
  return outputs


def read_losses(workdir):
  return {r["step"]: r["loss"] for r in read_metrics(workdir)}


@pytest.fixture(scope="module")
def straight_one(tmp_path_factory):
  """An uninterrupted run: one process, 8 devices, a checkpoint every 2
  steps (numerically the same as none)."""
  workdir = tmp_path_factory.mktemp("straight_one") / "run"
  run_ok(workdir, ONE_STEPS, 1, 8, "checkpoint_every_steps=2")
  return workdir


@pytest.fixture(scope="module")
def straight_two(tmp_path_factory):
  """An uninterrupted run: two processes x 4 devices, fsdp over all 8."""
  workdir = tmp_path_factory.mktemp("straight_two") / "run"
  run_ok(workdir, TWO_STEPS, 2, 4, *TWO_PROCESSES)
  return workdir


def test_two_processes_equal_one(straight_one, straight_two):
  one, two = read_losses(straight_one), read_losses(straight_two)
  assert sorted(one) == list(range(1, ONE_STEPS + 1))
  np.testing.assert_allclose([two[s] for s in one], list(one.values()),
                             rtol=1e-5)


@pytest.mark.slow
def test_two_processes_initialise_from_a_pretrained_workdir_like_one(
    tmp_path, straight_one):
  """config.init over several processes (process 0 picks the source step
  and broadcasts it; every process restores its own shards) starts from
  the same weights as one process does."""
  init = f"init.workdir={str(straight_one)!r}"
  run_ok(tmp_path / "one", 2, 1, 8, init)
  run_ok(tmp_path / "two", 2, 2, 4, *TWO_PROCESSES, init)
  fresh = read_losses(straight_one)
  one, two = read_losses(tmp_path / "one"), read_losses(tmp_path / "two")
  assert sorted(one) == [1, 2]
  np.testing.assert_allclose([two[s] for s in one], list(one.values()),
                             rtol=1e-5)
  # The pretrained start is not the fresh one (the source trained 8 steps).
  assert abs(one[1] - fresh[1]) > 1e-4


def test_resume_in_new_process_matches_uninterrupted_run(tmp_path,
                                                         straight_one):
  # Stop after step 3 (the run's end writes a checkpoint), then a new process
  # on the same workdir extends the run (a config change: total_steps) and
  # continues to the end. The schedule is constant: the lr does not jump.
  workdir = tmp_path / "resumed"
  run_ok(workdir, 3, 1, 8)
  assert os.path.isdir(workdir / "checkpoints" / "3")
  (output,) = run_ok(workdir, ONE_STEPS, 1, 8, "--allow_config_change")
  assert "Resuming from checkpoint 3" in output
  assert f"total_steps: 3 -> {ONE_STEPS}" in output
  straight, resumed = read_losses(straight_one), read_losses(workdir)
  assert [r["step"] for r in read_metrics(workdir)] == list(
      range(1, ONE_STEPS + 1))
  # Bit-exact: same devices, same program, same data position.
  later = range(4, ONE_STEPS + 1)
  np.testing.assert_array_equal([resumed[s] for s in later],
                                [straight[s] for s in later])


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes(tmp_path, straight_two):
  total = TWO_STEPS
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
  straight = read_metrics(straight_two)
  resumed = read_metrics(workdir)
  assert [r["step"] for r in resumed] == list(range(1, total + 1))
  np.testing.assert_array_equal([r["loss"] for r in resumed],
                                [r["loss"] for r in straight])
  # Process p reports p + 1 skips per batch: the sum over both processes,
  # restored from the checkpoint, is the run total.
  assert [r["data/skipped"] for r in resumed] == [
      3 * s for s in range(1, total + 1)]


@pytest.mark.slow
def test_sigkill_while_committing_keeps_the_previous_checkpoint(
    tmp_path, straight_one):
  total, args = ONE_STEPS, ("checkpoint_every_steps=2",)
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
  straight, resumed = read_metrics(straight_one), read_metrics(workdir)
  assert [r["step"] for r in resumed] == list(range(1, total + 1))
  np.testing.assert_array_equal([r["loss"] for r in resumed],
                                [r["loss"] for r in straight])


@pytest.mark.slow
def test_full_disk_at_the_first_save_stops_naming_the_path(tmp_path):
  # Files larger than 64 KB fail to write (EFBIG), like a full disk: the
  # write probe passes, the first checkpoint's arrays do not.
  # The output goes to a pipe: a log file would hit the size limit too.
  workdir = tmp_path / "full"
  env = subprocess_env()
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


EVAL_WORKER = os.path.join(ROOT, "tests", "_eval_worker.py")


def run_eval_workers(data_dir, out_dir, num_processes, local_devices,
                     orders):
  port = free_port()
  env = subprocess_env()
  os.makedirs(out_dir, exist_ok=True)
  procs = [subprocess.Popen(
      [sys.executable, EVAL_WORKER, str(data_dir), str(out_dir), str(pid),
       str(num_processes), str(port), str(local_devices), ",".join(orders)],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True) for pid in range(num_processes)]
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  return {order: [dict(np.load(os.path.join(out_dir,
                                            f"process{pid}_{order}.npz")))
                   for pid in range(num_processes)]
          for order in orders}


@pytest.mark.slow
def test_two_processes_on_an_interleaved_mesh_evaluate_like_one(tmp_path):
  """Zero-shot / retrieval over two processes whose devices alternate in
  the mesh (not process-major), and over a hybrid mesh whose 'data' axis
  spans the two processes as slices, equal one process; the embeddings
  equal a dense, mesh-free model.apply in input order."""
  import _eval_worker as worker  # pylint: disable=g-import-not-at-top

  from clip_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from clip_jax.data import transforms  # pylint: disable=g-import-not-at-top
  from clip_jax.evals import readers, run  # pylint: disable=g-import-not-at-top

  worker.write_data(str(tmp_path / "data"))
  runs = run_eval_workers(tmp_path / "data", tmp_path / "two", 2, 4,
                          ["interleaved", "hybrid"])
  # The mesh really is not process-major: process 0's devices hold every
  # other pair of rows, not the first half of a batch.
  interleaved = runs["interleaved"]
  assert list(interleaved[0]["local_rows"]) == [0, 1, 4, 5, 8, 9, 12, 13]
  assert list(interleaved[1]["local_rows"]) == [2, 3, 6, 7, 10, 11, 14, 15]
  # Hybrid: 'data' rows 0-1 in process 0, 2-3 in process 1; 'fsdp' inside.
  for got in runs["hybrid"]:
    np.testing.assert_array_equal(got["slice_of_data"],
                                  [[0, 0], [0, 0], [1, 1], [1, 1]])

  # Reference 1: one process, natural 8-device mesh, in this process.
  model, params = worker.build_model_and_params()
  config = worker.eval_config(str(tmp_path / "data"))
  mesh = sharding_lib.make_mesh(ml_collections.ConfigDict(
      dict(data=2, fsdp=4)))
  one = run.run_all(config, model, params, mesh, tokenize=worker.tokenize)
  one = {k: v for k, v in one.items() if "seconds" not in k}
  # Reference 2: dense embeddings, no mesh, every readable image in order.
  source = readers.ClassFolderSource(str(tmp_path / "data" / "images"))
  images, labels = [], []
  for i in range(len(source)):
    try:
      image = transforms.preprocess_image(
          readers._read_image(source[i]["image"]), worker.IMAGE_SIZE)
    except Exception:  # noqa: BLE001  The corrupt file.
      continue
    images.append(transforms.normalize(image))
    labels.append(source[i]["label"])
  dense_image = np.asarray(model.apply(
      {"params": params}, np.stack(images), method=model.encode_image))
  captions = [f"{name} photo" for name in worker.CLASSES] * 5
  dense_text = np.asarray(model.apply(
      {"params": params}, worker.tokenize(captions),
      method=model.encode_text))
  assert len(images) == sum(worker.COUNTS) == len(source) - 1

  for got in interleaved + runs["hybrid"]:
    assert dict(zip(got["names"], got["values"])) == pytest.approx(
        one, rel=1e-6, abs=1e-6)
    assert one["eval/zeroshot/num_skipped"] == 1
    assert one["eval/retrieval/num_skipped"] == 1
    np.testing.assert_allclose(got["image_emb"], dense_image, rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_array_equal(got["labels"], labels)
    assert int(got["num_skipped"]) == 1
    np.testing.assert_allclose(got["text_emb"], dense_text, rtol=1e-5,
                               atol=1e-6)
    # Training batches: fed host_rows, the global batch is the batch;
    # fed contiguous blocks (the pipeline today), a row permutation with
    # every pair intact.
    batch = np.stack([np.arange(32), 1000 + np.arange(32)], axis=1)
    np.testing.assert_array_equal(got["own_rows"], batch)
    np.testing.assert_array_equal(np.sort(got["block"], axis=0), batch)
    np.testing.assert_array_equal(got["block"][:, 1],
                                  1000 + got["block"][:, 0])
  # ... and only on the interleaved mesh is the block order a permutation.
  assert not np.array_equal(interleaved[0]["block"], batch)
  np.testing.assert_array_equal(runs["hybrid"][0]["block"], batch)
