"""Partition rules, host -> global batches on any device order, and the
multi-slice (hybrid) mesh."""

import functools

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from clip_jax import config as config_lib
from clip_jax import losses
from clip_jax import sharding as sharding_lib


def _mesh(data, fsdp):
  return sharding_lib.make_mesh(ml_collections.ConfigDict(
      dict(data=data, fsdp=fsdp)))


def test_rules_first_match_wins_and_fsdp_picks_largest_divisible_dim():
  mesh = _mesh(2, 4)
  tree = {"img": {"kernel": np.zeros((6, 16)), "bias": np.zeros(16),
                  "odd": np.zeros((3, 5))},
          "txt": {"kernel": np.zeros((8, 12))}}
  rules = [("txt/", "replicate"), (".*", "fsdp")]
  specs = jax.tree_util.tree_map(lambda s: s.spec,
                                 sharding_lib.tree_shardings(tree, mesh, rules))
  assert specs == {"img": {"kernel": P(None, "fsdp"), "bias": P("fsdp"),
                           "odd": P()},
                   "txt": {"kernel": P()}}


def test_unmatched_leaves_are_replicated():
  mesh = _mesh(-1, 1)
  shardings = sharding_lib.tree_shardings({"a": np.zeros(8)}, mesh,
                                          [("nomatch", "fsdp")])
  assert shardings["a"].spec == P()


# A deliberately non-process-major order: as if devices 0-3 were process
# 0's and 4-7 process 1's, interleaved in the mesh (like a TPU pod's
# physical order, which ignores process boundaries).
INTERLEAVED = (0, 4, 1, 5, 2, 6, 3, 7)


def _ordered_mesh(order, data=2, fsdp=4, **extra):
  devices = [jax.devices()[i] for i in order]
  return sharding_lib.make_mesh(ml_collections.ConfigDict(
      dict(data=data, fsdp=fsdp, **extra)), devices=devices)


def _rows_by_mesh_position(mesh, num_rows):
  """Reference: the batch is split over ('data', 'fsdp') row-major, so the
  device at flat mesh position j holds rows [j*m, (j+1)*m)."""
  m = num_rows // mesh.size
  return {d: np.arange(j * m, (j + 1) * m)
          for j, d in enumerate(mesh.devices.flat)}


@pytest.mark.parametrize("order", [tuple(range(8)), INTERLEAVED,
                                   (5, 2, 7, 0, 3, 6, 1, 4)])
def test_every_device_holds_the_rows_of_its_mesh_position(order):
  mesh = _ordered_mesh(order)
  data = np.arange(16 * 3).reshape(16, 3)
  want = _rows_by_mesh_position(mesh, 16)
  for array in (sharding_lib.rows_to_global(data, mesh),
                sharding_lib.host_to_global(data, mesh)):
    np.testing.assert_array_equal(np.asarray(array), data)
    assert len(array.addressable_shards) == 8
    for shard in array.addressable_shards:
      np.testing.assert_array_equal(shard.data, data[want[shard.device]])


def test_host_rows_are_the_rows_of_the_process_devices_not_a_block():
  devices = jax.devices()
  process_of = {d: int(d.id >= 4) for d in devices}  # Two pretend hosts.
  for order, process_major in [(tuple(range(8)), True), (INTERLEAVED, False)]:
    mesh = _ordered_mesh(order)
    want = _rows_by_mesh_position(mesh, 32)
    blocks = []
    for p in (0, 1):
      mine = [d for d in devices if process_of[d] == p]
      rows = sharding_lib.host_rows(mesh, 32, devices=mine)
      np.testing.assert_array_equal(
          rows, np.sort(np.concatenate([want[d] for d in mine])))
      blocks.append(rows)
    np.testing.assert_array_equal(np.sort(np.concatenate(blocks)),
                                  np.arange(32))
    # The contiguous-block assumption holds only on a process-major mesh.
    assert (blocks[0] == np.arange(16)).all() == process_major
  assert list(sharding_lib.host_rows(_ordered_mesh(INTERLEAVED), 16)) == list(
      range(16))  # One process: every row.
  with pytest.raises(ValueError, match="does not split over the 8 devices"):
    sharding_lib.host_rows(mesh, 12)


def test_rows_to_global_takes_rows_in_any_order_and_names_missing_ones():
  mesh = _ordered_mesh((5, 2, 7, 0, 3, 6, 1, 4))
  data = np.random.default_rng(0).normal(size=(16, 5)).astype(np.float32)
  rows = np.random.default_rng(1).permutation(16)
  got = sharding_lib.rows_to_global(data[rows], mesh, rows=rows, num_rows=16)
  np.testing.assert_array_equal(np.asarray(got), data)
  with pytest.raises(ValueError, match=r"needs global rows \[14 15\] of 16"):
    sharding_lib.rows_to_global(data[:14], mesh, rows=np.arange(14),
                                num_rows=16)
  with pytest.raises(ValueError, match="duplicates"):
    sharding_lib.rows_to_global(data[:2], mesh, rows=[3, 3], num_rows=16)


def _slice_of_id(group_size):
  return lambda device: device.id // group_size


@pytest.mark.parametrize("order", [tuple(range(8)), INTERLEAVED])
def test_hybrid_mesh_spans_slices_along_data(order):
  devices = [jax.devices()[i] for i in order]
  config = ml_collections.ConfigDict(dict(data=4, fsdp=2, slices=2))
  slice_of = _slice_of_id(4)
  mesh = sharding_lib.make_mesh(config, devices, slice_of=slice_of)
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))
  # 'data' index i (all its fsdp devices) lies in slice i // 2: the DCN
  # axis is the outer part of 'data', 'fsdp' never crosses a slice.
  slice_grid = np.vectorize(slice_of)(mesh.devices)
  np.testing.assert_array_equal(slice_grid, [[0, 0], [0, 0], [1, 1], [1, 1]])
  # Four slices of two devices: each 'data' index is a whole slice.
  config.update(slices=4, data=4, fsdp=2)
  mesh4 = sharding_lib.make_mesh(config, devices, slice_of=_slice_of_id(2))
  np.testing.assert_array_equal(np.vectorize(_slice_of_id(2))(mesh4.devices),
                                [[0, 0], [1, 1], [2, 2], [3, 3]])
  # Batches and the sharded loss work on it like on any mesh.
  rng = np.random.default_rng(0)
  z = rng.normal(size=(2, 32, 8)).astype(np.float32)
  z /= np.linalg.norm(z, axis=-1, keepdims=True)
  batch = sharding_lib.rows_to_global(z.transpose(1, 0, 2), mesh)
  np.testing.assert_array_equal(np.asarray(batch), z.transpose(1, 0, 2))
  loss = losses.get_loss("softmax")
  on_mesh = jax.jit(lambda b: loss(b[:, 0], b[:, 1], 10.0, None, mesh=mesh))
  np.testing.assert_allclose(on_mesh(batch), loss(z[0], z[1], 10.0, None),
                             rtol=1e-5)


@pytest.mark.parametrize("mesh_keys, slice_of, message", [
    (dict(data=3, fsdp=-1, slices=3), None, "does not divide the 8 devices"),
    (dict(data=2, fsdp=4, slices=4), _slice_of_id(2),
     r"slices=4 must divide the 'data' axis \(mesh.data=2\)"),
    (dict(data=4, fsdp=2, slices=2), None, "has no slice_index"),
    (dict(data=4, fsdp=2, slices=2), _slice_of_id(2),  # 4 groups, not 2.
     "Number of slices 4 must equal"),
    (dict(data=4, fsdp=2, slices=2, dcn_granule="process"), None,
     "Number of slices 1 must equal"),  # One process here.
    (dict(data=4, fsdp=2, slices=2, dcn_granule="host"), None,
     "dcn_granule='host'"),
    (dict(data=4, fsdp=2, slices=0), None, "slices=0 must be an integer"),
])
def test_hybrid_mesh_errors(mesh_keys, slice_of, message):
  with pytest.raises(ValueError, match=message):
    sharding_lib.make_mesh(ml_collections.ConfigDict(mesh_keys),
                           slice_of=slice_of)


def test_validate_checks_slices_before_compiling():
  config = config_lib.load_config_file("configs/clip.py", "tiny,batch=32")
  config.mesh.update(data=2, fsdp=4, slices=4)
  with pytest.raises(ValueError, match="slices=4 must divide"):
    config_lib.validate(config, device_count=8)
  config.mesh.update(data=4, fsdp=2, slices=2)
  config_lib.validate(config, device_count=8)


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_losses_ignore_where_pairs_sit_in_the_global_batch(name):
  """Why training may keep process-local placement (host_to_global's
  docstring): on a non-process-major mesh the step sees the pairs in
  another row order. Every loss and its gradients must not change, other
  than by float summation order; per-row gradients move with their rows."""
  mesh = _ordered_mesh(INTERLEAVED)
  rng = np.random.default_rng(0)
  z = rng.normal(size=(2, 32, 8)).astype(np.float32)
  z /= np.linalg.norm(z, axis=-1, keepdims=True)
  perm = rng.permutation(32)
  loss = functools.partial(losses.get_loss(name), mesh=mesh)
  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))

  def run(zimg, ztxt):
    put = lambda x: sharding_lib.rows_to_global(x, mesh)
    return jax.device_get(grad(put(zimg), put(ztxt), np.float32(10.0),
                               np.float32(-5.0)))

  (value, (gi, gt, gs, gb)) = run(z[0], z[1])
  (pvalue, (pgi, pgt, pgs, pgb)) = run(z[0][perm], z[1][perm])
  np.testing.assert_allclose(pvalue, value, rtol=1e-6)
  np.testing.assert_allclose(pgi, gi[perm], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(pgt, gt[perm], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose([pgs, pgb], [gs, gb], rtol=1e-5)
  # Control: breaking the pairs (texts alone permuted) changes the loss.
  (broken, _) = run(z[0], z[1][perm])
  assert abs(broken - value) > 1e-3
