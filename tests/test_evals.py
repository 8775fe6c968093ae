"""Zero-shot, retrieval and embedding against answers known in closed form,
worked out by hand, or computed by a brute-force NumPy reference."""

import functools

import closed_form  # tests/closed_form.py: toy towers
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from clip_jax import sharding as sharding_lib
from clip_jax.evals import embed, retrieval, templates, zeroshot
from clip_jax.models import two_towers

D = 8


def _basis(k, d=D):
  e = np.zeros(d, np.float32)
  e[k] = 1.0
  return e


NAMES = ["cat", "dog", "emu", "fox", "gnu", "owl"]


def _toy_text_embedder(class_names):
  """Any template of class k embeds to e_k plus a template-specific tilt
  along the last axis (so averaging is not trivial), never changing which
  class an image e_j is closest to."""
  def embed_texts(texts):
    out = []
    for text in texts:
      k = next(i for i, name in enumerate(class_names)
               if f" {name}" in f" {text}")
      out.append(3 * _basis(k) + 0.1 * len(text) / 30 * _basis(D - 1))
    return np.stack(out)
  return embed_texts


def _classifier():
  return zeroshot.classifier(_toy_text_embedder(NAMES), NAMES, "short")


def _brute_force_ranks(queries, keys, targets):
  """Position of targets[q] in a stable descending sort: the tie rule."""
  scores = queries.astype(np.float64) @ keys.T.astype(np.float64)
  order = np.argsort(-scores, axis=1, kind="stable")
  return np.argmax(order == np.asarray(targets)[:, None], axis=1) + 1


# ------------------------------------------------------------- templates ----


def test_template_sets():
  clip = templates.get_templates("clip_imagenet")
  assert len(clip) == 80 and len(set(clip)) == 80
  assert "a photo of a {}." in clip and "itap of my {}." in clip
  assert set(templates.get_templates("clip_imagenet_7")) <= set(clip)
  assert templates.get_templates("none") == ["{}"]
  for name in templates.TEMPLATES:
    assert all(t.count("{}") == 1 for t in templates.get_templates(name))
  assert templates.get_templates(["{} x"]) == ["{} x"]
  with pytest.raises(ValueError, match="Unknown template set 'imagenett'.*"
                     "clip_imagenet, clip_imagenet_7, emoji, none, short"):
    templates.get_templates("imagenett")
  assert templates.get_templates("imagenet") == clip  # An alias.
  for bad in (["no slot"], ["{} and {}"], ["{0}"], []):
    with pytest.raises(ValueError):
      templates.get_templates(bad)


# -------------------------------------------------------------- zero-shot ----


def test_perfect_permuted_and_confused_accuracy():
  weights = _classifier()
  labels = np.repeat(np.arange(6), 5)
  images = np.stack([_basis(k) for k in labels])
  assert zeroshot.evaluate_zeroshot(images, labels, weights)["top1"] == 1.0
  permuted = zeroshot.evaluate_zeroshot(images, (labels + 1) % 6, weights,
                                        topk=(1,))
  assert permuted["top1"] == 0.0
  # Images of class 3 embedded as class 5 for 2 of their 5 examples.
  confused = images.copy()
  confused[[15, 16]] = _basis(5)
  result = zeroshot.evaluate_zeroshot(confused, labels, weights,
                                      per_class=True)
  assert result["top1"] == pytest.approx(28 / 30)
  np.testing.assert_allclose(result["per_class"], [1, 1, 1, 3 / 5, 1, 1])
  assert result["mean_per_class"] == pytest.approx((5 + 3 / 5) / 6)
  assert result["num_images"] == 30


def test_top5_on_a_constructed_ranking():
  # 8 classes on the axes; the image scores class j as s[j]. Label at
  # rank r: s sorted descending is 8, 7, ..., 1 over classes `order`.
  weights = np.eye(D, dtype=np.float32)
  order = [6, 2, 7, 0, 4, 1, 5, 3]           # classes from best to worst
  s = np.zeros(D, np.float32)
  s[order] = np.arange(D, 0, -1)
  image = s / np.linalg.norm(s)
  for rank, label in enumerate(order, start=1):
    r = zeroshot.evaluate_zeroshot(image[None], [label], weights,
                                   topk=(1, 2, 5, 8))
    assert r == {"top1": float(rank <= 1), "top2": float(rank <= 2),
                 "top5": float(rank <= 5), "top8": 1.0, "num_images": 1}
  assert zeroshot.topk_predictions(image[None], weights, 5).tolist() == [
      order[:5]]


def test_ties_break_towards_lower_class_index():
  weights = np.stack([_basis(k) for k in range(6)])
  # Equal similarity to classes 2 and 4: the prediction is 2, then 4.
  image = ((_basis(2) + _basis(4)) / np.sqrt(2))[None]
  assert zeroshot.topk_predictions(image, weights, 2).tolist() == [[2, 4]]
  assert zeroshot.evaluate_zeroshot(image, [2], weights)["top1"] == 1.0
  r = zeroshot.evaluate_zeroshot(image, [4], weights, topk=(1, 2))
  assert (r["top1"], r["top2"]) == (0.0, 1.0)
  # A zero image ties with every class: rank = label index + 1.
  zero = np.zeros((6, D), np.float32)
  np.testing.assert_array_equal(
      zeroshot.label_ranks(zero, np.arange(6), weights), np.arange(1, 7))


def test_ranks_match_a_stable_sort_on_data_with_many_ties():
  rng = np.random.default_rng(1)
  # Coarsely quantised embeddings: many exactly equal scores.
  keys = rng.integers(-1, 2, size=(40, 5)).astype(np.float32)
  queries = rng.integers(-1, 2, size=(75, 5)).astype(np.float32)
  labels = rng.integers(0, 40, size=75)
  want = _brute_force_ranks(queries, keys, labels)
  got = zeroshot.label_ranks(queries, labels, keys)
  np.testing.assert_array_equal(got, want)
  # And top-k from jax.lax.top_k agrees with the ranks.
  top5 = zeroshot.topk_predictions(queries, keys, 5)
  np.testing.assert_array_equal((top5 == labels[:, None]).any(axis=1),
                                want <= 5)
  r = zeroshot.evaluate_zeroshot(queries, labels, keys, topk=(1, 5, 10))
  for k in (1, 5, 10):
    assert r[f"top{k}"] == np.mean(want <= k)


def test_non_finite_embeddings_are_misses():
  weights = np.eye(4, dtype=np.float32)
  images = np.eye(4, dtype=np.float32)
  images[1] = np.nan
  r = zeroshot.evaluate_zeroshot(images, np.arange(4), weights,
                                 topk=(1, 4))
  assert r["top1"] == 0.75 and r["top4"] == 0.75


def test_labels_out_of_range_are_an_error():
  with pytest.raises(ValueError, match=r"targets must be in \[0, 3\)"):
    zeroshot.evaluate_zeroshot(np.eye(3), [0, 1, 3], np.eye(3))


def test_classifier_is_renormalised_mean_of_normalised_template_embeddings():
  rng = np.random.default_rng(0)
  table = {}
  calls = []

  def embed_texts(texts):
    calls.append(len(texts))
    return np.stack([table.setdefault(t, rng.normal(size=D)) for t in texts])

  names, temps = ["a", "b", "c"], ["x {}", "y {}", "z {}.", "{}"]
  # chunk_size 5 splits the 12 texts across template boundaries.
  weights = zeroshot.classifier(embed_texts, names, temps, chunk_size=5)
  assert calls == [5, 5, 2]
  assert weights.shape == (3, D) and weights.dtype == np.float32
  for c, name in enumerate(names):
    vs = [table[t.format(name)] for t in temps]
    mean = np.mean([v / np.linalg.norm(v) for v in vs], axis=0)
    np.testing.assert_allclose(weights[c], mean / np.linalg.norm(mean),
                               rtol=1e-6)


def test_template_sets_side_by_side():
  # With the bare name, class k's text embeds as class (k + 1) % 6; with
  # any other template it embeds correctly.
  def embed_texts(texts):
    out = []
    for text in texts:
      k = next(i for i, n in enumerate(NAMES) if f" {n}" in f" {text}")
      out.append(_basis((k + 1) % 6 if text in NAMES else k))
    return np.stack(out)

  labels = np.arange(6)
  images = np.eye(6, D, dtype=np.float32)
  r = zeroshot.run_zeroshot(images, labels, embed_texts, NAMES,
                            ["none", "short"], topk=(1,), per_class=True)
  assert r["none/top1"] == 0.0 and r["short/top1"] == 1.0
  assert r["none/mean_per_class"] == 0.0 and r["num_images"] == 6
  np.testing.assert_array_equal(r["short/per_class"], np.ones(6))
  # One set: unprefixed keys; a user list; {prefix: set}.
  assert zeroshot.run_zeroshot(images, labels, embed_texts, NAMES, "none",
                               topk=(1,)) == {"top1": 0.0, "num_images": 6}
  assert zeroshot.run_zeroshot(images, labels, embed_texts, NAMES,
                               ["a {}", "the {}"], topk=(1,))["top1"] == 1.0
  r = zeroshot.run_zeroshot(images, labels, embed_texts, NAMES,
                            {"mine": ["a {}"], "bare": "none"}, topk=(1,))
  assert (r["mine/top1"], r["bare/top1"]) == (1.0, 0.0)
  with pytest.raises(ValueError, match="mixes templates"):
    zeroshot.run_zeroshot(images, labels, embed_texts, NAMES,
                          ["none", "a {}"])
  with pytest.raises(ValueError, match="Unknown template set 'nope'"):
    zeroshot.run_zeroshot(images, labels, embed_texts, NAMES, ["none", "nope"])


# -------------------------------------------------------------- retrieval ----


def test_retrieval_with_several_captions_per_image():
  # 3 images on the axes; 5 captions: image 0 owns captions 0 and 1, image 1
  # owns caption 2, image 2 owns captions 3 and 4.
  images = np.stack([_basis(0), _basis(1), _basis(2)])
  captions = np.stack([
      _basis(1),                          # cap 0 (image 0) looks like image 1
      0.9 * _basis(0) + 0.1 * _basis(3),  # cap 1 (image 0) matches image 0
      _basis(1),                          # cap 2 (image 1)
      _basis(0),                          # cap 3 (image 2) looks like image 0
      0.5 * _basis(2),                    # cap 4 (image 2)
  ])
  owner = np.array([0, 0, 1, 2, 2])
  # Image queries (scores of captions 0..4):
  #   image 0: (0, .9, 0, 1, 0) -> order 3, 1, ...: first own caption (1)
  #            at rank 2.
  #   image 1: (1, 0, 1, 0, 0) -> caps 0 and 2 tie; the lower index (cap 0,
  #            not its own) first -> rank 2.
  #   image 2: (0, 0, 0, 0, .5) -> cap 4 first -> rank 1.
  # i2t ranks (2, 2, 1): r@1 = 1/3, r@2 = 1, mean 5/3, median 2.
  # Caption queries (scores of images 0..2):
  #   cap 0: (0, 1, 0)  -> image 1 first, own image 0 next  -> rank 2;
  #   cap 1: (.9, 0, 0) -> own image 0 first               -> rank 1;
  #   cap 2: (0, 1, 0)  -> own image 1 first               -> rank 1;
  #   cap 3: (1, 0, 0)  -> image 0; own image 2 ties with image 1 at 0
  #                        and comes after it (higher index) -> rank 3;
  #   cap 4: (0, 0, .5) -> own image 2 first               -> rank 1.
  # t2i ranks (2, 1, 1, 3, 1): r@1 = 3/5, r@2 = 4/5, mean 8/5, median 1.
  want = {"i2t/r@1": 1 / 3, "i2t/r@2": 1.0, "i2t/mean_rank": 5 / 3,
          "i2t/median_rank": 2.0, "t2i/r@1": 3 / 5, "t2i/r@2": 4 / 5,
          "t2i/mean_rank": 8 / 5, "t2i/median_rank": 1.0,
          "num_images": 3, "num_captions": 5}
  for chunk_size in (1024, 2):
    got = retrieval.recall_at_k(images, captions, owner, ks=(1, 2),
                                chunk_size=chunk_size)
    assert got.keys() == want.keys()
    for key, value in want.items():
      assert got[key] == pytest.approx(value), key


def test_retrieval_images_without_captions_are_not_queries():
  images = np.eye(3, dtype=np.float32)
  captions = np.eye(3, dtype=np.float32)[[0, 2]]
  r = retrieval.recall_at_k(images, captions, [0, 2], ks=(1,))
  assert r["num_images"] == 2 and r["i2t/r@1"] == 1.0
  assert r["t2i/r@1"] == 1.0


def test_retrieval_matches_brute_force_with_ties():
  rng = np.random.default_rng(2)
  images = rng.integers(-1, 2, size=(30, 4)).astype(np.float32)
  owner = np.sort(rng.integers(0, 30, size=70))
  captions = rng.integers(-1, 2, size=(70, 4)).astype(np.float32)
  i2t, t2i = retrieval.ranks(images, captions, owner, chunk_size=8)
  np.testing.assert_array_equal(t2i, _brute_force_ranks(captions, images,
                                                        owner))
  # i2t reference: position of the first own caption in a stable sort.
  scores = images.astype(np.float64) @ captions.T.astype(np.float64)
  order = np.argsort(-scores, axis=1, kind="stable")
  ref = [np.argmax(owner[order[i]] == i) + 1 for i in range(30)
         if (owner == i).any()]
  np.testing.assert_array_equal(i2t, ref)


# -------------------------------------------------------- embedding on mesh --


def _tiny_model():
  config = ml_collections.ConfigDict(dict(
      embed_dim=8, logit_scale_init=10.0, logit_scale_max=None,
      logit_bias_init=None, dtype="float32", activation="gelu", remat=False,
      scan=False,
      image=dict(variant="mu", image_size=8, pool="cls", patch_size=4),
      text=dict(variant="mu", vocab_size=20, context_length=4, pool="eos",
                causal=True, eos_id=1, pad_id=0)))
  model = two_towers.build_model(config)
  # Random params of the right shapes, without compiling model.init.
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 8, 8, 3)),
                          jnp.zeros((1, 4), jnp.int32))["params"]
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
      lambda s: (0.3 * rng.normal(size=s.shape)).astype(s.dtype), shapes)
  return model, params


def _mesh():
  return sharding_lib.make_mesh(ml_collections.ConfigDict(
      dict(data=4, fsdp=2)))


def test_embedding_pads_the_last_batch_and_drops_the_padding():
  model, params = _tiny_model()
  mesh = _mesh()
  encode = embed.make_encode_fn(model, mesh, "image")
  images = np.random.default_rng(0).normal(size=(37, 8, 8, 3)).astype(
      np.float32)
  want = np.asarray(jax.jit(functools.partial(
      model.apply, method=model.encode_image))({"params": params}, images))
  got = embed.embed_arrays(encode, params, mesh, images, batch_size=16)
  assert got.shape == (37, 8)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # Eval batches of 16 with a mask (the reader padded the last batch with
  # 11 rows), plus a batch of 6 real rows not divisible by the 8 devices:
  # padded rows are dropped, real rows kept once, in order.
  batches = [
      {"image": images[:16], "mask": np.ones(16), "label": np.arange(16),
       "captions": [[str(i)] for i in range(16)]},
      {"image": np.concatenate([images[16:31], np.zeros((1, 8, 8, 3))]),
       "mask": np.r_[np.ones(15), 0.0], "label": np.arange(16, 32),
       "captions": [[str(i)] for i in range(16, 32)]},
      {"image": np.zeros((16, 8, 8, 3)), "mask": np.zeros(16),
       "label": -np.ones(16)},                       # All padding.
      {"image": images[31:37], "mask": np.ones(6), "label": np.arange(31, 37),
       "captions": [[str(i)] for i in range(31, 37)], "num_skipped": [0, 1]},
  ]
  emb, rows = embed.embed_batches(encode, params, mesh, batches)
  np.testing.assert_allclose(emb, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(rows["label"], np.arange(37))
  assert rows["captions"] == [[str(i)] for i in range(37)]
  assert rows["num_skipped"] == 1


@pytest.mark.parametrize("batch_size", [1, 5, 16, 64])
def test_every_example_is_embedded_once_in_order(batch_size):
  model, mesh = closed_form.ClosedFormTowers(dim=8), _mesh()
  encode = embed.make_encode_fn(model, mesh, "image")
  classes = np.random.default_rng(batch_size).integers(0, 7, size=37)
  images = np.stack([closed_form.solid_image(k) for k in classes]) / 255.0
  images = ((images - closed_form.CLIP_MEAN_R) / closed_form.CLIP_STD_R).astype(
      np.float32)
  got = embed.embed_arrays(encode, {}, mesh, images, batch_size=batch_size)
  np.testing.assert_array_equal(got, np.eye(8)[classes])


def test_text_embedder_batches_and_pads():
  model, mesh = closed_form.ClosedFormTowers(dim=8), _mesh()
  tokenize = closed_form.tokenize_fn(NAMES)
  texts = [t.format(n) for t in templates.get_templates("short")
           for n in NAMES][:13]
  embed_texts = embed.text_embedder(
      embed.make_encode_fn(model, mesh, "text"), {}, mesh, tokenize,
      batch_size=8)
  got = embed_texts(texts)
  want = model.apply({"params": {}}, tokenize(texts),
                     method=model.encode_text)
  assert got.shape == (13, 8)
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_rows_mode_on_a_shuffled_mesh_keeps_input_order():
  """A process that holds only some rows of each batch ('image_rows', in
  any order) and failed to decode one ('image_mask' 0): embeddings come
  back in input order, the failed row dropped and counted, labels paired."""
  model, params = _tiny_model()
  order = (5, 2, 7, 0, 3, 6, 1, 4)
  mesh = sharding_lib.make_mesh(
      ml_collections.ConfigDict(dict(data=4, fsdp=2)),
      devices=[jax.devices()[i] for i in order])
  encode = embed.make_encode_fn(model, mesh, "image")
  rng = np.random.default_rng(1)
  images = rng.normal(size=(27, 8, 8, 3)).astype(np.float32)
  want = np.asarray(jax.jit(functools.partial(
      model.apply, method=model.encode_image))({"params": params}, images))
  batches = []
  for start in (0, 16):  # Batches of 16; the second has 11 real rows.
    real = min(16, 27 - start)
    rows = rng.permutation(16)
    padded = np.concatenate([images[start:start + real],
                             np.zeros((16 - real, 8, 8, 3), np.float32)])
    ok = np.ones(16, np.float32)
    if start == 16:
      ok[rows == 4] = 0.0  # Global row 20 could not be decoded.
    batches.append({"image": padded[rows], "image_rows": rows,
                    "image_mask": ok, "label": start + np.arange(16),
                    "mask": (np.arange(16) < real).astype(np.float32),
                    "num_skipped": np.zeros(16, np.int32)})
  emb, rows = embed.embed_batches(encode, params, mesh, batches)
  kept = np.r_[0:20, 21:27]
  np.testing.assert_allclose(emb, want[kept], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(rows["label"], kept)
  assert rows["num_skipped"] == 1
  assert set(rows) == {"label", "num_skipped"}
