"""Contrastive losses over the global batch, dense or with explicit collectives.

Every loss has the signature

  fn(zimg, ztxt, logit_scale, logit_bias, mesh=None, keys=None) -> float32

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
                   Sharded: all-gather both modalities; each direction's
                   logsumexp streams over [n, n] column tiles (Inf-CL), and
                   the custom gradient recomputes the tiles.
  sigmoid          SigLIP: every pair is a binary problem, label +1 on the
                   diagonal and -1 elsewhere; the sum of -log sigmoid(label *
                   logit) over all N^2 pairs divided by N (the paper's
                   normalisation: per-image mean of the sum over texts).
                   Sharded: all-gather the texts; a scan over [n, n]
                   column tiles, recomputed by the custom gradient.
  sigmoid_chunked  the same value; the texts travel around a ring of devices
                   (ppermute), so a device holds one [n, n] block and one
                   [n, D] block of texts at a time, forward and backward;
                   each hop is issued before the block it overlaps.

  multi_positive   UniCL (Yang et al. 2022, "Unified Contrastive Learning in
                   Image-Text-Label Space"; Florence): softmax with soft
                   targets. `keys` (int32 [N], batch-sharded like the rows)
                   say which pairs are positives: (i, j) is a positive iff
                   i == j or keys[i] == keys[j] >= 0 (a negative key, e.g.
                   the label -1 of web data, matches only its own row). Row
                   i's target spreads 1 / c_i over its c_i positives, in
                   both directions (img->txt and txt->img), as UniCL's
                   bidirectional loss; the value is the mean over rows of
                   the two cross-entropies / 2. With all keys distinct (or
                   keys=None) it is `softmax`. Sharded: softmax's gathers
                   and tiled logsumexps, plus the keys gathered (int32 [N])
                   and the positives' term from per-group sums: group g's
                   image and text embeddings summed over the global batch
                   (a segment_sum of the gathered [N, D] arrays; groups from
                   jnp.unique of the gathered keys), so no [n, N] target
                   mask exists; extra memory two [N, D] sums.
  vse_max          VSE++ (Faghri et al. 2018, "VSE++: Improving Visual-
                   Semantic Embeddings with Hard Negatives"), max of hinges:
                   for each pair i, [margin - s_ii + s_ij*]_+ with j* the
                   hardest negative text of image i in the GLOBAL batch,
                   plus the same with the hardest negative image of text i;
                   summed over the pairs and divided by N (the paper and
                   its code, fartashf/vsepp, sum over the batch; the mean
                   keeps the value independent of the batch size).
  vse_sum          VSE0 of the same paper, sum of hinges: every negative's
                   [margin - s_ii + s_ij]_+, both directions, / N.
                   Both VSE losses use the raw cosine similarities s = zimg
                   @ ztxt.T, as the paper does (the margin, 0.2 there, is in
                   cosine units); they ignore logit_scale and logit_bias, so
                   those params get an exactly zero gradient and, under
                   AdamW (which never decays them, see optim.py), stay at
                   their initial values: the learnable temperature is not
                   trained by a loss that does not use it. The margin is
                   a keyword argument (config.vse_margin, see
                   `loss_from_config`).
                   Gather pattern: the hardest negative of image i needs a
                   max over all N texts, and that of text j a max over all
                   N images. Both modalities are all-gathered (as softmax
                   does) and each device computes its own rows' maxima in
                   both directions over [n, n] column tiles, without
                   gradient, keeping only the argmax index (ties: the
                   lowest global index); the loss is then s_ij* recomputed
                   from the gathered row j*, so its gradient (through the
                   gather's transpose, a reduce-scatter) touches just the
                   hardest negatives. The alternative, per-device column
                   maxima combined with a pmax over devices, would save
                   one of the two similarity passes but needs a custom
                   gradient to send each column's gradient to the one
                   device holding its argmax (and a tie rule across
                   devices); the gathered version reuses softmax's
                   communication and autodiff. vse_sum streams over [n, n]
                   column tiles under jax.checkpoint, so the backward
                   recomputes each tile rather than storing [n, N] masks.

Every loss takes an optional `keys=` (int32 [N]); only those in
KEYED_LOSSES use it, the others ignore it. The train step passes the
batch's 'loss_key' when the batch has one (train_state.contrastive_loss),
which train.py adds for the keyed losses only.

No sharded loss holds an [n, N] block of logits: per-device temporary memory
is O(n^2 + N D) (gathered) or O(n^2 + n D) (ring), not O(n N).
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


def _tiles(keys, tile: int):
  """[N, D] -> [N / tile, tile, D]: the column tiles a scan walks over."""
  return keys.reshape(keys.shape[0] // tile, tile, keys.shape[1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _tiled_logsumexp(rows, keys, scale, tile):
  """logsumexp over columns of scale * rows @ keys.T, [n] (Inf-CL style).

  Streams over column tiles with a running max and sum, so only one
  [n, tile] block of logits exists at a time; the custom gradient recomputes
  each block from the saved logsumexp instead of storing the [n, N] logits.
  """
  def block_logits(t):
    return scale * (rows @ jax.lax.dynamic_slice_in_dim(keys, t * tile,
                                                        tile).T)

  def step(t, carry):
    running_max, running_sum = carry
    logits = block_logits(t)
    new_max = jnp.maximum(running_max, logits.max(axis=1))
    running_sum = (running_sum * jnp.exp(running_max - new_max) +
                   jnp.exp(logits - new_max[:, None]).sum(axis=1))
    return new_max, running_sum

  # The first tile starts the running max (no -inf sentinel to special-case);
  # dynamic slices of the keys, not a sliced copy of them.
  first = block_logits(0)
  first_max = first.max(axis=1)
  init = (first_max, jnp.exp(first - first_max[:, None]).sum(axis=1))
  row_max, row_sum = jax.lax.fori_loop(1, keys.shape[0] // tile, step, init)
  return row_max + jnp.log(row_sum)


def _tiled_logsumexp_fwd(rows, keys, scale, tile):
  lse = _tiled_logsumexp(rows, keys, scale, tile)
  return lse, (rows, keys, scale, lse)


def _tiled_logsumexp_bwd(tile, residuals, g):
  """d lse_i / d logit_ij = softmax_ij = exp(logit_ij - lse_i), per tile."""
  rows, keys, scale, lse = residuals

  def step(carry, block_keys):
    drows, dscale = carry
    similarity = rows @ block_keys.T
    dlogits = g[:, None] * jnp.exp(scale * similarity - lse[:, None])
    drows = drows + scale * (dlogits @ block_keys)
    dscale = dscale + jnp.sum(dlogits * similarity)
    return (drows, dscale), scale * (dlogits.T @ rows)

  (drows, dscale), dkeys = jax.lax.scan(
      step, (jnp.zeros_like(rows), jnp.zeros_like(scale)), _tiles(keys, tile))
  return drows, dkeys.reshape(keys.shape), dscale


_tiled_logsumexp.defvjp(_tiled_logsumexp_fwd, _tiled_logsumexp_bwd)


def _smoothing_term(rows, keys_all, scale):
  """scale * sum_i rows_i . mean_j keys_j: the sum over rows of each row's
  mean logit, the part label smoothing adds to the targets."""
  return scale * jnp.sum(rows @ jnp.mean(keys_all, axis=0))


def softmax_loss(zimg, ztxt, logit_scale, logit_bias=None, mesh=None,
                 keys=None, label_smoothing: float = 0.0):
  """CLIP's InfoNCE, both directions; `label_smoothing` eps (ALIGN's 0.1,
  as torch's cross_entropy(label_smoothing=eps)) makes each row's target
  (1 - eps) one-hot + eps / N uniform, so a row's term is
  lse - (1 - eps) z_pos - eps mean_j z_j. eps = 0 is the plain loss (and
  the same program: the smoothing terms are not traced)."""
  del logit_bias, keys  # InfoNCE is invariant to a shared bias.
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1).")
  zimg, ztxt, scale = _f32(zimg, ztxt, logit_scale)
  n = zimg.shape[0]
  eps = float(label_smoothing)
  if mesh is None:
    if not eps:
      return (_softmax_sum(zimg, ztxt, scale, 0) +
              _softmax_sum(ztxt, zimg, scale, 0)) / (2 * n)
    positives = scale * jnp.sum(zimg * ztxt)
    lse = (jnp.sum(jax.nn.logsumexp(_logits(zimg, ztxt, scale), axis=1)) +
           jnp.sum(jax.nn.logsumexp(_logits(ztxt, zimg, scale), axis=1)))
    smooth = (_smoothing_term(zimg, ztxt, scale) +
              _smoothing_term(ztxt, zimg, scale))
    return (lse - 2 * (1 - eps) * positives - eps * smooth) / (2 * n)
  _check_divisible(n, mesh)

  def body(zimg, ztxt, scale, axes):
    # Varying scale: the custom gradient returns a per-device scale gradient
    # and the cast's transpose sums it over devices (a scalar all-reduce).
    scale = jax.lax.pcast(scale, axes, to="varying")
    tile = zimg.shape[0]  # [n, n] logits blocks, as the ring holds.
    ztxt_all = jax.lax.all_gather(ztxt, axes, tiled=True)
    zimg_all = jax.lax.all_gather(zimg, axes, tiled=True)
    # A device's positives are its own rows: logit (i, offset + i) is
    # scale * zimg_i . ztxt_i in both directions.
    positives = scale * jnp.sum(zimg * ztxt)
    local = (jnp.sum(_tiled_logsumexp(zimg, ztxt_all, scale, tile)) +
             jnp.sum(_tiled_logsumexp(ztxt, zimg_all, scale, tile)))
    if eps:
      local = local - 2 * (1 - eps) * positives - eps * (
          _smoothing_term(zimg, ztxt_all, scale) +
          _smoothing_term(ztxt, zimg_all, scale))
    else:
      local = local - 2 * positives
    return jax.lax.psum(local, axes) / (2 * n)

  return _sharded(mesh, body, zimg, ztxt, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _tiled_sigmoid_sum(zimg, ztxt_all, scale, bias, axes):
  """This device's rows of the sigmoid sum over the gathered texts.

  One [n, n] block of logits at a time (a scan over column tiles); the
  custom gradient recomputes each block rather than storing [n, N] logits.
  """
  n = zimg.shape[0]
  offset = jax.lax.axis_index(axes) * n

  def step(total, tile_and_keys):
    t, block_keys = tile_and_keys
    return total + _sigmoid_sum(zimg, block_keys, scale, bias,
                                offset - t * n), None

  tiles = _tiles(ztxt_all, n)
  total, _ = jax.lax.scan(step, jnp.zeros_like(scale),
                          (jnp.arange(tiles.shape[0]), tiles))
  return total


def _tiled_sigmoid_fwd(zimg, ztxt_all, scale, bias, axes):
  return (_tiled_sigmoid_sum(zimg, ztxt_all, scale, bias, axes),
          (zimg, ztxt_all, scale, bias))


def _tiled_sigmoid_bwd(axes, inputs, g):
  zimg, ztxt_all, scale, bias = inputs
  n = zimg.shape[0]
  offset = jax.lax.axis_index(axes) * n

  def step(local, tile_and_keys):
    t, block_keys = tile_and_keys
    _, vjp = jax.vjp(lambda *a: _sigmoid_sum(*a, offset - t * n),
                     zimg, block_keys, scale, bias)
    dimg, dkeys, dscale, dbias = vjp(g)
    return jax.tree.map(jnp.add, local, (dimg, dscale, dbias)), dkeys

  tiles = _tiles(ztxt_all, n)
  zeros = jax.tree.map(jnp.zeros_like, (zimg, scale, bias))
  (dimg, dscale, dbias), dtexts = jax.lax.scan(
      step, zeros, (jnp.arange(tiles.shape[0]), tiles))
  return dimg, dtexts.reshape(ztxt_all.shape), dscale, dbias


_tiled_sigmoid_sum.defvjp(_tiled_sigmoid_fwd, _tiled_sigmoid_bwd)


def sigmoid_loss(zimg, ztxt, logit_scale, logit_bias, mesh=None, keys=None):
  del keys  # Unkeyed (module docstring).
  zimg, ztxt, scale, bias = _f32(zimg, ztxt, logit_scale, logit_bias)
  n = zimg.shape[0]
  if mesh is None:
    return _sigmoid_sum(zimg, ztxt, scale, bias, 0) / n
  _check_divisible(n, mesh)

  def body(zimg, ztxt, scale, bias, axes):
    scale, bias = jax.lax.pcast((scale, bias), axes, to="varying")
    ztxt_all = jax.lax.all_gather(ztxt, axes, tiled=True)
    local = _tiled_sigmoid_sum(zimg, ztxt_all, scale, bias, axes)
    return jax.lax.psum(local, axes) / n

  return _sharded(mesh, body, zimg, ztxt, scale, bias)


def _ring_perm(axes):
  """Device j sends to device j + 1 (linear index over `axes`)."""
  size = jax.lax.axis_size(axes)
  return [(j, (j + 1) % size) for j in range(size)]


def _hop(x, axes):
  return jax.lax.ppermute(x, axes, _ring_perm(axes))


def _ring_offset(k, n):
  """Positives only at step 0, where a device holds its own texts."""
  return jnp.where(k == 0, 0, n)  # Offset n: outside the [n, n] block.


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _ring_sigmoid_sum(zimg, ztxt, scale, bias, axes):
  """This device's rows of the sigmoid sum, the texts passed around a ring.

  At step k device i holds the texts device i - k started with. Each step
  sends its texts on before computing their block, so the hop has no data
  dependence on the block and can overlap it; the last step sends nothing.
  A fori_loop: the HLO holds one step, not one per device. A custom
  gradient because autodiff of the loop would store every step's [n, n]
  block (together, an [n, N] one) and every step's texts.
  """
  n = zimg.shape[0]
  block = lambda k, texts: _sigmoid_sum(zimg, texts, scale, bias,
                                        _ring_offset(k, n))

  def send_then_compute(k, carry):
    texts, total = carry
    return _hop(texts, axes), total + block(k, texts)

  last = jax.lax.axis_size(axes) - 1
  texts, total = jax.lax.fori_loop(0, last, send_then_compute,
                                   (ztxt, jnp.zeros_like(scale)))
  return total + block(last, texts)


def _ring_sigmoid_fwd(zimg, ztxt, scale, bias, axes):
  loss = _ring_sigmoid_sum(zimg, ztxt, scale, bias, axes)
  return loss, (zimg, ztxt, scale, bias)


def _ring_sigmoid_bwd(axes, inputs, g):
  """The same ring again, each block recomputed and differentiated.

  The texts' gradient travels one hop behind the texts: at step k a device
  receives the gradient the previous device accumulated for the texts it now
  holds and adds its own block's share. Both hops are issued before the
  block is computed, so they can overlap it; after the last step the
  gradient takes one final hop home.
  """
  zimg, ztxt, scale, bias = inputs
  n = zimg.shape[0]

  def block_grads(k, texts):
    _, vjp = jax.vjp(lambda *a: _sigmoid_sum(*a, _ring_offset(k, n)),
                     zimg, texts, scale, bias)
    dimg, dtexts, dscale, dbias = vjp(g)
    return dtexts, (dimg, dscale, dbias)

  def accumulate(k, texts, dtexts, local):
    block_dtexts, block_local = block_grads(k, texts)
    return (dtexts + block_dtexts,
            jax.tree.map(jnp.add, local, block_local))

  def send_then_compute(k, carry):
    texts, dtexts, local = carry
    next_texts, dtexts = _hop(texts, axes), _hop(dtexts, axes)
    return (next_texts, *accumulate(k, texts, dtexts, local))

  last = jax.lax.axis_size(axes) - 1
  # Step 0 outside the loop: nothing has been accumulated yet to receive.
  dtexts, local = block_grads(0, ztxt)
  texts = _hop(ztxt, axes) if last else ztxt
  texts, dtexts, local = jax.lax.fori_loop(
      1, last, send_then_compute, (texts, dtexts, local))
  if last:
    dtexts, local = accumulate(last, texts, _hop(dtexts, axes), local)
  dimg, dscale, dbias = local
  return dimg, _hop(dtexts, axes), dscale, dbias


_ring_sigmoid_sum.defvjp(_ring_sigmoid_fwd, _ring_sigmoid_bwd)


def sigmoid_chunked_loss(zimg, ztxt, logit_scale, logit_bias, mesh=None,
                         keys=None):
  del keys
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


def _effective_keys(keys):
  """Negative keys (no key) become distinct negative numbers: -1 - row."""
  keys = jnp.asarray(keys, jnp.int32)
  return jnp.where(keys >= 0, keys, -1 - jnp.arange(keys.shape[0]))


def _positive_groups(keys):
  """[N] int keys -> [N] group ids in [0, N): rows i, j share a group iff
  they are positives (module docstring)."""
  n = keys.shape[0]
  _, groups = jnp.unique(_effective_keys(keys), return_inverse=True, size=n)
  return groups.reshape(n)


def _multi_positive_dense(zimg, ztxt, scale, keys):
  """UniCL's soft-target cross-entropy, both directions, [N, N] logits."""
  eff = _effective_keys(keys)
  positive = (eff[:, None] == eff[None, :]).astype(jnp.float32)
  # positive is symmetric and the counts are equal within a group, so the
  # row-normalised targets serve both directions.
  targets = positive / positive.sum(axis=1, keepdims=True)
  logits = _logits(zimg, ztxt, scale)
  img_to_txt = -jnp.sum(targets * jax.nn.log_softmax(logits, axis=1))
  txt_to_img = -jnp.sum(targets.T * jax.nn.log_softmax(logits.T, axis=1))
  return (img_to_txt + txt_to_img) / (2 * zimg.shape[0])


def multi_positive_loss(zimg, ztxt, logit_scale, logit_bias=None, mesh=None,
                        keys=None):
  del logit_bias  # Invariant to a shared bias, as softmax.
  if keys is None:  # Every row its own key: exactly the softmax targets.
    return softmax_loss(zimg, ztxt, logit_scale, mesh=mesh)
  zimg, ztxt, scale = _f32(zimg, ztxt, logit_scale)
  keys = jnp.asarray(keys, jnp.int32)
  n = zimg.shape[0]
  if keys.shape != (n,):
    raise ValueError(f"keys have shape {keys.shape}; expected ({n},), one "
                     "int32 key per row of the global batch.")
  if mesh is None:
    return _multi_positive_dense(zimg, ztxt, scale, keys)
  _check_divisible(n, mesh)

  def body(zimg, ztxt, keys, scale, axes):
    scale = jax.lax.pcast(scale, axes, to="varying")
    rows = zimg.shape[0]
    ztxt_all = jax.lax.all_gather(ztxt, axes, tiled=True)
    zimg_all = jax.lax.all_gather(zimg, axes, tiled=True)
    groups = _positive_groups(jax.lax.all_gather(keys, axes, tiled=True))
    mine = jax.lax.dynamic_slice_in_dim(
        groups, jax.lax.axis_index(axes) * rows, rows)
    # Sum over row i's positives j of logit (i, j), divided by their count
    # c_i: scale * zimg_i . (sum of group g_i's texts) / c_i; the same with
    # the roles swapped for the txt->img direction.
    counts = jax.ops.segment_sum(jnp.ones(n, jnp.float32), groups, n)[mine]
    txt_sums = jax.ops.segment_sum(ztxt_all, groups, n)[mine]
    img_sums = jax.ops.segment_sum(zimg_all, groups, n)[mine]
    positives = scale * jnp.sum(
        (jnp.sum(zimg * txt_sums, axis=1) + jnp.sum(ztxt * img_sums, axis=1))
        / counts)
    local = (jnp.sum(_tiled_logsumexp(zimg, ztxt_all, scale, rows)) +
             jnp.sum(_tiled_logsumexp(ztxt, zimg_all, scale, rows)) -
             positives)
    return jax.lax.psum(local, axes) / (2 * n)

  return _sharded(mesh, body, zimg, ztxt, keys, scale)


VSE_MARGIN = 0.2  # Faghri et al. 2018.


def _hinges(negatives, positives, margin):
  return jax.nn.relu(margin - positives + negatives)


def _vse_max_dense(zimg, ztxt, margin):
  similarity = zimg @ ztxt.T
  positives = jnp.diagonal(similarity)
  masked = jax.lax.stop_gradient(jnp.where(
      jnp.eye(zimg.shape[0], dtype=bool), -jnp.inf, similarity))
  # argmax, not max: the gradient goes to the lowest index among ties, as
  # in the sharded loss.
  hardest_txt = ztxt[jnp.argmax(masked, axis=1)]
  hardest_img = zimg[jnp.argmax(masked, axis=0)]
  return jnp.sum(
      _hinges(jnp.sum(zimg * hardest_txt, axis=1), positives, margin) +
      _hinges(jnp.sum(ztxt * hardest_img, axis=1), positives, margin)
  ) / zimg.shape[0]


def _hardest_negative(rows, cols, offset):
  """[n] global column index of each row's most similar column, its own
  positive (column offset + row) excluded; ties: the lowest index.
  No gradient: a scan over [n, n] tiles keeping a running max and argmax."""
  rows, cols = jax.lax.stop_gradient((rows, cols))
  tile = rows.shape[0]
  own = offset + jnp.arange(tile)

  def step(t, carry):
    best, best_index = carry
    block = rows @ jax.lax.dynamic_slice_in_dim(cols, t * tile, tile).T
    index = t * tile + jnp.arange(tile)
    block = jnp.where(index[None, :] == own[:, None], -jnp.inf, block)
    better = block.max(axis=1) > best  # Strictly: earlier tiles win ties.
    return (jnp.where(better, block.max(axis=1), best),
            jnp.where(better, t * tile + jnp.argmax(block, axis=1),
                      best_index))

  # *_like of device-varying values: the carry must vary like the body's.
  init = (jnp.full_like(rows[:, 0], -jnp.inf), jnp.zeros_like(own))
  _, index = jax.lax.fori_loop(0, cols.shape[0] // tile, step, init)
  return index


def _hinge_sum(rows, cols, positives, margin, offset):
  """Sum over rows r and columns c != offset + r of the hinges
  [margin - positives_r + rows_r . cols_c]_+, [n, n] tiles at a time; the
  checkpointed body is recomputed in the backward pass."""
  tile = rows.shape[0]
  own = offset + jnp.arange(tile)

  @jax.checkpoint
  def step(total, index_and_block):
    index, block = index_and_block
    hinges = _hinges(rows @ block.T, positives[:, None], margin)
    hinges = jnp.where(index[None, :] == own[:, None], 0.0, hinges)
    return total + jnp.sum(hinges), None

  tiles = _tiles(cols, tile)
  indices = jnp.arange(cols.shape[0]).reshape(tiles.shape[0], tile)
  total, _ = jax.lax.scan(step, jnp.zeros_like(positives[0]),
                          (indices, tiles))
  return total


def _vse_sum_dense(zimg, ztxt, margin):
  similarity = zimg @ ztxt.T
  positives = jnp.diagonal(similarity)
  off_diagonal = ~jnp.eye(zimg.shape[0], dtype=bool)
  row_hinges = _hinges(similarity, positives[:, None], margin)
  col_hinges = _hinges(similarity, positives[None, :], margin)
  return jnp.sum(jnp.where(off_diagonal, row_hinges + col_hinges, 0.0)
                 ) / zimg.shape[0]


def _vse_loss(zimg, ztxt, mesh, margin, hardest: bool):
  zimg, ztxt = _f32(zimg, ztxt)
  n = zimg.shape[0]
  if mesh is None:
    return (_vse_max_dense if hardest else _vse_sum_dense)(zimg, ztxt, margin)
  _check_divisible(n, mesh)

  def body(zimg, ztxt, axes):
    rows = zimg.shape[0]
    offset = jax.lax.axis_index(axes) * rows
    ztxt_all = jax.lax.all_gather(ztxt, axes, tiled=True)
    zimg_all = jax.lax.all_gather(zimg, axes, tiled=True)
    positives = jnp.sum(zimg * ztxt, axis=1)
    if hardest:
      txt = ztxt_all[_hardest_negative(zimg, ztxt_all, offset)]
      img = zimg_all[_hardest_negative(ztxt, zimg_all, offset)]
      local = jnp.sum(
          _hinges(jnp.sum(zimg * txt, axis=1), positives, margin) +
          _hinges(jnp.sum(ztxt * img, axis=1), positives, margin))
    else:
      local = (_hinge_sum(zimg, ztxt_all, positives, margin, offset) +
               _hinge_sum(ztxt, zimg_all, positives, margin, offset))
    return jax.lax.psum(local, axes) / n

  return _sharded(mesh, body, zimg, ztxt)


def vse_max_loss(zimg, ztxt, logit_scale=None, logit_bias=None, mesh=None,
                 keys=None, margin=VSE_MARGIN):
  del logit_scale, logit_bias, keys  # Raw cosines (module docstring).
  return _vse_loss(zimg, ztxt, mesh, margin, hardest=True)


def vse_sum_loss(zimg, ztxt, logit_scale=None, logit_bias=None, mesh=None,
                 keys=None, margin=VSE_MARGIN):
  del logit_scale, logit_bias, keys
  return _vse_loss(zimg, ztxt, mesh, margin, hardest=False)


def _nt_xent_sum(views, keys_all, offset, n_global, temperature):
  """Sum over this device's 2n anchors of NT-Xent's cross-entropy.

  views: [2, n, E] this device's rows of both views; keys_all: [2N, E]
  (view 1's N rows, then view 2's). Anchor (v, i) is global row
  g = offset + i of view v: its logits are its similarities / temperature
  to all 2N keys, its own key (column v N + g) masked out, its positive
  the other view's row (column (1 - v) N + g).
  """
  n = views.shape[1]
  rows = views.reshape(2 * n, -1)
  logits = (rows @ keys_all.T) / temperature  # [2n, 2N]
  view = jnp.repeat(jnp.arange(2), n)
  g = offset + jnp.tile(jnp.arange(n), 2)
  own = view * n_global + g
  positive = (1 - view) * n_global + g
  columns = jnp.arange(2 * n_global)[None, :]
  logits = jnp.where(columns == own[:, None], -jnp.inf, logits)
  correct = jnp.take_along_axis(logits, positive[:, None], axis=1)[:, 0]
  return jnp.sum(jax.nn.logsumexp(logits, axis=1) - correct)


def nt_xent_loss(h1, h2, temperature: float, mesh=None):
  """SimCLR's NT-Xent (Chen et al. 2020) between two views, as SLIP uses it.

  h1, h2: L2-normalised [N, E] embeddings of two augmentations of the same
  N images (row i of each is a positive pair). The 2N embeddings form a
  2N x 2N similarity matrix divided by `temperature`; each of the 2N rows
  is a softmax cross-entropy over the other 2N - 1 columns (its own
  column masked), its target the other view of its image. Returns the mean
  over the 2N rows (facebookresearch/SLIP's SIMCLRLoss: the mean of its two
  directions' means). float32 whatever the input dtype.

  With `mesh` (batch sharded over all its axes, as the other losses) each
  device gathers both views ([2N, E]) and computes its own 2n rows of the
  logits, [2n, 2N] (not tiled like softmax_loss: the SSL head is narrow and
  SLIP itself holds these rows); the embedding gradients come back through
  all_gather's transpose (a reduce-scatter).
  """
  if temperature <= 0:
    raise ValueError(f"NT-Xent temperature={temperature} must be > 0.")
  h1, h2 = _f32(h1, h2)
  n = h1.shape[0]
  if h2.shape != h1.shape:
    raise ValueError(f"The two views' embeddings differ in shape: "
                     f"{h1.shape} vs {h2.shape}.")
  if mesh is None:
    keys = jnp.concatenate([h1, h2])
    return _nt_xent_sum(jnp.stack([h1, h2]), keys, 0, n,
                        temperature) / (2 * n)
  _check_divisible(n, mesh)

  def body(h1, h2, axes):
    local_n = h1.shape[0]
    offset = jax.lax.axis_index(axes) * local_n
    keys = jnp.concatenate([jax.lax.all_gather(h1, axes, tiled=True),
                            jax.lax.all_gather(h2, axes, tiled=True)])
    local = _nt_xent_sum(jnp.stack([h1, h2]), keys, offset, n, temperature)
    return jax.lax.psum(local, axes) / (2 * n)

  return _sharded(mesh, body, h1, h2)


LOSSES = {
    "softmax": softmax_loss,
    "sigmoid": sigmoid_loss,
    "sigmoid_chunked": sigmoid_chunked_loss,
    "multi_positive": multi_positive_loss,
    "vse_max": vse_max_loss,
    "vse_sum": vse_sum_loss,
}
KEYED_LOSSES = ("multi_positive",)  # Take keys= (the batch's 'loss_key').
MARGIN_LOSSES = ("vse_max", "vse_sum")  # Take margin= (config.vse_margin).
LOSS_KEYS = ("label", "caption_hash")  # config.loss_key: batch fields.


def get_loss(name: str):
  """The loss called `name` in LOSSES (a config string)."""
  if name not in LOSSES:
    raise ValueError(
        f"Unknown loss {name!r}; valid names: {', '.join(sorted(LOSSES))}.")
  return LOSSES[name]


def loss_from_config(config):
  """The run's loss: LOSSES[config.loss] with its options bound:
  config.vse_margin for the VSE losses, config.label_smoothing (softmax
  only) when it is not 0. Otherwise the registry's function itself, so the
  program is today's."""
  loss_fn = get_loss(config.loss)
  if config.loss in MARGIN_LOSSES:
    return functools.partial(loss_fn, margin=float(config.vse_margin))
  smoothing = config.get("label_smoothing") or 0.0
  if not smoothing:
    return loss_fn
  if loss_fn is not softmax_loss:
    raise ValueError(
        f"config.label_smoothing={smoothing} needs config.loss='softmax', "
        f"got {config.loss!r}.")
  return functools.partial(loss_fn, label_smoothing=float(smoothing))
