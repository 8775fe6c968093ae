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
           A batch's 'loss_key' (LOSS_KEY) is split and merged like the
           embeddings, so it stays row-aligned with them.
  'naive'  each micro-batch's own loss (its own negatives only), losses and
           gradients averaged over micro-batches: the ablation baseline.

Extra loss terms (`ExtraLoss`: distill.py's teacher terms, slip.py's
SimCLR term; several are joined by `combine_extra_losses`) are added to the
contrastive loss in the same differentiated function, and logged with the
step's metrics next to 'contrastive_loss'. Without one the step is the
program it was before the hook existed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from clip_jax import lora, optim
from clip_jax import sharding as sharding_lib

METRIC_NAMES = ("loss", "logit_scale", "logit_bias", "grad_norm", "lr",
                "train/nonfinite_steps", "train/nonfinite_consecutive")
ACCUM_MODES = ("exact", "naive")
# Params the loss uses directly (not through the embeddings).
SCALAR_PARAMS = ("logit_scale", "logit_bias")
# Optional batch field: int32 [B] per-example keys for the keyed losses
# (losses.KEYED_LOSSES, e.g. multi_positive); see train.step_inputs.
LOSS_KEY = "loss_key"


def init_model_params(model, config, rng):
  """Model params from dummy inputs shaped like one example."""
  size = config.model.image.image_size
  images = jnp.zeros((1, size, size, 3), jnp.float32)
  tokens = jnp.zeros((1, config.model.text.context_length), jnp.int32)
  params = model.init(rng, images, tokens)["params"]
  # LoRA adapters (config.lora; none when it is off), beside their kernels.
  return lora.add_adapters(params, config.get("lora"), rng)


def init_params(model, config, rng):
  """The run's trained params: the model's, plus those of extra loss terms
  (distill.init_params: a projection to the teacher's width; {} when the
  config has none, so the model's init is unchanged)."""
  from clip_jax import distill  # pylint: disable=g-import-not-at-top
  params = init_model_params(model, config, rng)
  return {**params, **distill.init_params(config, rng)}


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


@dataclasses.dataclass(frozen=True)
class ExtraLoss:
  """Loss terms added to the contrastive loss (distill.py's, slip.py's).

  targets(inputs, batch) -> a pytree of [B, ...] per-example arrays that
      get no gradient (a frozen teacher's embeddings); `inputs` is the
      step's extra argument (the teacher's params), `batch` the global
      batch or, with accumulation, one micro-batch.
  loss(params, zimg, ztxt, out, targets, inputs) -> (scalar, {name:
      scalar}): the weighted terms' sum (added to `loss`) and each term for
      the metrics; zimg / ztxt / targets cover the whole global batch
      (exact accumulation: all micro-batches), out is `scalars`'.
  param_keys: the top-level params `loss` reads directly (not through the
      towers' embeddings), e.g. a projection; with exact accumulation their
      gradient is the full-batch loss's, like logit_scale's.
  exact_accumulation: False when `loss` runs a tower itself (SLIP's views
      through the image tower): exact accumulation back-propagates only
      through zimg / ztxt and `param_keys`, so it is refused; naive works.
  """
  targets: Callable
  loss: Callable
  param_keys: tuple[str, ...] = ()
  exact_accumulation: bool = True


def combine_extra_losses(extra_losses):
  """One ExtraLoss adding up several (None if there are none); its inputs
  and targets are tuples with one entry per extra loss."""
  extra_losses = tuple(e for e in extra_losses if e is not None)
  if not extra_losses:
    return None
  if len(extra_losses) == 1:
    return extra_losses[0]

  def targets(inputs, batch):
    return tuple(e.targets(i, batch) for e, i in zip(extra_losses, inputs))

  def loss(params, zimg, ztxt, out, all_targets, inputs):
    total, metrics = 0.0, {}
    for e, t, i in zip(extra_losses, all_targets, inputs):
      value, own = e.loss(params, zimg, ztxt, out, t, i)
      total, metrics = total + value, {**metrics, **own}
    return total, metrics

  return ExtraLoss(
      targets, loss,
      tuple(k for e in extra_losses for k in e.param_keys),
      all(e.exact_accumulation for e in extra_losses))


def contrastive_loss(loss_fn, zimg, ztxt, out, mesh, keys=None):
  """`keys`: the batch's 'loss_key' (int32 [N], batch-sharded, row-aligned
  with zimg / ztxt), passed only when present (a loss_fn without a keys
  argument works on unkeyed batches); losses.KEYED_LOSSES use it, the
  other registered losses ignore it."""
  bias = out.get("logit_bias")
  extra = {} if keys is None else {"keys": keys}
  return loss_fn(zimg, ztxt, out["logit_scale"],
                 jnp.zeros((), jnp.float32) if bias is None else bias,
                 mesh=mesh, **extra)


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


def _with_extra_loss(extra_loss, loss, params, zimg, ztxt, out, targets,
                     inputs):
  """(contrastive + extra terms, metrics) when there is an extra loss."""
  value, metrics = extra_loss.loss(params, zimg, ztxt, out,
                                   jax.lax.stop_gradient(targets), inputs)
  return loss + value, {"contrastive_loss": loss, **metrics}


def make_loss_and_grads(model, loss_fn, mesh, param_shardings, *,
                        accum_steps: int = 1, accum_mode: str = "exact",
                        frozen=None, extra_loss: ExtraLoss | None = None):
  """Returns f(params, batch) -> (loss, grads) for the given accumulation.

  The model has no dropout or other randomness (its apply takes no rngs), so
  the embedding pass and the back-propagation pass compute the same function;
  a model with dropout would have to get the same rng in both passes.
  `frozen` (optim.frozen_mask, or None): those parameters' gradients are 0.
  `extra_loss` (an ExtraLoss, or None): its terms are added to the loss and
  f is f(params, batch, inputs) -> (loss, grads, metrics), `inputs` (no
  gradient) passed on to it; metrics has 'contrastive_loss' and the
  extra's own terms (averaged over micro-batches with 'naive').
  """
  if accum_mode not in ACCUM_MODES:
    raise ValueError(f"accum_mode={accum_mode!r} is not one of {ACCUM_MODES}.")
  if accum_steps < 1:
    raise ValueError(f"accum_steps={accum_steps} must be >= 1.")
  if (extra_loss is not None and accum_steps > 1 and accum_mode == "exact"
      and not extra_loss.exact_accumulation):
    raise ValueError(
        f"accum_steps={accum_steps} with accum_mode='exact': this extra loss "
        "runs a tower itself (SLIP's views), which exact accumulation "
        "cannot back-propagate; use accum_steps=1 or accum_mode='naive'.")
  loss_grads_and_metrics = _loss_grads_and_metrics(
      model, loss_fn, mesh, param_shardings, accum_steps=accum_steps,
      accum_mode=accum_mode, frozen=frozen, extra_loss=extra_loss)
  if extra_loss is not None:
    return loss_grads_and_metrics
  return lambda params, batch: loss_grads_and_metrics(params, batch, None)[:2]


def _loss_grads_and_metrics(model, loss_fn, mesh, param_shardings, *,
                            accum_steps, accum_mode, frozen, extra_loss):
  """f(params, batch, inputs) -> (loss, grads, metrics): make_loss_and_grads
  for any extra loss (None: metrics {}, the plain contrastive program)."""

  def total_loss(params, zimg, ztxt, out, keys, targets, inputs):
    loss = contrastive_loss(loss_fn, zimg, ztxt, out, mesh, keys)
    if extra_loss is None:
      return loss, {}
    return _with_extra_loss(extra_loss, loss, params, zimg, ztxt, out,
                            targets, inputs)

  def targets_of(inputs, batch):
    return None if extra_loss is None else extra_loss.targets(inputs, batch)

  def loss_of_params(params, batch, inputs):
    params = stop_frozen_gradients(params, frozen)
    zimg, ztxt, out = embed(model, params, batch, train=True)
    return total_loss(params, zimg, ztxt, out, batch.get(LOSS_KEY),
                      targets_of(inputs, batch), inputs)

  grad_fn = jax.value_and_grad(loss_of_params, has_aux=True)

  def full_batch(params, batch, inputs):
    (loss, metrics), grads = grad_fn(params, batch, inputs)
    return loss, grads, metrics

  if accum_steps == 1:  # One forward and backward, no scan.
    return full_batch

  def zero_grads(params):
    return jax.lax.with_sharding_constraint(
        jax.tree_util.tree_map(jnp.zeros_like, params), param_shardings)

  def split(tree):
    return jax.tree_util.tree_map(
        lambda x: split_microbatches(x, accum_steps, mesh), tree)

  def naive(params, batch, inputs):
    def one(total, batch_i):
      return _tree_add(total, full_batch(params, batch_i, inputs)), None

    micro = split(batch)
    metric_shapes = jax.eval_shape(
        loss_of_params, params,
        jax.tree_util.tree_map(lambda x: x[0], micro), inputs)[1]
    zero_metrics = jax.tree_util.tree_map(
        lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes)
    total, _ = jax.lax.scan(
        one, (jnp.zeros((), jnp.float32), zero_grads(params), zero_metrics),
        micro)
    return jax.tree_util.tree_map(lambda x: x / accum_steps, total)

  def exact(params, batch, inputs):
    micro = split(batch)

    def towers(params, batch_i):
      params = stop_frozen_gradients(params, frozen)
      return embed(model, params, batch_i, train=True)[:2]

    # 1. Every micro-batch's embeddings and the extra's targets (a
    # teacher's embeddings); no gradient, so nothing is kept.
    _, (zimgs, ztxts, targets) = jax.lax.scan(
        lambda _, batch_i: (None, (*towers(params, batch_i),
                                   targets_of(inputs, batch_i))),
        None, micro)
    # Back in the global batch's row order (a local transpose on each
    # device). The loss would not care: it is invariant to any permutation
    # applied to both modalities alike, since pairs stay row-aligned. The
    # keys go through the same split and merge, so they stay aligned too.
    zimg, ztxt, targets = jax.tree_util.tree_map(
        lambda x: merge_microbatches(x, mesh), (zimgs, ztxts, targets))
    keys = (None if LOSS_KEY not in micro
            else merge_microbatches(micro[LOSS_KEY], mesh))

    # 2. The full-batch loss and its gradient w.r.t. the embeddings and the
    # params the losses read directly (scale, bias, the extra's).
    def loss_of(zimg, ztxt, direct_params):
      merged = stop_frozen_gradients({**params, **direct_params}, frozen)
      return total_loss(merged, zimg, ztxt, scalars(model, merged), keys,
                        targets, inputs)

    direct_keys = SCALAR_PARAMS + (
        () if extra_loss is None else tuple(extra_loss.param_keys))
    direct_params = {k: params[k] for k in direct_keys if k in params}
    (loss, metrics), (dzimg, dztxt, ddirect) = jax.value_and_grad(
        loss_of, argnums=(0, 1, 2), has_aux=True)(zimg, ztxt, direct_params)

    # 3. Back-propagate each micro-batch's slice of the embedding gradient.
    def backprop(total, inputs_i):
      batch_i, dzimg_i, dztxt_i = inputs_i
      _, vjp = jax.vjp(lambda p: towers(p, batch_i), params)
      return _tree_add(total, vjp((dzimg_i, dztxt_i))[0]), None

    grads, _ = jax.lax.scan(
        backprop, zero_grads(params),
        (micro, split_microbatches(dzimg, accum_steps, mesh),
         split_microbatches(dztxt, accum_steps, mesh)))
    # The towers do not use the direct params: their gradients are the
    # full-batch loss's, once (open_clip multiplies the scale's by the
    # accumulation count).
    return loss, {**grads, **_tree_add(
        {k: grads[k] for k in ddirect}, ddirect)}, metrics

  return exact if accum_mode == "exact" else naive


def _finite_where(applied, new, old):
  return jax.tree_util.tree_map(lambda n, o: jnp.where(applied, n, o), new,
                                old)


def make_train_step(model, tx, loss_fn, schedule, mesh, state_shardings,
                    *, max_log_logit_scale: float | None,
                    accum_steps: int = 1, accum_mode: str = "exact",
                    frozen=None, extra_loss: ExtraLoss | None = None,
                    extra_input_shardings=None):
  """Returns step(state, batch) -> (state, metrics), jitted and donating.

  `extra_loss` (an ExtraLoss, e.g. distill.make_extra_loss's or
  slip.make_extra_loss's, or combine_extra_losses of several): the step is
  step(state, batch, inputs), `inputs` (e.g. the teacher's params, in
  `extra_input_shardings`) neither differentiated nor donated; its terms
  are added to 'loss' and logged ('contrastive_loss' and their own names).

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
      accum_steps=accum_steps, accum_mode=accum_mode, frozen=frozen,
      extra_loss=extra_loss)

  def step(state, batch, *inputs):
    old_params, old_opt = state["params"], state["opt"]
    if not isinstance(old_opt, optax.ApplyIfFiniteState):
      raise TypeError(
          f"The optimiser state is a {type(old_opt).__name__}, expected "
          "optax.ApplyIfFiniteState: build tx with optim.make_optimizer.")
    if extra_loss is None:
      loss, grads = loss_and_grads(old_params, batch)
      extra_metrics = {}
    else:
      loss, grads, extra_metrics = loss_and_grads(old_params, batch, *inputs)
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
        **extra_metrics,
    }
    metrics = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32),
                                     metrics)
    return {"step": state["step"] + 1, "params": params, "opt": opt}, metrics

  in_shardings = (state_shardings, sharding_lib.batch_sharding(mesh))
  if extra_loss is not None:
    in_shardings += (extra_input_shardings,)
  return jax.jit(
      step, in_shardings=in_shardings,
      out_shardings=(state_shardings, sharding_lib.replicated(mesh)),
      donate_argnums=(0,))
