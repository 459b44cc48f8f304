"""The analytical FLOP counts against an independent reference: the traced model's matmuls.

The reference traces the real forward pass with ``jax.make_jaxpr`` and sums 2 x (output size) x
(contracted size) over every ``dot_general``, sub-jaxprs included (a scan's body counts once per
iteration). On CPU ``jax.nn.dot_product_attention`` lowers to two dot_generals (q k^T with the
query heads grouped under their KV head, then p v), so attention is in the reference too.
"""

import math

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.extend import core as jax_core
from tests.tiny import tiny_model_config

from ecdit_jax.inference.sampler import generate
from ecdit_jax.model import TextToImageDiT
from ecdit_jax.model import flops as F
from ecdit_jax.model.config import ModelConfig
from ecdit_jax.model.presets import model_overrides


def traced_matmul_flops(jaxpr) -> int:
  """2 x prod(output shape) x prod(contracted dims) summed over the dot_generals of a jaxpr."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      contracted = math.prod(eqn.invars[0].aval.shape[i] for i in lhs_contract)
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * contracted
    subs = [traced_matmul_flops(s.jaxpr if isinstance(s, jax_core.ClosedJaxpr) else s)
            for value in eqn.params.values()
            for s in (value if isinstance(value, (list, tuple)) else [value])
            if isinstance(s, (jax_core.ClosedJaxpr, jax_core.Jaxpr))]
    if eqn.primitive.name == "scan":
      total += eqn.params["length"] * sum(subs)
    elif eqn.primitive.name in ("while", "cond") and any(subs):
      # A while loop's trip count is not in the jaxpr; a cond runs one branch of several.
      raise NotImplementedError(f"matmuls inside {eqn.primitive.name}")
    else:
      total += sum(subs)
  return total


def trace_flops(fn, *args) -> int:
  return traced_matmul_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def model_inputs(config, batch, text_len=None):
  text_len = config.text_max_len if text_len is None else text_len
  x = jnp.zeros((batch, config.image_size, config.image_size, config.in_channels))
  tokens = jnp.ones((batch, text_len), jnp.int32)
  return x, jnp.zeros((batch,)), tokens


def traced_forward(config, batch=2, text_len=None, **call_kwargs):
  """Per-image matmul FLOPs of the whole model, of the DiT alone and of the text encoder."""
  graphdef, state = nnx.split(TextToImageDiT(config, rngs=nnx.Rngs(0)))
  x, t, tokens = model_inputs(config, batch, text_len)

  def whole(state, x, t, tokens):
    return nnx.merge(graphdef, state)(x, t, tokens, **call_kwargs)

  def text(state, tokens):
    return nnx.merge(graphdef, state).encode_text(tokens)

  def dit(state, x, t, context, lengths):
    return nnx.merge(graphdef, state).dit(x, t, context, lengths, **call_kwargs)

  context = jnp.zeros((batch, tokens.shape[1], config.text_hidden_size))
  lengths = jnp.full((batch,), tokens.shape[1], jnp.int32)
  return {"total": trace_flops(whole, state, x, t, tokens) / batch,
          "text_encoder": trace_flops(text, state, tokens) / batch,
          "backbone": trace_flops(dit, state, x, t, context, lengths) / batch}


VARIANTS = {
    # name: (config overrides, model call kwargs, images per batch)
    "dense_mha": ({"moe_layout": "none", "num_kv_heads": None}, {}, 2),
    "dense_gqa": ({"moe_layout": "none"}, {}, 2),
    "ec_train": ({}, {"train": True}, 2),
    "ec_eval_factor": ({"eval_capacity_factor": 0.5}, {"train": False}, 2),
    "ec_sweep_factor": ({}, {"train": False, "capacity_factor": 1.3}, 2),
    "ec_every_layer_mqa": ({"moe_layout": "every", "num_kv_heads": 1, "num_layers": 3}, {}, 1),
    "ec_routing_group": ({"routing_group_size": 2}, {"train": False, "capacity_factor": 1.5}, 4),
    "ec_no_qk_norm": ({"qk_norm": False, "num_experts": 8}, {}, 2),
    "token_choice": ({"router": "token_choice"}, {}, 2),
    "token_choice_factor": ({"router": "token_choice", "token_choice_top_k": 1},
                            {"capacity_factor": 2.0}, 2),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_forward_equals_the_traced_model(name):
  overrides, call_kwargs, batch = VARIANTS[name]
  config = tiny_model_config(**overrides)
  counted = F.forward_flops_per_image(config, **call_kwargs)
  traced = traced_forward(config, batch, **call_kwargs)
  for key in ("total", "backbone", "text_encoder"):
    assert counted[key] == traced[key], key
  assert counted["total"] == math.fsum(counted[k] for k in F.COMPONENTS)


def test_short_prompts_and_masked_tokens_equal_the_traced_model():
  config = tiny_model_config()
  graphdef, state = nnx.split(TextToImageDiT(config, rngs=nnx.Rngs(0)))
  x, t, tokens = model_inputs(config, batch=2, text_len=5)
  keep = jnp.tile(jnp.array([0, 3, 5, 9, 10, 15], jnp.int32), (2, 1))

  def masked(state, x, t, tokens, keep):
    return nnx.merge(graphdef, state)(x, t, tokens, keep_index=keep, train=True)

  counted = F.forward_flops_per_image(config, num_tokens=6, text_tokens=5)
  assert counted["total"] == trace_flops(masked, state, x, t, tokens, keep) / 2
  # The patch embedding runs before tokens are dropped, so it does not shrink.
  assert counted["patch_embed"] == F.forward_flops_per_image(config)["patch_embed"]


@pytest.mark.parametrize("kv_heads", [None, 2, 1])
def test_attention_components_equal_the_traced_modules(kv_heads):
  config = tiny_model_config(num_kv_heads=kv_heads, text_hidden_size=24, text_num_heads=3)
  block = TextToImageDiT(config, rngs=nnx.Rngs(0)).dit.blocks[0]
  n, length, layers = config.num_tokens, config.text_max_len, config.num_layers
  x = jnp.zeros((1, n, config.hidden_size))
  context = jnp.zeros((1, length, config.text_hidden_size))
  lengths = jnp.array([length], jnp.int32)
  counted = F.forward_flops_per_image(config)
  for kind, traced in [
      ("self_attn", trace_flops(lambda x: block.self_attn(x), x)),
      ("cross_attn", trace_flops(lambda x, c, lens: block.cross_attn(x, c, lens), x, context,
                                 lengths)),
  ]:
    parts = [f"{kind}_{p}" for p in ("q", "k", "v", "out", "scores_values")]
    assert sum(counted[p] for p in parts) / layers == traced, kind
  # Grouped KV heads shrink the key/value projections, and nothing else.
  full = F.forward_flops_per_image(tiny_model_config(text_hidden_size=24, text_num_heads=3,
                                                     num_kv_heads=None))
  ratio = config.kv_heads / config.num_heads
  for key in ("self_attn_k", "self_attn_v", "cross_attn_k", "cross_attn_v"):
    assert counted[key] == ratio * full[key]
  assert counted["self_attn_scores_values"] == full["self_attn_scores_values"]
  # Cross-attention keys/values are projected from the text width.
  assert counted["cross_attn_k"] == layers * 2 * length * 24 * config.kv_heads * config.head_dim


@pytest.mark.parametrize("router", ["expert_choice", "token_choice"])
def test_moe_components_equal_the_traced_layer(router):
  config = tiny_model_config(router=router)
  ffn = TextToImageDiT(config, rngs=nnx.Rngs(0)).dit.blocks[1].ffn
  x = jnp.zeros((2, config.num_tokens, config.hidden_size))
  traced = trace_flops(lambda x: ffn(x, train=False, capacity_factor=1.5), x) / 2
  counted = F.forward_flops_per_image(config, train=False, capacity_factor=1.5)
  assert counted["moe_router"] + counted["moe_experts"] == traced


@pytest.mark.parametrize("factor", [0.25, 0.5, 1.0, 1.3, 2.0, 3.0, 4.0])
def test_expert_choice_experts_cost_about_f_dense_ffns(factor):
  dense = F.forward_flops_per_image(tiny_model_config(moe_layout="none", num_layers=3))["ffn_dense"]
  config = tiny_model_config(moe_layout="every", num_layers=3)
  experts = F.forward_flops_per_image(config, capacity_factor=factor)["moe_experts"]
  # C rounds N f / E to whole tokens: at most half a token per expert off from f x dense.
  per_token = dense / config.num_tokens
  assert abs(experts - factor * dense) <= config.num_experts / 2 * per_token
  if (config.num_tokens * factor / config.num_experts).is_integer():
    assert experts == factor * dense
  # At a paper size the rounding is negligible.
  xl = ModelConfig(in_channels=4, **model_overrides("XL-32E"))
  xl_flops = F.forward_flops_per_image(xl, capacity_factor=factor)
  xl_dense = (xl.num_layers // 2) * xl.num_tokens * 4 * xl.hidden_size * xl.mlp_hidden_size
  assert xl_flops["moe_experts"] == pytest.approx(factor * xl_dense, rel=0.04)


def test_token_choice_experts_cost_top_k_times_buffer_factor():
  config = tiny_model_config(moe_layout="every", router="token_choice", token_choice_top_k=2,
                             token_choice_capacity_factor=1.25, num_experts=2)
  dense = F.forward_flops_per_image(tiny_model_config(moe_layout="none"))["ffn_dense"]
  # 16 tokens x 2 choices x 1.25 / 2 experts = 20 slots, clipped to the 16 tokens.
  assert config.moe_capacity(16) == 16
  assert F.forward_flops_per_image(config)["moe_experts"] == 2 * dense
  wide = tiny_model_config(moe_layout="every", router="token_choice", num_experts=8)
  assert wide.moe_capacity(16) == 5  # round(16 x 2 x 1.25 / 8) = round(5.0)
  assert F.forward_flops_per_image(wide)["moe_experts"] == 8 * 5 / 16 * dense


def test_xl_without_text_matches_the_dit_papers_dit_xl_2():
  # The DiT paper reports DiT-XL/2 at 256 tokens as 118.6 "Gflops", counting multiply-adds.
  config = ModelConfig(in_channels=4, **model_overrides("XL-dense"))
  counted = F.forward_flops_per_image(config)
  d, width, length = config.hidden_size, config.text_hidden_size, config.text_max_len
  text_pooling = 2 * length * width + 2 * width * d
  cross_attention = sum(v for k, v in counted.items() if k.startswith("cross_attn"))
  without_text = (counted["total"] - counted["text_encoder"] - text_pooling - cross_attention)
  assert without_text / 2 == pytest.approx(118.6e9, rel=5e-4)


def test_training_is_three_forwards_and_bounds_the_traced_backward():
  config = tiny_model_config()
  forward = F.forward_flops_per_image(config, train=True)
  train = F.train_flops_per_image(config)
  assert set(train) == set(forward)
  assert all(train[k] == 3 * forward[k] for k in forward)
  graphdef, params = nnx.split(TextToImageDiT(config, rngs=nnx.Rngs(0)), nnx.Param)

  def loss(params, x, t, tokens):
    out, aux = nnx.merge(graphdef, params)(x, t, tokens, train=True)
    return jnp.mean(out**2) + aux["aux_loss"]

  traced = trace_flops(jax.grad(loss), params, *model_inputs(config, batch=2)) / 2
  # The traced gradient skips the input-gradient half of the backward of the matmuls whose
  # input is data: the patch embedding, the timestep MLP's first layer and the text pooling
  # weights. The convention counts them, so it overestimates by exactly those.
  d, width, length = config.hidden_size, config.text_hidden_size, config.text_max_len
  no_input_grad = (forward["patch_embed"] + 2 * F.TIMESTEP_FREQUENCY_DIM * d
                   + 2 * length * width)
  assert train["total"] - no_input_grad == traced


@pytest.mark.parametrize("method", ["euler", "heun"])
@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_generation_equals_the_traced_sampler(method, cfg_scale):
  config = tiny_model_config(eval_capacity_factor=1.0)
  graphdef, state = nnx.split(TextToImageDiT(config, rngs=nnx.Rngs(0)))
  x, _, tokens = model_inputs(config, batch=2)

  def sample(state, tokens, null_tokens, noise):
    return generate(nnx.merge(graphdef, state), tokens, null_tokens, noise, num_steps=3,
                    cfg_scale=cfg_scale, method=method, capacity_factor=0.5)

  traced = trace_flops(sample, state, tokens, tokens[0], x) / 2
  counted = F.generation_flops_per_image(config, num_steps=3, method=method, capacity_factor=0.5)
  assert counted["total"] == traced
  assert counted["forwards"] == 3 * {"euler": 1, "heun": 2}[method] * 2
  inference = F.forward_flops_per_image(config, train=False, capacity_factor=0.5)
  assert counted["per_forward"] == inference["backbone"]


def test_preset_table_reports_the_flops():
  from ecdit_jax.model.counting import preset_table
  header, _, row = preset_table(["XL-32E"]).splitlines()
  cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in row.split("|")]))
  config = ModelConfig(in_channels=4, **model_overrides("XL-32E"))
  forward = F.forward_flops_per_image(config)["total"] / 1e9
  assert float(cells["fwd GFLOPs/image"]) == pytest.approx(forward, abs=0.05)
  assert float(cells["train GFLOPs/image"]) == pytest.approx(3 * forward, abs=0.05)


def test_evaluation_report_has_flops_per_forward_and_per_image():
  from ecdit_jax.evaluate import flops_report, format_table
  config = tiny_model_config()
  report = flops_report(config, capacity_factor=0.5, num_steps=4, method="heun")
  assert report == F.generation_flops_per_image(config, num_steps=4, method="heun",
                                                capacity_factor=0.5)
  summary = {"per_category": {"colors": 0.5}, "overall": 0.5, "flops": report}
  table = format_table({0.5: summary, 1.0: dict(summary, overall=None)})
  assert f"| FLOPs per forward | {F.format_flops(report['per_forward'])} |" in table
  assert f"| FLOPs per image | {F.format_flops(report['total'])} |" in table


def test_format_flops():
  assert F.format_flops(152.34e6) == "152.3M"
  assert F.format_flops(1.5e13) == "15T"
  assert F.format_flops(999.0) == "999"


def test_out_of_range_arguments_fail():
  config = tiny_model_config(num_experts=8)
  with pytest.raises(ValueError, match="num_tokens"):
    F.forward_flops_per_image(config, num_tokens=config.num_tokens + 1)
  with pytest.raises(ValueError, match="text_tokens"):
    F.forward_flops_per_image(config, text_tokens=config.text_max_len + 1)
  with pytest.raises(ValueError, match="capacity factor"):
    F.forward_flops_per_image(config, capacity_factor=0.2)  # 16 x 0.2 / 8 rounds to 0
  with pytest.raises(ValueError, match="method"):
    F.generation_flops_per_image(config, num_steps=2, method="dpm")
