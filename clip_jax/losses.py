"""Contrastive losses over the global batch, dense or with explicit collectives.

Every loss has the signature

  fn(zimg, ztxt, logit_scale, logit_bias, mesh=None) -> float32 scalar

zimg, ztxt: L2-normalised [N, D] embeddings of the global batch; row i of
each is a matching pair. logit_scale: the multiplier (already exponentiated).
logit_bias: added to every logit (ignored by softmax, may be None there).
Logits are scale * zimg @ ztxt.T + bias, computed in float32 whatever the
input dtype.

With `mesh`, the batch is split over all the mesh's axes (PartitionSpec of
the axis tuple, as `sharding.batch_sharding` does) and the loss runs inside
shard_map: each device holds n = N / devices rows and computes only its own
row block of the logits, with its positives at column offset (linear device
index) * n. The value is the same global-batch mean as the dense loss, and so
are the gradients: the transpose of all_gather is a reduce-scatter, so each
device receives just the gradient of its own rows; only scalars are
all-reduced. On a mesh with Explicit axes the inputs must already be
batch-sharded; Auto meshes (ours) reshard them.

  softmax          CLIP's symmetric InfoNCE: mean over i of
                   (CE(row i of img->txt, i) + CE(row i of txt->img, i)) / 2.
                   Sharded: all-gather both modalities; [n, N] blocks.
  sigmoid          SigLIP: every pair is a binary problem, label +1 on the
                   diagonal and -1 elsewhere; the sum of -log sigmoid(label *
                   logit) over all N^2 pairs divided by N (the paper's
                   normalisation: per-image mean of the sum over texts).
                   Sharded: all-gather the texts; [n, N] blocks.
  sigmoid_chunked  the same value; the texts travel around a ring of devices
                   (ppermute), so a device holds one [n, n] block and one
                   [n, D] block of texts at a time, forward and backward.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P


def _logits(zimg, ztxt, scale, bias=None):
  logits = scale * (zimg @ ztxt.T)
  return logits if bias is None else logits + bias


def _softmax_sum(zimg, ztxt_all, scale, offset):
  """Sum over the rows of zimg of CE(logits row, label offset + row)."""
  logits = _logits(zimg, ztxt_all, scale)
  labels = offset + jnp.arange(zimg.shape[0])
  correct = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
  return jnp.sum(jax.nn.logsumexp(logits, axis=1) - correct)


def _sigmoid_sum(zimg, ztxt, scale, bias, offset):
  """Sum of -log sigmoid(label * logit) over a block of pairs.

  Positives are (row r, column offset + r); offset may put them outside the
  block (then the block has none).
  """
  logits = _logits(zimg, ztxt, scale, bias)
  rows = jnp.arange(zimg.shape[0])[:, None]
  cols = jnp.arange(ztxt.shape[0])[None, :]
  labels = jnp.where(cols == rows + offset, 1.0, -1.0)
  return -jnp.sum(jax.nn.log_sigmoid(labels * logits))


def _f32(*xs):
  return [None if x is None else jnp.asarray(x, jnp.float32) for x in xs]


def _check_divisible(n: int, mesh) -> int:
  devices = mesh.size
  if n % devices:
    raise ValueError(
        f"Global batch of {n} examples cannot be split over the {devices} "
        f"devices of the mesh {dict(mesh.shape)}; use a multiple of {devices}.")
  return devices


def _sharded(mesh, body, *args):
  """Runs body(*local_args, axes) with batch-sharded [N, D] args + scalars."""
  axes = tuple(mesh.axis_names)
  specs = tuple(P(axes) if jnp.ndim(a) else P() for a in args)
  fn = jax.shard_map(functools.partial(body, axes=axes), mesh=mesh,
                     in_specs=specs, out_specs=P())
  return fn(*args)


def softmax_loss(zimg, ztxt, logit_scale, logit_bias=None, mesh=None):
  del logit_bias  # InfoNCE is invariant to a shared bias.
  zimg, ztxt, scale = _f32(zimg, ztxt, logit_scale)
  n = zimg.shape[0]
  if mesh is None:
    return (_softmax_sum(zimg, ztxt, scale, 0) +
            _softmax_sum(ztxt, zimg, scale, 0)) / (2 * n)
  _check_divisible(n, mesh)

  def body(zimg, ztxt, scale, axes):
    offset = jax.lax.axis_index(axes) * zimg.shape[0]
    ztxt_all = jax.lax.all_gather(ztxt, axes, tiled=True)
    zimg_all = jax.lax.all_gather(zimg, axes, tiled=True)
    local = (_softmax_sum(zimg, ztxt_all, scale, offset) +
             _softmax_sum(ztxt, zimg_all, scale, offset))
    return jax.lax.psum(local, axes) / (2 * n)

  return _sharded(mesh, body, zimg, ztxt, scale)


def sigmoid_loss(zimg, ztxt, logit_scale, logit_bias, mesh=None):
  zimg, ztxt, scale, bias = _f32(zimg, ztxt, logit_scale, logit_bias)
  n = zimg.shape[0]
  if mesh is None:
    return _sigmoid_sum(zimg, ztxt, scale, bias, 0) / n
  _check_divisible(n, mesh)

  def body(zimg, ztxt, scale, bias, axes):
    offset = jax.lax.axis_index(axes) * zimg.shape[0]
    ztxt_all = jax.lax.all_gather(ztxt, axes, tiled=True)
    local = _sigmoid_sum(zimg, ztxt_all, scale, bias, offset)
    return jax.lax.psum(local, axes) / n

  return _sharded(mesh, body, zimg, ztxt, scale, bias)


def _ring_perm(axes):
  """Device j sends to device j + 1 (linear index over `axes`)."""
  size = jax.lax.axis_size(axes)
  return [(j, (j + 1) % size) for j in range(size)]


def _ring(axes, step, travelling, local):
  """Runs step(k, travelling, local) -> (travelling, local), k = 0..size-1.

  Before each step but the first, `travelling` hops one device along the
  ring, so at step k device i holds what device i - k started with. A
  fori_loop: the HLO holds one step, not one per device.
  """
  def hop_then_step(k, carry):
    travelling, local = carry
    return step(k, jax.lax.ppermute(travelling, axes, _ring_perm(axes)), local)

  return jax.lax.fori_loop(1, jax.lax.axis_size(axes), hop_then_step,
                           step(0, travelling, local))


def _ring_offset(k, n):
  """Positives only at step 0, where a device holds its own texts."""
  return jnp.where(k == 0, 0, n)  # Offset n: outside the [n, n] block.


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _ring_sigmoid_sum(zimg, ztxt, scale, bias, axes):
  """This device's rows of the sigmoid sum, the texts passed around a ring.

  A custom gradient because autodiff of the loop would store every step's
  [n, n] block (together, an [n, N] one) and every step's texts.
  """
  def step(k, texts, total):
    offset = _ring_offset(k, zimg.shape[0])
    return texts, total + _sigmoid_sum(zimg, texts, scale, bias, offset)

  return _ring(axes, step, ztxt, jnp.zeros_like(scale))[1]


def _ring_sigmoid_fwd(zimg, ztxt, scale, bias, axes):
  loss = _ring_sigmoid_sum(zimg, ztxt, scale, bias, axes)
  return loss, (zimg, ztxt, scale, bias)


def _ring_sigmoid_bwd(axes, inputs, g):
  """The same ring again, each block recomputed and differentiated.

  The texts' gradient travels with the texts, every device adding its
  block's contribution, and takes one last hop home after the final step.
  """
  zimg, ztxt, scale, bias = inputs

  def step(k, travelling, local):
    texts, dtexts = travelling
    offset = _ring_offset(k, zimg.shape[0])
    _, vjp = jax.vjp(lambda *a: _sigmoid_sum(*a, offset),
                     zimg, texts, scale, bias)
    dimg, dt, dscale, dbias = vjp(g)
    return (texts, dtexts + dt), jax.tree.map(jnp.add, local,
                                              (dimg, dscale, dbias))

  zeros = functools.partial(jax.tree.map, jnp.zeros_like)
  (_, dtexts), (dimg, dscale, dbias) = _ring(
      axes, step, (ztxt, zeros(ztxt)), zeros((zimg, scale, bias)))
  return dimg, jax.lax.ppermute(dtexts, axes, _ring_perm(axes)), dscale, dbias


_ring_sigmoid_sum.defvjp(_ring_sigmoid_fwd, _ring_sigmoid_bwd)


def sigmoid_chunked_loss(zimg, ztxt, logit_scale, logit_bias, mesh=None):
  if mesh is None:
    return sigmoid_loss(zimg, ztxt, logit_scale, logit_bias)
  zimg, ztxt, scale, bias = _f32(zimg, ztxt, logit_scale, logit_bias)
  n = zimg.shape[0]
  _check_divisible(n, mesh)

  def body(zimg, ztxt, scale, bias, axes):
    # The replicated scalars are cast to device-varying, like the rows, so
    # the custom gradient returns per-device scalar gradients; the cast's
    # transpose sums them over devices (a scalar all-reduce).
    scale, bias = jax.lax.pcast((scale, bias), axes, to="varying")
    local = _ring_sigmoid_sum(zimg, ztxt, scale, bias, axes)
    return jax.lax.psum(local, axes) / n

  return _sharded(mesh, body, zimg, ztxt, scale, bias)


LOSSES = {
    "softmax": softmax_loss,
    "sigmoid": sigmoid_loss,
    "sigmoid_chunked": sigmoid_chunked_loss,
}


def get_loss(name: str):
  """The loss called `name` in LOSSES (a config string)."""
  if name not in LOSSES:
    raise ValueError(
        f"Unknown loss {name!r}; valid names: {', '.join(sorted(LOSSES))}.")
  return LOSSES[name]
