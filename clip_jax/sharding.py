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

Several TPU slices (`config.mesh.slices = s > 1`): the 'data' axis spans the
slices (data-centre network, DCN, between them; only the gradient
reduction crosses it); 'fsdp' and the rest of 'data' stay inside a slice
(ICI). Built with mesh_utils.create_hybrid_device_mesh, which groups devices
by their `slice_index` (`mesh.dcn_granule='process'`: by process, for GPU
clusters whose hosts are the slow-network units).

Row order across processes. A mesh is not process-major on TPU pods: the
devices of process p need not hold global rows [p*n/k, (p+1)*n/k). Global
batches are therefore built from the rows each process's devices really
hold (`host_rows`):
  rows_to_global   the process has the whole batch, or any superset of its
                   rows with their indices: row r lands at global row r on
                   any device order (make_array_from_callback). Evaluation
                   uses it.
  host_to_global   the process has exactly its rows, host_rows(mesh, n), in
                   ascending order (make_array_from_process_local_data's
                   layout). Training uses it (see its docstring for what the
                   pipeline feeds).
"""

from __future__ import annotations

import re

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from clip_jax import config as config_lib
from clip_jax.optim import path_str

AXES = ("data", "fsdp")
BATCH_SPEC = P(AXES)


def make_mesh(mesh_config, devices=None, *, slice_of=None) -> Mesh:
  """A ('data', 'fsdp') mesh over all (or the given) devices.

  mesh_config.slices > 1: a hybrid mesh, 'data' split across slices (module
  docstring). `slice_of(device) -> int` overrides how devices are grouped
  into slices (tests: fake CPU devices have no slice_index).
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = config_lib.mesh_shape(mesh_config, len(devices))
  # Auto axes: GSPMD propagates shardings outside the shard_map'd loss.
  axis_types = (jax.sharding.AxisType.Auto,) * len(AXES)
  slices = mesh_config.get("slices", 1)
  config_lib.check_slices(slices, shape[0], len(devices))
  if slices == 1:
    return jax.make_mesh(shape, AXES, devices=devices, axis_types=axis_types)
  granule = mesh_config.get("dcn_granule") or "slice"
  return Mesh(hybrid_device_array(devices, shape, slices, granule=granule,
                                  slice_of=slice_of),
              AXES, axis_types=axis_types)


class _SliceTagged:
  """A device as create_hybrid_device_mesh sees it, with a given slice."""

  def __init__(self, device, slice_index: int):
    self.device, self.slice_index = device, slice_index

  def __getattr__(self, name):
    return getattr(self.device, name)


def hybrid_device_array(devices, shape, slices: int, *,
                        granule: str = "slice", slice_of=None) -> np.ndarray:
  """Devices [data, fsdp] with 'data' = slices (DCN) x data/slices (ICI).

  Row-major over 'data': slice 0's devices first, so a data index's slice
  is index // (data / slices). granule 'slice' groups devices by
  `slice_of(device)` (default: device.slice_index), 'process' by
  device.process_index.
  """
  data, fsdp = shape
  config_lib.check_slices(slices, data, len(devices))
  ici, dcn = (data // slices, fsdp), (slices, 1)
  if granule == "process":
    return mesh_utils.create_hybrid_device_mesh(
        ici, dcn, devices, process_is_granule=True)
  if granule != "slice":
    raise ValueError(f"config.mesh.dcn_granule={granule!r}: expected "
                     "'slice' or 'process'.")
  if slice_of is None:
    if not hasattr(devices[0], "slice_index"):
      raise ValueError(
          f"config.mesh.slices={slices} but device {devices[0]} has no "
          "slice_index (not a multi-slice TPU); set mesh.slices=1, or "
          "mesh.dcn_granule='process' to treat processes as slices.")
    return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
  tagged = mesh_utils.create_hybrid_device_mesh(
      ici, dcn, [_SliceTagged(d, int(slice_of(d))) for d in devices])
  return np.vectorize(lambda t: t.device, otypes=[object])(tagged)


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


def host_rows(mesh: Mesh, num_rows: int, devices=None) -> np.ndarray:
  """int64 [m]: the global rows of a `num_rows`-row batch (batch_sharding)
  that `devices` hold (default: this process's devices), ascending.

  On a process-major mesh process p's rows are [p*m, (p+1)*m); in general
  (TPU pods, hybrid meshes) they are any m rows.
  """
  if num_rows % mesh.size:
    raise ValueError(f"A batch of {num_rows} rows does not split over the "
                     f"{mesh.size} devices of the mesh; pad it to a "
                     f"multiple of {mesh.size}.")
  devices = mesh.local_devices if devices is None else devices
  index_map = batch_sharding(mesh).devices_indices_map((num_rows,))
  unknown = [d for d in devices if d not in index_map]
  if unknown:
    raise ValueError(f"Devices {unknown} are not in the mesh.")
  everything = np.arange(num_rows)
  return np.unique(np.concatenate(
      [everything[index_map[d][0]] for d in devices]))


def _position_lookup(rows: np.ndarray, num_rows: int) -> np.ndarray:
  """position[r] = i where rows[i] == r, -1 for rows not given."""
  rows = np.asarray(rows, np.int64).reshape(-1)
  if len(rows) and (rows.min() < 0 or rows.max() >= num_rows):
    raise ValueError(f"rows {rows.min()}..{rows.max()} are outside the "
                     f"{num_rows}-row batch.")
  if len(np.unique(rows)) != len(rows):
    raise ValueError("rows has duplicates; each global row appears once.")
  position = np.full(num_rows, -1, np.int64)
  position[rows] = np.arange(len(rows))
  return position


def rows_to_global(x, mesh: Mesh, *, rows=None, num_rows=None) -> jax.Array:
  """A global array, sharded over the batch, whose row r is global row r
  for any device order.

  x: this process's data; x[i] is global row rows[i] of a `num_rows`-row
  batch (rows=None: x is the whole batch). `rows` must include every row
  this process's devices hold (host_rows(mesh, num_rows)); rows others
  hold may be given too and are ignored.
  """
  x = np.asarray(x)
  if rows is None:
    rows = np.arange(len(x))
    num_rows = len(x) if num_rows is None else num_rows
  if num_rows is None:
    raise ValueError("rows_to_global(rows=...) needs num_rows.")
  if len(rows) != len(x):
    raise ValueError(f"x has {len(x)} rows but rows has {len(rows)} entries.")
  position = _position_lookup(rows, num_rows)

  def device_rows(index):
    wanted = position[np.arange(num_rows)[index[0]]]
    if (wanted < 0).any():
      missing = np.arange(num_rows)[index[0]][wanted < 0]
      raise ValueError(
          f"Process {jax.process_index()} needs global rows {missing[:8]} "
          f"of {num_rows} for its devices but was not given them; pass "
          "rows including sharding.host_rows(mesh, num_rows).")
    if len(wanted) and wanted[-1] - wanted[0] == len(wanted) - 1 and (
        np.all(np.diff(wanted) == 1)):
      return x[wanted[0]:wanted[-1] + 1]  # A view: no copy on the host.
    return x[wanted]

  return jax.make_array_from_callback((num_rows, *x.shape[1:]),
                                      batch_sharding(mesh), device_rows)


def host_to_global(local_batch, mesh: Mesh):
  """Per-process numpy batches -> global jax.Arrays sharded over the batch.

  Each leaf holds this process's rows of the global batch, in ascending
  order: host_rows(mesh, n) for the global size n = local rows x process
  count (jax.make_array_from_process_local_data's layout). Then row r of
  the result is row r of the global batch on any device order.

  Training feeds process p the contiguous block [p*n/k, (p+1)*n/k) of each
  global batch (data/pipeline.py), which is host_rows only on a
  process-major mesh (one process, CPU, GPU hosts in order). On a TPU pod
  the step's global array is then a row permutation of the block-ordered
  batch: the same examples, image i still paired with text i (every leaf is
  placed the same way), so every registered loss, being a sum over the
  pairs with all others as negatives, and its gradient are the same up to
  float summation order. What the device order does change: which device
  holds which pair (float rounding, and anything that depends on a row's
  position, such as naive per-micro-batch accumulation or per-row
  randomness). For a run bit-reproducible across device orders, the
  pipeline must read host_rows(mesh, n) of each global batch instead of
  block p.
  """
  sharding = batch_sharding(mesh)
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      local_batch)
