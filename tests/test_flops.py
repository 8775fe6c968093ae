"""clip_jax.flops (the analytic matmul count) against XLA's cost analysis.

The analytic figure counts matmuls only; XLA's compiled cost analysis also
counts elementwise work (layer norms, activations, softmax, residual adds,
the loss's exp/log), about 1 FLOP per element per op. So the compiled figure
must be at or above the formula, and above it by no more than the
elementwise share, which shrinks as width grows: <= 2% at width 256 (one
encoder; 5% at width 64 with 128 tokens, the softmax over [T, T]), <= 12%
for a whole width-32 model's forward + backward (its backward adds the
elementwise ops' derivatives too).
"""

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from clip_jax import flops, losses, train_state
from clip_jax.models import common, two_towers


@pytest.mark.parametrize("width,mlp,tokens,depth,heads,limit", [
    (256, 1024, 16, 2, 8, 0.02),
    (128, 512, 17, 1, 4, 0.03),
    (64, 256, 128, 1, 2, 0.05),  # Attention is a third of the matmuls.
])
def test_encoder_forward_flops_match_cost_analysis(width, mlp, tokens, depth,
                                                   heads, limit):
  encoder = common.Encoder(depth, mlp, heads, "gelu", jnp.float32)
  x = jnp.ones((4, tokens, width), jnp.float32)
  params = encoder.init(jax.random.key(0), x)
  compiled = jax.jit(encoder.apply).lower(params, x).compile()
  measured = flops.compiled_flops(compiled) / 4
  expected = flops.encoder_forward_flops(
      flops.Tower(width, depth, mlp, tokens))
  assert expected <= measured <= (1 + limit) * expected, (measured, expected)


def _mu_model_config():
  return ml_collections.ConfigDict(dict(
      embed_dim=32, logit_scale_init=1 / 0.07, logit_scale_max=100.0,
      logit_bias_init=None, dtype="float32", activation="quick_gelu",
      remat=False, remat_policy="none", scan=False,
      image=dict(variant="mu", image_size=32, patch_size=8, pool="cls"),
      text=dict(variant="mu", vocab_size=64, context_length=8, pool="eos",
                causal=True, eos_id=1, pad_id=0)))


def test_train_flops_match_cost_analysis_of_loss_and_grads():
  model_config, batch = _mu_model_config(), 16
  model = two_towers.build_model(model_config)
  images = jnp.zeros((batch, 32, 32, 3), jnp.float32)
  tokens = jnp.ones((batch, 8), jnp.int32)
  params = model.init(jax.random.key(0), images[:1], tokens[:1])["params"]
  grad_fn = train_state.make_loss_and_grads(
      model, losses.get_loss("softmax"), None, None)
  compiled = jax.jit(grad_fn).lower(
      params, {"image": images, "text": tokens}).compile()
  measured = flops.compiled_flops(compiled) / batch
  expected = flops.config_train_flops_per_example(model_config, batch)
  assert expected["total"] == sum(
      v for k, v in expected.items() if k != "total")
  assert expected["total"] <= measured <= 1.12 * expected["total"], (
      measured, expected)


def test_thunk_categories_name_the_heaviest_op_of_each_fusion():
  from clip_jax.hlo import thunk_categories
  x = jnp.ones((64, 32), jnp.float32)

  def program(a, b):
    return jnp.exp(a @ b).T + 1.0, jnp.sum(jnp.tanh(a), axis=0)

  hlo = jax.jit(program).lower(x, x.T).compile().as_text()
  categories = thunk_categories(hlo)
  assert "dot" in categories.values(), categories
  assert set(categories.values()) <= {"dot", "convolution", "transpose",
                                      "reduce", "gather", "scatter",
                                      "elementwise"}, categories
  # The program has one matmul, so exactly one thunk is a dot.
  assert sum(v == "dot" for v in categories.values()) == 1, categories
