"""configs/lit.py end to end: a mu-size LiT run from a workdir made here
keeps the source's image tower and projection bit for bit, trains the text
tower, and a resumed run keeps its own checkpoint."""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from _train_worker import synthetic_stream
from train_testing import write_source

from clip_jax import config as config_lib
from clip_jax import optim, train
from clip_jax import sharding as sharding_lib


def _run(config, workdir):
  stream = synthetic_stream(config, 0, 1)
  return train.train(config, str(workdir), data=(stream, None),
                     allow_config_change=True)


def _params(workdir, step):
  """{path: numpy} of a checkpoint's params, read with orbax directly."""
  path = os.path.join(str(workdir), "checkpoints", str(step), "state")
  with ocp.PyTreeCheckpointer() as checkpointer:
    tree = checkpointer.restore(path)
  return {optim.path_str(p): np.asarray(x) for p, x in
          jax.tree_util.tree_flatten_with_path(tree["params"])[0]}


def _lit_config(source, **overrides):
  config = config_lib.load_config_file("configs/lit.py",
                                       f"init={source},tiny,batch=32")
  config.total_steps = 3
  config.warmup_steps = 1
  config.log_every_steps = 1
  config.checkpoint_every_steps = 100
  config.update_from_flattened_dict(overrides)
  return config


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """The pretrained clip_jax workdir LiT starts from: a CLIP config and a
  checkpoint at step 2 (seed 7: not lit's seed, so a fresh init differs)."""
  workdir = tmp_path_factory.mktemp("pretrained") / "clip"
  config = config_lib.load_config_file("configs/clip.py", "tiny,batch=32")
  write_source(workdir, config, {2: 7},
               sharding_lib.make_mesh(config.mesh))
  return workdir


def test_lit_locks_the_pretrained_image_tower(source, tmp_path):
  config = _lit_config(source)
  assert config.freeze == config.init.include == "img/.*|img_proj/.*"
  result = _run(config, tmp_path / "lit")
  assert result.step == 3 and np.isfinite(result.metrics["loss"])
  before, after = _params(source, 2), _params(tmp_path / "lit", 3)
  assert before.keys() == after.keys()
  locked = [p for p in after if p.startswith(("img/", "img_proj/"))]
  assert len(locked) > 10
  for path in locked:
    assert after[path].tobytes() == before[path].tobytes(), path
  # The text tower trained (from scratch: differs from the source's too).
  moved = [p for p in after if p.startswith("txt/")
           and after[p].tobytes() != before[p].tobytes()]
  assert len(moved) > 10

  # Resume to 4 steps with init pointing elsewhere: the run keeps its own
  # checkpoint (init is read at step 0 only), the tower stays locked.
  config = _lit_config(source, total_steps=4)
  config.init.workdir = str(tmp_path / "nowhere-but-allowed")
  os.makedirs(os.path.join(config.init.workdir, "checkpoints"))
  assert _run(config, tmp_path / "lit").step == 4
  resumed = _params(tmp_path / "lit", 4)
  for path in locked:
    assert resumed[path].tobytes() == before[path].tobytes(), path


def test_lit_arguments(source):
  config = config_lib.load_config_file(
      "configs/lit.py", f"init={source},tiny,batch=32,img_head")
  assert config.freeze == config.init.include == "img/.*"  # Fresh img_proj.
  pretrained = config_lib.load_config_file(
      "configs/lit.py", f"init={source},tiny,batch=32,text=pretrained")
  assert pretrained.init.include.startswith("img/.*|img_proj/.*|txt/.*")
  with pytest.raises(ValueError, match="text=pretrained needs init"):
    config_lib.load_config_file("configs/lit.py", "tiny,text=pretrained")
