r"""Embedding index for retrieval: a run's image embeddings searched by faiss.

  python -m clip_jax.index build --workdir runs/demo --split openmoji \
      --out runs/openmoji.index [--kind flat|hnsw|ivfpq] [--step N]
  python -m clip_jax.index build --workdir runs/demo --folder photos/ \
      --out runs/photos.index --kind hnsw [--M 32 --ef_search 64]
  python -m clip_jax.index query runs/openmoji.index --text "red apple" \
      -k 10 [--sheet top.png]
  python -m clip_jax.index query runs/openmoji.index --image x.png
  python -m clip_jax.index report --index runs/openmoji.index \
      --synthetic 1000000 --out runs/index_report.json

build: the images of a data split of the run's config.data (--split, e.g.
the emoji 'openmoji'), or of a folder (--folder: every .png/.jpg/... under
it, captions from x.txt beside x.png if present; a .csv or .jsonl of
image,caption works too, as config.data.source='folder' reads it) are
embedded in batches over the mesh by the evaluator's code
(evals/embed.py: the same preprocessing, every process reads the same
batches and decodes only the rows its devices hold; the embeddings come
back to every process). Images that cannot be read or decoded are skipped
and counted. Process 0 alone builds the faiss index and writes INDEX/:
  meta.json       workdir and step of the model, kind and parameters, the
                  data indexed, counts, the skipped images, and one item per
                  row: {'path'} or {'split', 'index'}, 'caption' (its first
                  caption, '' if none), 'class_name' (labelled splits);
  embeddings.npy  float16 [N, D]: the model's unit-norm embeddings, rounded;
  faiss.index     faiss.write_index of the index over those float16 vectors
                  (as float32), inner product: cosine similarity up to the
                  float16 rounding (|1 - norm| < 2^-11 * sqrt(D)).
meta.json is written last: a folder without it is an unfinished build.

Kinds (faiss-cpu; parameters default by set size, see default_params):
  flat   exact search (IndexFlatIP).
  hnsw   graph search (IndexHNSWFlat): M links per node (16, 32 from 100k
         vectors), ef_construction, ef_search (64) candidates at query time.
  ivfpq  inverted lists + product quantisation (IndexIVFPQ): nlist coarse
         k-means cells (a power of two near sqrt(N)), nprobe cells searched
         (nlist / 16, >= 1), m sub-quantisers of nbits bits (m = D / 2,
         nbits 8, fewer for small sets). Training needs 39 points per k-means
         centroid (faiss's minimum): N >= 39 * max(nlist, 2^nbits), else
         build refuses, saying which parameter to lower.

query: embeds the text (or image) with the index's model (the workdir and
step recorded in meta.json) and prints the top k items with their scores
(inner products); --sheet writes a contact sheet PNG of them.

report (a benchmark, not a test): for each kind, recall@k of its results
against exact (flat) search and queries per second (all queries in one
faiss call, median of --runs rounds, kinds alternated within a round), on
an index's stored embeddings with text queries (the items' distinct
captions, embedded by the model) and/or a synthetic set (synthetic_set),
written as JSON with the load average: on a shared machine compare kinds
by their QPS ratio to flat, measured in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import numpy as np

KINDS = ("flat", "hnsw", "ivfpq")
MIN_POINTS_PER_CENTROID = 39  # faiss warns below this (Clustering).
PARAM_NAMES = {"flat": (), "hnsw": ("M", "ef_construction", "ef_search"),
               "ivfpq": ("nlist", "nprobe", "m", "nbits")}
SEARCH_PARAMS = {"ef_search": "efSearch", "nprobe": "nprobe"}
LARGE_SET = 100_000
FORMAT_VERSION = 1


# ------------------------------------------------------- index parameters --


def _pow2_near(x: float) -> int:
  return 2 ** max(0, round(math.log2(max(x, 1.0))))


def default_params(kind: str, n: int, dim: int) -> dict:
  """The parameters of `kind` for n vectors of `dim` (module docstring)."""
  check_kind(kind)
  if kind == "hnsw":
    links = 32 if n >= LARGE_SET else 16
    return {"M": links, "ef_construction": 2 * links + 16, "ef_search": 64}
  if kind == "ivfpq":
    # Both k-means (coarse cells, PQ codebooks) get >= 39 points each when
    # the set allows; nbits shrinks before nlist (codes stay fine-grained).
    per = max(n // MIN_POINTS_PER_CENTROID, 1)
    nbits = min(8, max(4, int(math.log2(per))))
    nlist = max(1, min(_pow2_near(math.sqrt(n)), per))
    return {"nlist": nlist, "nprobe": max(1, nlist // 16),
            "m": _sub_quantizers(dim), "nbits": nbits}
  return {}


def _sub_quantizers(dim: int) -> int:
  """The largest divisor of dim that is <= dim / 2 (2 dims per code: on
  the 1M synthetic set 4 dims per code capped recall@10 at 0.55 even
  searching every cell, 2 dims reached 0.84; README)."""
  return max(m for m in range(1, max(dim // 2, 1) + 1) if dim % m == 0)


def check_kind(kind: str) -> None:
  if kind not in KINDS:
    raise ValueError(f"index kind {kind!r} is not one of {', '.join(KINDS)}.")


def resolve_params(kind: str, n: int, dim: int,
                   overrides: dict | None = None) -> dict:
  """default_params updated with the non-None overrides of this kind;
  checked (check_params). Overrides of other kinds are an error."""
  params = default_params(kind, n, dim)
  for name, value in (overrides or {}).items():
    if value is None:
      continue
    if name not in PARAM_NAMES[kind]:
      raise ValueError(
          f"--{name} is not a parameter of --kind {kind} (its parameters: "
          f"{', '.join(PARAM_NAMES[kind]) or 'none'}).")
    params[name] = int(value)
  check_params(kind, params, n, dim)
  return params


def check_params(kind: str, params: dict, n: int, dim: int) -> None:
  """ValueError naming the bad value and the fix; n = vectors to index."""
  if n < 1:
    raise ValueError("Nothing to index: 0 vectors.")
  for name, value in params.items():
    if value < 1:
      raise ValueError(f"--{name}={value}: must be >= 1.")
  if kind == "hnsw" and params["M"] < 2:
    raise ValueError(f"--M={params['M']}: HNSW needs >= 2 links per node.")
  if kind != "ivfpq":
    return
  nlist, m, nbits = params["nlist"], params["m"], params["nbits"]
  if dim % m:
    raise ValueError(f"--m={m} does not divide the embedding width {dim}; "
                     "give a divisor of it.")
  if nbits > 16:
    raise ValueError(f"--nbits={nbits}: at most 16 bits per code.")
  if params["nprobe"] > nlist:
    raise ValueError(f"--nprobe={params['nprobe']} > --nlist={nlist}: "
                     "cannot search more cells than there are.")
  needed = MIN_POINTS_PER_CENTROID * max(nlist, 2 ** nbits)
  if n < needed:
    raise ValueError(
        f"Too few vectors to train ivfpq: {n:,} vectors, and nlist={nlist} "
        f"coarse centroids / 2^nbits={2 ** nbits} codes per sub-quantiser "
        f"need >= {MIN_POINTS_PER_CENTROID} training points each "
        f"({needed:,}). Lower --nlist / --nbits, or use --kind flat "
        "(exact) or hnsw for a set this small.")


# ------------------------------------------------------------ faiss index --


def _faiss():
  try:
    import faiss  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("The embedding index needs faiss-cpu (pinned in "
                      "requirements.txt: `pip install faiss-cpu==1.15.1`)."
                      ) from e
  return faiss


def as_float32(vectors) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(vectors, np.float32))


def build_faiss(vectors, kind: str, params: dict):
  """A faiss index of `kind` over float32 [n, D] vectors, inner product."""
  faiss = _faiss()
  x = as_float32(vectors)
  n, dim = x.shape
  check_params(kind, params, n, dim)
  ip = faiss.METRIC_INNER_PRODUCT
  if kind == "flat":
    index = faiss.IndexFlatIP(dim)
  elif kind == "hnsw":
    index = faiss.IndexHNSWFlat(dim, params["M"], ip)
    index.hnsw.efConstruction = params["ef_construction"]
  else:
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFPQ(quantizer, dim, params["nlist"], params["m"],
                             params["nbits"], ip)
    index.train(x)
  index.add(x)
  set_search_params(index, params)
  return index


def set_search_params(index, params: dict) -> None:
  """Applies ef_search / nprobe (search-time parameters, not all of them
  survive write_index) to a built or loaded index."""
  space = _faiss().ParameterSpace()
  for name, faiss_name in SEARCH_PARAMS.items():
    if name in params:
      space.set_index_parameter(index, faiss_name, int(params[name]))


def search(index, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
  """(scores float32 [q, k], ids int64 [q, k]); ids -1 past the set's end."""
  q = as_float32(queries)
  if q.ndim == 1:
    q = q[None]
  if q.shape[1] != index.d:
    raise ValueError(f"Queries of width {q.shape[1]}, the index holds "
                     f"width {index.d}: embed them with the index's model.")
  return index.search(q, k)


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
  """Mean over queries of |found[i] & exact[i]| / k (ids, [q, k])."""
  found, exact = np.asarray(found), np.asarray(exact)
  k = exact.shape[1]
  hits = [len(set(f[f >= 0]) & set(e)) for f, e in zip(found, exact)]
  return float(np.mean(hits) / k)


def synthetic_set(n: int, num_queries: int, dim: int, *,
                  num_clusters: int = 1000, noise: float = 1.0,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(database float32 [n, dim], queries float32 [num_queries, dim]).

  Unit vectors with cluster structure: num_clusters centres uniform on the
  sphere; each point picks a centre c uniformly and is
  normalise(c + noise * g / sqrt(dim)), g ~ N(0, I). With noise 1 a point's
  cosine to its centre is ~0.71 and to a cluster-mate ~0.5, to other points
  ~0 +- 1/sqrt(dim): neighbours are in the same cluster but ranking them
  within it is random, so an ANN index must still search. Queries are drawn
  the same way (same centres, other noise).
  """
  rng = np.random.default_rng(seed)
  centres = _normalise(rng.standard_normal((num_clusters, dim),
                                           dtype=np.float32))

  def draw(count, stream):
    r = np.random.default_rng([seed, stream])
    out = np.empty((count, dim), np.float32)
    for start in range(0, count, 65536):  # Bounded temporaries.
      size = min(65536, count - start)
      which = r.integers(0, num_clusters, size)
      g = r.standard_normal((size, dim), dtype=np.float32)
      out[start:start + size] = _normalise(
          centres[which] + (noise / math.sqrt(dim)) * g)
    return out

  return draw(n, 1), draw(num_queries, 2)


def _normalise(x: np.ndarray) -> np.ndarray:
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ------------------------------------------------------------------ build --


@dataclasses.dataclass
class Embedded:
  """Image embeddings of a data set, with one metadata item per row."""
  embeddings: np.ndarray  # float32 [n, D], unit norm.
  items: list[dict]
  num_skipped: int
  skipped: list[str]  # ids of the skipped examples.
  source: dict  # What was embedded: {'folder': path} or {'split': name}.


def dataset_overrides(folder: str | None, split: str | None) -> dict:
  """Eval dataset overrides (evals/run.py) of --folder or --split."""
  if (folder is None) == (split is None):
    raise ValueError("Give exactly one of --folder PATH (images to index) "
                     "or --split NAME (a split of the run's data).")
  if folder is not None:
    if not os.path.exists(folder):
      raise FileNotFoundError(f"--folder {folder!r} does not exist.")
    return {"source": "folder", "path": os.path.abspath(folder),
            "split": "index"}
  return {"split": split}


def embed_dataset(model, dataset: dict, *, batch_size: int = 256,
                  num_threads: int = 0, check_size=None) -> Embedded:
  """Embeds the images of `dataset` (overrides of the run's config.data)
  as the evaluator does, on every process; unreadable images are skipped.

  check_size(n): called with the data set's size before embedding (to
  refuse early, e.g. too small for ivfpq).
  """
  from clip_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from clip_jax.evals import embed  # pylint: disable=g-import-not-at-top
  from clip_jax.evals import run as eval_run  # pylint: disable=g-import-not-at-top
  mesh = model.mesh
  batch = embed.padded_size(batch_size, mesh.size)
  make_batches = eval_run.make_batches_fn(
      model.config.data, batch_size=batch, num_threads=num_threads,
      rows=sharding_lib.host_rows(mesh, batch))
  data = make_batches(dataset, captions=True)
  source = data.source
  if check_size is not None:
    check_size(len(source))
  image_fn = embed.make_encode_fn(model.model, mesh, "image")
  emb, rows = embed.embed_batches(image_fn, model.params, mesh, data)
  folder = dataset.get("source") == "folder"
  names = data.class_names
  items = []
  for i, captions, label in zip(rows["index"], rows["captions"],
                                rows["label"]):
    i = int(i)
    item = ({"path": source[i]["image"]} if folder
            else {"split": dataset["split"], "index": i})
    item["caption"] = str(captions[0]) if captions else ""
    if names and label >= 0:
      item["class_name"] = names[int(label)]
    items.append(item)
  kept = {int(i) for i in rows["index"]}
  skipped = [str(source[i].get("id", i)) for i in range(len(source))
             if i not in kept]
  where = ({"folder": dataset["path"]} if folder
           else {"split": dataset["split"]})
  return Embedded(emb, items, rows["num_skipped"], skipped, where)


def index_paths(path: str) -> dict:
  return {name: os.path.join(path, name)
          for name in ("meta.json", "embeddings.npy", "faiss.index")}


def write_index(path: str, embedded: Embedded, *, kind: str, params: dict,
                workdir: str, step: int, overwrite: bool = False) -> dict:
  """Builds the faiss index over the float16 embeddings and writes INDEX/
  (module docstring). Returns the metadata written."""
  faiss = _faiss()
  files = index_paths(path)
  if os.path.exists(files["meta.json"]) and not overwrite:
    raise FileExistsError(f"{path!r} already holds an index; pass "
                          "--overwrite to replace it, or another --out.")
  stored = embedded.embeddings.astype(np.float16)
  start = time.perf_counter()
  index = build_faiss(stored, kind, params)
  seconds = time.perf_counter() - start
  os.makedirs(path, exist_ok=True)
  if os.path.exists(files["meta.json"]):
    os.remove(files["meta.json"])  # Unfinished until rewritten last.
  np.save(files["embeddings.npy"], stored)
  faiss.write_index(index, files["faiss.index"])
  meta = {"version": FORMAT_VERSION, "workdir": os.path.abspath(workdir),
          "step": int(step), "kind": kind, "params": params,
          "metric": "inner_product", "count": len(stored),
          "dim": int(stored.shape[1]), "source": embedded.source,
          "num_skipped": int(embedded.num_skipped),
          "skipped": embedded.skipped, "build_seconds": round(seconds, 3),
          "items": embedded.items}
  tmp = files["meta.json"] + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(meta, f, ensure_ascii=False)
  os.replace(tmp, files["meta.json"])
  return meta


def build(workdir: str, out: str, *, folder: str | None = None,
          split: str | None = None, kind: str = "flat",
          step: int | None = None, params: dict | None = None,
          batch_size: int = 256, num_threads: int = 0,
          overwrite: bool = False) -> dict:
  """Embeds, builds and (process 0) writes an index; returns its metadata
  (without items)."""
  import jax  # pylint: disable=g-import-not-at-top

  from clip_jax import api  # pylint: disable=g-import-not-at-top
  check_kind(kind)
  dataset = dataset_overrides(folder, split)
  if os.path.exists(index_paths(out)["meta.json"]) and not overwrite:
    raise FileExistsError(f"--out {out!r} already holds an index; pass "
                          "--overwrite to replace it, or another --out.")
  model = api.load(workdir, step=step, batch_size=batch_size)
  dim = model.config.model.embed_dim
  # Fail before embedding if the set cannot be indexed even when every
  # image reads (the same answer on every process: same data).
  embedded = embed_dataset(
      model, dataset, batch_size=batch_size, num_threads=num_threads,
      check_size=lambda n: resolve_params(kind, n, dim, params))
  resolved = resolve_params(kind, len(embedded.embeddings), dim, params)
  meta = {"count": len(embedded.embeddings), "kind": kind,
          "params": resolved, "num_skipped": embedded.num_skipped,
          "skipped": embedded.skipped, "step": model.step}
  if jax.process_index() == 0:
    meta = write_index(out, embedded, kind=kind, params=resolved,
                       workdir=workdir, step=model.step, overwrite=overwrite)
  return {k: v for k, v in meta.items() if k != "items"}


# ------------------------------------------------------------------ query --


class Index:
  """A written index: meta, float16 embeddings, the faiss index."""

  def __init__(self, path: str, search_params: dict | None = None):
    files = index_paths(path)
    if not os.path.isdir(path):
      raise FileNotFoundError(f"No index at {path!r}; build one with "
                              "`python -m clip_jax.index build`.")
    if not os.path.exists(files["meta.json"]):
      raise FileNotFoundError(f"{path!r} has no meta.json: not an index, or "
                              "its build did not finish; build it again.")
    with open(files["meta.json"], encoding="utf-8") as f:
      self.meta = json.load(f)
    if self.meta.get("version") != FORMAT_VERSION:
      raise ValueError(f"{path!r} is index format {self.meta.get('version')}"
                       f", this code reads {FORMAT_VERSION}; rebuild it.")
    self.path = path
    self.embeddings = np.load(files["embeddings.npy"])
    self.faiss = _faiss().read_index(files["faiss.index"])
    params = dict(self.meta["params"])
    for name, value in (search_params or {}).items():
      if value is None:
        continue
      if name not in params:
        raise ValueError(f"--{name} does not apply to a {self.meta['kind']} "
                         f"index (its parameters: "
                         f"{', '.join(params) or 'none'}).")
      params[name] = int(value)
    check_params(self.meta["kind"], params, self.meta["count"],
                 self.meta["dim"])
    set_search_params(self.faiss, params)
    self.params = params

  @property
  def items(self) -> list[dict]:
    return self.meta["items"]

  def search(self, queries, k: int):
    return search(self.faiss, queries, k)


def load_model(index: Index):
  """The model that built `index` (its workdir and step)."""
  from clip_jax import api  # pylint: disable=g-import-not-at-top
  return api.load(index.meta["workdir"], step=index.meta["step"])


def item_label(item: dict) -> str:
  where = (item["path"] if "path" in item
           else f"{item['split']}#{item['index']}")
  text = item.get("caption") or item.get("class_name") or ""
  return f"{where}  {text}".rstrip()


def query(index: Index, model, *, text: str | None = None,
          image: str | None = None, k: int = 10) -> list[tuple]:
  """[(rank, score, item)] of the top k items for the text or image."""
  if (text is None) == (image is None):
    raise ValueError("Give exactly one of --text or --image.")
  if k < 1:
    raise ValueError(f"-k {k}: must be >= 1.")
  if image is not None:
    q = model.encode_image([image])
  else:
    q = model.encode_text([text])
  scores, ids = index.search(q, k)
  return [(rank + 1, float(s), index.items[int(i)])
          for rank, (s, i) in enumerate(zip(scores[0], ids[0])) if i >= 0]


def item_image(item: dict, config, opened: dict | None = None):
  """The item's image as a PIL RGB image (re-read from its source; opened:
  {split: source} reused across calls)."""
  import io  # pylint: disable=g-import-not-at-top

  import ml_collections  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  from clip_jax.data import sources  # pylint: disable=g-import-not-at-top
  if "path" in item:
    return Image.open(item["path"]).convert("RGB")
  opened = {} if opened is None else opened
  if item["split"] not in opened:
    data = ml_collections.ConfigDict(config.data.to_dict())
    opened[item["split"]] = sources.get_source(data, item["split"])
  image = opened[item["split"]][item["index"]]["image"]
  if isinstance(image, (bytes, bytearray)):
    return Image.open(io.BytesIO(image)).convert("RGB")
  if isinstance(image, (str, os.PathLike)):
    return Image.open(image).convert("RGB")
  return Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")


def contact_sheet(tiles: list[tuple], path: str, *, tile: int = 128,
                  columns: int = 5) -> None:
  """A PNG grid of (PIL image, label) tiles, label under each image."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  label_height = 28
  rows = max(1, math.ceil(len(tiles) / columns))
  sheet = Image.new("RGB", (columns * tile, rows * (tile + label_height)),
                    "white")
  draw = ImageDraw.Draw(sheet)
  for n, (image, label) in enumerate(tiles):
    x, y = (n % columns) * tile, (n // columns) * (tile + label_height)
    thumb = image.copy()
    thumb.thumbnail((tile, tile))
    sheet.paste(thumb, (x + (tile - thumb.width) // 2,
                        y + (tile - thumb.height) // 2))
    for line_no, line in enumerate(_wrap(label, 22)[:2]):
      draw.text((x + 2, y + tile + 1 + 13 * line_no), line, fill="black")
  sheet.save(path)


def _wrap(text: str, width: int) -> list[str]:
  return [text[i:i + width] for i in range(0, len(text), width)] or [""]


# ----------------------------------------------------------------- report --


def _log(message: str) -> None:
  print(f"[index report {time.strftime('%H:%M:%S')}] {message}",
        file=sys.stderr, flush=True)


def _time_search(index, queries, k):
  start = time.perf_counter()
  index.search(queries, k)
  return time.perf_counter() - start


def benchmark(database, queries, *, kinds=KINDS, k: int = 10,
              runs: int = 5, overrides: dict | None = None) -> dict:
  """Per kind: parameters, build seconds, QPS (median of runs, kinds
  alternated), its ratio to flat, recall@k against flat's results."""
  database, queries = as_float32(database), as_float32(queries)
  n, dim = database.shape
  kinds = ["flat"] + [kind for kind in kinds if kind != "flat"]
  built, out = {}, {}
  for kind in kinds:
    params = resolve_params(kind, n, dim, {
        name: value for name, value in (overrides or {}).items()
        if name in PARAM_NAMES[kind]})
    _log(f"building {kind} over {n:,} vectors ({params})")
    start = time.perf_counter()
    built[kind] = build_faiss(database, kind, params)
    out[kind] = {"params": params,
                 "build_seconds": round(time.perf_counter() - start, 3)}
  exact = built["flat"].search(queries, k)[1]
  times = {kind: [] for kind in kinds}
  for run in range(runs):
    _log(f"timing round {run + 1}/{runs}")
    for kind in kinds:
      times[kind].append(_time_search(built[kind], queries, k))
  for kind in kinds:
    qps = [len(queries) / t for t in times[kind]]
    out[kind].update(
        qps_median=round(float(np.median(qps)), 1),
        qps_runs=[round(q, 1) for q in qps],
        recall_at_k=recall_at_k(built[kind].search(queries, k)[1], exact))
  for kind in kinds:
    out[kind]["qps_ratio_to_flat"] = round(
        out[kind]["qps_median"] / out["flat"]["qps_median"], 2)
  return {"num_vectors": n, "dim": dim, "num_queries": len(queries),
          "k": k, "runs": runs, "kinds": out}


def caption_queries(index: Index, model, num_queries: int,
                    seed: int = 0) -> tuple[np.ndarray, int]:
  """(text embeddings of up to num_queries distinct item captions, a
  seeded sample; how many distinct captions there are)."""
  captions = sorted({item.get("caption") or item.get("class_name") or ""
                     for item in index.items} - {""})
  if not captions:
    raise ValueError(f"{index.path!r}: its items have no captions or class "
                     "names to use as text queries.")
  rng = np.random.default_rng(seed)
  chosen = sorted(rng.permutation(len(captions))[:num_queries])
  return model.encode_text([captions[i] for i in chosen]), len(captions)


def report(*, index_path: str | None, synthetic: int, dim: int,
           num_clusters: int, num_queries: int, runs: int, k: int,
           kinds=KINDS, seed: int = 0, overrides: dict | None = None) -> dict:
  """The benchmark on an index's embeddings and/or a synthetic set
  (overrides: parameters replacing the defaults of the kinds they belong
  to)."""
  import faiss  # pylint: disable=g-import-not-at-top
  if not index_path and not synthetic:
    raise ValueError("Nothing to report on: give --index INDEX and/or "
                     "--synthetic N.")
  result = {"load_average_before": [round(x, 2) for x in os.getloadavg()],
            "cpu_count": os.cpu_count(), "faiss_threads":
            faiss.omp_get_max_threads(), "faiss_version": faiss.__version__,
            "sets": {}}
  if index_path:
    index = Index(index_path)
    model = load_model(index)
    queries, num_captions = caption_queries(index, model, num_queries, seed)
    result["sets"]["index"] = {
        "index": os.path.abspath(index_path), "source": index.meta["source"],
        "workdir": index.meta["workdir"], "step": index.meta["step"],
        "queries": f"{len(queries)} of the items' {num_captions} distinct "
                   "captions, embedded by the model",
        **benchmark(index.embeddings, queries, kinds=kinds, k=k, runs=runs,
                    overrides=overrides)}
  if synthetic:
    database, queries = synthetic_set(synthetic, num_queries, dim,
                                      num_clusters=num_clusters, seed=seed)
    result["sets"]["synthetic"] = {
        "generator": f"synthetic_set(n={synthetic}, dim={dim}, "
                     f"num_clusters={num_clusters}, noise=1.0, seed={seed})",
        **benchmark(database, queries, kinds=kinds, k=k, runs=runs,
                    overrides=overrides)}
  result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
  return result


# -------------------------------------------------------------------- CLI --


def _add_param_flags(parser, names):
  helps = {"M": "hnsw: links per node", "ef_construction":
           "hnsw: candidates while building", "ef_search":
           "hnsw: candidates while searching", "nlist":
           "ivfpq: coarse cells", "nprobe": "ivfpq: cells searched",
           "m": "ivfpq: sub-quantisers (divides the width)",
           "nbits": "ivfpq: bits per sub-quantiser code"}
  for name in names:
    parser.add_argument(f"--{name}", type=int, default=None,
                        help=helps[name] + " (default: by set size)")


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m clip_jax.index",
      description="Embedding index for retrieval (faiss-cpu).")
  sub = parser.add_subparsers(dest="command", required=True)
  b = sub.add_parser("build", help="embed images and build an index")
  b.add_argument("--workdir", required=True, help="a training run")
  b.add_argument("--folder", help="images to index (or a .csv / .jsonl)")
  b.add_argument("--split", help="a split of the run's config.data")
  b.add_argument("--out", required=True, help="the index folder to write")
  b.add_argument("--kind", default="flat", choices=KINDS)
  b.add_argument("--step", type=int, default=None,
                 help="checkpoint step (default: the latest)")
  b.add_argument("--batch_size", type=int, default=256)
  b.add_argument("--num_threads", type=int, default=0,
                 help="threads decoding images")
  b.add_argument("--overwrite", action="store_true")
  _add_param_flags(b, ("M", "ef_construction", "ef_search", "nlist",
                       "nprobe", "m", "nbits"))
  b.add_argument("--distributed", action="store_true",
                 help="jax.distributed.initialize() (pods, SLURM)")
  b.add_argument("--coordinator_address", default=None)
  b.add_argument("--num_processes", type=int, default=None)
  b.add_argument("--process_id", type=int, default=None)
  q = sub.add_parser("query", help="top matches of a text or an image")
  q.add_argument("index", help="an index folder (build --out)")
  q.add_argument("--text")
  q.add_argument("--image")
  q.add_argument("-k", type=int, default=10)
  q.add_argument("--sheet", help="write a contact sheet PNG of the matches")
  _add_param_flags(q, ("ef_search", "nprobe"))
  r = sub.add_parser("report", help="recall@k and QPS of the kinds")
  r.add_argument("--index", help="an index: its embeddings, caption queries")
  r.add_argument("--synthetic", type=int, default=0,
                 help="also a synthetic set of this many vectors")
  r.add_argument("--dim", type=int, default=96, help="synthetic width")
  r.add_argument("--clusters", type=int, default=1000,
                 help="synthetic clusters")
  r.add_argument("--queries", type=int, default=1000)
  r.add_argument("--runs", type=int, default=5)
  r.add_argument("-k", type=int, default=10)
  _add_param_flags(r, ("M", "ef_construction", "ef_search", "nlist",
                       "nprobe", "m", "nbits"))
  r.add_argument("--threads", type=int, default=None,
                 help="faiss (OpenMP) threads (default: faiss's)")
  r.add_argument("--kinds", default=",".join(KINDS),
                 help="comma-separated kinds (flat is always measured)")
  r.add_argument("--out", help="write the JSON here too")
  return parser


def _init_distributed(args) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  if args.coordinator_address:
    jax.distributed.initialize(coordinator_address=args.coordinator_address,
                               num_processes=args.num_processes,
                               process_id=args.process_id)
  elif args.distributed:
    jax.distributed.initialize()


def _run_build(args) -> int:
  _init_distributed(args)
  params = {name: getattr(args, name) for names in PARAM_NAMES.values()
            for name in names if getattr(args, name) is not None}
  for name in params:
    if name not in PARAM_NAMES[args.kind]:
      raise ValueError(f"--{name} is not a parameter of --kind {args.kind} "
                       f"(its parameters: "
                       f"{', '.join(PARAM_NAMES[args.kind]) or 'none'}).")
  meta = build(args.workdir, args.out, folder=args.folder, split=args.split,
               kind=args.kind, step=args.step, params=params,
               batch_size=args.batch_size, num_threads=args.num_threads,
               overwrite=args.overwrite)
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    print(f"indexed {meta['count']:,} images ({args.kind}, "
          f"{json.dumps(meta['params'])}) with step {meta['step']} of "
          f"{args.workdir} -> {args.out}")
    if meta["num_skipped"]:
      shown = ", ".join(meta["skipped"][:5])
      more = " ..." if len(meta["skipped"]) > 5 else ""
      print(f"skipped {meta['num_skipped']} unreadable images: "
            f"{shown}{more}")
  return 0


def _run_query(args) -> int:
  if (args.text is None) == (args.image is None):
    raise ValueError("Give exactly one of --text or --image.")
  if args.image is not None and not os.path.isfile(args.image):
    raise FileNotFoundError(f"--image {args.image!r} not found.")
  if args.k < 1:
    raise ValueError(f"-k {args.k}: must be >= 1.")
  index = Index(args.index, {"ef_search": args.ef_search,
                             "nprobe": args.nprobe})
  model = load_model(index)
  matches = query(index, model, text=args.text, image=args.image, k=args.k)
  for rank, score, item in matches:
    print(f"{rank:3d}  {score:.4f}  {item_label(item)}")
  if args.sheet:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    tiles = []
    if args.image is not None:
      tiles.append((Image.open(args.image).convert("RGB"), "query"))
    opened = {}
    tiles += [(item_image(item, model.config, opened),
               f"{rank}. {score:.3f} {item.get('caption', '')}")
              for rank, score, item in matches]
    contact_sheet(tiles, args.sheet)
    print(f"wrote {args.sheet}")
  return 0


def _run_report(args) -> int:
  kinds = [kind.strip() for kind in args.kinds.split(",") if kind.strip()]
  for kind in kinds:
    check_kind(kind)
  if args.threads is not None:
    _faiss().omp_set_num_threads(args.threads)
  result = report(index_path=args.index, synthetic=args.synthetic,
                  dim=args.dim, num_clusters=args.clusters,
                  num_queries=args.queries, runs=args.runs, k=args.k,
                  kinds=kinds, overrides={
                      name: getattr(args, name) for names in
                      PARAM_NAMES.values() for name in names
                      if getattr(args, name) is not None})
  text = json.dumps(result, indent=2)
  print(text)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
      f.write(text + "\n")
  return 0


def main(argv=None) -> int:
  args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
  if args.command == "build":
    return _run_build(args)
  if args.command == "query":
    return _run_query(args)
  return _run_report(args)


if __name__ == "__main__":
  from clip_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run_plain(main)
