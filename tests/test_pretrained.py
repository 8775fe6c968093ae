"""config.init: included params equal the source checkpoint's exactly, the
others equal a fresh init; shape mismatches and bad steps are named."""

import re

import jax
import ml_collections
import numpy as np
import pytest
from train_testing import state_of_seed, tiny_config, write_source

from clip_jax import config as config_lib
from clip_jax import optim, pretrained
from clip_jax import sharding as sharding_lib


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  config = tiny_config("softmax", "replicate")
  mesh = sharding_lib.make_mesh(config.mesh)
  workdir = tmp_path_factory.mktemp("source")
  return workdir, write_source(workdir, config, {3: 11, 5: 12}, mesh)


def _flat(tree):
  return {optim.path_str(p): np.asarray(x) for p, x in
          jax.tree_util.tree_flatten_with_path(tree)[0]}


def _init(config, step=None, include="img/.*"):
  mesh = sharding_lib.make_mesh(config.mesh)
  state, shardings = state_of_seed(config, config.seed, mesh)
  fresh = jax.device_get(state["params"])
  init = ml_collections.ConfigDict(dict(workdir=None, step=step,
                                        include=include))
  return fresh, state, shardings, init


@pytest.mark.parametrize("step, include", [
    (None, "img/.*"), (3, "img/.*|img_proj/.*|logit_scale"), (5, "txt/.*")])
def test_included_params_come_from_the_source(source, step, include):
  workdir, saved = source
  config = tiny_config("softmax", "replicate")
  fresh, state, shardings, init = _init(config, step, include)
  init.workdir = str(workdir)
  params = pretrained.init_params(state["params"], init, shardings["params"])
  got, want = _flat(params), _flat(saved[step or 5])
  # The other checkpoint of the source.
  fresh, other = _flat(fresh), _flat(saved[3 if step in (None, 5) else 5])
  included = [p for p in got if re.fullmatch(include, p)]
  assert included and len(included) < len(got)
  distinct = 0
  for path, value in got.items():
    expected, alternative = ((want[path], other[path]) if path in included
                             else (fresh[path], want[path]))
    assert value.tobytes() == expected.tobytes(), path
    # Random leaves (not zero-initialised biases) tell the sources apart.
    distinct += value.tobytes() != alternative.tobytes()
  random_leaves = sum(want[p].tobytes() != other[p].tobytes() for p in got)
  assert distinct == random_leaves > 10
  # In the run's own shardings.
  for leaf, sharding in zip(jax.tree_util.tree_leaves(params),
                            jax.tree_util.tree_leaves(shardings["params"])):
    assert leaf.sharding == sharding


def test_no_workdir_changes_nothing(source):
  config = tiny_config("softmax", "replicate")
  fresh, state, shardings, init = _init(config)
  params = pretrained.init_params(state["params"], init, shardings["params"])
  assert params is state["params"]


def test_shape_mismatch_names_the_param_and_both_shapes(source):
  workdir, _ = source
  config = tiny_config("softmax", "replicate")
  config.model.text.context_length = config.data.context_length = 16
  _, state, shardings, init = _init(config, include="txt/.*")
  init.workdir = str(workdir)
  with pytest.raises(ValueError, match=r"txt/pos_embed has shape \(8, 32\) "
                     r"in .* but \(16, 32\) in this run's model"):
    pretrained.init_params(state["params"], init, shardings["params"])


def test_bad_step_include_and_workdir(source, tmp_path):
  workdir, _ = source
  config = tiny_config("softmax", "replicate")
  _, state, shardings, init = _init(config, step=4)
  init.workdir = str(workdir)
  with pytest.raises(ValueError, match=r"init.step=4 .* has steps \[3, 5\]"):
    pretrained.init_params(state["params"], init, shardings["params"])
  init.step, init.include = None, "image/.*"
  with pytest.raises(ValueError, match="'image/.*' matches no parameter"):
    pretrained.init_params(state["params"], init, shardings["params"])
  init.include, init.workdir = "img/.*", str(tmp_path)
  with pytest.raises(ValueError, match="has no checkpoint"):
    pretrained.init_params(state["params"], init, shardings["params"])
  config.init.workdir = str(tmp_path)
  with pytest.raises(ValueError, match="has no checkpoints/ folder"):
    config_lib.validate(config, device_count=8)
