"""Zero-shot classification with prompt-template ensembles.

Classifier. The weight vector of class c is CLIP's prompt ensemble: embed
every text `template.format(c)`, L2-normalise each embedding, average over
the templates, L2-normalise the mean. Texts go to `embed_texts` in chunks of
`chunk_size` (10k classes x 80 templates never need 800k embeddings at
once); the mean is accumulated in float64.

Scoring. An image is scored against every class by cosine similarity
(float32, full precision; see ranking.py). The image counts as correct at k
if its label is among the k best classes. Ties are broken towards the lower
class index (a stable descending sort), so results are deterministic and
`top1` agrees with `np.argmax` / `jax.lax.top_k`. Images with non-finite
embeddings count as wrong. k >= the number of classes is trivially 1.0.

Metrics (`evaluate_zeroshot`): 'top{k}' for each k in topk (fraction of
images); with per_class=True also 'mean_per_class' (top-1 accuracy averaged
over the classes that have images) and 'per_class' (float64 [C] top-1
accuracy per class, NaN for classes without images); 'num_images'.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from clip_jax.evals import ranking
from clip_jax.evals import templates as templates_lib

DEFAULT_CHUNK_SIZE = 16384  # Texts per embed_texts call.


def _normalize(x, axis=-1):
  return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def classifier(embed_texts: Callable[[list[str]], np.ndarray],
               class_names: Sequence[str], templates, *,
               chunk_size: int = DEFAULT_CHUNK_SIZE) -> np.ndarray:
  """float32 [C, D] unit vectors, one per class (module docstring).

  embed_texts: list of C' strings -> float [C', D] (need not be normalised).
  templates: a template-set name, or a list of '{}' templates.
  """
  templates = templates_lib.get_templates(templates)
  class_names = list(class_names)
  if not class_names:
    raise ValueError("classifier() needs at least one class name.")
  num_classes = len(class_names)
  total = len(templates) * num_classes
  sums = None
  for start in range(0, total, chunk_size):
    flat = np.arange(start, min(start + chunk_size, total))
    texts = [templates[i // num_classes].format(class_names[i % num_classes])
             for i in flat]
    emb = np.asarray(embed_texts(texts), np.float64)
    if emb.ndim != 2 or len(emb) != len(texts):
      raise ValueError(f"embed_texts returned shape {emb.shape} for "
                       f"{len(texts)} texts; expected [{len(texts)}, D].")
    if sums is None:
      sums = np.zeros((num_classes, emb.shape[1]), np.float64)
    np.add.at(sums, flat % num_classes, _normalize(emb))
  return _normalize(sums / len(templates)).astype(np.float32)


def topk_predictions(image_embeddings, classifier_weights, k: int):
  """int32 [N, k]: the k best classes per image, best first, ties -> lower
  class index."""
  return ranking.top_k(image_embeddings, classifier_weights, k)


def label_ranks(image_embeddings, labels, classifier_weights):
  """int32 [N]: 1-based rank of each image's label among the classes."""
  return ranking.target_ranks(image_embeddings, classifier_weights, labels)


def evaluate_zeroshot(image_embeddings, labels, classifier_weights,
                      topk=(1, 5), per_class: bool = False) -> dict:
  """Accuracies of `classifier_weights` [C, D] on images [N, D] with int
  labels [N] in [0, C) (module docstring for the keys and the tie rule)."""
  labels = np.asarray(labels).astype(np.int64)
  if len(labels) != len(image_embeddings):
    raise ValueError(f"{len(image_embeddings)} image embeddings but "
                     f"{len(labels)} labels.")
  if len(labels) == 0:
    raise ValueError("evaluate_zeroshot() got no images.")
  ranks = label_ranks(image_embeddings, labels, classifier_weights)
  result = {f"top{k}": float(np.mean(ranks <= k)) for k in topk}
  if per_class:
    num_classes = len(classifier_weights)
    counts = np.bincount(labels, minlength=num_classes)
    correct = np.bincount(labels, weights=ranks == 1, minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
      accuracy = np.where(counts > 0, correct / np.maximum(counts, 1), np.nan)
    result["mean_per_class"] = float(np.nanmean(accuracy))
    result["per_class"] = accuracy
  result["num_images"] = len(labels)
  return result


def template_set_items(template_sets) -> list[tuple[str | None, list[str]]]:
  """[(prefix or None, templates)] for `run_zeroshot`'s template_sets:

    'clip_imagenet'               one registered set, keys unprefixed;
    ['a {}.', 'the {}.']          one user set (every entry has '{}');
    ['none', 'clip_imagenet']     several registered sets side by side,
                                  keys prefixed 'none/', 'clip_imagenet/';
    {'mine': [...], 'none': 'none'}  several sets with the given prefixes.
  """
  if isinstance(template_sets, str):
    return [(None, templates_lib.get_templates(template_sets))]
  if isinstance(template_sets, dict) or hasattr(template_sets, "items"):
    return [(str(k), templates_lib.get_templates(v))
            for k, v in template_sets.items()]
  entries = list(template_sets)
  if not entries:
    raise ValueError("template_sets is empty; give a set name "
                     f"({', '.join(sorted(templates_lib.TEMPLATES))}), a list "
                     "of '{}' templates, or a list of set names.")
  with_slot = ["{}" in e for e in entries]
  if all(with_slot):
    return [(None, templates_lib.get_templates(entries))]
  if any(with_slot):
    raise ValueError(
        f"template_sets {entries!r} mixes templates (with '{{}}') and set "
        "names; give either one list of templates or a list of set names.")
  if len(set(entries)) != len(entries):
    raise ValueError(f"template_sets {entries!r} names a set twice.")
  return [(name, templates_lib.get_templates(name)) for name in entries]


def run_zeroshot(image_embeddings, labels, embed_texts, class_names,
                 template_sets="none", *, topk=(1, 5),
                 per_class: bool = False,
                 chunk_size: int = DEFAULT_CHUNK_SIZE) -> dict:
  """Zero-shot metrics for one or several template sets, side by side.

  See `template_set_items` for template_sets; with several sets every key
  is prefixed '<set>/' ('none/top1', 'clip_imagenet/top1', ...).
  """
  result = {}
  for prefix, templates in template_set_items(template_sets):
    weights = classifier(embed_texts, class_names, templates,
                         chunk_size=chunk_size)
    metrics = evaluate_zeroshot(image_embeddings, labels, weights, topk,
                                per_class)
    num_images = metrics.pop("num_images")
    result.update({(f"{prefix}/{k}" if prefix else k): v
                   for k, v in metrics.items()})
  result["num_images"] = num_images
  return result
