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

import ml_collections
import numpy as np
import pytest

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


@pytest.mark.slow
def test_two_processes_initialise_from_a_pretrained_workdir_like_one(
    tmp_path):
  """config.init over several processes (process 0 picks the source step
  and broadcasts it; every process restores its own shards) starts from
  the same weights as one process does."""
  run_workers(tmp_path / "source", 2, 1, 8)
  init = [f"init.workdir={str(tmp_path / 'source')!r}"]
  run_workers(tmp_path / "one", 2, 1, 8, *init)
  run_workers(tmp_path / "two", 2, 2, 4, "mesh.data=2", "mesh.fsdp=4",
              "sharding_rules=(('.*', 'fsdp'),)", *init)
  fresh = read_losses(tmp_path / "source")
  one, two = read_losses(tmp_path / "one"), read_losses(tmp_path / "two")
  assert sorted(one) == [1, 2]
  np.testing.assert_allclose([two[s] for s in one], list(one.values()),
                             rtol=1e-5)
  # The pretrained start is not the fresh one (the source trained 2 steps).
  assert abs(one[1] - fresh[1]) > 1e-4


EVAL_WORKER = os.path.join(ROOT, "tests", "_eval_worker.py")


def run_eval_workers(data_dir, out_dir, num_processes, local_devices,
                     orders):
  port = free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = ROOT
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
