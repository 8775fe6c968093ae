"""Zero-shot classification with prompt-template ensembles.

The classifier of class c is the re-normalised mean over templates t of the
normalised text embedding of t.format(c) (CLIP's prompt ensembling). An
image is assigned the classes of highest cosine similarity. Ties break
towards the lower class index (a stable sort), so results are deterministic.
"""

from __future__ import annotations

import numpy as np

from clip_jax.evals import templates as templates_lib


def _normalize(x, axis=-1):
  return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def classifier(embed_texts, class_names, templates) -> np.ndarray:
  """[C, D] unit vectors; embed_texts(list[str]) -> [n, D]."""
  templates = templates_lib.get_templates(templates)
  texts = [t.format(c) for t in templates for c in class_names]
  emb = _normalize(np.asarray(embed_texts(texts), np.float64))
  emb = emb.reshape(len(templates), len(class_names), -1)
  return _normalize(emb.mean(axis=0)).astype(np.float32)


def topk_predictions(image_embeddings, classifier_weights, k: int):
  """Indices of the k best classes per image, best first, ties -> lower."""
  scores = np.asarray(image_embeddings, np.float32) @ classifier_weights.T
  return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def accuracy(image_embeddings, labels, classifier_weights, topk=(1, 5),
             per_class: bool = False) -> dict:
  """{'top1': ..., 'top5': ..., ['mean_per_class', 'per_class']}."""
  labels = np.asarray(labels)
  k_max = min(max(topk), classifier_weights.shape[0])
  preds = topk_predictions(image_embeddings, classifier_weights, k_max)
  hits = preds == labels[:, None]
  result = {f"top{k}": float(hits[:, :k].any(axis=1).mean()) for k in topk}
  if per_class:
    top1 = hits[:, 0]
    present = np.unique(labels)
    per = {int(c): float(top1[labels == c].mean()) for c in present}
    result["mean_per_class"] = float(np.mean(list(per.values())))
    result["per_class"] = per
  return result
