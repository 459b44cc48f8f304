"""Routing analysis: per-token expert counts recorded while sampling, object/background split."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ecdit_jax.data import geneval_shapes as gen
from ecdit_jax.eval import routing
from ecdit_jax.model import ModelConfig, TextToImageDiT
from ecdit_jax.model.config import expert_capacity
from tests.model.model_testing import perturbed


def _model():
  config = ModelConfig(image_size=16, patch_size=4, hidden_size=32, num_layers=4, num_heads=2,
                       num_kv_heads=1, num_experts=4, text_vocab_size=64, text_max_len=8,
                       text_hidden_size=16, text_num_layers=1, text_num_heads=2,
                       dtype="float32")
  model = TextToImageDiT(config, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  return config, graphdef, perturbed(params)


def test_recorded_counts_obey_expert_choice_and_vary_by_token():
  config, graphdef, params = _model()
  tokens = jnp.array([[5, 6, 1, 0, 0, 0, 0, 0], [7, 1, 0, 0, 0, 0, 0, 0]])
  null = jnp.array([1, 0, 0, 0, 0, 0, 0, 0])
  noise = jax.random.normal(jax.random.key(2), (2, 16, 16, 3))
  images, counts = routing.record_routing(graphdef, params, tokens, null, noise, num_steps=3,
                                          cfg_scale=2.0, capacity_factor=1.0)
  assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()
  assert counts.shape == (3, len(config.moe_layer_indices), 2, config.num_tokens)
  # Every expert takes exactly C tokens of its image, whatever the step or layer.
  capacity = expert_capacity(config.num_tokens, 1.0, config.num_experts)
  np.testing.assert_array_equal(counts.sum(-1), config.num_experts * capacity)
  assert counts.min() >= 0 and counts.max() <= config.num_experts
  assert len(np.unique(counts)) > 1  # adaptive: tokens get different numbers of experts


def test_object_mask_and_ratio():
  image = np.zeros((2, 16, 16, 3), np.uint8)
  image[0, 4:8, 8:12] = gen.PALETTE["red"]  # exactly the patch (row 1, column 2) of 4x4 patches
  mask = routing.object_token_mask(image, 4)
  expected = np.zeros((2, 16), bool)
  expected[0, 1 * 4 + 2] = True
  np.testing.assert_array_equal(mask, expected)
  counts = np.ones((2, 3, 2, 16), np.int32)
  counts[:, :, 0, 6] = 3  # the object token gets 3 experts, everything else 1
  assert routing.object_background_ratio(counts, mask) == 3.0
  assert routing.object_background_ratio(counts, np.zeros_like(mask)) is None
  maps = routing.token_maps(counts, 4)
  assert maps.shape == (2, 4, 4) and maps[0, 1, 2] == 3.0
