"""Evaluates a tiny model over the mesh in one of several processes.

  python tests/_eval_worker.py DATA_DIR OUT_DIR PROCESS_ID NUM_PROCESSES
      PORT LOCAL_DEVICES ORDER[,ORDER...]

ORDER (the mesh, one run each): 'natural': ('data', 'fsdp') = (2, 4) over
jax.devices() in order (process-major); 'interleaved': the same with
process 0's and process 1's devices alternating, as a TPU pod's physical
order ignores process boundaries; 'hybrid': (4, 2) with mesh.slices=2 and
dcn_granule='process' (each process a "slice"; create_hybrid_device_mesh).
Every process writes OUT_DIR/process<i>_<ORDER>.npz: the zero-shot and
retrieval results of evals.run.run_all, the image and caption embeddings
with their labels, and two training-style batches gathered back to the
host (see evaluate).

The helpers (model, params, data, tokenizer) are imported by
test_multiprocess.py to compute the single-process reference.
"""

import os
import sys
import zlib

import numpy as np

CLASSES = ["cat", "dog", "emu"]
COUNTS = [13, 11, 12]           # 36 images + 1 corrupt: not a multiple of 16.
IMAGE_SIZE = 8
BATCH = 16                      # Eval batch: 2 rows per device.
MODEL = dict(
    embed_dim=8, logit_scale_init=10.0, logit_scale_max=None,
    logit_bias_init=None, dtype="float32", activation="gelu", remat=False,
    scan=False,
    image=dict(variant="mu", image_size=IMAGE_SIZE, pool="cls", patch_size=4),
    text=dict(variant="mu", vocab_size=20, context_length=4, pool="eos",
              causal=True, eos_id=1, pad_id=0))


def write_data(root: str) -> None:
  """root/images/<class>/*.png (one corrupt), root/captions.jsonl."""
  import json  # pylint: disable=g-import-not-at-top

  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  lines = []
  for label, (name, count) in enumerate(zip(CLASSES, COUNTS)):
    folder = os.path.join(root, "images", name)
    os.makedirs(folder)
    for i in range(count):
      path = os.path.join(folder, f"{i:02d}.png")
      pixels = rng.integers(0, 256, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
      pixels[..., label] //= 4  # Some class signal.
      Image.fromarray(pixels.astype(np.uint8)).save(path)
      words = rng.choice(["a", "big", "small", "photo", "of"], size=2)
      lines.append({"image": path,
                    "captions": [f"{name} {i}", f"{' '.join(words)} {name}"]})
  broken = os.path.join(root, "images", "dog", "99.png")
  with open(broken, "wb") as f:
    f.write(b"not a png")  # Decodes on no process: masked and counted.
  lines.insert(17, {"image": broken, "captions": ["dog 99"]})
  with open(os.path.join(root, "captions.jsonl"), "w") as f:
    f.writelines(json.dumps(line) + "\n" for line in lines)


def tokenize(texts):
  """int32 [n, 4]: two word hashes, EOS, padding."""
  out = np.zeros((len(texts), 4), np.int32)
  for row, text in enumerate(texts):
    words = (text.split() + ["", ""])[:2]
    out[row, :2] = [2 + zlib.crc32(w.encode()) % 18 for w in words]
    out[row, 2] = 1
  return out


def build_model_and_params():
  """The model and deterministic numpy params (no compilation)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top

  from clip_jax.models import two_towers  # pylint: disable=g-import-not-at-top
  model = two_towers.build_model(ml_collections.ConfigDict(MODEL))
  shapes = jax.eval_shape(
      model.init, jax.random.key(0),
      jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3)),
      jnp.zeros((1, 4), jnp.int32))["params"]
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
      lambda s: (0.3 * rng.normal(size=s.shape)).astype(s.dtype), shapes)
  return model, params


def eval_config(data_dir: str):
  import ml_collections  # pylint: disable=g-import-not-at-top

  from clip_jax.data import transforms  # pylint: disable=g-import-not-at-top
  images = os.path.join(data_dir, "images")
  return ml_collections.ConfigDict(dict(
      batch_size=64,
      data=dict(image_size=IMAGE_SIZE, mean=transforms.CLIP_MEAN,
                std=transforms.CLIP_STD, context_length=4),
      evals=dict(
          zeroshot=dict(type="zeroshot", templates="short", batch_size=BATCH,
                        topk=(1, 2), per_class=True,
                        dataset=dict(source="image_folder", path=images)),
          retrieval=dict(type="retrieval", batch_size=BATCH, ks=(1, 5),
                         dataset=dict(source="folder", split="val",
                                      path=os.path.join(
                                          data_dir, "captions.jsonl"))))))


def make_mesh(devices, order: str):
  """The mesh of an ORDER (see the module docstring)."""
  import ml_collections  # pylint: disable=g-import-not-at-top

  from clip_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  mesh_config = ml_collections.ConfigDict(dict(data=2, fsdp=4))
  if order == "interleaved":
    by_process = {}
    for d in devices:
      by_process.setdefault(d.process_index, []).append(d)
    devices = [d for group in zip(*by_process.values()) for d in group]
  elif order == "hybrid":
    mesh_config.update(data=4, fsdp=2, slices=2, dcn_granule="process")
  elif order != "natural":
    raise ValueError(f"ORDER={order!r}: expected 'natural', 'interleaved' "
                     "or 'hybrid'.")
  return sharding_lib.make_mesh(mesh_config, devices=list(devices))


def main():
  data_dir, out_dir, pid, nproc, port, local_devices, orders = sys.argv[1:8]
  os.environ["XLA_FLAGS"] = (  # After the test's flags (subprocess_env).
      os.environ.get("XLA_FLAGS", "") +
      f" --xla_force_host_platform_device_count={local_devices}").strip()
  import jax  # pylint: disable=g-import-not-at-top
  if int(nproc) > 1:
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                               num_processes=int(nproc), process_id=int(pid))
  for order in orders.split(","):
    evaluate(data_dir, os.path.join(out_dir, f"process{pid}_{order}.npz"),
             make_mesh(jax.devices(), order))
  if int(nproc) > 1:
    jax.distributed.shutdown()


def evaluate(data_dir: str, out_path: str, mesh) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  from clip_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from clip_jax.evals import embed, run  # pylint: disable=g-import-not-at-top

  model, host_params = build_model_and_params()
  replicated = sharding_lib.replicated(mesh)
  params = jax.tree_util.tree_map(
      lambda x: jax.make_array_from_callback(x.shape, replicated,
                                             lambda i: x[i]), host_params)
  config = eval_config(data_dir)
  results = run.run_all(config, model, params, mesh, tokenize=tokenize)

  # The embeddings behind those results, as run_all reads them.
  make_batches = run.make_batches_fn(
      config.data, batch_size=BATCH,
      rows=sharding_lib.host_rows(mesh, BATCH))
  image_fn = embed.make_encode_fn(model, mesh, "image")
  text_fn = embed.make_encode_fn(model, mesh, "text")
  image_emb, rows = embed.embed_batches(
      image_fn, params, mesh, make_batches(
          config.evals.zeroshot.dataset.to_dict()))
  captions = [f"{name} photo" for name in CLASSES] * 5
  text_emb = embed.text_embedder(text_fn, params, mesh, tokenize,
                                 batch_size=BATCH)(captions)

  # Training batches: row r = [r, 1000 + r] (an image id and its text id).
  n = 32
  batch = np.stack([np.arange(n), 1000 + np.arange(n)], axis=1)
  gather = lambda local: np.asarray(multihost_utils.process_allgather(
      sharding_lib.host_to_global(local, mesh), tiled=True))
  own_rows = gather(batch[sharding_lib.host_rows(mesh, n)])
  p, k = jax.process_index(), jax.process_count()
  block = gather(batch[p * n // k:(p + 1) * n // k])

  np.savez(out_path,
           names=np.array(sorted(k for k in results if "seconds" not in k)),
           values=np.array([results[k] for k in sorted(results)
                            if "seconds" not in k], np.float64),
           image_emb=image_emb, labels=rows["label"],
           num_skipped=rows["num_skipped"], text_emb=text_emb,
           own_rows=own_rows, block=block,
           local_rows=sharding_lib.host_rows(mesh, BATCH),
           slice_of_data=np.array([[d.process_index for d in row]
                                   for row in mesh.devices]))


if __name__ == "__main__":
  main()
