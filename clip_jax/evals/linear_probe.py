"""Linear probe: multinomial logistic regression on frozen image features.

Model: logits = x W + b on L2-normalised features x (the towers' outputs
are already unit vectors; they are normalised again so any features work).
Objective (float32):

  mean_i CE(softmax(x_i W + b), y_i) + l2 / 2 * ||W||_F^2   (b unregularised)

Optimiser: full-batch L-BFGS (`optax.lbfgs`, memory 10, zoom line search)
from W = 0, b = 0, until the gradient norm is below `tol` or `max_iter`
iterations (CLIP's probes: L-BFGS, 1000 iterations). Nothing is random and
every reduction has a fixed order on a given device set, so a probe is
deterministic. Matmuls use Precision.HIGHEST (TPUs would otherwise round
f32 through bfloat16).

Regularisation: l2 is chosen from `l2_grid` (default 10^-6 .. 10^0, 7
values) by accuracy on the validation split; ties go to the larger l2 (the
simpler model). Without a validation split, a fixed `val_fraction` of the
training split (a permutation seeded by `seed`) is held out for the choice,
and the final model is then fitted on the whole training split. With a
validation split, the final model is fitted on the training split only.
Accuracy is reported on the test split. Predictions take the argmax of the
logits, ties -> the lower class index.

Scale: the whole training set is one device array (or, with `mesh`, rows
are sharded over the mesh's devices and GSPMD inserts the reductions).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

_HIGHEST = jax.lax.Precision.HIGHEST
DEFAULT_L2_GRID = tuple(10.0 ** e for e in range(-6, 1))
ROW_BUCKET = 256


def normalize(x) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames="num_classes")
def _fit(x, y, sample_weight, l2, tol, max_iter, *, num_classes: int):
  params = {"w": jnp.zeros((x.shape[1], num_classes), jnp.float32),
            "b": jnp.zeros((num_classes,), jnp.float32)}
  onehot = jax.nn.one_hot(y, num_classes, dtype=jnp.float32)
  total = jnp.sum(sample_weight)

  def loss_fn(p):
    logits = jnp.matmul(x, p["w"], precision=_HIGHEST) + p["b"]
    ce = -jnp.sum(onehot * jax.nn.log_softmax(logits), axis=1)
    return (jnp.sum(sample_weight * ce) / total
            + 0.5 * l2 * jnp.sum(jnp.square(p["w"])))

  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss_fn)

  def step(carry):
    p, state = carry
    value, grad = value_and_grad(p, state=state)
    updates, state = opt.update(grad, state, p, value=value, grad=grad,
                                value_fn=loss_fn)
    return optax.apply_updates(p, updates), state

  def keep_going(carry):
    _, state = carry
    count = optax.tree_utils.tree_get(state, "count")
    grad = optax.tree_utils.tree_get(state, "grad")
    return (count == 0) | ((count < max_iter) &
                           (optax.tree_utils.tree_norm(grad) >= tol))

  params, state = jax.lax.while_loop(keep_going, step,
                                     (params, opt.init(params)))
  return (params, optax.tree_utils.tree_get(state, "count"),
          loss_fn(params))


def fit(features, labels, num_classes: int, l2: float, *,
        max_iter: int = 1000, tol: float = 1e-6, mesh=None) -> dict:
  """Fits the probe; returns {'w' [D, C], 'b' [C], 'iterations', 'loss'}
  as numpy. features [N, D] (normalised here), labels int [N] in [0, C)."""
  x = normalize(features)
  y = np.asarray(labels).astype(np.int32)
  if len(x) != len(y) or len(x) == 0:
    raise ValueError(f"fit() needs matching, non-empty features and labels; "
                     f"got {len(x)} and {len(y)}.")
  if y.min() < 0 or y.max() >= num_classes:
    raise ValueError(f"labels must be in [0, {num_classes}); found "
                     f"[{y.min()}, {y.max()}].")
  # Rows padded with weight-0 examples to a multiple of ROW_BUCKET (and of
  # the device count): fits of similar sizes share one compilation.
  multiple = ROW_BUCKET if mesh is None else int(np.lcm(ROW_BUCKET,
                                                         mesh.size))
  pad = -len(x) % multiple
  weight = np.pad(np.ones(len(x), np.float32), (0, pad))
  x, y = np.pad(x, [(0, pad), (0, 0)]), np.pad(y, (0, pad))
  if mesh is not None:  # Rows sharded over all devices.
    rows = NamedSharding(mesh, P(mesh.axis_names))
    x = jax.device_put(x, NamedSharding(mesh, P(mesh.axis_names, None)))
    y, weight = jax.device_put(y, rows), jax.device_put(weight, rows)
  params, iterations, loss = _fit(
      x, y, weight, jnp.float32(l2), jnp.float32(tol), jnp.int32(max_iter),
      num_classes=num_classes)
  params = jax.device_get(params)
  return {"w": np.asarray(params["w"]), "b": np.asarray(params["b"]),
          "iterations": int(iterations), "loss": float(loss)}


def predict(probe: dict, features) -> np.ndarray:
  """int [N]: argmax of the logits, ties -> the lower class index."""
  logits = jnp.matmul(jnp.asarray(normalize(features)), probe["w"],
                      precision=_HIGHEST) + probe["b"]
  return np.asarray(jnp.argmax(logits, axis=1))


def accuracy(probe: dict, features, labels) -> float:
  return float(np.mean(predict(probe, features) == np.asarray(labels)))


def split_off_validation(num_examples: int, val_fraction: float, seed: int):
  """(train indices, validation indices): a seeded random val_fraction."""
  if not 0 < val_fraction < 1:
    raise ValueError(f"val_fraction={val_fraction} must be in (0, 1).")
  if num_examples < 2:
    raise ValueError(f"{num_examples} training example(s) cannot be split "
                     "into train and validation; give a validation split.")
  order = np.random.default_rng(seed).permutation(num_examples)
  n_val = min(max(1, round(num_examples * val_fraction)), num_examples - 1)
  return np.sort(order[n_val:]), np.sort(order[:n_val])


def linear_probe(train_features, train_labels, test_features, test_labels, *,
                 val_features=None, val_labels=None,
                 num_classes: int | None = None, l2_grid=DEFAULT_L2_GRID,
                 val_fraction: float = 0.2, seed: int = 0,
                 max_iter: int = 1000, tol: float = 1e-6,
                 mesh=None) -> dict:
  """Chooses l2 on validation, fits, scores the test split.

  Returns {'accuracy' (test), 'l2' (chosen), 'val_accuracy' (at that l2),
  'val_accuracy/l2=<v>' for each grid value, 'train_accuracy',
  'iterations' (final fit), 'num_train', 'num_test'}.
  """
  train_labels = np.asarray(train_labels)
  test_labels = np.asarray(test_labels)
  if num_classes is None:
    num_classes = int(max(train_labels.max(), test_labels.max(),
                          -1 if val_labels is None else
                          np.max(val_labels)) + 1)
  grid = sorted({float(v) for v in l2_grid}, reverse=True)
  if not grid or min(grid) < 0:
    raise ValueError(f"l2_grid={list(l2_grid)} must be non-empty, >= 0.")
  fit_ = functools.partial(fit, num_classes=num_classes, max_iter=max_iter,
                           tol=tol, mesh=mesh)
  if val_features is None:
    train_idx, val_idx = split_off_validation(len(train_labels),
                                              val_fraction, seed)
    sel_x, sel_y = np.asarray(train_features)[train_idx], \
        train_labels[train_idx]
    val_x, val_y = np.asarray(train_features)[val_idx], train_labels[val_idx]
  else:
    sel_x, sel_y = train_features, train_labels
    val_x, val_y = val_features, np.asarray(val_labels)
  result, best = {}, None
  for l2 in grid:  # Largest first: ties keep the larger l2.
    acc = accuracy(fit_(sel_x, sel_y, l2=l2), val_x, val_y)
    result[f"val_accuracy/l2={l2:g}"] = acc
    if best is None or acc > best[1]:
      best = (l2, acc)
  probe = fit_(train_features, train_labels, l2=best[0])
  result.update(
      accuracy=accuracy(probe, test_features, test_labels), l2=best[0],
      val_accuracy=best[1],
      train_accuracy=accuracy(probe, train_features, train_labels),
      iterations=probe["iterations"], num_train=len(train_labels),
      num_test=len(test_labels))
  return result
