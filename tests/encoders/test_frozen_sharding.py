"""Frozen encoders split over a mesh by the model's rule table: each device holds its share, and
the outputs are those of the unsplit networks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ecdit_jax.encoders import frozen, random_init
from ecdit_jax.model import ModelConfig
from ecdit_jax.parallel import mesh as mesh_lib

CAPTIONS = ["a red circle", "two squares to the left of a blue triangle", ""]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  return random_init.write_random_models(tmp_path_factory.mktemp("weights"))


def _bytes_on(device, tree):
  return sum(shard.data.nbytes for leaf in jax.tree.leaves(tree)
             for shard in leaf.addressable_shards if shard.device == device)


@pytest.mark.parametrize("sizes", [{"fsdp": 8}, {"fsdp": 4, "tensor": 2}])
def test_a_t5_encoder_split_over_the_mesh_gives_the_unsplit_context(weights, sizes):
  t5_dir, _ = weights
  config = ModelConfig(text_encoder="t5", text_hidden_size=32, text_max_len=12, dtype="float32")
  encoder = frozen.load_frozen_text_encoder("t5", t5_dir, "float32", config)
  tokens = encoder.tokenize(CAPTIONS)
  want = jax.jit(encoder.encode)(encoder.placed(None).params, tokens)
  mesh = mesh_lib.create_mesh(mesh_lib.MeshConfig(data=1, **sizes))
  split = encoder.placed(mesh)
  total = sum(leaf.nbytes for leaf in jax.tree.leaves(split.params))
  for device in mesh.devices.flat:  # a share each, not a copy
    assert _bytes_on(device, split.params) < total / 3
  encode = frozen.make_batch_encoder(split, mesh)
  rows = {"tokens": np.tile(tokens, (8 // len(CAPTIONS) + 1, 1))[:8]}
  got = encode(rows)
  for row, caption in enumerate(CAPTIONS):
    length = int(want[1][row])
    assert int(got["context_lengths"][row]) == length
    np.testing.assert_allclose(got["context"][row, :length], want[0][row, :length], rtol=1e-5,
                               atol=1e-5, err_msg=caption)


def test_a_vae_split_over_the_mesh_encodes_and_decodes_as_unsplit(weights):
  _, vae_dir = weights
  config = ModelConfig(image_size=16, in_channels=4, dtype="float32")
  vae = frozen.load_frozen_vae(vae_dir, "float32", config)
  images = jax.random.uniform(jax.random.key(0), (8, 32, 32, 3), minval=-1, maxval=1)
  alone = vae.placed(None)
  want_latents = jax.jit(vae.encode)(alone.params, images)
  want_images = jax.jit(vae.decode)(alone.params, want_latents)
  mesh = mesh_lib.create_mesh(mesh_lib.MeshConfig(data=2, fsdp=2, tensor=2))
  split = vae.placed(mesh)
  kernels = [leaf for leaf in jax.tree.leaves(split.params) if leaf.ndim == 4 and leaf.size > 1000]
  assert kernels and all(k.addressable_shards[0].data.size < k.size for k in kernels)
  latents = frozen.make_image_encoder(split, mesh)({"image": images})["image"]
  np.testing.assert_allclose(latents, want_latents, rtol=1e-4, atol=1e-5)
  decoded = jax.jit(split.decode)(split.params, jnp.asarray(want_latents))
  np.testing.assert_allclose(decoded, want_images, rtol=1e-4, atol=1e-5)


def test_prompts_encoded_once_give_the_encoders_context(weights):
  t5_dir, _ = weights
  config = ModelConfig(text_encoder="t5", text_hidden_size=32, text_max_len=12, dtype="float32")
  encoder = frozen.load_frozen_text_encoder("t5", t5_dir, "float32", config).placed(None)
  prompts = CAPTIONS[:2]
  table = frozen.PrecomputedContext.of(encoder, prompts).placed(None)
  rows = table.rows.encode_batch(list(reversed(prompts)), 12)
  context, lengths = jax.jit(table.encode)(table.params, rows)
  want, want_lengths = jax.jit(encoder.encode)(encoder.params,
                                               encoder.tokenize(list(reversed(prompts))))
  np.testing.assert_array_equal(lengths, want_lengths)
  np.testing.assert_allclose(context, want, rtol=1e-6, atol=1e-6)
  null_context, null_length = table.encode(table.params, table.null_row)
  want_null, want_length = encoder.null_caption()
  assert int(null_length) == int(want_length)
  np.testing.assert_allclose(null_context, want_null, rtol=1e-6, atol=1e-6)
  # The rows' tokenizer is the encoder's for prompt checks, and knows only the table's prompts.
  assert table.rows.encode("a red circle") == encoder.tokenizer.encode("a red circle")
  with pytest.raises(ValueError, match="not encoded beforehand"):
    table.rows.encode_batch(["a green star"], 12)
