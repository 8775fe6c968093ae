"""The train state pytree and the jitted train step.

The state is a plain dict: {'step': int32 scalar, 'params': ..., 'opt': ...}.
It is created directly in its target shardings (jit with out_shardings), so no
device ever holds an unsharded copy of FSDP-sharded parameters.

The step is split into the pieces exact contrastive gradient accumulation
needs: `embed` (towers -> normalised embeddings for some examples) and
`contrastive_loss` (the loss over the whole global batch of embeddings). The
plain step differentiates their composition in one go.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from clip_jax import sharding as sharding_lib

METRIC_NAMES = ("loss", "logit_scale", "logit_bias", "grad_norm", "lr")


def init_params(model, config, rng):
  """Model params from dummy inputs shaped like one example."""
  size = config.model.image.image_size
  images = jnp.zeros((1, size, size, 3), jnp.float32)
  tokens = jnp.zeros((1, config.model.text.context_length), jnp.int32)
  return model.init(rng, images, tokens)["params"]


def param_shapes(model, config):
  """ShapeDtypeStructs of the params, without allocating them."""
  return jax.eval_shape(lambda: init_params(model, config, jax.random.key(0)))


def abstract_state(model, tx, config, mesh):
  """(ShapeDtypeStruct tree of the state, NamedSharding tree of the state)."""

  def init(rng):
    params = init_params(model, config, rng)
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt": tx.init(params)}

  shapes = jax.eval_shape(init, jax.random.key(0))
  shardings = sharding_lib.tree_shardings(shapes, mesh, config.sharding_rules)
  return shapes, shardings, init


def create_state(model, tx, config, mesh):
  """Initialises the state on the mesh, in its target shardings."""
  _, shardings, init = abstract_state(model, tx, config, mesh)
  rng = jax.random.key(config.seed)
  return jax.jit(init, out_shardings=shardings)(rng), shardings


def embed(model, params, batch, *, train: bool = True):
  """Normalised embeddings (zimg, ztxt) and {'logit_scale', 'logit_bias'}."""
  return model.apply({"params": params}, batch["image"], batch["text"],
                     train=train)


def contrastive_loss(loss_fn, zimg, ztxt, out, mesh):
  bias = out.get("logit_bias")
  return loss_fn(zimg, ztxt, out["logit_scale"],
                 jnp.zeros((), jnp.float32) if bias is None else bias,
                 mesh=mesh)


def make_train_step(model, tx, loss_fn, schedule, mesh, state_shardings,
                    *, max_log_logit_scale: float | None):
  """Returns step(state, batch) -> (state, metrics), jitted and donating."""

  def loss_of_params(params, batch):
    zimg, ztxt, out = embed(model, params, batch, train=True)
    loss = contrastive_loss(loss_fn, zimg, ztxt, out, mesh)
    return loss, out

  def step(state, batch):
    (loss, out), grads = jax.value_and_grad(loss_of_params, has_aux=True)(
        state["params"], batch)
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    if max_log_logit_scale is not None:
      # CLIP clamps the stored log-scale after the update (not in the
      # forward pass), so gradients still flow when it sits at the cap.
      params = {**params, "logit_scale": jnp.minimum(
          params["logit_scale"], max_log_logit_scale)}
    bias = out.get("logit_bias")
    metrics = {
        "loss": loss,
        "logit_scale": out["logit_scale"],
        "logit_bias": jnp.nan if bias is None else bias,
        "grad_norm": optax.tree.norm(grads),
        "lr": schedule(state["step"]),
    }
    metrics = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32),
                                     metrics)
    return {"step": state["step"] + 1, "params": params, "opt": opt}, metrics

  return jax.jit(
      step,
      in_shardings=(state_shardings, sharding_lib.batch_sharding(mesh)),
      out_shardings=(state_shardings, sharding_lib.replicated(mesh)),
      donate_argnums=(0,))
