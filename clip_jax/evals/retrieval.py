"""Image <-> text retrieval: recall@k and ranks, several captions per image.

Inputs: image embeddings [I, D], caption embeddings [T, D] and
`caption_to_image` int [T] (the image each caption describes; COCO has ~5
captions per image). Similarity is the dot product (cosine for the
L2-normalised embeddings of the towers), float32 at full precision.

  i2t (image queries, caption keys): an image is a hit at k if ANY of its
      captions is among its k best captions; its rank is the position of its
      first caption in the ranking. Images without captions are not queries.
  t2i (caption queries, image keys): each caption has exactly one correct
      image; its rank is that image's position.

Ties are broken by key index, lower index first (a stable descending sort;
see ranking.py), e.g. a caption tied with another image's caption ranks
after it if its index is higher. Non-finite similarities are misses.
Queries are processed in chunks of `chunk_size` rows; no [I, T] matrix is
held for the whole set.

Metrics: '{i2t,t2i}/r@{k}' (fractions), '{i2t,t2i}/mean_rank' and
'{i2t,t2i}/median_rank' (1-based), 'num_images' (image queries),
'num_captions'.
"""

from __future__ import annotations

import numpy as np

from clip_jax.evals import ranking


def ranks(image_embeddings, caption_embeddings, caption_to_image, *,
          chunk_size: int = ranking.DEFAULT_CHUNK_SIZE):
  """(i2t ranks of the images that have captions [I'], t2i ranks [T])."""
  img = np.asarray(image_embeddings, np.float32)
  txt = np.asarray(caption_embeddings, np.float32)
  owner = np.asarray(caption_to_image)
  if owner.shape != (len(txt),):
    raise ValueError(f"caption_to_image has shape {owner.shape}; expected "
                     f"({len(txt)},), one image index per caption.")
  if len(owner) and (owner.min() < 0 or owner.max() >= len(img)):
    raise ValueError(f"caption_to_image must index the {len(img)} images; "
                     f"found values in [{owner.min()}, {owner.max()}].")
  has_caption = np.bincount(owner, minlength=len(img)) > 0
  i2t = ranking.first_positive_ranks(img[has_caption], txt, owner,
                                     np.flatnonzero(has_caption),
                                     chunk_size=chunk_size)
  t2i = ranking.target_ranks(txt, img, owner, chunk_size=chunk_size)
  return i2t, t2i


def recall_at_k(image_embeddings, caption_embeddings, caption_to_image,
                ks=(1, 5, 10), *,
                chunk_size: int = ranking.DEFAULT_CHUNK_SIZE) -> dict:
  """Retrieval metrics both ways (module docstring for keys and rules)."""
  if len(caption_to_image) == 0:
    raise ValueError("recall_at_k() got no captions.")
  i2t, t2i = ranks(image_embeddings, caption_embeddings, caption_to_image,
                   chunk_size=chunk_size)
  result = {}
  for name, r in (("i2t", i2t), ("t2i", t2i)):
    for k in ks:
      result[f"{name}/r@{k}"] = float(np.mean(r <= k))
    result[f"{name}/mean_rank"] = float(np.mean(r))
    result[f"{name}/median_rank"] = float(np.median(r))
  result["num_images"] = len(i2t)
  result["num_captions"] = len(t2i)
  return result
