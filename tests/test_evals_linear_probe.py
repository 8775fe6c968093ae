"""Linear probe: separable data, random labels, optimality, determinism."""

import ml_collections
import numpy as np
import pytest

from clip_jax import sharding as sharding_lib
from clip_jax.evals import linear_probe

C, D = 4, 12


def _separable(n, seed):
  """Class k: a fixed direction plus noise far smaller than the margins."""
  rng = np.random.default_rng(seed)
  centres = np.random.default_rng(0).normal(size=(C, D))
  labels = rng.integers(0, C, n)
  return centres[labels] + 0.05 * rng.normal(size=(n, D)), labels


def _numpy_gradient(x, y, probe, l2):
  """Gradient of mean CE + l2/2 |W|^2 (NumPy, float64) at the probe."""
  x = linear_probe.normalize(x).astype(np.float64)
  logits = x @ probe["w"] + probe["b"]
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  p[np.arange(len(y)), y] -= 1
  return (x.T @ p / len(y) + l2 * probe["w"], p.mean(0))


def test_separable_features_reach_100_percent():
  train_x, train_y = _separable(450, 1)
  test_x, test_y = _separable(100, 2)
  r = linear_probe.linear_probe(train_x, train_y, test_x, test_y,
                                num_classes=C)
  assert r["accuracy"] == 1.0 and r["train_accuracy"] == 1.0
  assert r["num_train"] == 450 and r["num_test"] == 100
  # The chosen l2 is the largest with the best validation accuracy.
  grid = {float(k.split("=")[1]): v for k, v in r.items()
          if k.startswith("val_accuracy/")}
  assert sorted(grid) == pytest.approx([10.0 ** e for e in range(-6, 1)])
  best = max(grid.values())
  assert r["l2"] == max(l2 for l2, acc in grid.items() if acc == best)
  assert r["val_accuracy"] == best


def test_random_labels_stay_near_chance():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(900, D))
  y = rng.integers(0, C, 900)
  r = linear_probe.linear_probe(x[:500], y[:500], x[500:], y[500:],
                                val_features=x[500:600], val_labels=y[500:600],
                                num_classes=C)
  # 400 test examples: chance 1/4, std sqrt(p(1-p)/n) ~ 0.022.
  std = np.sqrt(0.25 * 0.75 / 400)
  assert abs(r["accuracy"] - 0.25) < 4 * std


@pytest.mark.parametrize("l2", [1e-2, 1e-4])
def test_fit_reaches_the_optimum_deterministically(l2):
  rng = np.random.default_rng(4)
  x, y = rng.normal(size=(450, D)), rng.integers(0, C, 450)
  probe = linear_probe.fit(x, y, C, l2)
  grad_w, grad_b = _numpy_gradient(x, y, probe, l2)
  assert np.abs(grad_w).max() < 1e-4 and np.abs(grad_b).max() < 1e-4
  again = linear_probe.fit(x, y, C, l2)
  np.testing.assert_array_equal(probe["w"], again["w"])
  # Rows sharded over 8 devices (padded with weight-0 rows): the same
  # optimum.
  mesh = sharding_lib.make_mesh(ml_collections.ConfigDict(
      dict(data=4, fsdp=2)))
  sharded = linear_probe.fit(x, y, C, l2, mesh=mesh)
  np.testing.assert_allclose(sharded["w"], probe["w"], atol=1e-4)
  np.testing.assert_array_equal(
      linear_probe.predict(sharded, x), linear_probe.predict(probe, x))


def test_validation_split_is_seeded_and_disjoint():
  train, val = linear_probe.split_off_validation(10, 0.2, seed=0)
  assert len(val) == 2 and sorted(np.r_[train, val].tolist()) == list(
      range(10))
  again = linear_probe.split_off_validation(10, 0.2, seed=0)
  np.testing.assert_array_equal(val, again[1])
  with pytest.raises(ValueError, match="val_fraction"):
    linear_probe.split_off_validation(10, 1.5, seed=0)
  with pytest.raises(ValueError, match=r"labels must be in \[0, 4\)"):
    linear_probe.fit(np.ones((3, 2)), [0, 1, 4], 4, 0.1)
