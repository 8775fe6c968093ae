"""The paper recipes decay weights as their papers do, per optimiser step.

Reference: the papers' update rules written in NumPy. With a zero gradient
Adam's step is exactly 0 (m = v = 0), so one update multiplies a decayed
weight by (1 - per-step decay):
  CLIP (PyTorch AdamW): w <- w (1 - lr(t) wd), wd = 0.2, lr(peak) = 5e-4.
  SigLIP (big_vision):  w <- w (1 - wd lr(t) / lr), wd = 1e-4: 1e-4 per
                        step at the peak, whatever the base lr.
  ALIGN (LAMB):         Adam's direction plus wd w, rescaled per tensor by
                        the trust ratio ||w|| / ||direction + wd w||, then
                        times lr(t) (You et al. 2019, written in NumPy).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clip_jax import config as config_lib
from clip_jax import optim

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
WARMUP, TOTAL = 4, 20


def recipe(name, arg=None):
  return config_lib.load_config_file(os.path.join(CONFIGS, name), arg)


def numpy_schedule(lr, step):
  """Linear warmup over WARMUP steps then cosine to 0 at TOTAL."""
  if step < WARMUP:
    return lr * step / WARMUP
  return lr * 0.5 * (1 + np.cos(np.pi * (step - WARMUP) / (TOTAL - WARMUP)))


def decay_factors(config, steps):
  """w_{t+1} / w_t of a decayed kernel under a zero gradient, t < steps."""
  params = {"kernel": jnp.full((3, 3), 2.0, jnp.float32)}
  zero = {"kernel": jnp.zeros((3, 3), jnp.float32)}
  config.grad_clip_norm = None  # A zero gradient has no norm to clip.
  tx, _ = optim.make_optimizer(config, params, total_steps=TOTAL,
                               warmup_steps=WARMUP)
  state, factors = tx.init(params), []
  update = jax.jit(tx.update)
  for _ in range(steps):
    updates, state = update(zero, state, params)
    new = optax.apply_updates(params, updates)
    factors.append(float(new["kernel"][0, 0] / params["kernel"][0, 0]))
    params = new
  return np.array(factors)


@pytest.mark.parametrize("arg,peak_lr", [(None, 5e-4), ("model=L/14", 4e-4)])
def test_clip_decays_like_pytorch_adamw(arg, peak_lr):
  c = recipe("clip.py", arg)
  assert (c.wd, c.lr, c.wd_convention) == (0.2, peak_lr, "coupled")
  want = [1 - 0.2 * numpy_schedule(peak_lr, t) for t in range(TOTAL)]
  np.testing.assert_allclose(decay_factors(c, TOTAL), want, rtol=0,
                             atol=1e-7)
  # At the peak: 0.2 x 5e-4 = 1e-4 per step (B/32).
  assert abs(1 - decay_factors(c, WARMUP + 1)[WARMUP]
             - 0.2 * peak_lr) < 1e-7


def test_siglip_decays_1e4_per_step_at_peak():
  c = recipe("siglip.py")
  assert (c.wd, c.lr, c.wd_convention) == (1e-4, 1e-3, "decoupled")
  want = [1 - 1e-4 * numpy_schedule(1e-3, t) / 1e-3 for t in range(TOTAL)]
  factors = decay_factors(c, TOTAL)
  np.testing.assert_allclose(factors, want, rtol=0, atol=1e-7)
  assert abs(1 - factors[WARMUP] - 1e-4) < 1e-7  # Not 1e-7 (wd x lr).


def test_decoupled_decay_does_not_depend_on_the_base_lr():
  """big_vision's convention: the same decay for lr 1e-3 and 1e-2."""
  factors = []
  for lr in (1e-3, 1e-2):
    c = recipe("siglip.py", "tiny")
    c.lr = lr
    factors.append(decay_factors(c, WARMUP + 1)[WARMUP])
  np.testing.assert_allclose(factors, [1 - 1e-4] * 2, rtol=0, atol=1e-7)


def test_default_convention_is_coupled():
  """The default keeps the old behaviour (configs/demo.py unchanged)."""
  assert config_lib.base_config().wd_convention == "coupled"
  assert recipe("demo.py").wd_convention == "coupled"


def test_unknown_convention_is_named():
  c = recipe("clip.py", "tiny")
  c.wd_convention = "l2"
  with pytest.raises(ValueError, match="wd_convention='l2'.*coupled"):
    config_lib.validate(c, device_count=8)


@pytest.mark.parametrize("name,values", [
    ("clip.py", dict(b1=0.9, b2=0.98, eps=1e-6, warmup_steps=2000,
                     batch_size=32768, schedule="cosine", min_lr_ratio=0.0,
                     logit_scale_init=1 / 0.07, logit_scale_max=100.0,
                     logit_bias_init=None, image_pool="cls",
                     text_pool="eos", causal=True,
                     activation="quick_gelu", vocab_size=49408)),
    ("siglip.py", dict(b1=0.9, b2=0.95, eps=1e-6, warmup_steps=5000,
                       batch_size=32768, schedule="cosine",
                       min_lr_ratio=0.0, logit_scale_init=10.0,
                       logit_scale_max=None, logit_bias_init=-10.0,
                       image_pool="map", text_pool="last", causal=False,
                       activation="gelu", vocab_size=32000)),
    ("align.py", dict(b1=0.9, b2=0.999, eps=1e-6, warmup_steps=10_000,
                      batch_size=16384, schedule="linear", min_lr_ratio=0.0,
                      logit_scale_init=1.0, logit_scale_max=None,
                      logit_bias_init=None, image_pool="cls",
                      text_pool="first", causal=False, activation="gelu",
                      vocab_size=30522)),
])
def test_recipe_values_match_the_docstring_citations(name, values):
  """The values each config's docstring cites from its paper."""
  c = recipe(name)
  got = dict(b1=c.adam.b1, b2=c.adam.b2, eps=c.adam.eps,
             warmup_steps=c.warmup_steps, batch_size=c.batch_size,
             schedule=c.schedule, min_lr_ratio=c.min_lr_ratio,
             logit_scale_init=c.model.logit_scale_init,
             logit_scale_max=c.model.logit_scale_max,
             logit_bias_init=c.model.logit_bias_init,
             image_pool=c.model.image.pool, text_pool=c.model.text.pool,
             causal=c.model.text.causal, activation=c.model.activation,
             vocab_size=c.model.text.vocab_size)
  assert got == values


def test_runs_from_before_wd_convention_resume_without_the_flag():
  """A stored config without wd_convention (older runs) equals the new
  default 'coupled' in effect: no --allow_config_change needed; any other
  value, or any other change, still needs it."""
  from clip_jax import train  # pylint: disable=g-import-not-at-top
  new = recipe("clip.py", "tiny")
  stored = recipe("clip.py", "tiny")
  del stored["wd_convention"]

  def resume(config):
    return train.check_resume(config, stored, workdir="w", step=3,
                              mismatches=[], allow_change=False,
                              schedules=None)

  assert "Resuming from checkpoint 3" in resume(new)
  new.wd_convention = "decoupled"
  with pytest.raises(ValueError, match="wd_convention"):
    resume(new)


def _parent_and_name(config, dotted: str):
  """('model.image.patch_embed') -> (config.model.image, 'patch_embed')."""
  *parents, name = dotted.split(".")
  for part in parents:
    config = config[part]
  return config, name


def test_runs_from_before_the_optional_model_keys_resume_without_the_flag():
  """The recipes now define model.attention / image.patch_embed /
  text.embed_lookup (so --config flags reach them) at the value their
  absence meant: an older run's config without them resumes as is; a
  lever actually switched still needs --allow_config_change."""
  from clip_jax import train  # pylint: disable=g-import-not-at-top
  new = recipe("clip.py", "tiny")
  stored = recipe("clip.py", "tiny")
  for key in ("model.attention", "model.image.patch_embed",
              "model.text.embed_lookup", "model.logit_bias_init"):
    parent, name = _parent_and_name(stored, key)
    del parent[name]

  def resume(config):
    return train.check_resume(config, stored, workdir="w", step=3,
                              mismatches=[], allow_change=False,
                              schedules=None)

  assert "Resuming from checkpoint 3" in resume(new)
  new.model.image.patch_embed = "matmul"
  with pytest.raises(ValueError, match="model.image.patch_embed"):
    resume(new)


@pytest.mark.parametrize("flag, value", [
    ("model.attention", "fused_qkv"), ("model.image.patch_embed", "matmul"),
    ("model.text.embed_lookup", "one_hot")])
def test_the_performance_levers_are_recipe_keys(flag, value):
  """config_flags only overrides keys the config has: the recipes define
  the levers (at their defaults), so `--config.<flag>=<value>` works and
  validates."""
  c = recipe("clip.py", "tiny")
  assert flag in config_lib.to_flat_dict(c)
  parent, name = _parent_and_name(c, flag)
  parent[name] = value  # What --config.<flag>=<value> does.
  config_lib.validate(c, device_count=8)


def test_align_recipe_values():
  """The values configs/align.py's docstring cites (Section 5 and HF)."""
  c = recipe("align.py")
  assert (c.optimizer, c.lr, c.wd, c.wd_convention) == ("lamb", 1e-3, 1e-5,
                                                        "coupled")
  assert (c.total_steps, c.label_smoothing, c.model.embed_dim) == (
      1_200_000, 0.1, 640)
  assert (c.model.text.depth, c.model.text.width, c.model.text.heads) == (
      24, 1024, 16)
  config_lib.validate(c, device_count=8)


def test_align_schedule_warms_up_then_decays_linearly_to_zero():
  c = recipe("align.py")
  schedule = optim.make_schedule(c, total_steps=c.total_steps,
                                 warmup_steps=c.warmup_steps)
  for step, want in [(0, 0.0), (5_000, 5e-4), (10_000, 1e-3),
                     (605_000, 5e-4), (1_200_000, 0.0)]:
    np.testing.assert_allclose(float(schedule(step)), want, rtol=1e-6,
                               atol=1e-12)


def numpy_lamb(w, grads, lrs, b1, b2, eps, wd):
  """LAMB on one weight matrix, float64: the weights after each step."""
  m, v, out = np.zeros_like(w), np.zeros_like(w), []
  for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    direction = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps) + wd * w
    ratio = np.linalg.norm(w) / np.linalg.norm(direction)
    w = w - lr * ratio * direction
    out.append(w)
  return out


def test_align_uses_lamb_as_written():
  c = recipe("align.py", "tiny")
  c.wd = 0.05  # Large enough that a wrong decay would show.
  rng = np.random.default_rng(0)
  w = rng.normal(size=(4, 3))
  grads = [rng.normal(size=(4, 3)) for _ in range(TOTAL)]
  tx, schedule = optim.make_optimizer(c, {"kernel": jnp.float32(w)},
                                      total_steps=TOTAL,
                                      warmup_steps=WARMUP)
  params = {"kernel": jnp.float32(w)}
  state, got = tx.init(params), []
  update = jax.jit(tx.update)
  for g in grads:
    updates, state = update({"kernel": jnp.float32(g)}, state, params)
    params = optax.apply_updates(params, updates)
    got.append(np.asarray(params["kernel"]))
  lrs = [float(schedule(t)) for t in range(TOTAL)]
  want = numpy_lamb(w, grads, lrs, 0.9, 0.999, 1e-6, 0.05)
  np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5,
                             atol=1e-6)
  assert not np.allclose(want[-1], w)  # It moved.


def test_lamb_rejects_the_decoupled_convention():
  c = recipe("align.py", "tiny")
  c.wd_convention = "decoupled"
  with pytest.raises(ValueError, match="optimizer='lamb' with "
                     "config.wd_convention='decoupled'"):
    config_lib.validate(c, device_count=8)
