"""Image <-> text retrieval: recall@k and ranks with several captions/image.

An image query is a hit at k if any of its captions ranks in the top k; a
caption query has exactly one correct image. Ranks are 1-based; ties break
towards the lower index (stable sort), i.e. pessimistically for nobody.
"""

from __future__ import annotations

import numpy as np


def _first_hit_rank(scores, is_correct):
  """1-based rank of the first correct column in each row of `scores`."""
  order = np.argsort(-scores, axis=1, kind="stable")
  correct_sorted = np.take_along_axis(is_correct, order, axis=1)
  return correct_sorted.argmax(axis=1) + 1


def recall_at_k(image_embeddings, text_embeddings, caption_to_image,
                ks=(1, 5, 10), chunk: int = 1024) -> dict:
  """{'i2t/r@k', 't2i/r@k', 'i2t/mean_rank', 't2i/median_rank', ...}."""
  img = np.asarray(image_embeddings, np.float32)
  txt = np.asarray(text_embeddings, np.float32)
  owner = np.asarray(caption_to_image)
  i2t, t2i = [], []
  for start in range(0, len(img), chunk):  # Images as queries.
    rows = np.arange(start, min(start + chunk, len(img)))
    i2t.append(_first_hit_rank(img[rows] @ txt.T,
                               owner[None, :] == rows[:, None]))
  for start in range(0, len(txt), chunk):  # Captions as queries.
    rows = np.arange(start, min(start + chunk, len(txt)))
    t2i.append(_first_hit_rank(txt[rows] @ img.T,
                               np.arange(len(img))[None, :] ==
                               owner[rows][:, None]))
  # Images without any caption cannot be answered; they are not queries.
  has_caption = np.bincount(owner, minlength=len(img)) > 0
  result = {}
  for name, ranks in (("i2t", np.concatenate(i2t)[has_caption]),
                      ("t2i", np.concatenate(t2i))):
    for k in ks:
      result[f"{name}/r@{k}"] = float((ranks <= k).mean())
    result[f"{name}/mean_rank"] = float(ranks.mean())
    result[f"{name}/median_rank"] = float(np.median(ranks))
  return result
