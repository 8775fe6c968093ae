"""train_state.combine_extra_losses: several extra losses as one."""

import jax.numpy as jnp
import numpy as np

from clip_jax import train_state


def _scaled_norm(name, weight, exact=True, keys=()):
  """A toy extra loss: weight x ||zimg - its target||^2, target = the batch
  field `name` times its own step input."""
  def targets(factor, batch):
    return batch[name] * factor

  def loss(params, zimg, ztxt, out, target, factor):
    del params, ztxt, out, factor
    value = jnp.sum((zimg - target) ** 2)
    return weight * value, {f"{name}/value": value}

  return train_state.ExtraLoss(targets, loss, keys, exact)


def test_combined_losses_add_up_and_route_their_own_inputs():
  a = _scaled_norm("a", 2.0, keys=("proj_a",))
  b = _scaled_norm("b", 0.5, exact=False, keys=("proj_b",))
  both = train_state.combine_extra_losses([a, None, b])
  batch = {"a": jnp.ones((2, 3)), "b": jnp.full((2, 3), 3.0)}
  inputs = (10.0, -1.0)  # One step input per extra loss, in order.
  targets = both.targets(inputs, batch)
  np.testing.assert_array_equal(targets[0], np.full((2, 3), 10.0))
  np.testing.assert_array_equal(targets[1], np.full((2, 3), -3.0))
  zimg = jnp.zeros((2, 3))
  value, metrics = both.loss({}, zimg, None, {}, targets, inputs)
  # a: 6 entries of (0 - 10)^2 = 600; b: 6 of (0 + 3)^2 = 54.
  assert metrics == {"a/value": 600.0, "b/value": 54.0}
  assert float(value) == 2.0 * 600 + 0.5 * 54
  assert both.param_keys == ("proj_a", "proj_b")
  assert not both.exact_accumulation  # b runs a tower itself.


def test_one_or_no_extra_loss_is_passed_through():
  a = _scaled_norm("a", 1.0)
  assert train_state.combine_extra_losses([None, a]) is a
  assert train_state.combine_extra_losses([]) is None
