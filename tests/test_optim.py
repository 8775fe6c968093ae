"""Optimiser: weight-decay mask and schedule against hand-written values."""

import math

import jax.numpy as jnp
import numpy as np
import optax

from clip_jax import config as config_lib
from clip_jax import optim


def test_decay_mask():
  params = {"img": {"kernel": jnp.zeros((4, 4)), "bias": jnp.zeros(4),
                    "cls": jnp.zeros((1, 1, 4))},
            "logit_scale": jnp.zeros(())}
  mask = optim.decay_mask(params, r"(^|/)cls$")
  assert mask == {"img": {"kernel": True, "bias": False, "cls": False},
                  "logit_scale": False}


def test_warmup_cosine_schedule():
  c = config_lib.base_config()
  c.lr, c.min_lr_ratio = 1.0, 0.1
  fn = optim.make_schedule(c, total_steps=110, warmup_steps=10)
  assert float(fn(0)) == 0.0
  np.testing.assert_allclose(float(fn(5)), 0.5, rtol=1e-6)
  np.testing.assert_allclose(float(fn(10)), 1.0, rtol=1e-6)
  # Halfway through the decay: 0.1 + 0.9 * (1 + cos(pi/2)) / 2 = 0.55.
  np.testing.assert_allclose(float(fn(60)), 0.55, rtol=1e-5)
  np.testing.assert_allclose(float(fn(110)), 0.1, rtol=1e-5)


def test_adamw_matches_formula():
  """One step on a decayed and an undecayed leaf vs the AdamW formula."""
  c = config_lib.base_config()
  c.lr, c.wd, c.schedule, c.grad_clip_norm = 0.1, 0.5, "constant", None
  params = {"w": jnp.full((2, 2), 2.0), "b": jnp.full((2,), 2.0)}
  grads = {"w": jnp.full((2, 2), 0.3), "b": jnp.full((2,), 0.3)}
  tx, _ = optim.make_optimizer(c, params, total_steps=10, warmup_steps=0)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  b1, b2, eps = c.adam.b1, c.adam.b2, c.adam.eps
  m_hat = (1 - b1) * 0.3 / (1 - b1)
  v_hat = (1 - b2) * 0.09 / (1 - b2)
  adam_step = m_hat / (math.sqrt(v_hat) + eps)
  np.testing.assert_allclose(new["w"], 2.0 - 0.1 * (adam_step + 0.5 * 2.0),
                             rtol=1e-6)
  np.testing.assert_allclose(new["b"], 2.0 - 0.1 * adam_step, rtol=1e-6)


def test_adam_moments_get_their_params_sharding():
  """An anchored rule ('^img/') shards the moments like the params.

  Matching the rules against optimiser-state paths ('0/mu/img/...') would
  miss '^img/' and silently replicate every moment.
  """
  import jax
  from jax.sharding import PartitionSpec as P

  from clip_jax import sharding as sharding_lib
  from clip_jax import train_state
  from clip_jax.models import two_towers

  config = config_lib.load_config_file("configs/clip.py", "tiny,batch=32")
  config.mesh.data, config.mesh.fsdp = 2, 4
  config.sharding_rules = [("^img/", "fsdp")]
  mesh = sharding_lib.make_mesh(config.mesh)
  model = two_towers.build_model(config.model)
  tx, _ = optim.make_optimizer(config, train_state.param_shapes(model, config),
                               total_steps=10, warmup_steps=0)
  state, _ = train_state.create_state(model, tx, config, mesh)
  params = {optim.path_str(p): x.sharding.spec for p, x in
            jax.tree_util.tree_leaves_with_path(state["params"])}
  # The rule itself: the image tower is split over 'fsdp', nothing else.
  assert params["img/encoder/block0/mlp/fc1/kernel"] == P(None, "fsdp")
  assert params["img_proj/kernel"] == P()
  assert all(spec == P() for name, spec in params.items()
             if not name.startswith("img/"))
  for moment in ("mu", "nu"):
    (tree,) = optax.tree_utils.tree_get_all_with_path(state["opt"], moment)
    specs = {optim.path_str(p): x.sharding.spec
             for p, x in jax.tree_util.tree_leaves_with_path(tree[1])}
    assert specs == params, moment
  counts = [x for p, x in jax.tree_util.tree_leaves_with_path(state["opt"])
            if x.ndim == 0]
  assert counts and all(x.sharding.spec == P() for x in counts)
