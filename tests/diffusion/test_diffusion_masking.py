"""Tests for token masking and the patch layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ecdit_jax.diffusion import masking
from ecdit_jax.model.layers import patchify, unpatchify


def test_num_kept_tokens():
  assert masking.num_kept_tokens(256, 0.5) == 128
  assert masking.num_kept_tokens(256, 0.0) == 256
  assert masking.num_kept_tokens(10, 0.7) == 3  # float error must not floor to 2
  assert masking.num_kept_tokens(10, 0.99) == 1  # never zero tokens
  assert masking.num_kept_tokens(7, 0.5) == 3


@pytest.mark.parametrize("bad_ratio", [-0.1, 1.0, 1.5, float("nan"), "0.5"])
def test_bad_mask_ratio_raises_naming_the_key(bad_ratio):
  with pytest.raises(ValueError, match="mask_ratio"):
    masking.num_kept_tokens(16, bad_ratio)
  with pytest.raises(ValueError, match="mask_ratio"):
    masking.random_keep_indices(jax.random.key(0), 2, 16, bad_ratio)


def test_random_keep_indices_properties():
  batch, num_tokens, ratio = 64, 32, 0.5
  keep = jax.jit(masking.random_keep_indices, static_argnums=(1, 2, 3))(
    jax.random.key(0), batch, num_tokens, ratio
  )
  keep = np.asarray(keep)
  assert keep.shape == (batch, 16) and keep.dtype == np.int32
  assert keep.min() >= 0 and keep.max() < num_tokens
  assert np.all(np.diff(keep, axis=1) > 0)  # strictly increasing => sorted and unique
  assert len({tuple(row) for row in keep}) > batch - 2  # rows differ across images


def test_random_keep_indices_uniform_and_independent():
  batch, num_tokens = 20_000, 8
  keep = np.asarray(masking.random_keep_indices(jax.random.key(1), batch, num_tokens, 0.5))
  membership = np.zeros((batch, num_tokens))
  np.put_along_axis(membership, keep, 1.0, axis=1)
  # Every token is kept with probability K / N = 0.5 (std of the frequency ~ 0.0035).
  np.testing.assert_allclose(membership.mean(axis=0), 0.5, atol=0.02)
  # Independence across images: consecutive images' memberships are uncorrelated.
  correlation = np.corrcoef(membership[:-1].ravel(), membership[1:].ravel())[0, 1]
  assert abs(correlation) < 0.02
  # Different keys give different masks for the same image.
  other = np.asarray(masking.random_keep_indices(jax.random.key(2), batch, num_tokens, 0.5))
  assert np.mean(np.any(other != keep, axis=1)) > 0.9


def test_ratio_zero_keeps_everything_in_order():
  keep = masking.random_keep_indices(jax.random.key(0), 3, 10, 0.0)
  np.testing.assert_array_equal(keep, np.tile(np.arange(10), (3, 1)))
  x = jax.random.normal(jax.random.key(1), (3, 10, 4))
  np.testing.assert_array_equal(masking.gather_tokens(x, keep), x)


def test_gather_takes_each_rows_kept_tokens():
  x = jnp.arange(2 * 5 * 3, dtype=jnp.float32).reshape(2, 5, 3)
  keep = jnp.array([[0, 3], [1, 4]], dtype=jnp.int32)
  gathered = masking.gather_tokens(x, keep)
  np.testing.assert_array_equal(
    gathered, np.stack([np.asarray(x)[0, [0, 3]], np.asarray(x)[1, [1, 4]]])
  )


def test_patchify_layout_hand_checked():
  # 4x4 single-channel image with value 10 * row + col, patch size 2.
  rows, cols = np.meshgrid(np.arange(4), np.arange(4), indexing="ij")
  image = jnp.asarray((10 * rows + cols)[None, :, :, None], dtype=jnp.float32)
  tokens = patchify(image, 2)
  assert tokens.shape == (1, 4, 4)
  np.testing.assert_array_equal(
    tokens[0],
    [
      [0, 1, 10, 11],  # patch (0, 0)
      [2, 3, 12, 13],  # patch (0, 1)
      [20, 21, 30, 31],  # patch (1, 0)
      [22, 23, 32, 33],
    ],
  )  # patch (1, 1)


def test_patchify_channel_order_is_fastest():
  image = jnp.arange(2 * 2 * 3, dtype=jnp.float32).reshape(1, 2, 2, 3)
  # One 2x2 patch: features run (dy, dx, c), i.e. the raw row-major pixel order.
  np.testing.assert_array_equal(patchify(image, 2)[0, 0], np.arange(12))


def test_patchify_round_trip_non_square():
  images = jax.random.normal(jax.random.key(0), (2, 8, 12, 3))
  tokens = patchify(images, 4)
  assert tokens.shape == (2, 6, 48)
  # Token i * (W/p) + j holds the pixels of patch (i, j).
  np.testing.assert_array_equal(tokens[1, 1 * 3 + 2].reshape(4, 4, 3), images[1, 4:8, 8:12])
  np.testing.assert_array_equal(unpatchify(tokens, 4, 8, 12), images)
  with pytest.raises(ValueError):
    patchify(images, 5)
