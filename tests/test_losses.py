"""Losses vs a float64 NumPy formula with hand-derived gradients.

Every loss, dense and sharded over five mesh shapes, must give the NumPy
value and the NumPy gradients w.r.t. both embeddings, the scale and the bias.
The sharded losses must also never build an N x N (nor an n x N) logits
buffer on a device nor all-reduce an [N, D] gradient; they compute one
[n, n] logits block at a time, backward included, and the ring
(sigmoid_chunked) holds no more than one [n, D] block of embeddings.
"""

import functools
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from clip_jax import losses, numpy_losses
from clip_jax import sharding as sharding_lib

N, D = 64, 32
MESH_SHAPES = [(1, 1), (8, 1), (4, 2), (2, 4), (1, 8)]


def _log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def _sigmoid(x):
  return np.exp(_log_sigmoid(x))


def _softmax(x, axis):
  x = x - x.max(axis=axis, keepdims=True)
  e = np.exp(x)
  return e / e.sum(axis=axis, keepdims=True)


def numpy_softmax(a, b, s, bias):
  """Value and grads (a, b, s, bias) of CLIP's loss, float64."""
  del bias
  n = len(a)
  sim = a @ b.T
  z = s * sim
  lse_rows = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
  lse_cols = np.log(np.exp(z - z.max(0, keepdims=True)).sum(0)) + z.max(0)
  diag = np.diag(z)
  value = ((lse_rows - diag).sum() + (lse_cols - diag).sum()) / (2 * n)
  eye = np.eye(n)
  g = ((_softmax(z, 1) - eye) + (_softmax(z, 0) - eye)) / (2 * n)  # dL/dz
  return value, (s * g @ b, s * g.T @ a, (g * sim).sum(), 0.0)


def numpy_sigmoid(a, b, s, bias):
  """Value and grads of SigLIP's loss (sum over pairs / N), float64."""
  n = len(a)
  sim = a @ b.T
  z = s * sim + bias
  y = 2 * np.eye(n) - 1
  value = -_log_sigmoid(y * z).sum() / n
  g = -y * _sigmoid(-y * z) / n  # dL/dz
  return value, (s * g @ b, s * g.T @ a, (g * sim).sum(), g.sum())


REFERENCE = {"softmax": numpy_softmax, "sigmoid": numpy_sigmoid,
             "sigmoid_chunked": numpy_sigmoid}


def _keys(n, seed=0):
  """Keys with many duplicates and some -1 (no key)."""
  return np.random.default_rng(seed).integers(-1, n // 4, size=n).astype(
      np.int32)


def _reference(name, a, b, s, bias, keys=None):
  if name in REFERENCE:
    return REFERENCE[name](a, b, s, bias)
  return numpy_losses.loss_and_grads(name, a, b, s, bias, keys=keys)


def _unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _embeddings(n=N, seed=0):
  rng = np.random.default_rng(seed)
  a = _unit(rng.normal(size=(n, D)))
  b = _unit(a + 0.7 * rng.normal(size=(n, D)))  # Correlated pairs.
  return a, b


# A deliberately permuted device order: mesh position k is not device k.
PERMUTED = (5, 2, 7, 0, 3, 6, 1, 4)


@functools.lru_cache(maxsize=None)
def _mesh(shape, order=None):
  devices = jax.devices()[:shape[0] * shape[1]]
  if order is not None:
    devices = [jax.devices()[i] for i in order]
  return sharding_lib.make_mesh(
      ml_collections.ConfigDict(dict(data=shape[0], fsdp=shape[1])), devices)


@functools.lru_cache(maxsize=None)
def _value_and_grad(name, shape, order=None, keyed=False):
  mesh = None if shape is None else _mesh(shape, order)

  def fn(a, b, s, bias, keys):
    kwargs = {"keys": keys} if keyed else {}
    return losses.get_loss(name)(a, b, s, bias, mesh=mesh, **kwargs)

  return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3)))


def _check(name, shape, a, b, s, bias, rtol=2e-5, keys=None, order=None):
  """`keys` default for the keyed losses: _keys (duplicates and -1s)."""
  if keys is None and name in losses.KEYED_LOSSES:
    keys = _keys(len(a))
  fn = _value_and_grad(name, shape, order, keys is not None)
  arrays = (jnp.float32(a), jnp.float32(b),
            jnp.zeros(len(a), jnp.int32) if keys is None else keys)
  if shape is not None:
    sharding = sharding_lib.batch_sharding(_mesh(shape, order))
    arrays = [jax.device_put(x, sharding) for x in arrays]
  a32, b32, keys32 = arrays
  value, grads = fn(a32, b32, jnp.float32(s), jnp.float32(bias), keys32)
  ref_value, ref_grads = _reference(name, a, b, s, bias, keys)
  np.testing.assert_allclose(float(value), ref_value, rtol=rtol)
  for got, want, what in zip(grads, ref_grads, ("zimg", "ztxt", "scale",
                                                "bias")):
    # float32 rounding relative to the gradient's own magnitude (with a floor
    # for gradients that are exactly zero, e.g. identical pairs).
    atol = rtol * max(np.abs(want).max(), 1e-2)
    np.testing.assert_allclose(np.asarray(got), want, rtol=rtol, atol=atol,
                               err_msg=f"{name} {shape} d/d{what}")


# The paper losses on every mesh shape; the method losses (issue 13) on the
# single-device, pure-data and mixed meshes (they share the paper losses'
# sharding code: gathers, tiles, offsets).
PAPER_LOSSES = ("softmax", "sigmoid", "sigmoid_chunked")
LOSS_AND_SHAPE = (
    [(name, shape) for name in PAPER_LOSSES for shape in [None] + MESH_SHAPES]
    + [(name, shape) for name in sorted(set(losses.LOSSES) - set(PAPER_LOSSES))
       for shape in (None, (8, 1), (2, 4))])


@pytest.mark.parametrize("name, shape", LOSS_AND_SHAPE)
def test_value_and_grads_match_numpy(name, shape):
  a, b = _embeddings()
  _check(name, shape, a, b, s=10.0, bias=-3.0)


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_batch_equal_to_device_count(name):
  a, b = _embeddings(n=8, seed=1)
  _check(name, (8, 1), a, b, s=1 / 0.07, bias=-10.0)


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_identical_pairs(name):
  a = _unit(np.ones((N, D)))  # Every image and text is the same vector.
  _check(name, (2, 4), a, a.copy(), s=10.0, bias=-10.0)


@pytest.mark.parametrize("shape", [None, (4, 2)])
@pytest.mark.parametrize("scale", [100.0, 1000.0])
@pytest.mark.parametrize(  # The VSE losses ignore the scale.
    "name", sorted(set(losses.LOSSES) - set(losses.MARGIN_LOSSES)))
def test_very_large_scale_is_finite_and_exact(name, scale, shape):
  a, b = _embeddings(seed=2)
  # float32 logits of size ~scale lose ~scale * 6e-8 absolutely.
  _check(name, shape, a, b, s=scale, bias=-10.0, rtol=2e-4)


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_eager_call_with_unsharded_bfloat16_inputs(name):
  """No outer jit, host arrays: shard_map places them itself (Auto mesh)."""
  a, b = _embeddings(seed=3)
  a16, b16 = (np.asarray(jnp.asarray(x, jnp.bfloat16)) for x in (a, b))
  value = losses.get_loss(name)(a16, b16, 10.0, -3.0, mesh=_mesh((2, 4)))
  assert value.dtype == jnp.float32
  ref_value, _ = _reference(name, a16.astype(np.float64),
                            b16.astype(np.float64), 10.0, -3.0)
  np.testing.assert_allclose(float(value), ref_value, rtol=2e-5)


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_batch_not_divisible_by_devices(name):
  a, b = _embeddings(n=12)
  with pytest.raises(ValueError, match="12 examples cannot be split over the "
                     "8 devices"):
    losses.get_loss(name)(jnp.float32(a), jnp.float32(b), 1.0, 0.0,
                          mesh=_mesh((8, 1)))


def test_unknown_loss_lists_valid_names():
  with pytest.raises(ValueError, match="'infonce'.*sigmoid, sigmoid_chunked, "
                     "softmax"):
    losses.get_loss("infonce")


def _shapes_in_hlo(hlo):
  return {tuple(int(d) for d in dims.split(",") if d)
          for dims in re.findall(r"f32\[([\d,]*)\]", hlo)}


@pytest.mark.parametrize("shape", [(8, 1), (2, 4)])
@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_compiled_memory_and_communication(name, shape):
  mesh = _mesh(shape)
  sharding = sharding_lib.batch_sharding(mesh)
  a, b = (jax.device_put(jnp.float32(x), sharding) for x in _embeddings())
  keyed = name in losses.KEYED_LOSSES
  keys = jax.device_put(_keys(N), sharding)
  hlo = _value_and_grad(name, shape, None, keyed).lower(
      a, b, jnp.float32(10.0), jnp.float32(-1.0), keys).compile().as_text()
  shapes = _shapes_in_hlo(hlo)
  n_local = N // mesh.size
  assert (N, N) not in shapes  # No device holds the full logits matrix.
  # Every loss computes one [n, n] logits block at a time (column tiles of
  # the gathered embeddings, or the ring's blocks): no [n, N] logits.
  assert (n_local, n_local) in shapes
  assert (n_local, N) not in shapes, sorted(shapes)
  biggest = max(np.prod(s, dtype=int) for s in shapes)
  if name == "sigmoid_chunked":
    # One [n, n] logits block and one [n, D] block of embeddings at a time:
    # nothing gathered, and no per-step residuals stacked for the backward.
    assert biggest <= max(n_local * D, n_local**2), sorted(shapes)
    assert "all-gather" not in hlo and "collective-permute" in hlo
    assert "while" in hlo  # A loop over the ring, not unrolled per device.
  else:
    # The gathered [N, D] embeddings (and their gradient) are the largest.
    assert biggest <= max(N * D, n_local**2), sorted(shapes)
    assert "while" in hlo  # A loop over column tiles.
  # Only scalars are all-reduced: the embedding gradients come back through
  # reduce-scatter (the transpose of all_gather), never an [N, D] all-reduce.
  for line in hlo.splitlines():
    if re.search(r"\ball-reduce(-start)?\(", line):
      result_type = line.split("=", 1)[1].split("all-reduce")[0]
      assert not re.search(r"f32\[\d", result_type), line
  if name != "sigmoid_chunked":
    assert "reduce-scatter" in hlo or "all-to-all" in hlo or mesh.size == 1


@pytest.mark.parametrize("name", ["softmax", "sigmoid"])
def test_bench_chunked_float64_references(name):
  """The 32K step benchmark's chunked NumPy losses equal the dense ones."""
  from clip_jax import numpy_losses  # pylint: disable=g-import-not-at-top
  a, b = _embeddings(seed=4)
  if name == "softmax":
    got = numpy_losses.softmax_loss_chunked(a, b, 10.0, rows=24)
  else:
    got = numpy_losses.sigmoid_loss_chunked(a, b, 10.0, -3.0, rows=24)
  np.testing.assert_allclose(got, REFERENCE[name](a, b, 10.0, -3.0)[0],
                             rtol=1e-12)


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_permuted_device_mesh(name):
  """Mesh position k on device PERMUTED[k]: the row blocks, the offsets of
  the positives and the gathered keys follow mesh positions."""
  a, b = _embeddings(seed=5)
  _check(name, (2, 4), a, b, s=10.0, bias=-3.0, order=PERMUTED)


@pytest.mark.parametrize("shape", [None, (8, 1), (2, 4)])
def test_multi_positive_with_distinct_keys_is_softmax(shape):
  a, b = _embeddings(seed=6)
  mesh = None if shape is None else _mesh(shape)
  args = (jnp.float32(a), jnp.float32(b), jnp.float32(10.0))
  grad = lambda fn: jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))(*args)
  keys = np.arange(N, dtype=np.int32) * 7 + 3  # Any distinct keys.
  got = grad(lambda a, b, s: losses.multi_positive_loss(
      a, b, s, mesh=mesh, keys=keys))
  want = grad(lambda a, b, s: losses.softmax_loss(a, b, s, mesh=mesh))
  # The same formula, summed in another order: float32 rounding only (a
  # few ulp of the largest entry).
  jax.tree_util.tree_map(
      lambda x, y: np.testing.assert_allclose(
          x, y, rtol=1e-6, atol=1e-6 * np.abs(y).max()), got, want)
  # All keys -1 (no key): nothing is a positive but its own pair either.
  no_keys = losses.multi_positive_loss(*args, mesh=mesh,
                                       keys=np.full(N, -1, np.int32))
  np.testing.assert_allclose(no_keys, want[0], rtol=1e-6)


def test_multi_positive_toy_with_known_answer():
  """Answers by hand for N = 2: the cross-entropy of the targets (1/2, 1/2)
  (a shared key) or (1, 0) (distinct or -1 keys) against each row's
  softmax, the same in both directions."""
  a = np.array([[1.0, 0.0], [1.0, 0.0]])
  value = losses.multi_positive_loss(a, a, 5.0, keys=np.array([4, 4]))
  np.testing.assert_allclose(value, np.log(2.0), rtol=1e-6)
  b = np.array([[1.0, 0.0], [0.0, 1.0]])
  same = losses.multi_positive_loss(b, b, 5.0, keys=np.array([4, 4]))
  # Targets (1/2, 1/2) against softmax (e^5, 1) / (e^5 + 1) per row.
  p = 1 / (1 + np.exp(-5.0))
  np.testing.assert_allclose(same, -0.5 * (np.log(p) + np.log(1 - p)),
                             rtol=1e-6)
  # -1 keys are never positives of each other: the one-hot loss.
  unkeyed = losses.multi_positive_loss(b, b, 5.0, keys=np.array([-1, -1]))
  np.testing.assert_allclose(unkeyed, -np.log(p), rtol=1e-6)


def test_multi_positive_rejects_keys_of_the_wrong_shape():
  a, b = _embeddings(n=8)
  with pytest.raises(ValueError, match=r"keys have shape \(4,\); expected "
                     r"\(8,\)"):
    losses.multi_positive_loss(a, b, 1.0, keys=np.zeros(4, np.int32))


@pytest.mark.parametrize("shape", [None, (2, 4)])
@pytest.mark.parametrize("name", ["vse_max", "vse_sum"])
def test_vse_margin_and_no_scale_gradient(name, shape):
  """The margin reaches the loss; logit_scale and logit_bias get an exactly
  zero gradient (the loss uses raw cosines)."""
  a, b = _embeddings(seed=7)
  mesh = None if shape is None else _mesh(shape)
  for margin in (0.0, 0.5):
    fn = functools.partial(losses.get_loss(name), mesh=mesh, margin=margin)
    value, (dscale, dbias) = jax.value_and_grad(fn, argnums=(2, 3))(
        jnp.float32(a), jnp.float32(b), jnp.float32(10.0), jnp.float32(-3.0))
    ref, _ = numpy_losses.loss_and_grads(name, a, b, 10.0, -3.0,
                                         margin=margin)
    np.testing.assert_allclose(value, ref, rtol=2e-5)
    assert float(dscale) == 0.0 and float(dbias) == 0.0


def test_vse_max_is_the_hardest_negative():
  """Three pairs on the unit circle, hinges worked out by hand: e.g. image
  1's hardest text is 2 (cos 1 vs 0), text 1's hardest image is 2 (0.96
  vs 0.8)."""
  img = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
  txt = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
  sim = img @ txt.T  # [[1, .8, 0], [0, .6, 1], [.6, .96, .8]]
  margin = 0.2
  row = [max(0, margin - sim[i, i] + max(sim[i, j] for j in range(3)
                                         if j != i)) for i in range(3)]
  col = [max(0, margin - sim[j, j] + max(sim[i, j] for i in range(3)
                                         if i != j)) for j in range(3)]
  # row: [0, 0.2 - 0.6 + 1, 0.2 - 0.8 + 0.96]; col: [0, 0.36, 0.2 + 0.2].
  np.testing.assert_allclose(row, [0.0, 0.6, 0.36], atol=1e-12)
  np.testing.assert_allclose(col, [0.0, 0.56, 0.4], atol=1e-12)
  value = losses.vse_max_loss(img, txt, margin=margin)
  np.testing.assert_allclose(value, (sum(row) + sum(col)) / 3, rtol=1e-6)

