"""Evaluators against answers known in closed form or worked out by hand."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from clip_jax import sharding as sharding_lib
from clip_jax.evals import embed, retrieval, templates, zeroshot
from clip_jax.models import two_towers

D = 8


def _basis(k):
  e = np.zeros(D, np.float32)
  e[k] = 1.0
  return e


def _toy_text_embedder(class_names):
  """Any template of class k embeds to e_k (plus a template-specific tilt)."""
  def embed_texts(texts):
    out = []
    for text in texts:
      k = next(i for i, name in enumerate(class_names) if name in text)
      out.append(_basis(k) + 0.1 * _basis(D - 1) * len(text) / 100)
    return np.stack(out)
  return embed_texts


NAMES = ["cat", "dog", "emu", "fox", "gnu", "owl"]


def _classifier():
  return zeroshot.classifier(_toy_text_embedder(NAMES), NAMES, "short")


def test_perfect_wrong_and_partial_accuracy():
  weights = _classifier()
  labels = np.repeat(np.arange(6), 5)
  images = np.stack([_basis(k) for k in labels])
  assert zeroshot.accuracy(images, labels, weights)["top1"] == 1.0
  assert zeroshot.accuracy(images, (labels + 1) % 6, weights)["top1"] == 0.0
  # Images of class 3 embedded as class 5 for 2 of their 5 examples.
  confused = images.copy()
  confused[[15, 16]] = _basis(5)
  result = zeroshot.accuracy(confused, labels, weights, per_class=True)
  assert result["top1"] == pytest.approx(28 / 30)
  assert result["per_class"][3] == pytest.approx(3 / 5)
  assert result["mean_per_class"] == pytest.approx((5 + 3 / 5) / 6)


def test_top5_and_ties_break_towards_lower_class_index():
  weights = np.stack([_basis(k) for k in range(6)])
  # Equal similarity to classes 2 and 4: the prediction is 2.
  image = (_basis(2) + _basis(4)) / np.sqrt(2)
  assert zeroshot.topk_predictions(image[None], weights, 2).tolist() == [[2, 4]]
  assert zeroshot.accuracy(image[None], [4], weights, topk=(1, 5)) == {
      "top1": 0.0, "top5": 1.0}


def test_classifier_is_renormalised_mean_of_normalised_template_embeddings():
  rng = np.random.default_rng(0)
  table = {}

  def embed_texts(texts):
    return np.stack([table.setdefault(t, rng.normal(size=D)) for t in texts])

  weights = zeroshot.classifier(embed_texts, ["a", "b"], ["x {}", "y {}"])
  for c, name in enumerate(["a", "b"]):
    vs = [table[f"{t} {name}"] for t in ("x", "y")]
    mean = np.mean([v / np.linalg.norm(v) for v in vs], axis=0)
    np.testing.assert_allclose(weights[c], mean / np.linalg.norm(mean),
                               rtol=1e-5)


def test_template_sets():
  assert len(templates.get_templates("clip_imagenet")) == 80
  assert templates.get_templates(["{} x"]) == ["{} x"]
  with pytest.raises(ValueError, match="Unknown template set 'imagenet'"):
    templates.get_templates("imagenet")
  with pytest.raises(ValueError, match="has no"):
    templates.get_templates(["no slot"])


def test_retrieval_with_several_captions_per_image():
  # 3 images on the axes; 5 captions: image 0 owns captions 0 and 1, image 1
  # owns caption 2, image 2 owns captions 3 and 4.
  images = np.stack([_basis(0), _basis(1), _basis(2)])
  captions = np.stack([
      _basis(1),                # cap 0 (image 0) looks like image 1
      0.9 * _basis(0) + 0.1 * _basis(3),  # cap 1 (image 0) matches image 0
      _basis(1),                # cap 2 (image 1)
      _basis(0),                # cap 3 (image 2) looks like image 0
      0.5 * _basis(2),          # cap 4 (image 2)
  ])
  owner = np.array([0, 0, 1, 2, 2])
  r = retrieval.recall_at_k(images, captions, owner, ks=(1, 2))
  # Image queries. Image 0 scores: caps (0, .9, 0, 1, 0): order 3, 1, ...
  # -> first own caption (1) at rank 2. Image 1: caps 0 and 2 tie at 1;
  # stable order puts cap 0 (not its own) first -> rank 2. Image 2: cap 4
  # (0.5) is the only positive score -> rank 1.
  assert r["i2t/r@1"] == pytest.approx(1 / 3)
  assert r["i2t/r@2"] == 1.0
  assert r["i2t/mean_rank"] == pytest.approx(5 / 3)
  # Caption queries: cap 0 -> image 1 first (own image 0 rank 2); cap 1 ->
  # image 0 rank 1; cap 2 -> rank 1; cap 3 -> image 0 first, own image 2
  # scores 0 and ties with image 1 -> stable order: image 1, image 2 -> 3;
  # cap 4 -> rank 1.
  assert r["t2i/r@1"] == pytest.approx(3 / 5)
  assert r["t2i/r@2"] == pytest.approx(4 / 5)
  assert r["t2i/mean_rank"] == pytest.approx((2 + 1 + 1 + 3 + 1) / 5)


def _tiny_model():
  config = ml_collections.ConfigDict(dict(
      embed_dim=8, logit_scale_init=10.0, logit_scale_max=None,
      logit_bias_init=None, dtype="float32", activation="gelu", remat=False,
      scan=False,
      image=dict(variant="mu", image_size=8, pool="cls", patch_size=4),
      text=dict(variant="mu", vocab_size=20, context_length=4, pool="eos",
                causal=True, eos_id=1, pad_id=0)))
  model = two_towers.build_model(config)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)),
                      jnp.zeros((1, 4), jnp.int32))["params"]
  return model, params


def test_embedding_pads_the_last_batch_and_drops_the_padding():
  model, params = _tiny_model()
  mesh = sharding_lib.make_mesh(ml_collections.ConfigDict(
      dict(data=4, fsdp=2)))
  images = np.random.default_rng(0).normal(size=(37, 8, 8, 3)).astype(
      np.float32)
  got = embed.embed_arrays(model, params, mesh, images, "image", 16)
  want = model.apply({"params": params}, images, method=model.encode_image)
  assert got.shape == (37, 8)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # Eval batches with a mask: padded rows are dropped, order kept.
  batches = [{"image": images[:16], "mask": np.ones(16),
              "label": np.arange(16)},
             {"image": np.concatenate([images[16:], images[:11]]),
              "mask": np.r_[np.ones(21), np.zeros(11)],
              "label": np.arange(16, 48)}]
  emb, rows = embed.embed_batches(model, params, mesh, batches)
  np.testing.assert_allclose(emb, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(rows["label"], np.arange(37))
