"""Evaluators by name, run on a model's params during or after training.

`config.evals` maps a name to an evaluator config:
  type         'zeroshot' | 'retrieval' (EVALUATORS).
  split        split of config.data's source to evaluate on.
  source       optional override of config.data.source (e.g. 'folder'),
  path         with its path for folder sources.
  templates    zeroshot: a template-set name or list of templates, or a list
               of set names to report side by side ('<set>/top1', ...).
  class_names  zeroshot: override the source's class names.
  topk         zeroshot: accuracies to report (default (1, 5)).
  batch_size   examples per embedding batch (rounded up to the devices).
  every_steps  run every this many train steps (also at start and end).
Results are flat dicts {'eval/<name>/<metric>': value}.
"""

from __future__ import annotations

import copy

import numpy as np

from clip_jax.data import pipeline, sources
from clip_jax.evals import embed, retrieval, templates as templates_lib
from clip_jax.evals import zeroshot


def _data_config(config, eval_config):
  data = copy.deepcopy(config.data)
  for key in ("source", "path"):
    if eval_config.get(key) is not None:
      data[key] = eval_config[key]
  return data


def _embed_split(ctx, eval_config):
  data = _data_config(ctx["config"], eval_config)
  batches = pipeline.eval_batches(data, eval_config.split,
                                  eval_config.get("batch_size", 256))
  source = sources.get_source(data, eval_config.split)
  emb, rows = embed.embed_batches(ctx["model"], ctx["params"], ctx["mesh"],
                                  batches)
  return source, emb, rows


def _text_embedder(ctx, eval_config):
  data = ctx["config"].data
  tokenizer = pipeline.get_tokenizer(data)

  def embed_texts(texts):
    tokens = tokenizer.encode(texts, data.context_length, data.eos_policy)
    return embed.embed_arrays(ctx["model"], ctx["params"], ctx["mesh"],
                              tokens, "text",
                              eval_config.get("batch_size", 256))

  return embed_texts


def run_zeroshot(ctx, eval_config) -> dict:
  source, emb, rows = _embed_split(ctx, eval_config)
  class_names = eval_config.get("class_names") or source.class_names
  if not class_names:
    raise ValueError(
        f"Zero-shot eval on split {eval_config.split!r}: the source has no "
        "class names; set class_names in the eval config.")
  sets = eval_config.get("templates", "none")
  side_by_side = isinstance(sets, (list, tuple)) and all(
      s in templates_lib.TEMPLATES for s in sets)
  embed_texts = _text_embedder(ctx, eval_config)
  topk = tuple(eval_config.get("topk", (1, 5)))
  result = {}
  for name in (sets if side_by_side else [sets]):
    weights = zeroshot.classifier(embed_texts, list(class_names), name)
    acc = zeroshot.accuracy(emb, rows["label"], weights, topk)
    prefix = f"{name}/" if side_by_side else ""
    result.update({prefix + k: v for k, v in acc.items()})
  result["num_images"] = len(emb)
  return result


def run_retrieval(ctx, eval_config) -> dict:
  source, emb, rows = _embed_split(ctx, eval_config)
  captions, owner = [], []
  for row, index in enumerate(rows["index"]):
    for caption in source[int(index)].get("captions", []):
      captions.append(caption)
      owner.append(row)
  text_emb = _text_embedder(ctx, eval_config)(captions)
  result = retrieval.recall_at_k(emb, text_emb, np.asarray(owner))
  result.update(num_images=len(emb), num_captions=len(captions))
  return result


EVALUATORS = {"zeroshot": run_zeroshot, "retrieval": run_retrieval}


def run_all(config, model, params, mesh, names=None) -> dict:
  """Runs config.evals (or the given names); flat 'eval/<name>/<metric>'."""
  ctx = dict(config=config, model=model, params=params, mesh=mesh)
  out = {}
  for name, eval_config in config.evals.items():
    if names is not None and name not in names:
      continue
    if eval_config.type not in EVALUATORS:
      raise ValueError(
          f"config.evals.{name}.type={eval_config.type!r} is not one of "
          f"{sorted(EVALUATORS)}.")
    result = EVALUATORS[eval_config.type](ctx, eval_config)
    out.update({f"eval/{name}/{k}": v for k, v in result.items()})
  return out


def due(config, step: int, total_steps: int) -> list[str]:
  """Names of the evals to run after `step` (0 = before training)."""
  names = []
  for name, eval_config in config.evals.items():
    every = eval_config.get("every_steps") or 0
    if step in (0, total_steps) or (every and step % every == 0):
      names.append(name)
  return names
