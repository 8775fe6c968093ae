"""uint8 images to the device, normalised by the model: the same values as
the host-normalised float32 images, a quarter of the bytes."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from clip_jax import losses
from clip_jax.data import pipeline, transforms
from clip_jax.models import two_towers

SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)


def _model_config():
  return ml_collections.ConfigDict(dict(
      embed_dim=8, logit_scale_init=10.0, logit_scale_max=None,
      logit_bias_init=None, dtype="float32", activation="gelu", remat=False,
      scan=False,
      image=dict(variant="mu", image_size=8, pool="cls", patch_size=4),
      text=dict(variant="mu", vocab_size=20, context_length=4, pool="eos",
                causal=True, eos_id=1, pad_id=0)))


def _params(model, images, tokens):
  """Random params of the right shapes, without compiling model.init."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), images,
                          tokens)["params"]
  rng = np.random.default_rng(0)
  return jax.tree_util.tree_map(
      lambda s: (0.3 * rng.normal(size=s.shape)).astype(s.dtype), shapes)


@pytest.mark.parametrize("mean, std", [(transforms.CLIP_MEAN,
                                        transforms.CLIP_STD),
                                       (SIGLIP_MEAN, SIGLIP_STD)])
def test_device_normalisation_equals_the_host_formula(mean, std):
  # Every value in every channel.
  pixels = np.tile(np.arange(256, dtype=np.uint8)[:, None], (1, 3))
  host = transforms.normalize(pixels, mean, std)
  device = jax.jit(functools.partial(two_towers.normalize_pixels, mean=mean,
                                     std=std))(pixels)
  assert device.dtype == jnp.float32
  # Against float64: the host's two roundings and the device's (XLA may
  # fuse into one multiply-add) are both within float32 rounding of it ...
  exact = (pixels / 255.0 - np.asarray(mean)) / np.asarray(std)
  one_rounding = np.spacing(np.float32(np.abs(exact).max()))
  np.testing.assert_allclose(host, exact, rtol=0, atol=3 * one_rounding)
  np.testing.assert_allclose(device, exact, rtol=0, atol=3 * one_rounding)
  # ... and of each other: at most one rounding apart.
  assert np.abs(np.asarray(device) - host).max() <= one_rounding


def test_model_on_uint8_equals_model_on_normalised_floats():
  model = two_towers.build_model(_model_config(),
                                 pixel_mean=transforms.CLIP_MEAN,
                                 pixel_std=transforms.CLIP_STD)
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, size=(16, 8, 8, 3), dtype=np.uint8)
  tokens = rng.integers(2, 20, size=(16, 4)).astype(np.int32)
  params = {"params": _params(model, pixels, tokens)}
  apply = jax.jit(model.apply)
  from_uint8 = apply(params, pixels, tokens)
  from_float = apply(params, transforms.normalize(pixels), tokens)
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
      from_uint8, from_float)
  # Control: other statistics give other embeddings.
  siglip = two_towers.build_model(_model_config(), pixel_mean=SIGLIP_MEAN,
                                  pixel_std=SIGLIP_STD)
  other = jax.jit(siglip.apply)(params, pixels, tokens)
  assert not np.allclose(other[0], from_float[0], atol=1e-3)
  # A model built without statistics refuses uint8, names the fix.
  plain = two_towers.build_model(_model_config())
  with pytest.raises(ValueError, match=r"build_run_model\(config\)"):
    plain.apply(params, pixels, tokens)
  with pytest.raises(ValueError, match="both pixel_mean and pixel_std"):
    two_towers.build_model(_model_config(), pixel_mean=SIGLIP_MEAN)


def _pipeline_batches(**overrides):
  c = pipeline.default_data_config()
  c.update(source="synthetic", synthetic_size=48, image_size=8,
           context_length=4, vocab_size=20, style_strength=0.5,
           random_resized_crop=(0.5, 1.0), **overrides)
  with pipeline.make_dataset(c, split="train", batch_size_per_process=16,
                             seed=0, tokenizer=None) as iterator:
    return [next(iterator) for _ in range(3)]


def test_pipeline_ships_the_same_pixels_as_uint8():
  floats = _pipeline_batches(uint8_images=False)
  uint8s = _pipeline_batches(uint8_images=True)
  for f, u in zip(floats, uint8s):
    assert u["image"].dtype == np.uint8 and f["image"].dtype == np.float32
    assert u["image"].nbytes * 4 == f["image"].nbytes
    np.testing.assert_array_equal(transforms.normalize(u["image"]),
                                  f["image"])
    np.testing.assert_array_equal(u["text"], f["text"])


def test_loss_gradients_on_uint8_equal_the_float_ones():
  """What the train step differentiates (train_state.embed + the loss) on a
  uint8 pipeline batch equals the same on its host-normalised floats."""
  model = two_towers.build_model(_model_config(),
                                 pixel_mean=transforms.CLIP_MEAN,
                                 pixel_std=transforms.CLIP_STD)
  batch = _pipeline_batches(uint8_images=True)[0]
  params = _params(model, batch["image"][:1], batch["text"][:1])
  loss_fn = losses.get_loss("softmax")

  def loss(params, image):
    zimg, ztxt, out = model.apply({"params": params}, image, batch["text"])
    return loss_fn(zimg, ztxt, out["logit_scale"], None)

  grad = jax.jit(jax.value_and_grad(loss))
  floats = transforms.normalize(batch["image"])
  (value8, grads8) = grad(params, batch["image"])
  (value, grads) = grad(params, floats)
  assert float(value8) == pytest.approx(float(value), rel=1e-6)
  # Equal to float32 precision (the device may round the normalisation
  # once where the host rounds twice, and fuses it into the patch
  # embedding): within 1e-5 of the gradient's scale. Control: SigLIP's
  # statistics instead of CLIP's move it by orders of magnitude more.
  flat = lambda tree: np.concatenate(
      [np.ravel(x) for x in jax.tree_util.tree_leaves(tree)])
  scale = np.abs(flat(grads)).max()
  assert np.abs(flat(grads8) - flat(grads)).max() <= 1e-5 * scale
  (_, grads_siglip) = grad(params, transforms.normalize(
      batch["image"], SIGLIP_MEAN, SIGLIP_STD))
  assert np.abs(flat(grads_siglip) - flat(grads)).max() > 1e-2 * scale
