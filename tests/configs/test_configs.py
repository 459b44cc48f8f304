"""Every shipped config builds a valid model config; presets select the paper's sizes."""

import pytest

from configs import default, ecdit, t2i_256
from ecdit_jax.model import ModelConfig
from ecdit_jax.model.presets import BACKBONES, model_overrides, preset_names


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


@pytest.mark.parametrize("variant", t2i_256.VARIANTS)
def test_t2i_256_variants_train_on_latents_with_a_frozen_t5(variant):
  config = t2i_256.get_config(variant)
  model = ModelConfig.from_mapping(config.model)
  assert (model.image_size, model.in_channels, model.patch_size) == (32, 4, 2)
  assert model.text_encoder == "t5" and model.text_hidden_size == 4096
  assert model.hidden_size == ModelConfig(**model_overrides(variant)).hidden_size
  assert config.data.dataset == "latents:" and config.batch_size == 4096
  local = t2i_256.get_config(variant + ",runlocal")
  local_model = ModelConfig.from_mapping(local.model)
  # The random T5 of ecdit_jax.encoders.random_init (width 32) and its VAE (32 px -> 16x16x4).
  assert (local_model.text_hidden_size, local_model.image_size) == (32, 16)
  assert local_model.num_experts == model.num_experts
  with pytest.raises(ValueError, match="XL-32E"):
    t2i_256.get_config("B-8E")
