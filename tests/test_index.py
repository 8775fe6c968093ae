"""clip_jax.index: faiss results against NumPy brute force, the stored
float16 embeddings against the model, build -> load -> query on a tiny
workdir, approximate kinds against bounds derived from how they search."""

import os
import subprocess
import sys

import numpy as np
import pytest
import train_testing
import ux_data
from PIL import Image
from subprocess_env import free_port, subprocess_env

import clip_jax
from clip_jax import index as index_lib
from clip_jax import sharding as sharding_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# float16 keeps 11 significant bits: rounding a value x moves it by at most
# 2^-11 |x| (relative, round to nearest), for |x| >= 2^-14; below that
# (subnormals) by at most 2^-25. Embedding entries are <= 1 in size.
F16_RTOL = 2.0 ** -11
F16_ATOL = 2.0 ** -25
CORRUPT = ("broken.png", "truncated.png")


def _numpy_topk(database, queries, k):
  """(scores, ids) of the k largest inner products, by sorting."""
  scores = queries @ database.T
  ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(scores, ids, axis=1), ids


@pytest.fixture(scope="module", autouse=True)
def one_faiss_thread():
  """faiss's OpenMP threads spin at barriers: on a loaded shared CPU two
  threads are several times slower than one. Results do not depend on it."""
  import faiss  # pylint: disable=g-import-not-at-top
  before = faiss.omp_get_max_threads()
  faiss.omp_set_num_threads(1)
  yield
  faiss.omp_set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A randomly initialised tiny run (configs/clip.py:tiny) over a folder
  of coloured squares with captions, and that folder with two corrupt
  images added: (workdir, folder)."""
  root = tmp_path_factory.mktemp("index")
  folder, _, tok = ux_data.make(str(root), train_per_class=6,
                                eval_per_class=0)
  with open(os.path.join(folder, CORRUPT[0]), "wb") as f:
    f.write(b"not an image at all")
  good = os.path.join(folder, "red_0.png")
  with open(good, "rb") as f, open(os.path.join(folder, CORRUPT[1]),
                                   "wb") as g:
    g.write(f.read()[:60])  # Header only: decoding fails.
  config = train_testing.tiny_config("softmax", "replicate")
  config.data.update(source="folder", path=folder, tokenizer=tok)
  workdir = str(root / "run")
  mesh = sharding_lib.make_mesh(config.mesh)
  train_testing.write_source(workdir, config, {3: 0}, mesh)
  return workdir, folder


@pytest.fixture(scope="module")
def built(tiny, tmp_path_factory):
  """A flat index of the folder, written by the CLI's main: (path, meta)."""
  workdir, folder = tiny
  out = str(tmp_path_factory.mktemp("built") / "flat.index")
  assert index_lib.main(["build", "--workdir", workdir, "--folder", folder,
                         "--out", out, "--batch_size", "16"]) == 0
  return out, index_lib.Index(out)


def test_build_skips_and_counts_corrupt_images(tiny, built, capsys):
  _, folder = tiny
  _, index = built
  num_good = len(ux_data.COLOURS) * 6
  assert index.meta["count"] == num_good == len(index.items)
  assert index.meta["num_skipped"] == 2
  assert sorted(index.meta["skipped"]) == sorted(CORRUPT)
  paths = sorted(item["path"] for item in index.items)
  assert paths == sorted(os.path.join(folder, f"{c}_{i}.png")
                         for c in ux_data.COLOURS for i in range(6))
  for item in index.items:
    colour = os.path.basename(item["path"]).split("_")[0]
    assert item["caption"] == f"a {colour} square"


def test_stored_embeddings_are_the_models_in_float16(tiny, built):
  workdir, _ = tiny
  _, index = built
  assert index.embeddings.dtype == np.float16
  model = clip_jax.load(workdir)
  assert model.step == index.meta["step"] == 3
  # Embedded again, one image at a time (other batches, other padding).
  expected = np.concatenate([model.encode_image([item["path"]])
                             for item in index.items])
  np.testing.assert_allclose(index.embeddings.astype(np.float32), expected,
                             rtol=F16_RTOL, atol=F16_ATOL)
  assert np.abs(expected).max() <= 1.0


def test_flat_index_is_numpy_brute_force(built):
  _, index = built
  database = index.embeddings.astype(np.float32)
  rng = np.random.default_rng(1)
  queries = rng.normal(size=(20, database.shape[1])).astype(np.float32)
  queries = np.concatenate([queries, database[:5]])
  k = 7
  scores, ids = index.search(queries, k)
  want_scores, want_ids = _numpy_topk(database, queries, k)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-6)


def test_query_text_and_image_round_trip(tiny, built, tmp_path, capsys):
  workdir, _ = tiny
  path, index = built
  loaded = index_lib.Index(path)  # Read back from disk.
  model = clip_jax.load(workdir)
  text = "a blue square"
  matches = index_lib.query(loaded, model, text=text, k=5)
  want_scores, want_ids = _numpy_topk(
      loaded.embeddings.astype(np.float32), model.encode_text([text]), 5)
  assert [m[2] for m in matches] == [loaded.items[i] for i in want_ids[0]]
  np.testing.assert_allclose([m[1] for m in matches], want_scores[0],
                             rtol=1e-5, atol=1e-6)
  # An indexed image finds itself first, at cosine 1 up to float16.
  item = loaded.items[9]
  first = index_lib.query(loaded, model, image=item["path"], k=3)[0]
  assert first[2] == item
  assert abs(first[1] - 1.0) < F16_RTOL * np.sqrt(loaded.meta["dim"])
  # The CLI prints the same ranking and writes the contact sheet.
  sheet = str(tmp_path / "sheet.png")
  capsys.readouterr()
  assert index_lib.main(["query", path, "--text", text, "-k", "5",
                         "--sheet", sheet]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert [line.split()[2] for line in lines[:5]] == [
      m[2]["path"] for m in matches]
  with Image.open(sheet) as image:
    assert image.size == (5 * 128, 128 + 28)


@pytest.mark.parametrize("kind", ["hnsw"])
def test_build_other_kinds_from_a_folder(tiny, tmp_path, kind):
  workdir, folder = tiny
  out = str(tmp_path / f"{kind}.index")
  meta = index_lib.build(workdir, out, folder=folder, kind=kind,
                         params={"ef_search": 200}, batch_size=16)
  index = index_lib.Index(out)
  assert meta["params"] == index.params == {"M": 16, "ef_construction": 48,
                                            "ef_search": 200}
  database = index.embeddings.astype(np.float32)
  # ef_search >= N: the search is exhaustive (see below), so exact.
  np.testing.assert_array_equal(index.search(database, 5)[1],
                                _numpy_topk(database, database, 5)[1])


# ---------------------------------------------------- approximate kinds --


@pytest.fixture(scope="module")
def synthetic():
  database, queries = index_lib.synthetic_set(4000, 100, 32,
                                              num_clusters=40, seed=3)
  return database, queries


def test_synthetic_set_is_unit_vectors_in_clusters(synthetic):
  database, queries = synthetic
  np.testing.assert_allclose(np.linalg.norm(database, axis=1), 1, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(queries, axis=1), 1, atol=1e-5)
  # noise 1: cosine to the centre ~ 1/sqrt(2), so nearest neighbours have
  # cosine ~ 1/2 while unrelated pairs have ~ 0 +- 1/sqrt(32).
  top = _numpy_topk(database, queries, 10)[0]
  assert 0.35 < float(np.median(top[:, -1])) < 0.75


def test_hnsw_with_ef_search_n_is_exact(synthetic):
  """With ef_search >= N the beam at layer 0 never fills, so the search
  only stops when every node reachable from the entry point was visited:
  on a connected graph, all of them: recall@10 must be 1 (no threshold to
  tune)."""
  database, queries = synthetic
  params = index_lib.default_params("hnsw", len(database), 32)
  index = index_lib.build_faiss(database, "hnsw", params)
  index_lib.set_search_params(index, {"ef_search": len(database)})
  _, exact = _numpy_topk(database, queries, 10)
  assert index_lib.recall_at_k(index.search(queries, 10)[1], exact) == 1.0


@pytest.fixture(scope="module")
def ivfpq(synthetic):
  """(make(nprobe) -> (index, params), decoded vectors, cell centroids) of
  one IVFPQ index of the synthetic set (default cells, 16 x 6-bit codes)."""
  database, _ = synthetic
  params = index_lib.resolve_params("ivfpq", len(database), 32,
                                    {"m": 16, "nbits": 6})
  index = index_lib.build_faiss(database, "ivfpq", params)
  index.make_direct_map()
  decoded = index.reconstruct_n(0, len(database))
  centroids = index.quantizer.reconstruct_n(0, params["nlist"])

  def make(nprobe=None):
    searched = dict(params, nprobe=nprobe or params["nprobe"])
    index_lib.check_params("ivfpq", searched, len(database), 32)
    index_lib.set_search_params(index, searched)
    return index, searched

  return make, decoded, centroids


def _numpy_ivfpq(database, decoded, centroids, queries, nprobe, k):
  """IVFPQ search by hand: a vector lives in the cell of its best centroid
  (inner product); a query scores q . decoded over the vectors of its
  nprobe best cells and keeps the top k."""
  cell = np.argmax(database @ centroids.T, axis=1)
  probed = np.argsort(-(queries @ centroids.T), axis=1)[:, :nprobe]
  scores = queries @ decoded.T
  scores[~(cell[None, :] == probed[:, :, None]).any(axis=1)] = -np.inf
  ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(scores, ids, axis=1), ids


@pytest.mark.parametrize("nprobe", [None, 64])
def test_ivfpq_is_the_numpy_search_over_its_codes(synthetic, ivfpq,
                                                  nprobe):
  """At the default nprobe (4 of 64 cells) and at nprobe = nlist (every
  cell: only the quantisation error is left), IVFPQ returns what a NumPy
  search over its decoded vectors and cells returns."""
  database, queries = synthetic
  make, decoded, centroids = ivfpq
  index, params = make(nprobe)
  assert params["nlist"] == 64 and params["nprobe"] == (nprobe or 4)
  scores, ids = index.search(queries, 10)
  want_scores, want_ids = _numpy_ivfpq(database, decoded, centroids,
                                       queries, params["nprobe"], 10)
  np.testing.assert_allclose(scores, want_scores, rtol=1e-4, atol=1e-5)
  # Ids equal except where two decoded vectors score within float error.
  assert (ids == want_ids).mean() > 0.99


def test_ivfpq_recall_when_every_cell_is_searched(synthetic, ivfpq):
  """The threshold, derived: searching every cell, IVFPQ's recall@10 is
  the recall of exact search over its decoded vectors (quantisation is
  the only error left), and it cannot lose more than that."""
  database, queries = synthetic
  make, decoded, _ = ivfpq
  index, _ = make(64)
  _, exact = _numpy_topk(database, queries, 10)
  _, by_codes = _numpy_topk(decoded, queries, 10)
  threshold = index_lib.recall_at_k(by_codes, exact)
  recall = index_lib.recall_at_k(index.search(queries, 10)[1], exact)
  assert recall >= threshold - 0.01, (recall, threshold)
  assert threshold > 0.3  # Codes of 16 x 6 bits keep most neighbours.


def test_benchmark_reports_every_kind_against_flat(synthetic):
  database, queries = synthetic
  result = index_lib.benchmark(database, queries[:20], kinds=("hnsw",),
                               runs=2, overrides={"ef_search": 4000,
                                                  "nprobe": 3})
  kinds = result["kinds"]
  assert list(kinds) == ["flat", "hnsw"]  # nprobe: not an hnsw parameter.
  assert kinds["hnsw"]["params"]["ef_search"] == 4000
  assert kinds["flat"]["recall_at_k"] == kinds["hnsw"]["recall_at_k"] == 1
  assert kinds["flat"]["qps_ratio_to_flat"] == 1
  assert len(kinds["hnsw"]["qps_runs"]) == 2
  assert result["num_vectors"] == 4000 and result["num_queries"] == 20


def test_recall_at_k_counts_shared_ids():
  exact = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
  found = np.array([[4, 3, 9, -1], [5, 6, 7, 8]])
  assert index_lib.recall_at_k(found, exact) == (2 / 4 + 1) / 2


# ----------------------------------------------------------------- errors --


def test_defaults_follow_the_set_size():
  assert index_lib.default_params("hnsw", 1000, 96)["M"] == 16
  assert index_lib.default_params("hnsw", 10**6, 96)["M"] == 32
  small = index_lib.default_params("ivfpq", 3944, 96)
  assert small == {"nlist": 64, "nprobe": 4, "m": 48, "nbits": 6}
  large = index_lib.default_params("ivfpq", 10**6, 96)
  assert large == {"nlist": 1024, "nprobe": 64, "m": 48, "nbits": 8}
  for n in (624, 3944, 10**6):  # Defaults always train when n allows.
    index_lib.check_params("ivfpq", index_lib.default_params(
        "ivfpq", n, 96), n, 96)


@pytest.mark.parametrize("kind,n,overrides,message", [
    ("ivfpq", 600, {}, "Too few vectors to train ivfpq: 600"),
    ("ivfpq", 5000, {"nlist": 256}, r"need >= 39 training points each "
     r"\(9,984\)"),
    ("ivfpq", 5000, {"m": 7}, "--m=7 does not divide the embedding width"),
    ("ivfpq", 5000, {"nprobe": 999}, "cannot search more cells"),
    ("flat", 5000, {"nprobe": 4}, "--nprobe is not a parameter of --kind "
     "flat"),
    ("hnsw", 5000, {"M": 1}, "needs >= 2 links"),
    ("annoy", 5000, {}, "index kind 'annoy' is not one of"),
])
def test_bad_parameters_are_refused(kind, n, overrides, message):
  with pytest.raises(ValueError, match=message):
    index_lib.resolve_params(kind, n, 96, overrides)


def test_cli_errors(tiny, built, tmp_path):
  workdir, folder = tiny
  path, _ = built
  with pytest.raises(ValueError, match="exactly one of --folder"):
    index_lib.main(["build", "--workdir", workdir, "--out", str(tmp_path)])
  with pytest.raises(ValueError, match="exactly one of --folder"):
    index_lib.main(["build", "--workdir", workdir, "--folder", folder,
                    "--split", "x", "--out", str(tmp_path)])
  with pytest.raises(ValueError, match="--nlist is not a parameter"):
    index_lib.main(["build", "--workdir", workdir, "--folder", folder,
                    "--out", str(tmp_path / "x"), "--nlist", "4"])
  with pytest.raises(FileExistsError, match="--overwrite"):
    index_lib.main(["build", "--workdir", workdir, "--folder", folder,
                    "--out", path])
  with pytest.raises(ValueError, match="Too few vectors to train ivfpq"):
    index_lib.main(["build", "--workdir", workdir, "--folder", folder,
                    "--out", str(tmp_path / "y"), "--kind", "ivfpq"])
  assert not os.path.exists(tmp_path / "y")
  with pytest.raises(ValueError, match="exactly one of --text or --image"):
    index_lib.main(["query", path])
  with pytest.raises(FileNotFoundError, match="not an index"):
    index_lib.main(["query", str(tmp_path), "--text", "x"])
  with pytest.raises(ValueError, match="--nprobe does not apply to a flat"):
    index_lib.main(["query", path, "--text", "x", "--nprobe", "2"])
  # From the shell: one line on stderr, exit status 2.
  proc = subprocess.run(
      [sys.executable, "-m", "clip_jax.index", "query", str(tmp_path),
       "--text", "x"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.startswith("error: ") and "not an index" in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_two_processes_build_the_index_one_process_builds(tiny, built,
                                                          tmp_path):
  """Two processes of 4 devices each: the same items, skips and (up to one
  float16 step) embeddings as one process of 8; process 0 alone writes
  and prints."""
  workdir, folder = tiny
  _, single = built
  port = free_port()
  out = str(tmp_path / "two.index")
  env = subprocess_env(devices=4)
  procs = [subprocess.Popen(
      [sys.executable, "-m", "clip_jax.index", "build", "--workdir", workdir,
       "--folder", folder, "--out", out, "--batch_size", "16",
       "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2",
       "--process_id", str(pid)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for pid in range(2)]
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  assert "indexed 24 images" in outputs[0][0]
  assert "skipped 2 unreadable images" in outputs[0][0]
  assert "indexed" not in outputs[1][0]  # (Gloo's own lines go to stdout.)
  two = index_lib.Index(out)
  assert two.items == single.items
  assert sorted(two.meta["skipped"]) == sorted(CORRUPT)
  np.testing.assert_allclose(two.embeddings.astype(np.float32),
                             single.embeddings.astype(np.float32),
                             rtol=2 * F16_RTOL, atol=2 * F16_ATOL)
