"""Bad configurations fail at construction naming the key; every preset builds abstractly."""

import pytest

from ecdit_jax.model import ConfigError, ModelConfig
from ecdit_jax.model.counting import abstract_model, count_params
from ecdit_jax.model.presets import model_overrides, preset_names

from tests.tiny import tiny_model_config


@pytest.mark.parametrize("overrides,key", [
    (dict(num_heads=5), "config.model.num_heads"),
    (dict(num_kv_heads=3), "config.model.num_kv_heads"),
    (dict(patch_size=5), "config.model.patch_size"),
    (dict(text_num_heads=3), "config.model.text_num_heads"),
    (dict(num_experts=64, capacity_factor=0.5), "config.model.capacity_factor"),
    (dict(num_experts=64, eval_capacity_factor=0.1), "config.model.eval_capacity_factor"),
    (dict(num_experts=0), "config.model.num_experts"),
    (dict(moe_layout="sometimes"), "config.model.moe_layout"),
    (dict(router="random"), "config.model.router"),
    (dict(router="token_choice", token_choice_top_k=5), "config.model.token_choice_top_k"),
    (dict(dtype="int8"), "config.model.dtype"),
    (dict(routing_group_size=0), "config.model.routing_group_size"),
])
def test_bad_values_name_the_key(overrides, key):
  with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
    tiny_model_config(**overrides)


def test_unknown_key_is_named():
  with pytest.raises(ConfigError, match=r"config\.model\.num_expert\b"):
    ModelConfig.from_mapping({"num_expert": 8})


def test_capacity_check_counts_the_routing_group():
  # 16 tokens per image, 64 experts, f = 2: C = round(0.5) = 1 per image is allowed ...
  tiny_model_config(num_experts=64, capacity_factor=2.0)
  # ... and f = 0.5 fails per image but works when 4 images share a routing group.
  with pytest.raises(ConfigError):
    tiny_model_config(num_experts=64, capacity_factor=0.5, eval_capacity_factor=0.5)
  tiny_model_config(num_experts=64, capacity_factor=0.5, eval_capacity_factor=0.5,
                    routing_group_size=4)


def test_unknown_preset_is_rejected():
  with pytest.raises(ValueError, match="XL-32E"):
    model_overrides("XL-33X")
  with pytest.raises(ValueError, match="expert count"):
    model_overrides("XL-12E")


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_builds_abstractly(name):
  config = ModelConfig(in_channels=4, **model_overrides(name))
  model = abstract_model(config)  # shapes only: M-64E (~98B parameters) costs no memory
  assert len(model.dit.blocks) == config.num_layers
  counts = count_params(config, model)
  print(f"{name}: {counts.summary()}")
  assert counts.total == counts.backbone + counts.text_encoder
  if config.moe_layout == "none":
    assert counts.experts == 0 and counts.activated_per_token == counts.backbone
  else:
    # f = 2 under expert choice: an average token uses 2 of the E experts.
    expert_share = counts.experts * (1 - 2 / config.num_experts)
    assert counts.activated_per_token == pytest.approx(counts.backbone - expert_share)


def test_counts_match_the_architecture_formula():
  """Independent closed-form count for the XL backbone with 32 experts."""
  d, layers, e, p, c, text = 1152, 28, 32, 2, 4, 512
  h = 4 * d
  attn = 4 * d * d + 4 * d  # q, k, v, out projections with biases
  cross = 2 * d * d + 2 * text * d + 4 * d  # q, out from d; k, v from the text width
  qk_norm = 2 * (d // 18) * 2  # query/key RMS scales, self- and cross-attention
  norms = 2 * d  # the cross-attention LayerNorm (the others have no affine parameters)
  adaln = d * 6 * d + 6 * d
  ffn = 2 * d * h + h + d
  experts = e * ffn + d * e  # plus the router
  block = attn + cross + qk_norm + norms + adaln
  backbone = layers * block + layers // 2 * (ffn + experts)
  backbone += p * p * c * d + d  # patch embedding
  backbone += 256 * d + d + d * d + d  # timestep MLP
  backbone += text * d + d  # pooled-text projection
  backbone += d * 2 * d + 2 * d + d * p * p * c + p * p * c  # final layer
  counts = count_params(ModelConfig(in_channels=4, **model_overrides("XL-32E")))
  assert counts.backbone == backbone
  assert counts.experts == layers // 2 * e * ffn
