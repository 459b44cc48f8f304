"""Routing analysis: per-token expert counts recorded while sampling, object/background split."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ecdit_jax.data import geneval_shapes as gen
from ecdit_jax.eval import routing
from ecdit_jax.inference.sampler import make_sampler
from ecdit_jax.model import ModelConfig, TextToImageDiT
from ecdit_jax.model.config import expert_capacity
from tests.tiny import perturbed


def _model():
  config = ModelConfig(image_size=16, patch_size=4, hidden_size=32, num_layers=4, num_heads=2,
                       num_kv_heads=1, num_experts=4, text_vocab_size=64, text_max_len=8,
                       text_hidden_size=16, text_num_layers=1, text_num_heads=2,
                       dtype="float32")
  model = TextToImageDiT(config, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  return config, graphdef, perturbed(params)


@pytest.mark.slow
def test_recorded_counts_obey_expert_choice_and_vary_by_token():
  config, graphdef, params = _model()
  tokens = jnp.array([[5, 6, 1, 0, 0, 0, 0, 0], [7, 1, 0, 0, 0, 0, 0, 0]])
  null = jnp.array([1, 0, 0, 0, 0, 0, 0, 0])
  settings = dict(num_steps=3, cfg_scale=2.0, method="euler", capacity_factor=1.0)
  recording = make_sampler(graphdef, config, record_routing=True, **settings)
  images, counts = recording(params, tokens, null, seed=2)
  assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()
  # Recording changes nothing in the images: they are those the plain sampler draws.
  np.testing.assert_array_equal(images, make_sampler(graphdef, config, **settings)(
      params, tokens, null, seed=2))
  counts = np.asarray(counts)
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


def test_summary_splits_compute_between_objects_and_background_per_step_and_layer():
  mask = np.zeros((2, 16), bool)
  mask[0, 6] = mask[1, 0] = True
  counts = np.ones((3, 2, 2, 16), np.int32)  # (steps, layers, images, tokens)
  counts[0, :, 0, 6] = 5  # step 0: image 0's object token gets 5 experts
  counts[:, 1, 1, 0] = 0  # layer 1: image 1's object token gets none
  result = routing.summary(counts, mask, np.array([1.0, 0.5, 0.0]), (1, 3))
  by_step, by_layer = result["experts_per_token_by_step"], result["experts_per_token_by_layer"]
  # step 0: objects (5 + 5 + 1 + 0) / 4; steps 1, 2: (1 + 1 + 1 + 0) / 4
  assert [r["object"] for r in by_step] == [2.75, 0.75, 0.75]
  assert [r["background"] for r in by_step] == [1.0, 1.0, 1.0]
  # layer 0: (5 + 1 + 1 + 1 + 1 + 1) / 6; layer 1: (5 + 1 + 1 + 0 + 0 + 0) / 6
  assert [r["block"] for r in by_layer] == [1, 3]
  np.testing.assert_allclose([r["object"] for r in by_layer], [10 / 6, 7 / 6])
  empty = routing.region_means(counts, np.zeros_like(mask))
  assert empty["object"] is None and empty["background"] == 1.0 * counts.mean()
