"""NT-Xent (SLIP) and label-smoothed softmax (ALIGN) vs float64 NumPy.

Both the value and the gradients, dense and sharded over the test meshes
(including a deliberately permuted device order), against formulas with
hand-derived gradients written here in NumPy.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from clip_jax import losses
from clip_jax import sharding as sharding_lib

N, E = 32, 16
MESH_SHAPES = [(1, 1), (8, 1), (4, 2), (2, 4), (1, 8)]


def _softmax(x, axis):
  x = x - x.max(axis=axis, keepdims=True)
  e = np.exp(x)
  return e / e.sum(axis=axis, keepdims=True)


def _lse(x, axis):
  m = x.max(axis=axis, keepdims=True)
  return (m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))).squeeze(
      axis)


def numpy_nt_xent(h1, h2, tau):
  """SimCLR's loss over the 2N x 2N similarity matrix and its grads."""
  n = len(h1)
  z = np.concatenate([h1, h2])
  s = z @ z.T / tau
  np.fill_diagonal(s, -np.inf)  # A view is not its own negative.
  positive = (np.arange(2 * n) + n) % (2 * n)
  value = (_lse(s, 1) - s[np.arange(2 * n), positive]).mean()
  g = _softmax(s, 1)
  g[np.arange(2 * n), positive] -= 1
  g /= 2 * n  # dL/ds; zero on the diagonal.
  dz = (g + g.T) @ z / tau
  return value, (dz[:n], dz[n:])


def numpy_smoothed_softmax(a, b, scale, eps):
  """CLIP's loss with targets (1 - eps) one-hot + eps / N, and its grads."""
  n = len(a)
  sim = a @ b.T
  z = scale * sim
  value = ((_lse(z, 1) + _lse(z, 0)).sum() - 2 * (1 - eps) * np.trace(z)
           - eps * (z.mean(1).sum() + z.mean(0).sum())) / (2 * n)
  target = (1 - eps) * np.eye(n) + eps / n
  g = (_softmax(z, 1) - target + _softmax(z, 0) - target) / (2 * n)
  return value, (scale * g @ b, scale * g.T @ a, (g * sim).sum())


def _unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _pairs(n=N, seed=0, noise=0.5):
  rng = np.random.default_rng(seed)
  a = _unit(rng.normal(size=(n, E)))
  return a, _unit(a + noise * rng.normal(size=(n, E)))


@functools.lru_cache(maxsize=None)
def _mesh(shape, permuted=False):
  devices = list(jax.devices()[:shape[0] * shape[1]])
  if permuted:  # Device order unrelated to the devices' ids.
    devices = [devices[i] for i in
               np.random.default_rng(7).permutation(len(devices))]
  return sharding_lib.make_mesh(
      ml_collections.ConfigDict(dict(data=shape[0], fsdp=shape[1])),
      np.array(devices))


def _put(mesh, *xs):
  if mesh is None:
    return [jnp.float32(x) for x in xs]
  sharding = sharding_lib.batch_sharding(mesh)
  return [jax.device_put(jnp.float32(x), sharding) for x in xs]


def _assert_close(got, want, rtol, what):
  atol = rtol * max(np.abs(want).max(), 1e-2)
  np.testing.assert_allclose(np.asarray(got), want, rtol=rtol, atol=atol,
                             err_msg=what)


MESHES = [None] + [(s, False) for s in MESH_SHAPES] + [((4, 2), True),
                                                        ((8, 1), True)]


@pytest.mark.parametrize("mesh_key,tau", [(m, 0.1) for m in MESHES]
                         + [(None, 0.5), (((4, 2), True), 0.5)], ids=str)
def test_nt_xent_matches_numpy(mesh_key, tau):
  mesh = None if mesh_key is None else _mesh(*mesh_key)
  h1, h2 = _pairs(seed=1)
  fn = jax.jit(jax.value_and_grad(
      lambda a, b: losses.nt_xent_loss(a, b, tau, mesh=mesh), argnums=(0, 1)))
  value, grads = fn(*_put(mesh, h1, h2))
  ref_value, ref_grads = numpy_nt_xent(h1, h2, tau)
  np.testing.assert_allclose(float(value), ref_value, rtol=2e-5)
  for got, want, what in zip(grads, ref_grads, ("h1", "h2")):
    _assert_close(got, want, 2e-5, f"d/d{what} {mesh_key}")


def test_nt_xent_known_values():
  """Identical views of orthogonal images: each anchor's positive logit is
  1/tau and its 2N - 2 negatives 0, so the loss is
  log(e^(1/tau) + 2N - 2) - 1/tau exactly."""
  n, tau = 8, 0.5  # A loss of ~1 (at 0.1 it is 6e-4: float32 noise).
  h = np.eye(n, E)
  value = losses.nt_xent_loss(jnp.float32(h), jnp.float32(h), tau)
  want = np.log(np.exp(1 / tau) + 2 * n - 2) - 1 / tau
  np.testing.assert_allclose(float(value), want, rtol=1e-5)


def test_nt_xent_rejects_bad_inputs():
  h = jnp.ones((8, E))
  with pytest.raises(ValueError, match="temperature=0.0 must be > 0"):
    losses.nt_xent_loss(h, h, 0.0)
  with pytest.raises(ValueError, match="differ in shape"):
    losses.nt_xent_loss(h, h[:4], 0.1)
  with pytest.raises(ValueError, match="12 examples cannot be split"):
    losses.nt_xent_loss(jnp.ones((12, E)), jnp.ones((12, E)), 0.1,
                        mesh=_mesh((8, 1)))


@pytest.mark.parametrize("mesh_key,eps", [(m, 0.1) for m in MESHES]
                         + [(None, 0.5), (((4, 2), True), 0.5)], ids=str)
def test_label_smoothing_matches_numpy(mesh_key, eps):
  mesh = None if mesh_key is None else _mesh(*mesh_key)
  a, b = _pairs(seed=2, noise=0.7)
  fn = jax.jit(jax.value_and_grad(
      lambda x, y, s: losses.softmax_loss(x, y, s, None, mesh=mesh,
                                          label_smoothing=eps),
      argnums=(0, 1, 2)))
  value, grads = fn(*_put(mesh, a, b), jnp.float32(10.0))
  ref_value, ref_grads = numpy_smoothed_softmax(a, b, 10.0, eps)
  np.testing.assert_allclose(float(value), ref_value, rtol=2e-5)
  for got, want, what in zip(grads, ref_grads, ("zimg", "ztxt", "scale")):
    _assert_close(got, want, 2e-5, f"d/d{what} {mesh_key}")


@pytest.mark.parametrize("mesh_key", [None, ((4, 2), False)], ids=str)
def test_label_smoothing_zero_is_the_plain_loss_program(mesh_key):
  """eps = 0 compiles to the very program of the loss without the argument
  (bit-identical value), so a config that leaves it at 0 trains as before."""
  mesh = None if mesh_key is None else _mesh(*mesh_key)
  a, b = _put(mesh, *_pairs(seed=3))
  plain = jax.jit(lambda x, y: losses.softmax_loss(x, y, 10.0, mesh=mesh))
  zero = jax.jit(lambda x, y: losses.softmax_loss(
      x, y, 10.0, mesh=mesh, label_smoothing=0.0))
  assert plain.lower(a, b).as_text() == zero.lower(a, b).as_text()
  assert float(plain(a, b)) == float(zero(a, b))


def test_label_smoothing_out_of_range():
  a = jnp.ones((8, E))
  with pytest.raises(ValueError, match=r"label_smoothing=1.0 must be in"):
    losses.softmax_loss(a, a, 1.0, label_smoothing=1.0)


def test_loss_from_config_binds_label_smoothing():
  config = ml_collections.ConfigDict(dict(loss="softmax",
                                          label_smoothing=0.0))
  assert losses.loss_from_config(config) is losses.softmax_loss
  config.label_smoothing = 0.1
  a, b = _pairs(seed=4)
  value = losses.loss_from_config(config)(jnp.float32(a), jnp.float32(b),
                                          10.0, None)
  np.testing.assert_allclose(float(value),
                             numpy_smoothed_softmax(a, b, 10.0, 0.1)[0],
                             rtol=2e-5)
  config.loss = "sigmoid"
  with pytest.raises(ValueError, match="label_smoothing=0.1 needs"):
    losses.loss_from_config(config)


def test_nt_xent_communication_is_gathers_and_scalar_reductions():
  """Both views are gathered ([N, E] each); the embedding gradients come
  back through reduce-scatter, never an [N, E] all-reduce."""
  import re  # pylint: disable=g-import-not-at-top
  mesh = _mesh((4, 2))
  h1, h2 = _put(mesh, *_pairs(seed=5))
  hlo = jax.jit(jax.grad(lambda a, b: losses.nt_xent_loss(
      a, b, 0.1, mesh=mesh), argnums=(0, 1))).lower(h1, h2).compile(
          ).as_text()
  assert "all-gather" in hlo
  assert "reduce-scatter" in hlo or "all-to-all" in hlo
  for line in hlo.splitlines():
    if re.search(r"\ball-reduce(-start)?\(", line):
      result_type = line.split("=", 1)[1].split("all-reduce")[0]
      assert not re.search(r"f32\[\d", result_type), line
