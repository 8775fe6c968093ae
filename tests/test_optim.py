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
