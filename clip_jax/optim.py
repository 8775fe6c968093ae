"""The optax chain from config: clipping, AdamW, warmup + decay schedule.

Config keys (top level of the experiment config):
  optimizer:      'adamw' (default) | 'lamb' (You et al. 2019, optax.lamb:
                  Adam moments from adam.b1/b2/eps, wd x weights added to
                  the update, then the layer-wise trust ratio; ALIGN's).
                  With 'lamb' wd is passed as it is (wd_convention must
                  be 'coupled').
  lr:             peak learning rate.
  wd:             decoupled weight decay; how much per step depends on
                  wd_convention.
  wd_convention:  'coupled' (PyTorch / optax AdamW, CLIP): each step decays
                  by wd x lr(t). 'decoupled' (big_vision, SigLIP): each step
                  decays by wd x lr(t) / lr, i.e. wd at the schedule's peak,
                  not multiplied by the base lr.
  wd_exclude:     regex; parameters whose '/'-joined path matches it get no
                  decay. Parameters with fewer than 2 dims (biases, norm
                  scales, logit scale/bias) never decay.
  adam.b1/b2/eps: AdamW moments; CLIP used b2=0.98, eps=1e-6.
  adam.flatten:   optional, default False. True: the gradient clipping and
                  Adam's moments run over one vector, all trained
                  parameters concatenated (optax.flatten), instead of one
                  small op per parameter; weight decay and the lr stay per
                  parameter (optax.adamw's own chain). Same updates up to
                  float32 rounding of the global norm, but a different
                  optimiser state (one flat mu / nu), so a checkpoint of
                  one setting does not restore into the other. Only for
                  fully replicated params (the flat state is replicated;
                  with FSDP it would gather every shard): train_state
                  refuses it otherwise.
  grad_clip_norm: clip the global gradient norm to this value; None = off.
  schedule:       'cosine' | 'linear' | 'constant' after the linear warmup.
  min_lr_ratio:   final lr as a fraction of `lr` for 'cosine'/'linear'.
  warmup_*:       warmup duration (steps/examples/epochs, see config.steps).
  freeze:         regex; parameters whose '/'-joined path it fully matches
                  (re.fullmatch, e.g. 'img/.*' = the image tower) are never
                  updated and get no optimiser state; None = train all.
                  With config.lora on, freeze must be None: LoRA freezes
                  every param but its adapters (freeze_of, clip_jax/lora.py).

Frozen parameters (LiT's locked tower) go through optax.multi_transform:
the AdamW chain sees only the trained ones (frozen leaves are
optax.MaskedNode in its state, so no moments are kept for them) and
optax.set_to_zero gives the frozen ones a zero update. The global-norm
clipping is inside that chain, so it counts the trained parameters only
(the frozen ones' gradients are discarded anyway; counting them would shrink
the trained updates by an amount that depends on a tower that does not
learn). The train step also stops gradients at the frozen parameters
(train_state.make_loss_and_grads), so their backward pass is not computed,
the non-finite check sees only trained gradients, and `grad_norm` is the
trained parameters' norm.

The chain is wrapped in optax.apply_if_finite: a step whose gradients are not
all finite is skipped (no update; the inner state, including Adam's moments,
its count and the lr schedule's count, is left as it was) and counted in the
state (`notfinite_count` consecutive, `total_notfinite` over the run, both in
the checkpoint). apply_if_finite would give up and apply the non-finite update
after `max_consecutive_errors` skips; it is set so high that it never does:
the training loop stops the run at config.max_consecutive_nonfinite instead.
"""

from __future__ import annotations

import re

import jax
import numpy as np
import optax

SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "lamb")
WD_CONVENTIONS = ("coupled", "decoupled")
# apply_if_finite's counter saturates at the int32 maximum, never above it.
NEVER_GIVE_UP = int(np.iinfo(np.int32).max)


def path_str(path) -> str:
  """'img/encoder/block0/kernel' from a jax tree path."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def flat_by_path(tree) -> dict:
  """{'a/b/c': leaf} of a nested param tree (path_str's names)."""
  return {path_str(path): leaf for path, leaf in
          jax.tree_util.tree_flatten_with_path(tree)[0]}


def nested_by_path(flat: dict) -> dict:
  """The inverse of flat_by_path: {'a/b/c': x} -> {'a': {'b': {'c': x}}}."""
  tree = {}
  for path, leaf in flat.items():
    *parents, name = path.split("/")
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
    node[name] = leaf
  return tree


def decay_mask(params, exclude_regex: str | None):
  """True where weight decay applies: >= 2 dims and not matched by regex."""
  pattern = re.compile(exclude_regex) if exclude_regex else None

  def decays(path, leaf):
    if leaf.ndim < 2:
      return False
    return not (pattern and pattern.search(path_str(path)))

  return jax.tree_util.tree_map_with_path(decays, params)


def frozen_mask(params, freeze) -> object:
  """True where a parameter is frozen: its '/'-joined path fully matches
  `freeze` (a regex, or a list of regexes; None = nothing frozen).

  A pattern that matches no parameter is an error (a typo would otherwise
  silently train everything).
  """
  patterns = [] if not freeze else [freeze] if isinstance(freeze, str) else (
      list(freeze))
  compiled = [re.compile(p) for p in patterns]
  paths = [path_str(path) for path, _ in
           jax.tree_util.tree_flatten_with_path(params)[0]]
  for pattern in compiled:
    if not any(pattern.fullmatch(path) for path in paths):
      raise ValueError(
          f"config.freeze pattern {pattern.pattern!r} matches no parameter "
          f"(it must match a whole '/'-joined path); parameters look like "
          f"{', '.join(paths[:4])}, ... e.g. 'img/.*' freezes the image "
          "tower.")
  return jax.tree_util.tree_map_with_path(
      lambda path, _: any(p.fullmatch(path_str(path)) for p in compiled),
      params)


def freeze_of(config):
  """The freeze regex in effect: config.freeze, or with config.lora on,
  every param but the adapters (and config.lora.train's)."""
  from clip_jax import lora  # pylint: disable=g-import-not-at-top
  if lora.enabled(config.get("lora")):
    return lora.freeze_regex(config.lora)
  return config.get("freeze")


def make_schedule(config, *, total_steps: int, warmup_steps: int):
  """Linear warmup from 0 to `config.lr`, then the configured decay."""
  if config.schedule not in SCHEDULES:
    raise ValueError(
        f"config.schedule={config.schedule!r} is not one of {SCHEDULES}.")
  if warmup_steps > total_steps:
    raise ValueError(
        f"warmup ({warmup_steps} steps) is longer than the run "
        f"({total_steps} steps); shorten config.warmup_*.")
  peak, end = config.lr, config.lr * config.min_lr_ratio
  decay_steps = max(total_steps - warmup_steps, 1)
  if config.schedule == "cosine":
    after = optax.cosine_decay_schedule(peak, decay_steps, alpha=end / peak)
  elif config.schedule == "linear":
    after = optax.linear_schedule(peak, end, decay_steps)
  else:
    after = optax.constant_schedule(peak)
  warmup = optax.linear_schedule(0.0, peak, max(warmup_steps, 1))
  return optax.join_schedules([warmup, after], [warmup_steps])


def weight_decay_per_lr(config) -> float:
  """The factor optax.adamw multiplies by lr(t) to decay weights by.

  'coupled': wd itself (decay wd x lr(t) per step). 'decoupled': wd / lr,
  so that the decay is wd x lr(t) / lr (wd at the peak of the schedule).
  """
  convention = config.get("wd_convention", "coupled")
  if convention not in WD_CONVENTIONS:
    raise ValueError(
        f"config.wd_convention={convention!r} is not one of "
        f"{WD_CONVENTIONS}.")
  if convention == "coupled" or not config.wd:
    return config.wd
  if config.lr <= 0:
    raise ValueError(
        f"config.wd_convention='decoupled' divides wd by config.lr, which is "
        f"{config.lr}; set a positive lr or use wd_convention='coupled'.")
  return config.wd / config.lr


def flattens(config) -> bool:
  """Whether config.adam.flatten puts the moments in one flat vector."""
  return bool(config.adam.get("flatten"))


def _clip_and_optimizer(config, schedule):
  """Clipping (if any) then AdamW or LAMB; with adam.flatten (AdamW only),
  the clipping and optax.adamw's first stage (scale_by_adam) see one flat
  vector."""
  clip = ([] if config.grad_clip_norm is None else
          [optax.clip_by_global_norm(config.grad_clip_norm)])
  # A function of the (possibly masked) tree it is given, so it also fits
  # the trained-only tree of multi_transform below.
  mask = lambda p: decay_mask(p, config.wd_exclude)  # noqa: E731
  adam = dict(b1=config.adam.b1, b2=config.adam.b2, eps=config.adam.eps)
  wd = weight_decay_per_lr(config)
  name = config.get("optimizer", "adamw")
  if name not in OPTIMIZERS:
    raise ValueError(
        f"config.optimizer={name!r} is not one of {OPTIMIZERS}.")
  if name == "lamb":
    if flattens(config):
      raise ValueError(
          "config.adam.flatten=True with config.optimizer='lamb': LAMB's "
          "trust ratio is per parameter, so it cannot run on one flat "
          "vector; set adam.flatten=False.")
    return optax.chain(*clip, optax.lamb(schedule, weight_decay=wd,
                                         mask=mask, **adam))
  if not flattens(config):
    return optax.chain(*clip, optax.adamw(schedule, weight_decay=wd,
                                          mask=mask, **adam))
  # optax.adamw is chain(scale_by_adam, add_decayed_weights,
  # scale_by_learning_rate); the decay needs the per-parameter tree.
  return optax.chain(
      optax.flatten(optax.chain(*clip, optax.scale_by_adam(**adam))),
      optax.add_decayed_weights(wd, mask),
      optax.scale_by_learning_rate(schedule))


def make_optimizer(config, params, *, total_steps: int, warmup_steps: int):
  """Returns (optax transformation, lr schedule)."""
  schedule = make_schedule(config, total_steps=total_steps,
                           warmup_steps=warmup_steps)
  tx = _clip_and_optimizer(config, schedule)
  frozen = frozen_mask(params, freeze_of(config))
  if any(jax.tree_util.tree_leaves(frozen)):
    labels = jax.tree_util.tree_map(
        lambda f: "frozen" if f else "trained", frozen)
    tx = optax.multi_transform(
        {"trained": tx, "frozen": optax.set_to_zero()}, labels)
  return optax.apply_if_finite(tx, NEVER_GIVE_UP), schedule
