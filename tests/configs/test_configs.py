"""Every shipped config builds a valid model config; presets select the paper's sizes."""

import pytest

from configs import default, ecdit
from ecdit_jax.model import ModelConfig
from ecdit_jax.model.presets import BACKBONES, preset_names


def test_default_config_is_a_valid_tiny_ec_model():
  config = default.get_config()
  model = ModelConfig.from_mapping(config.model)
  assert model.router == "expert_choice" and model.num_experts == 8
  assert model.moe_layer_indices == (1, 3, 5)


@pytest.mark.parametrize("name", preset_names())
def test_presets_and_their_runlocal_variants_are_valid(name):
  full = ModelConfig.from_mapping(ecdit.get_config(name).model)
  size = name.split("-")[0]
  assert full.hidden_size == BACKBONES[size][0]
  assert full.num_tokens == 256  # patch 2 on 32x32, as in the paper
  local = ModelConfig.from_mapping(ecdit.get_config(name + ",runlocal").model)
  assert (local.moe_layout, local.router, local.num_experts) == (full.moe_layout, full.router,
                                                                 full.num_experts)
  assert local.hidden_size < full.hidden_size


def test_m64e_uses_38_layers():
  assert ecdit.get_config("M-64E").model.num_layers == 38
  assert ecdit.get_config("M-32E").model.num_layers == 46


def test_unknown_flag_is_rejected():
  with pytest.raises(ValueError, match="runlocal"):
    ecdit.get_config("XL-32E,fast")
