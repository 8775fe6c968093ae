"""Evaluators by name, run on a model's params during or after training.

`config.evals` maps an eval name to an eval config (a dict / ConfigDict):

  type          EVALUATORS key: 'zeroshot' | 'retrieval' | 'linear_probe'.
  dataset       the eval data: overrides of config.data (see
                clip_jax/data/pipeline.py for its keys) including 'split',
                e.g. {'split': 'openmoji'} (emoji), {'source': 'tfds',
                'tfds_name': 'imagenette', 'split': 'validation',
                'label_key': 'label'}, {'source': 'folder', 'path':
                'coco_val.jsonl'} (captions: retrieval), or {'source':
                'image_folder', 'path': ROOT}: ROOT/<class name>/*.png|jpg
                (evals/readers.py). Images are preprocessed as the pipeline
                does at evaluation (centre square, config.data.image_size,
                mean/std).
  split, source, path
                shorthand for dataset.split / dataset.source / dataset.path.
  batch_size    global examples per embedding batch (rounded up to the
                device count), default 256.
  num_threads   threads reading/decoding eval images (default 0: none).
  every_steps | every_examples | every_epochs
                period during training (at most one; none = only at the
                start and the end). Evals always run before the first step
                and after the last; epochs need the training set size.
zeroshot:
  templates     a template-set name (evals/templates.py), a list of
                templates, a list of set names reported side by side
                ('<set>/top1', ...), or {prefix: set}. Default 'none'.
  class_names   list of class names overriding the dataset's (TFDS:
                features[label_key].names; image folder: folder names;
                emoji: base emoji names).
  topk          accuracies reported, default (1, 5).
  per_class     also 'mean_per_class' and 'per_class/<class name>'.
retrieval:
  ks            recall@k reported both ways, default (1, 5, 10). Captions:
                every caption of every image of the dataset.
linear_probe:
  train_split, val_split, test_split
                a split name of `dataset`, or a dict of overrides (e.g. a
                different image folder); val_split may be None: a fixed
                fraction of train is held out to choose l2.
  l2_grid       default 10^-6 .. 10^0; val_fraction (0.2), max_iter (1000).

Every evaluator has the signature
  evaluator(eval_config, *, model, params, mesh, tokenize, make_batches)
      -> dict[str, float]
with tokenize(list[str]) -> int32 [n, L] and make_batches(dataset dict, *,
captions=False) -> an iterable of eval batch dicts (readers.py; with
captions=True each batch has 'captions'), optionally with a `class_names`
attribute. `run_all` supplies both from the config and
returns {'eval/<name>/<metric>': value}.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

import ml_collections
import numpy as np

from clip_jax import config as config_lib
from clip_jax import sharding as sharding_lib
from clip_jax.data import sources, transforms
from clip_jax.evals import embed, linear_probe, readers, retrieval, zeroshot

_COMMON_KEYS = {"type", "dataset", "split", "source", "path", "batch_size",
                "num_threads", "every_steps", "every_examples",
                "every_epochs"}
_KEYS = {
    "zeroshot": {"templates", "class_names", "topk", "per_class"},
    "retrieval": {"ks"},
    "linear_probe": {"train_split", "val_split", "test_split", "l2_grid",
                     "val_fraction", "max_iter"},
}


def _as_dict(c) -> dict:
  if c is None:
    return {}
  return dict(c.to_dict() if hasattr(c, "to_dict") else c)


def dataset_config(eval_config, split=None) -> dict:
  """The eval's data overrides: `dataset` + shorthand keys (+ `split`, a
  split name or a dict of overrides)."""
  eval_config = _as_dict(eval_config)
  dataset = _as_dict(eval_config.get("dataset"))
  for key in ("split", "source", "path"):
    if eval_config.get(key) is not None:
      dataset[key] = eval_config[key]
  if isinstance(split, Mapping) or hasattr(split, "to_dict"):
    dataset.update(_as_dict(split))
  elif split is not None:
    dataset["split"] = split
  return dataset


def _encoders(model, mesh):
  return (embed.make_encode_fn(model, mesh, "image"),
          embed.make_encode_fn(model, mesh, "text"))


def _embed_images(model, params, mesh, make_batches, dataset,
                  captions=False):
  data = make_batches(dataset, captions=captions)
  image_fn, _ = _encoders(model, mesh)
  emb, rows = embed.embed_batches(image_fn, params, mesh, data)
  return emb, rows, getattr(data, "class_names", None)


def _labels(rows, what):
  labels = np.asarray(rows.get("label", []))
  if len(labels) == 0 or labels.min() < 0:
    raise ValueError(
        f"{what}: the dataset has examples without a class label; zero-shot "
        "and linear-probe evals need a labelled dataset (TFDS: set "
        "dataset.label_key; or use source 'image_folder').")
  return labels


def zeroshot_eval(eval_config, *, model, params, mesh, tokenize,
                  make_batches) -> dict:
  """Zero-shot accuracy (zeroshot.run_zeroshot) of the eval's dataset."""
  c = _as_dict(eval_config)
  emb, rows, names = _embed_images(model, params, mesh, make_batches,
                                   dataset_config(c))
  labels = _labels(rows, "zeroshot")
  names = c.get("class_names") or names
  if not names:
    raise ValueError(
        f"zeroshot on {dataset_config(c)}: the dataset has no class names; "
        "set class_names in the eval config.")
  if labels.max() >= len(names):
    raise ValueError(f"zeroshot: label {labels.max()} but only {len(names)} "
                     "class names.")
  _, text_fn = _encoders(model, mesh)
  embed_texts = embed.text_embedder(
      text_fn, params, mesh, tokenize,
      batch_size=c.get("batch_size") or embed.DEFAULT_BATCH_SIZE)
  result = zeroshot.run_zeroshot(
      emb, labels, embed_texts, list(names), c.get("templates") or "none",
      topk=tuple(c.get("topk") or (1, 5)),
      per_class=bool(c.get("per_class")))
  out = {}
  for key, value in result.items():
    if key == "per_class" or key.endswith("/per_class"):
      prefix = key[:-len("per_class")]
      for name, acc in zip(names, value):
        if not np.isnan(acc):
          out[f"{prefix}per_class/{name}"] = float(acc)
    else:
      out[key] = value
  out["num_skipped"] = rows["num_skipped"]
  return out


def retrieval_eval(eval_config, *, model, params, mesh, tokenize,
                   make_batches) -> dict:
  """Recall@k both ways (retrieval.recall_at_k), all captions per image."""
  c = _as_dict(eval_config)
  emb, rows, _ = _embed_images(model, params, mesh, make_batches,
                               dataset_config(c), captions=True)
  if "captions" not in rows:
    raise ValueError(f"retrieval on {dataset_config(c)}: the batches carry "
                     "no 'captions'.")
  captions, owner = [], []
  for row, row_captions in enumerate(rows["captions"]):
    captions.extend(row_captions)
    owner.extend([row] * len(row_captions))
  if not captions:
    raise ValueError(f"retrieval on {dataset_config(c)}: no captions.")
  _, text_fn = _encoders(model, mesh)
  batch_size = c.get("batch_size") or embed.DEFAULT_BATCH_SIZE
  if isinstance(captions[0], str):
    text_emb = embed.text_embedder(text_fn, params, mesh, tokenize,
                                   batch_size=batch_size)(captions)
  else:  # Pre-tokenised captions.
    text_emb = embed.embed_arrays(text_fn, params, mesh, np.stack(captions),
                                  batch_size=batch_size)
  result = retrieval.recall_at_k(emb, text_emb, np.asarray(owner),
                                 ks=tuple(c.get("ks") or (1, 5, 10)))
  result["num_skipped"] = rows["num_skipped"]
  return result


def linear_probe_eval(eval_config, *, model, params, mesh, tokenize,
                      make_batches) -> dict:
  """Test accuracy of a logistic-regression probe (linear_probe.py)."""
  del tokenize  # Images only.
  c = _as_dict(eval_config)
  features = {}
  for part in ("train", "val", "test"):
    split = c.get(f"{part}_split")
    if split is None:
      if part == "val":
        continue
      raise ValueError(f"linear_probe needs {part}_split (a split name or "
                       "a dict of dataset overrides).")
    emb, rows, names = _embed_images(model, params, mesh, make_batches,
                                     dataset_config(c, split))
    features[part] = (emb, _labels(rows, f"linear_probe {part}_split"),
                      names)
  train_x, train_y, names = features["train"]
  test_x, test_y, _ = features["test"]
  val_x, val_y, _ = features.get("val", (None, None, None))
  kwargs = {}
  for key in ("l2_grid", "val_fraction", "max_iter"):
    if c.get(key) is not None:
      kwargs[key] = c[key]
  return linear_probe.linear_probe(
      train_x, train_y, test_x, test_y, val_features=val_x, val_labels=val_y,
      num_classes=len(names) if names else None, mesh=mesh, **kwargs)


EVALUATORS = {"zeroshot": zeroshot_eval,
              "retrieval": retrieval_eval,
              "linear_probe": linear_probe_eval}


# ------------------------------------------------------------- the glue ----


class EvalData:
  """Iterable eval batches of one dataset, with its class names."""

  def __init__(self, source, preprocess, batch_size: int, *,
               captions: bool = False, num_threads: int = 0, rows=None,
               image_shape=None):
    self.source, self.preprocess = source, preprocess
    self.batch_size, self.num_threads = batch_size, num_threads
    self.captions, self.rows, self.image_shape = captions, rows, image_shape
    self.class_names = getattr(source, "class_names", None)

  def __len__(self):
    return math.ceil(len(self.source) / self.batch_size)

  def __iter__(self):
    return readers.record_batches(self.source, self.preprocess,
                                  self.batch_size,
                                  with_captions=self.captions,
                                  num_threads=self.num_threads,
                                  rows=self.rows,
                                  image_shape=self.image_shape)


def make_batches_fn(data_config, *, batch_size: int = 256,
                    num_threads: int = 0, rows=None):
  """make_batches(dataset overrides, captions=False) -> EvalData.

  rows: decode only these rows of each batch (this process's devices' rows,
  sharding.host_rows(mesh, batch_size)); None = every row.

  The dataset is config.data updated with the overrides. Sources:
  'image_folder' (readers.ClassFolderSource at path); 'tfds' without
  captions (readers.TfdsClassificationSource: tfds_name, split, data_dir,
  image_key, label_key (default 'label')); anything else, and 'tfds' with
  captions, through clip_jax.data.sources.get_source.
  """
  def make_batches(dataset, *, captions: bool = False):
    cfg = ml_collections.ConfigDict({**_as_dict(data_config),
                                     **_as_dict(dataset)})
    if cfg.get("source") == "image_folder":
      if not cfg.get("path"):
        raise ValueError("dataset source 'image_folder' needs path: "
                         "ROOT/<class name>/*.png|jpg.")
      source = readers.ClassFolderSource(cfg.path)
    elif cfg.get("source") == "tfds" and not captions:
      if not cfg.get("tfds_name") or not cfg.get("split"):
        raise ValueError(f"Eval dataset {_as_dict(dataset)}: source 'tfds' "
                         "needs tfds_name and split.")
      source = readers.TfdsClassificationSource(
          cfg.tfds_name, cfg.split, data_dir=cfg.get("data_dir"),
          image_key=cfg.get("image_key") or "image",
          label_key=cfg.get("label_key") or "label")
    else:
      if not cfg.get("split"):
        raise ValueError(f"Eval dataset {_as_dict(dataset)} has no split.")
      source = sources.get_source(cfg, cfg.split)
    size, mean, std = cfg.image_size, tuple(cfg.mean), tuple(cfg.std)
    resize = cfg.get("eval_resize") or "center_square"

    def preprocess(image):
      return transforms.normalize(
          transforms.preprocess_image(image, size, eval_resize=resize),
          mean, std)

    return EvalData(source, preprocess, batch_size, captions=captions,
                    num_threads=num_threads, rows=rows,
                    image_shape=(size, size, 3))

  return make_batches


def tokenize_fn(data_config):
  """tokenize(list[str]) -> int32 [n, L] with config.data's tokenizer,
  loaded on first use."""
  loaded = []

  def tokenize(texts):
    if not loaded:
      from clip_jax.data import pipeline  # pylint: disable=g-import-not-at-top
      tokenizer = pipeline.get_tokenizer(data_config)
      if tokenizer is None:
        raise ValueError(f"config.data.source={data_config.source!r} has no "
                         "tokenizer; text evals need one.")
      loaded.append(tokenizer)
    return loaded[0].encode(list(texts), data_config.context_length,
                            data_config.get("eos_policy") or "eos")

  return tokenize


def validate(config, *, evals=None, dataset_size: int | None = None) -> None:
  """Checks config.evals (or `evals`): types, keys, periods, templates.

  Raises ValueError. Periods in epochs are checked only with dataset_size.
  """
  evals = config.get("evals") if evals is None else evals
  for name, eval_config in _as_dict(evals).items():
    c = _as_dict(eval_config)
    where = f"config.evals.{name}"
    if c.get("type") not in EVALUATORS:
      raise ValueError(f"{where}.type={c.get('type')!r} is not one of "
                       f"{sorted(EVALUATORS)}.")
    unknown = set(c) - _COMMON_KEYS - _KEYS[c["type"]]
    if unknown:
      raise ValueError(
          f"{where} has unknown keys {sorted(unknown)} for type "
          f"{c['type']!r}; valid: {sorted(_COMMON_KEYS | _KEYS[c['type']])}.")
    given = [s for s in config_lib.DURATION_SUFFIXES
             if c.get(f"every_{s}") is not None]
    if len(given) > 1:
      raise ValueError(f"{where}: give at most one of "
                       f"{', '.join(f'every_{s}' for s in given)}.")
    if given and (given[0] != "epochs" or dataset_size is not None):
      _period(config, c, dataset_size, where)
    if c["type"] == "zeroshot":
      zeroshot.template_set_items(c.get("templates") or "none")
    if c["type"] == "linear_probe":
      for part in ("train", "test"):
        if c.get(f"{part}_split") is None:
          raise ValueError(f"{where}: linear_probe needs {part}_split (a "
                           "split name or a dict of dataset overrides).")
    elif (not dataset_config(c).get("split") and dataset_config(c).get(
        "source") not in ("image_folder", "folder")):
      # Never evaluate on config.data.split (training data) by default.
      raise ValueError(f"{where}: set dataset.split (or split).")


def _period(config, c, dataset_size, where) -> int:
  try:
    return config_lib.steps("every", c, batch_size=config.batch_size,
                            dataset_size=dataset_size, default=0)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None


def due(config, step: int, total_steps: int, *,
        dataset_size: int | None = None) -> list[str]:
  """Names of the evals to run after `step` (0 = before training)."""
  names = []
  for name, eval_config in _as_dict(config.get("evals")).items():
    every = _period(config, _as_dict(eval_config), dataset_size,
                    f"config.evals.{name}")
    if step in (0, total_steps) or (every and step % every == 0):
      names.append(name)
  return names


def run_all(config, model, params, mesh, names=None, *, evals=None,
            make_batches=None, tokenize=None) -> dict:
  """Runs config.evals (or `evals`), only `names` if given.

  Returns {'eval/<name>/<metric>': value, 'eval/<name>/seconds': ...}.
  make_batches / tokenize default to readers over config.data and its
  tokenizer (each eval's batch_size / num_threads apply).
  """
  evals = _as_dict(config.get("evals") if evals is None else evals)
  if names is not None:
    missing = set(names) - set(evals)
    if missing:
      raise ValueError(f"No evals named {sorted(missing)}; configured: "
                       f"{sorted(evals)}.")
  validate(config, evals=evals)
  tokenize = tokenize or tokenize_fn(config.data)
  out = {}
  for name, eval_config in evals.items():
    if names is not None and name not in names:
      continue
    c = _as_dict(eval_config)
    start = time.perf_counter()
    batch_size = embed.padded_size(
        c.get("batch_size") or embed.DEFAULT_BATCH_SIZE, mesh.size)
    # Each process decodes only the images its own devices embed.
    result = EVALUATORS[c["type"]](
        c, model=model, params=params, mesh=mesh, tokenize=tokenize,
        make_batches=make_batches or make_batches_fn(
            config.data, batch_size=batch_size,
            num_threads=c.get("num_threads") or 0,
            rows=sharding_lib.host_rows(mesh, batch_size)))
    result["seconds"] = time.perf_counter() - start
    out.update({f"eval/{name}/{k}": v for k, v in result.items()})
  return out
