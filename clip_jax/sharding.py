"""Mesh construction, parameter partition rules, host -> global arrays.

The mesh has axes ('data', 'fsdp'). The batch is split over both axes (every
device holds a distinct slice of the global batch). Parameters and optimiser
state follow `config.sharding_rules`: an ordered list of (regex, rule) pairs,
the first regex found in a leaf's '/'-joined path wins:
  'replicate'  the full array on every device;
  'fsdp'       split the largest dimension divisible by the 'fsdp' axis size
               over 'fsdp' (replicated if no dimension divides).
Leaves no rule matches are replicated. The optimiser state's leaves carry
their parameter's path (e.g. '0/mu/img/...'), so the same rules shard them.
"""

from __future__ import annotations

import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from clip_jax import config as config_lib
from clip_jax.optim import path_str

AXES = ("data", "fsdp")
BATCH_SPEC = P(AXES)


def make_mesh(mesh_config, devices=None) -> Mesh:
  """A ('data', 'fsdp') mesh over all (or the given) devices."""
  devices = jax.devices() if devices is None else devices
  shape = config_lib.mesh_shape(mesh_config, len(devices))
  # Auto axes: GSPMD propagates shardings outside the shard_map'd loss.
  return jax.make_mesh(shape, AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, BATCH_SPEC)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _fsdp_spec(shape, fsdp_size: int) -> P:
  if fsdp_size == 1:
    return P()
  # Largest dimension first; ties go to the later dimension (output features).
  order = sorted(range(len(shape)), key=lambda i: (shape[i], i), reverse=True)
  for dim in order:
    if shape[dim] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return P(*spec)
  return P()


def tree_shardings(tree, mesh: Mesh, rules):
  """NamedShardings for every leaf of `tree` (arrays or ShapeDtypeStructs)."""
  compiled = [(re.compile(pattern), rule) for pattern, rule in rules]
  fsdp_size = mesh.shape["fsdp"]

  def leaf_sharding(path, leaf):
    name = path_str(path)
    rule = next((r for pattern, r in compiled if pattern.search(name)),
                "replicate")
    if rule == "replicate":
      return NamedSharding(mesh, P())
    if rule == "fsdp":
      return NamedSharding(mesh, _fsdp_spec(np.shape(leaf), fsdp_size))
    raise ValueError(
        f"Sharding rule {rule!r} for {name!r}: expected 'replicate' or "
        "'fsdp'.")

  return jax.tree_util.tree_map_with_path(leaf_sharding, tree)


def host_to_global(local_batch, mesh: Mesh):
  """Per-process numpy batch -> global jax.Arrays sharded over the batch.

  Each process passes its own slice (global batch / process count rows); the
  result is one array per leaf with the global leading dimension.
  """
  sharding = batch_sharding(mesh)
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      local_batch)
