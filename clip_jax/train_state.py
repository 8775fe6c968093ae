"""The train state pytree and the jitted train step.

The state is a plain dict: {'step': int32 scalar, 'params': ..., 'opt': ...}.
It is created directly in its target shardings (jit with out_shardings), so no
device ever holds an unsharded copy of FSDP-sharded parameters. The params
follow `config.sharding_rules`; every optimiser-state leaf that mirrors a
param (Adam's moments) gets that param's sharding, other leaves (counts) are
replicated.

`state['step']` counts batches consumed, skipped (non-finite) ones included:
the loop, the checkpoints, the data-iterator state and the eval schedule all
key on it, and every process agrees on it. The optimiser's own counts (Adam's
bias correction, the lr schedule) count applied updates only, so a skipped
step changes nothing but the counters (see optim.py).

Gradient accumulation (`accum_steps = k > 1`) splits the global batch into k
micro-batches, each spread over all devices (`split_microbatches`):
  'exact'  GradCache / open_clip's accum_freq: embed every micro-batch without
           gradient, take the loss and its gradient w.r.t. (zimg, ztxt,
           logit_scale, logit_bias) on the whole global batch, then re-run
           each micro-batch under jax.vjp with its slice of the embedding
           gradient and sum the parameter gradients. The gradient is that of
           the full-batch loss; only one micro-batch's activations are alive.
  'naive'  each micro-batch's own loss (its own negatives only), losses and
           gradients averaged over micro-batches: the ablation baseline.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from clip_jax import optim
from clip_jax import sharding as sharding_lib

METRIC_NAMES = ("loss", "logit_scale", "logit_bias", "grad_norm", "lr",
                "train/nonfinite_steps", "train/nonfinite_consecutive")
ACCUM_MODES = ("exact", "naive")
# Params the loss uses directly (not through the embeddings).
SCALAR_PARAMS = ("logit_scale", "logit_bias")


def init_params(model, config, rng):
  """Model params from dummy inputs shaped like one example."""
  size = config.model.image.image_size
  images = jnp.zeros((1, size, size, 3), jnp.float32)
  tokens = jnp.zeros((1, config.model.text.context_length), jnp.int32)
  return model.init(rng, images, tokens)["params"]


def param_shapes(model, config):
  """ShapeDtypeStructs of the params, without allocating them."""
  return jax.eval_shape(lambda: init_params(model, config, jax.random.key(0)))


def opt_shardings(tx, opt_shapes, param_shardings, mesh):
  """Each optimiser-state leaf that mirrors a param gets its sharding.

  optax.tree_map_params finds those leaves from the transformation itself
  (whatever their path, so path regexes like '^img/' cannot miss them);
  every other leaf (step counts, non-finite counters) is replicated.
  """
  replicated = sharding_lib.replicated(mesh)

  def masked(x):  # A frozen param's empty place (optax.multi_transform).
    return isinstance(x, optax.MaskedNode)

  return optax.tree_utils.tree_map_params(
      tx, lambda leaf, sharding: leaf if masked(leaf) else sharding,
      opt_shapes, param_shardings,
      transform_non_params=lambda _: replicated, is_leaf=masked)


def check_flat_optimizer_replicated(param_shardings) -> None:
  """config.adam.flatten keeps one replicated flat state: refuse sharded
  params, whose shards the flat vector would gather on every device."""
  sharded = [optim.path_str(path) for path, s in
             jax.tree_util.tree_flatten_with_path(param_shardings)[0]
             if not s.is_fully_replicated]
  if sharded:
    raise ValueError(
        f"config.adam.flatten=True needs fully replicated params, but "
        f"config.sharding_rules shard {len(sharded)} of them (e.g. "
        f"{', '.join(sharded[:3])}); set config.adam.flatten=False or "
        "replicate every param (sharding_rules=(('.*', 'replicate'),)).")


def abstract_state(model, tx, config, mesh):
  """(ShapeDtypeStruct tree of the state, NamedSharding tree of the state)."""

  def init(rng):
    params = init_params(model, config, rng)
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt": tx.init(params)}

  shapes = jax.eval_shape(init, jax.random.key(0))
  params = sharding_lib.tree_shardings(shapes["params"], mesh,
                                       config.sharding_rules)
  if optim.flattens(config):  # One flat, replicated mu / nu.
    check_flat_optimizer_replicated(params)
    opt = jax.tree_util.tree_map(
        lambda _: sharding_lib.replicated(mesh), shapes["opt"])
  else:
    opt = opt_shardings(tx, shapes["opt"], params, mesh)
  shardings = {"step": sharding_lib.replicated(mesh), "params": params,
               "opt": opt}
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


def scalars(model, params):
  """{'logit_scale', 'logit_bias'} as the model computes them from params."""
  return model.apply({"params": params}, None, None)[2]


def contrastive_loss(loss_fn, zimg, ztxt, out, mesh):
  bias = out.get("logit_bias")
  return loss_fn(zimg, ztxt, out["logit_scale"],
                 jnp.zeros((), jnp.float32) if bias is None else bias,
                 mesh=mesh)


def split_microbatches(x, accum_steps: int, mesh):
  """[B, ...] batch-sharded -> [k, B/k, ...], micro-batch axis unsharded.

  Micro-batch i is the i-th of k equal slices of EVERY device's rows, so each
  micro-batch is spread over all devices and the split moves no data: [B] ->
  [D, k, B/(D k)] (D = devices, row block d on device d) -> swap the first
  two axes -> [k, B/k]. Its global row order is a permutation of the batch's.
  """
  devices, rows = mesh.size, x.shape[0]
  if rows % (devices * accum_steps):
    raise ValueError(
        f"A batch of {rows} rows over {devices} devices ({rows / devices:g} "
        f"per device) cannot be split into accum_steps={accum_steps} "
        "micro-batches; make accum_steps divide the per-device batch.")
  axes = tuple(mesh.axis_names)
  x = x.reshape(devices, accum_steps, rows // (devices * accum_steps),
                *x.shape[1:])
  x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(axes)))
  x = jnp.swapaxes(x, 0, 1).reshape(accum_steps, rows // accum_steps,
                                    *x.shape[3:])
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, axes)))


def merge_microbatches(x, mesh):
  """The inverse of split_microbatches: [k, B/k, ...] -> [B, ...]."""
  devices, (accum_steps, rows) = mesh.size, x.shape[:2]
  axes = tuple(mesh.axis_names)
  x = x.reshape(accum_steps, devices, rows // devices, *x.shape[2:])
  x = jnp.swapaxes(x, 0, 1).reshape(accum_steps * rows, *x.shape[3:])
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(axes)))


def _tree_add(a, b):
  return jax.tree_util.tree_map(jnp.add, a, b)


def stop_frozen_gradients(params, frozen):
  """`params` with lax.stop_gradient on the leaves `frozen` marks (a tree
  of Python bools, or None): their gradient is 0 and XLA drops the
  backward pass that only they need (a locked tower's)."""
  if frozen is None:
    return params
  return jax.tree_util.tree_map(
      lambda p, f: jax.lax.stop_gradient(p) if f else p, params, frozen)


def keep_frozen(new_params, old_params, frozen):
  """The frozen leaves of `old_params` exactly (a zero update would turn
  -0.0 into +0.0), the others of `new_params`."""
  if frozen is None:
    return new_params
  return jax.tree_util.tree_map(lambda n, o, f: o if f else n, new_params,
                                old_params, frozen)


def make_loss_and_grads(model, loss_fn, mesh, param_shardings, *,
                        accum_steps: int = 1, accum_mode: str = "exact",
                        frozen=None):
  """Returns f(params, batch) -> (loss, grads) for the given accumulation.

  The model has no dropout or other randomness (its apply takes no rngs), so
  the embedding pass and the back-propagation pass compute the same function;
  a model with dropout would have to get the same rng in both passes.
  `frozen` (optim.frozen_mask, or None): those parameters' gradients are 0.
  """
  if accum_mode not in ACCUM_MODES:
    raise ValueError(f"accum_mode={accum_mode!r} is not one of {ACCUM_MODES}.")
  if accum_steps < 1:
    raise ValueError(f"accum_steps={accum_steps} must be >= 1.")

  def loss_of_params(params, batch):
    params = stop_frozen_gradients(params, frozen)
    zimg, ztxt, out = embed(model, params, batch, train=True)
    return contrastive_loss(loss_fn, zimg, ztxt, out, mesh)

  if accum_steps == 1:  # Today's program: one forward and backward, no scan.
    return jax.value_and_grad(loss_of_params)

  def zero_grads(params):
    return jax.lax.with_sharding_constraint(
        jax.tree_util.tree_map(jnp.zeros_like, params), param_shardings)

  def naive(params, batch):
    micro = jax.tree_util.tree_map(
        lambda x: split_microbatches(x, accum_steps, mesh), batch)

    def one(total, batch_i):
      return _tree_add(total, jax.value_and_grad(loss_of_params)(
          params, batch_i)), None

    (loss, grads), _ = jax.lax.scan(
        one, (jnp.zeros((), jnp.float32), zero_grads(params)), micro)
    return jax.tree_util.tree_map(lambda x: x / accum_steps, (loss, grads))

  def exact(params, batch):
    micro = jax.tree_util.tree_map(
        lambda x: split_microbatches(x, accum_steps, mesh), batch)

    def towers(params, batch_i):
      params = stop_frozen_gradients(params, frozen)
      return embed(model, params, batch_i, train=True)[:2]

    # 1. Embeddings of every micro-batch; no gradient, so nothing is kept.
    _, (zimgs, ztxts) = jax.lax.scan(
        lambda _, batch_i: (None, towers(params, batch_i)), None, micro)
    # Back in the global batch's row order (a local transpose on each
    # device). The loss would not care: it is invariant to any permutation
    # applied to both modalities alike, since pairs stay row-aligned.
    zimg = merge_microbatches(zimgs, mesh)
    ztxt = merge_microbatches(ztxts, mesh)

    # 2. The full-batch loss and its gradient w.r.t. the embeddings and the
    # scale / bias params (the existing sharded loss, unchanged).
    def loss_of(zimg, ztxt, scalar_params):
      out = scalars(model, stop_frozen_gradients(
          {**params, **scalar_params}, frozen))
      return contrastive_loss(loss_fn, zimg, ztxt, out, mesh)

    scalar_params = {k: params[k] for k in SCALAR_PARAMS if k in params}
    loss, (dzimg, dztxt, dscalars) = jax.value_and_grad(
        loss_of, argnums=(0, 1, 2))(zimg, ztxt, scalar_params)

    # 3. Back-propagate each micro-batch's slice of the embedding gradient.
    def backprop(total, inputs):
      batch_i, dzimg_i, dztxt_i = inputs
      _, vjp = jax.vjp(lambda p: towers(p, batch_i), params)
      return _tree_add(total, vjp((dzimg_i, dztxt_i))[0]), None

    grads, _ = jax.lax.scan(
        backprop, zero_grads(params),
        (micro, split_microbatches(dzimg, accum_steps, mesh),
         split_microbatches(dztxt, accum_steps, mesh)))
    # The towers do not use scale / bias: their gradients are the full-batch
    # loss's, once (open_clip multiplies them by the accumulation count).
    return loss, {**grads, **_tree_add(
        {k: grads[k] for k in dscalars}, dscalars)}

  return exact if accum_mode == "exact" else naive


def _finite_where(applied, new, old):
  return jax.tree_util.tree_map(lambda n, o: jnp.where(applied, n, o), new,
                                old)


def make_train_step(model, tx, loss_fn, schedule, mesh, state_shardings,
                    *, max_log_logit_scale: float | None,
                    accum_steps: int = 1, accum_mode: str = "exact",
                    frozen=None):
  """Returns step(state, batch) -> (state, metrics), jitted and donating.

  `frozen` (optim.frozen_mask of config.freeze, or None): parameters that
  get no gradient and stay bit-identical (tx must freeze the same ones).

  `tx` must be optim.make_optimizer's (wrapped in optax.apply_if_finite): a
  non-finite loss or gradient leaves params and optimiser state unchanged,
  advances state['step'] and is counted in the metrics
  'train/nonfinite_steps' (run total, kept in the optimiser state, so in the
  checkpoint) and 'train/nonfinite_consecutive'.
  """
  loss_and_grads = make_loss_and_grads(
      model, loss_fn, mesh, state_shardings["params"],
      accum_steps=accum_steps, accum_mode=accum_mode, frozen=frozen)

  def step(state, batch):
    old_params, old_opt = state["params"], state["opt"]
    if not isinstance(old_opt, optax.ApplyIfFiniteState):
      raise TypeError(
          f"The optimiser state is a {type(old_opt).__name__}, expected "
          "optax.ApplyIfFiniteState: build tx with optim.make_optimizer.")
    loss, grads = loss_and_grads(old_params, batch)
    # apply_if_finite looks at the gradients only: a non-finite loss with
    # finite gradients must be skipped too.
    grads = jax.tree_util.tree_map(
        lambda g: jnp.where(jnp.isfinite(loss), g, jnp.nan), grads)
    updates, opt = tx.update(grads, old_opt, old_params)
    params = optax.apply_updates(old_params, updates)
    if max_log_logit_scale is not None:
      # CLIP clamps the stored log-scale after the update (not in the
      # forward pass), so gradients still flow when it sits at the cap.
      params = {**params, "logit_scale": jnp.minimum(
          params["logit_scale"], max_log_logit_scale)}
    # A skipped step returns the old params exactly: neither the clamp nor
    # adding a zero update (-0.0 + 0.0 = +0.0) may change them.
    params = _finite_where(opt.last_finite, params, old_params)
    params = keep_frozen(params, old_params, frozen)
    out = scalars(model, old_params)
    bias = out.get("logit_bias")
    metrics = {
        "loss": loss,
        "logit_scale": out["logit_scale"],
        "logit_bias": jnp.nan if bias is None else bias,
        "grad_norm": optax.tree.norm(grads),
        # The lr this step's update used: the schedule follows the
        # optimiser's count of applied updates, not state['step'].
        "lr": schedule(state["step"] - old_opt.total_notfinite),
        "train/nonfinite_steps": opt.total_notfinite,
        "train/nonfinite_consecutive": opt.notfinite_count,
    }
    metrics = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32),
                                     metrics)
    return {"step": state["step"] + 1, "params": params, "opt": opt}, metrics

  return jax.jit(
      step,
      in_shardings=(state_shardings, sharding_lib.batch_sharding(mesh)),
      out_shardings=(state_shardings, sharding_lib.replicated(mesh)),
      donate_argnums=(0,))
