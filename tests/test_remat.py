"""model.remat_policy: same values and grads as the model without remat."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax import config as config_lib
from clip_jax import train_state
from clip_jax.models import common, two_towers

POLICIES = ["full", "dots_saveable", "dots_with_no_batch_dims_saveable"]


def _model_config(policy, scan):
  config = config_lib.load_config_file("configs/clip.py", "tiny,batch=8")
  config.model.scan = scan
  config.model.image.depth = config.model.text.depth = 2
  config.model.remat_policy = policy
  return config


def _inputs(config):
  rng = np.random.default_rng(0)
  size = config.model.image.image_size
  length = config.model.text.context_length
  images = jnp.asarray(rng.normal(size=(4, size, size, 3)), jnp.float32)
  tokens = jnp.asarray(rng.integers(3, 64, size=(4, length)), jnp.int32)
  cotangents = [jnp.asarray(rng.normal(size=(4, config.model.embed_dim)),
                            jnp.float32) for _ in range(2)]
  return images, tokens, cotangents


def _printed(policy):
  """How a jaxpr prints a checkpoint policy (functions without address)."""
  if isinstance(policy, types.FunctionType):
    return f"<function {policy.__name__} at"
  return str(policy)


@pytest.mark.parametrize("scan", [False, True], ids=["blocks", "scan"])
def test_remat_policies_match_no_remat(scan):
  configs = [_model_config(p, scan) for p in ["none"] + POLICIES]
  models = [two_towers.build_model(c.model) for c in configs]
  params = train_state.init_params(models[0], configs[0], jax.random.key(1))
  images, tokens, (cimg, ctxt) = _inputs(configs[0])

  def value(model, params):
    zimg, ztxt, _ = model.apply({"params": params}, images, tokens)
    return jnp.sum(zimg * cimg) + jnp.sum(ztxt * ctxt)

  fns = [jax.value_and_grad(lambda p, m=m: value(m, p)) for m in models]
  for policy, fn in zip(["none"] + POLICIES, fns):
    # Rematerialised for real (a checkpoint with this policy in the
    # program), not silently ignored.
    jaxpr = str(jax.make_jaxpr(fn)(params))
    assert ("remat" in jaxpr) == (policy != "none"), policy
    if policy != "none":
      assert f"policy={_printed(common.REMAT_POLICIES[policy])}" in jaxpr
  results = jax.jit(lambda p: [fn(p) for fn in fns])(params)
  ref_value, ref_grads = results[0]
  scale = max(float(np.max(np.abs(g)))
              for g in jax.tree_util.tree_leaves(ref_grads))
  for policy, (v, grads) in zip(POLICIES, results[1:]):
    # Recomputation runs the same ops on the same inputs; XLA may fuse and
    # sum them in another order, so allow float32 rounding: a few ulp
    # (1.2e-7 each) of the gradient's largest entry, no more. (Some leaves,
    # like the attention key bias, have an exactly zero gradient: float
    # noise around 0 that no relative tolerance fits.)
    np.testing.assert_allclose(v, ref_value, rtol=1e-6, err_msg=policy)
    jax.tree_util.tree_map_with_path(
        lambda path, a, b, p=policy: np.testing.assert_allclose(
            a, b, rtol=1e-5, atol=1e-6 * scale,
            err_msg=f"{p} {jax.tree_util.keystr(path)}"),
        grads, ref_grads)


def test_remat_policy_config():
  model = _model_config(None, False).model
  assert two_towers.remat_policy(model) == "none"
  model.remat = True
  assert two_towers.remat_policy(model) == "full"  # The older boolean.
  model.remat_policy = "dots_saveable"
  assert two_towers.remat_policy(model) == "dots_saveable"
  model.remat_policy = "none"
  with pytest.raises(ValueError, match="remat=True contradicts"):
    two_towers.build_model(model)
  model.remat, model.remat_policy = False, "dots"
  with pytest.raises(ValueError, match="remat_policy='dots' is not one of"):
    two_towers.build_model(model)


# XLA:CPU's memory-minimising scheduler, chosen per compile. Its default
# (concurrency-optimised) scheduler drops remat's optimisation barriers and
# hoists every unscanned block's recomputation into the forward pass, so
# unscanned remat saves nothing there (TPU/GPU schedulers keep it late).
MEMORY_SCHEDULER = {
    "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def _grad_temp_bytes(policy, scan, compiler_options):
  """Temp bytes of the compiled towers' gradient, where activations
  dominate: 4 blocks of width 96, 17 image tokens, 64 examples."""
  config = _model_config(policy, scan)
  config.model.image.variant = config.model.text.variant = "tiny"
  config.model.image.depth = config.model.text.depth = 4
  model = two_towers.build_model(config.model)
  params = train_state.param_shapes(model, config)
  size = config.model.image.image_size
  images = jax.ShapeDtypeStruct((64, size, size, 3), jnp.float32)
  tokens = jax.ShapeDtypeStruct((64, config.model.text.context_length),
                                jnp.int32)

  def value(params, images, tokens):
    zimg, ztxt, _ = model.apply({"params": params}, images, tokens)
    return jnp.sum(zimg * ztxt)

  compiled = jax.jit(jax.grad(value)).lower(params, images, tokens).compile(
      compiler_options=compiler_options)
  return compiled.memory_analysis().temp_size_in_bytes


def test_remat_lowers_compiled_temp_memory():
  """Remat must shrink what the compiled program keeps, not only the jaxpr.

  Without remat a block keeps ~8 [L, width] + 2 [L, mlp] + heads [L, L]
  values per example for its backward; 'full' keeps only its input
  [L, width], so (4 blocks) well under 0.6 of the no-remat temp bytes
  (0.49 measured); 'dots_saveable' keeps the matmul outputs, between the
  two (0.71). Unscanned blocks, memory-minimising scheduler (see above).
  """
  temps = {p: _grad_temp_bytes(p, False, MEMORY_SCHEDULER)
           for p in ("none", "full", "dots_saveable")}
  assert temps["full"] < 0.6 * temps["none"], temps
  assert temps["full"] < temps["dots_saveable"] < 0.9 * temps["none"], temps


def test_scanned_remat_lowers_compiled_temp_memory():
  """The same under model.scan (the loop body is rematerialised; 0.18
  measured). Memory scheduler: XLA:CPU's default one gave run-to-run
  different temp bytes for the same train step."""
  none, full = (_grad_temp_bytes(p, True, MEMORY_SCHEDULER)
                for p in ("none", "full"))
  assert full < 0.5 * none, (none, full)
