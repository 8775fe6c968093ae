r"""LoRA: low-rank adapters on chosen Dense kernels (`config.lora`).

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"
(arXiv:2106.09685): a frozen kernel W [in, out] is used as W + (alpha / r)
A B with A [in, r], B [r, out] trained; B starts at zero, so the adapted
model is exactly the base model at step 0, and A starts random (the paper:
"random Gaussian"; here N(0, 1 / fan_in), so x A has x's scale).

Config keys (`config.lora`):
  targets  regex; every Dense kernel whose module path (the kernel's
           '/'-joined path without '/kernel') it fully matches (re.fullmatch)
           gets an adapter. None or '' = LoRA off: the param tree, the
           optimiser and the outputs are exactly those without LoRA.
  rank     r, the inner width of A B (default 8).
  alpha    the scale's numerator: the update is (alpha / rank) A B
           (default 8.0; the paper keeps alpha fixed while varying r).
  train    optional regex (fullmatch over param paths) of base params that
           are trained beside the adapters, e.g. 'logit_scale|logit_bias';
           None = only the adapters.

Module paths to match (unscanned model; with model.scan=True the blocks are
one stacked module 'ENC/blocks/block', e.g. 'img/encoder/blocks/block/attn/
query', whose kernels and adapters have a leading [depth] axis):
  img/encoder/block{i}/attn/{query,key,value,out}   image attention
  img/encoder/block{i}/mlp/{fc1,fc2}                image MLP in / out
  txt/encoder/block{i}/attn/..., txt/encoder/block{i}/mlp/...  text tower
  img/map_head/attn/..., img/map_head/mlp/...       image MAP head
  img_proj, txt_proj                                the projections
The patch embedding (a Conv) and the token embedding take no adapter.
Examples:
  '.*/attn/(query|value)'        q and v of every attention (the paper's
                                 GPT-3 choice), both towers and the MAP head
  '.*encoder/.*/attn/.*'         q, k, v, out of every encoder block
  'img/.*/(attn/.*|mlp/fc[12])'  all of the image tower's attention and MLP

Params: each adapted kernel gets siblings `lora_a` [*in_dims, r] and
`lora_b` [r, *out_dims] (with a leading [depth] axis when scanned): e.g.
'img/encoder/block0/attn/query/lora_a' [width, r] beside its kernel [width,
heads, head_dim], and '.../attn/out/lora_a' [heads, head_dim, r].

How the model uses them: build_run_model wraps the model in
flax.linen.map_variables, whose input transform (`merge_params`) replaces
each adapted kernel by W + (alpha / r) A B before the unchanged model code
reads it. So scanned blocks, remat and every attention formulation
(config.model.attention, including 'fused_qkv', which reads the q/k/v
kernels directly) see adapted kernels with no change to the model, and
`merge` for export is the same function. The cost of this form against the
paper's x W + s (x A) B: one [in, r] x [r, out] product per adapted kernel
per step, and the backward pass forms the full [in, out] gradient of the
merged kernel (as full fine-tuning does) before reducing it to A's and
B's; what LoRA saves here is the trained parameters and their optimiser
state (`python -m clip_jax.lora count`), not step time.

Training: with LoRA on, every param but the adapters (and `train`'s) is
frozen through config.freeze's machinery (optim.frozen_mask, optax
multi_transform + set_to_zero: no optimiser state, no gradient);
config.freeze itself must then be None.

Commands:
  python -m clip_jax.lora merge --workdir RUN --out MERGED [--step N]
      folds the adapters into the kernels and writes a plain workdir
      (config.lora off) that clip_jax.evaluate / api.load / convert read.
  python -m clip_jax.lora count --config CONFIG [--ranks 4,8]
      parameters and optimiser-state bytes: full fine-tuning vs LoRA.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clip_jax import optim

ADAPTER_NAMES = ("lora_a", "lora_b")
# Module names whose kernel is not a Dense one (no adapter possible).
NOT_DENSE = ("patch_embed",)
# The model methods that read params (all go through merge_params).
MODEL_METHODS = ("__call__", "encode_image", "encode_text")
# q, k, v and out of every encoder block of both towers (the paper's
# "adapt the attention weights" setting, on all four of them).
DEFAULT_TARGETS = r"(img|txt)/encoder/.*/attn/(query|key|value|out)"
# config.init.include for every param but the adapters (a pretrained
# source has none; they keep LoRA's init).
BASE_PARAMS = r"(?!.*/lora_[ab]$).*"
# Separates the adapters' init stream from the model's (same run seed).
_RNG_SALT = 0x10A


def enabled(lora_config) -> bool:
  """True when config.lora asks for adapters (non-empty `targets`)."""
  return bool(lora_config and lora_config.get("targets"))


def scale(lora_config) -> float:
  """alpha / rank, the factor of A B."""
  return float(lora_config.alpha) / int(lora_config.rank)


def check_config(lora_config, freeze=None) -> None:
  """Raises ValueError on a bad config.lora (rank, alpha and the regexes
  are checked even when it is off, so a typo shows before it is used)."""
  if not lora_config:
    return
  rank, alpha = lora_config.get("rank"), lora_config.get("alpha")
  if not isinstance(rank, int) or rank < 1:
    raise ValueError(f"config.lora.rank={rank!r} must be an integer >= 1.")
  if alpha is None or alpha <= 0:
    raise ValueError(f"config.lora.alpha={alpha!r} must be > 0 (the "
                     "update is alpha / rank x A B).")
  for key in ("targets", "train"):
    pattern = lora_config.get(key)
    if pattern:
      try:
        re.compile(pattern)
      except re.error as e:
        raise ValueError(f"config.lora.{key}={pattern!r} is not a regex "
                         f"({e}).") from None
  if freeze and enabled(lora_config):
    raise ValueError(
        f"config.freeze={freeze!r} is set together with config.lora: LoRA "
        "freezes every param but the adapters itself; set config.freeze="
        "None and list extra trained params in config.lora.train.")


def freeze_regex(lora_config) -> str:
  """The config.freeze-style regex LoRA implies: every param path except
  the adapters' and those `lora_config.train` fully matches."""
  keep = [r".*/(?:lora_a|lora_b)"]
  if lora_config.get("train"):
    keep.append(f"(?:{lora_config.train})")
  return f"(?!(?:{'|'.join(keep)})$).*"


# --- param trees -----------------------------------------------------------


def dense_modules(params) -> list[str]:
  """Module paths of every Dense kernel in `params` (adapter candidates)."""
  return [p[:-len("/kernel")] for p in optim.flat_by_path(params)
          if p.endswith("/kernel")
          and p.split("/")[-2] not in NOT_DENSE]


def target_modules(params, targets: str) -> list[str]:
  """The Dense module paths `targets` fully matches (error if none)."""
  pattern = re.compile(targets)
  candidates = dense_modules(params)
  matched = [m for m in candidates if pattern.fullmatch(m)]
  if not matched:
    raise ValueError(
        f"config.lora.targets={targets!r} matches no Dense module; it must "
        f"fully match a kernel's module path such as "
        f"{', '.join(candidates[:4])}, ... e.g. '.*/attn/(query|value)'.")
  return matched


def kernel_axes(module: str, kernel_ndim: int) -> tuple[int, int, int]:
  """(leading scan axes, input axes, output axes) of a Dense kernel.

  Scanned blocks ('.../blocks/...') stack a [depth] axis in front; the
  attention output projection ('.../attn/out', a DenseGeneral over
  (heads, head_dim)) has two input axes; every other Dense has one.
  """
  batch = 1 if "/blocks/" in f"/{module}/" else 0
  inputs = 2 if module.endswith("attn/out") else 1
  outputs = kernel_ndim - batch - inputs
  if outputs < 1:
    raise ValueError(f"LoRA: kernel of {module} has {kernel_ndim} dims, too "
                     "few for its scan / input axes.")
  return batch, inputs, outputs


def adapter_shapes(module: str, kernel_shape, rank: int):
  """(lora_a shape, lora_b shape) for a kernel."""
  batch, inputs, _ = kernel_axes(module, len(kernel_shape))
  lead = tuple(kernel_shape[:batch])
  ins = tuple(kernel_shape[batch:batch + inputs])
  outs = tuple(kernel_shape[batch + inputs:])
  return lead + ins + (rank,), lead + (rank,) + outs


def add_adapters(params, lora_config, rng):
  """`params` with lora_a (random) and lora_b (zeros) beside every target
  kernel; `params` itself when LoRA is off. Works on ShapeDtypeStructs
  inside jax.eval_shape too."""
  if not enabled(lora_config):
    return params
  rank = int(lora_config.rank)
  flat = optim.flat_by_path(params)
  extra = lora_config.get("train")
  if extra and not any(re.fullmatch(extra, p) for p in flat):
    raise ValueError(
        f"config.lora.train={extra!r} matches no parameter (it must match a "
        f"whole '/'-joined path such as {', '.join(list(flat)[:3])}); e.g. "
        "'logit_scale'.")
  rng = jax.random.fold_in(rng, _RNG_SALT)
  for i, module in enumerate(target_modules(params, lora_config.targets)):
    kernel = flat[f"{module}/kernel"]
    a_shape, b_shape = adapter_shapes(module, kernel.shape, rank)
    _, inputs, _ = kernel_axes(module, kernel.ndim)
    fan_in = math.prod(a_shape[-1 - inputs:-1])
    flat[f"{module}/lora_a"] = jax.random.normal(
        jax.random.fold_in(rng, i), a_shape, jnp.float32) / math.sqrt(fan_in)
    flat[f"{module}/lora_b"] = jnp.zeros(b_shape, jnp.float32)
  return optim.nested_by_path(flat)


def low_rank_product(lora_a, lora_b, kernel_ndim: int):
  """A B with A's input axes and B's output axes: the kernel's shape.

  The leading (scan) axes count is implied by the three ranks:
  a.ndim - 1 + b.ndim - 1 = kernel_ndim + batch axes.
  """
  batch = lora_a.ndim + lora_b.ndim - 2 - kernel_ndim
  lead = lora_a.shape[:batch]
  ins, outs = lora_a.shape[batch:-1], lora_b.shape[batch + 1:]
  a = lora_a.reshape(*lead, math.prod(ins), lora_a.shape[-1])
  b = lora_b.reshape(*lead, lora_b.shape[batch], math.prod(outs))
  # HIGHEST: a TPU's default would round the f32 factors to bfloat16.
  product = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
  return product.reshape(*lead, *ins, *outs)


def merge_params(params, *, scale: float):
  """Each kernel with adapters -> W + scale * A B; the adapters dropped.

  A pure function of a nested param dict; params without adapters pass
  through unchanged (the same leaves).
  """
  if not isinstance(params, Mapping):
    return params
  if "lora_a" in params:
    kernel = params["kernel"]
    delta = low_rank_product(params["lora_a"], params["lora_b"], kernel.ndim)
    merged = kernel + (scale * delta).astype(kernel.dtype)
    return {**{k: v for k, v in params.items() if k not in ADAPTER_NAMES},
            "kernel": merged}
  return {k: merge_params(v, scale=scale) for k, v in params.items()}


def has_adapters(params) -> bool:
  return any(p.rsplit("/", 1)[-1] in ADAPTER_NAMES
             for p in optim.flat_by_path(params))


def _merge_variables(variables, *, scale: float):
  # map_variables hands over {'params': tree} (or the tree's collection).
  return {k: merge_params(v, scale=scale) if k == "params" else v
          for k, v in variables.items()}


def wrap_model(model: nn.Module, lora_config) -> nn.Module:
  """`model` (TwoTowers) reading W + scale A B wherever adapters exist.

  The same module class under flax.linen.map_variables: its init makes the
  same params as `model` (adapters are added by add_adapters), its apply
  merges the adapters into their kernels first (merge_params).
  """
  wrapped = nn.map_variables(
      type(model), "params",
      trans_in_fn=functools.partial(_merge_variables,
                                    scale=scale(lora_config)),
      init=True, methods=list(MODEL_METHODS))
  fields = {f: getattr(model, f) for f in model.__dataclass_fields__
            if f not in ("parent", "name")}
  return wrapped(**fields)


# --- counts ------------------------------------------------------------------


def tree_size(tree) -> tuple[int, int]:
  """(number of array elements, bytes) over the array leaves of a tree
  (optax.MaskedNode and other non-arrays count nothing)."""
  leaves = [x for x in jax.tree_util.tree_leaves(tree) if hasattr(x, "dtype")
            and hasattr(x, "shape")]
  return (sum(math.prod(x.shape) for x in leaves),
          sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
              for x in leaves))


def count(config) -> dict:
  """{'params', 'trained', 'opt_elements', 'opt_bytes'} of a config's
  model and optimiser, from the real param tree (no arrays allocated)."""
  from clip_jax import train_state  # pylint: disable=g-import-not-at-top
  from clip_jax.models import two_towers  # pylint: disable=g-import-not-at-top
  model = two_towers.build_run_model(config)
  shapes = train_state.param_shapes(model, config)
  tx, _ = optim.make_optimizer(config, shapes, total_steps=1,
                               warmup_steps=0)
  opt = jax.eval_shape(tx.init, shapes)
  frozen = optim.frozen_mask(shapes, optim.freeze_of(config))
  params, _ = tree_size(shapes)
  trained = sum(math.prod(x.shape) for x, f in zip(
      jax.tree_util.tree_leaves(shapes), jax.tree_util.tree_leaves(frozen))
                if not f)
  opt_elements, opt_bytes = tree_size(opt)
  return {"params": params, "trained": trained, "opt_elements": opt_elements,
          "opt_bytes": opt_bytes}


def count_table(config, ranks=(4, 8), targets: str | None = None) -> str:
  """Full fine-tuning vs LoRA at each rank, as a Markdown table."""
  targets = targets or config.lora.get("targets") or DEFAULT_TARGETS
  rows = []
  full = config.copy_and_resolve_references()
  full.lora.targets = None
  rows.append(("full fine-tuning", count(full)))
  for rank in ranks:
    c = config.copy_and_resolve_references()
    c.freeze = None
    c.lora.update(targets=targets, rank=int(rank))
    rows.append((f"LoRA r={rank}", count(c)))
  lines = [f"LoRA targets: {targets!r}", "",
           "| run | params | trained params | optimiser state |",
           "|---|---:|---:|---:|"]
  for name, n in rows:
    lines.append(f"| {name} | {n['params']:,} | {n['trained']:,} | "
                 f"{n['opt_elements']:,} values, {n['opt_bytes']:,} B |")
  return "\n".join(lines)



# --- merge -----------------------------------------------------------------


def merged_config(config):
  """A run's config with LoRA off: the config of its merged params."""
  out = config.copy_and_resolve_references()
  out.lora.targets = None
  out.freeze = None
  # The merged workdir is a finished model: nothing to initialise from.
  out.init.workdir = None
  return out


def merge_workdir(workdir: str, out: str, *, step: int | None = None) -> str:
  """Writes `out`: a plain workdir (step-0 checkpoint, config with LoRA
  off) whose params are `workdir`'s with the adapters folded in."""
  from clip_jax import api, convert  # pylint: disable=g-import-not-at-top
  from clip_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  run_config = api.load_run_config(workdir)
  config = run_config.copy_and_resolve_references()
  if not enabled(config.get("lora")):
    raise ValueError(f"{workdir} was not trained with LoRA (its "
                     "config.lora.targets is empty): nothing to merge.")
  config.mesh.data, config.mesh.fsdp = -1, 1  # As api.load: any devices.
  mesh = sharding_lib.make_mesh(config.mesh, jax.devices())
  _, params, _, step = api.restore_params(config, workdir, step, mesh)
  merged = jax.device_get(merge_params(params, scale=scale(config.lora)))
  convert.write_workdir(merged_config(run_config), merged, out)
  return out


# --- command line ----------------------------------------------------------


def _load_config(spec: str):
  from clip_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  path, _, arg = spec.partition(":")
  return config_lib.load_config_file(path, arg or None)


def main(argv=None) -> int:
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(
      prog="python -m clip_jax.lora",
      description="LoRA adapters: merge them into a plain workdir, or count "
      "parameters and optimiser state (see clip_jax/lora.py).")
  commands = parser.add_subparsers(dest="command", required=True)
  merge = commands.add_parser(
      "merge", help="fold a LoRA run's adapters into its kernels")
  merge.add_argument("--workdir", required=True, help="the LoRA run")
  merge.add_argument("--out", required=True, help="new workdir to write")
  merge.add_argument("--step", type=int, default=None,
                     help="checkpoint step (default: the latest)")
  counts = commands.add_parser(
      "count", help="params and optimiser state: full vs LoRA")
  counts.add_argument("--config", required=True,
                      help="a config file, e.g. configs/demo.py or "
                      "configs/lora.py:init=runs/demo")
  counts.add_argument("--ranks", default="4,8",
                      help="comma-separated LoRA ranks (default 4,8)")
  counts.add_argument("--targets", default=None,
                      help="targets regex (default: the config's, else "
                      "DEFAULT_TARGETS)")
  args = parser.parse_args(argv)
  if args.command == "merge":
    out = merge_workdir(args.workdir, args.out, step=args.step)
    print(f"wrote {out}: {args.workdir}'s adapters merged into its kernels")
    return 0
  ranks = [int(r) for r in args.ranks.split(",") if r]
  print(count_table(_load_config(args.config), ranks, args.targets))
  return 0


if __name__ == "__main__":
  from clip_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run_plain(main)
