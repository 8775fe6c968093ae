"""A trained run as a Python object: embed images and texts, classify.

  import clip_jax
  model = clip_jax.load("runs/demo")             # latest checkpoint
  img = model.encode_image(["cat.png", "dog.png"])    # float32 [2, D], unit
  txt = model.encode_text(["a cat", "a dog"])         # float32 [2, D], unit
  probs = model.classify(["cat.png"], ["cat", "dog"], templates="imagenet")

Everything comes from the run's WORKDIR/config.json: the model, the
tokenizer (config.data.tokenizer, with its EOS policy and context length)
and the evaluation preprocessing (centre square, config.data.image_size,
mean/std), exactly as `python -m clip_jax.evaluate` and the training-time
evals see them. The parameters are placed on every device present, on a
('data', 'fsdp') = (all, 1) mesh, whatever mesh the run was trained on.

`classify` is zero-shot classification as evals/zeroshot.py computes it:
each class is its prompt ensemble (templates filled with the class name,
embeddings normalised, averaged, normalised); an image's logits are the
model's logit scale times its cosine similarity to each class. It returns
softmax probabilities over the classes given (their argmax is the
evaluator's top-1 prediction).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from clip_jax import config as config_lib


def restore_params(config, workdir: str, step: int | None, mesh=None):
  """(model, params on the mesh, mesh, step) of a run's checkpoint.

  step None = the latest; a step that was not saved is an error listing
  the steps that were. mesh None = config.mesh over all devices.
  """
  from clip_jax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from clip_jax import optim, train_state  # pylint: disable=g-import-not-at-top
  from clip_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from clip_jax.models import two_towers  # pylint: disable=g-import-not-at-top
  mesh = mesh or sharding_lib.make_mesh(config.mesh)
  model = two_towers.build_run_model(config)
  # The optimiser's state structure does not depend on the schedule's
  # length, so any length rebuilds the tree the run saved.
  tx, _ = optim.make_optimizer(config, train_state.param_shapes(model, config),
                               total_steps=1, warmup_steps=0)
  shapes, shardings, _ = train_state.abstract_state(model, tx, config, mesh)
  ckpt = checkpoint_lib.Checkpointer(workdir, every_steps=0, keep=10**6,
                                     async_save=False)
  try:
    available = sorted(ckpt.manager.all_steps())
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(
          f"No checkpoint in {ckpt.directory}; train first or pass a "
          "workdir that has checkpoints.")
    if step not in available:
      raise FileNotFoundError(
          f"No checkpoint of step {step} in {ckpt.directory}; steps saved: "
          f"{', '.join(map(str, available))} (default: the latest).")
    state = ckpt.restore(
        step, checkpoint_lib.abstract_with_shardings(shapes, shardings))
  finally:
    ckpt.close()
  return model, state["params"], mesh, step


def load_run_config(workdir: str):
  """The config a run saved, with a clear error if there is none."""
  if not os.path.isfile(os.path.join(workdir, "config.json")):
    raise FileNotFoundError(
        f"{workdir!r} has no config.json: not a clip_jax run directory "
        "(give the --workdir a training run wrote).")
  return config_lib.load(workdir)


class Model:
  """A restored run (see the module docstring); build with `load`."""

  def __init__(self, config, model, params, mesh, step: int, workdir: str,
               batch_size: int = 256):
    from clip_jax.evals import embed, run  # pylint: disable=g-import-not-at-top
    self.config, self.model, self.params = config, model, params
    self.mesh, self.step, self.workdir = mesh, step, workdir
    self.batch_size = batch_size
    self._image_fn = embed.make_encode_fn(model, mesh, "image")
    self._text_fn = embed.make_encode_fn(model, mesh, "text")
    self.tokenize = run.tokenize_fn(config.data)

  def __repr__(self):
    return (f"clip_jax.Model({self.workdir!r}, step={self.step}, "
            f"embed_dim={self.config.model.embed_dim})")

  def preprocess(self, images) -> np.ndarray:
    """float32 [n, S, S, 3] model inputs from paths, encoded bytes or
    uint8 [H, W, 3] arrays (one of them, or a list)."""
    from clip_jax.data import transforms  # pylint: disable=g-import-not-at-top
    from clip_jax.evals import readers  # pylint: disable=g-import-not-at-top
    data = self.config.data
    out = []
    for image in _as_list(images):
      if isinstance(image, (str, os.PathLike)) and not os.path.isfile(image):
        raise FileNotFoundError(f"Image {os.fspath(image)!r} not found.")
      pixels = transforms.preprocess_image(
          readers._read_image(image), data.image_size,  # pylint: disable=protected-access
          eval_resize=data.get("eval_resize") or "center_square")
      out.append(transforms.normalize(pixels, tuple(data.mean),
                                      tuple(data.std)))
    return np.stack(out)

  def encode_image(self, images) -> np.ndarray:
    """float32 [n, D] unit-norm embeddings of images (see `preprocess`).

    Decoded batch_size images at a time, so a long list of paths never
    sits in memory as pixels.
    """
    from clip_jax.evals import embed  # pylint: disable=g-import-not-at-top
    images = _as_list(images)
    if not images:
      raise ValueError("encode_image() got no images.")
    return np.concatenate([
        embed.embed_arrays(self._image_fn, self.params, self.mesh,
                           self.preprocess(images[i:i + self.batch_size]),
                           batch_size=self.batch_size)
        for i in range(0, len(images), self.batch_size)])

  def encode_text(self, texts) -> np.ndarray:
    """float32 [n, D] unit-norm embeddings of a list of strings."""
    from clip_jax.evals import embed  # pylint: disable=g-import-not-at-top
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
      raise ValueError("encode_text() got no texts.")
    return embed.text_embedder(self._text_fn, self.params, self.mesh,
                               self.tokenize,
                               batch_size=self.batch_size)(texts)

  @property
  def logit_scale(self) -> float:
    """The learned multiplier of cosine similarities (exp of the param)."""
    import jax  # pylint: disable=g-import-not-at-top
    return float(np.exp(jax.device_get(self.params["logit_scale"])))

  def class_weights(self, class_names: Sequence[str],
                    templates="none") -> np.ndarray:
    """float32 [C, D]: the zero-shot classifier (prompt ensembles)."""
    from clip_jax.evals import zeroshot  # pylint: disable=g-import-not-at-top
    return zeroshot.classifier(self.encode_text, list(class_names),
                               templates)

  def classify(self, images, class_names: Sequence[str],
               templates="none") -> np.ndarray:
    """float32 [n, C] softmax probabilities of each class for each image.

    templates: a template-set name or alias ('imagenet', 'emoji', 'none'),
    or a list of '{}' templates.
    """
    class_names = list(class_names)
    if not class_names:
      raise ValueError("classify() needs at least one class name.")
    weights = self.class_weights(class_names, templates)
    logits = self.logit_scale * (self.encode_image(images) @ weights.T)
    logits = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    return (probs / probs.sum(axis=1, keepdims=True)).astype(np.float32)


def _as_list(images) -> list:
  if isinstance(images, (str, bytes, os.PathLike)):
    return [images]
  if isinstance(images, np.ndarray) and images.ndim == 3:
    return [images]
  return list(images)


def load(workdir: str, *, step: int | None = None,
         batch_size: int = 256) -> Model:
  """A run's checkpoint (latest, or `step`) as a `Model`.

  The parameters are replicated over every device present (a data-parallel
  mesh), so a run trained on a pod loads on a laptop and vice versa.
  """
  import jax  # pylint: disable=g-import-not-at-top

  from clip_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  config = load_run_config(workdir)
  config.mesh.data, config.mesh.fsdp = -1, 1
  mesh = sharding_lib.make_mesh(config.mesh, jax.devices())
  model, params, mesh, step = restore_params(config, workdir, step, mesh)
  return Model(config, model, params, mesh, step, workdir,
               batch_size=batch_size)
