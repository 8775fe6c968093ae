"""Partition rules and host -> global batch assembly."""

import jax
import ml_collections
import numpy as np
from jax.sharding import PartitionSpec as P

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


def test_host_to_global_splits_batch_over_all_devices():
  mesh = _mesh(2, 4)
  local = {"x": np.arange(16 * 3).reshape(16, 3)}
  batch = sharding_lib.host_to_global(local, mesh)
  assert batch["x"].shape == (16, 3)
  np.testing.assert_array_equal(np.asarray(batch["x"]), local["x"])
  shard_rows = sorted(s.data.shape[0] for s in batch["x"].addressable_shards)
  assert shard_rows == [2] * 8  # Every device holds a distinct 2-row slice.
