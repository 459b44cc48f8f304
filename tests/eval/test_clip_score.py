"""CLIP score against cosines of ``transformers``' CLIPModel features on the same inputs."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ecdit_jax.encoders import clip, clip_tokenizer
from ecdit_jax.eval.clip_score import clip_score
from tests.eval.reference_models import transformers_clip_cosines, write_clip_tokenizer_dir

MAX_LENGTH = 16
IMAGE_SIZE = 32
CAPTIONS = ["a red circle", "two triangles", "A Purple SQUARE, to the left!", "",
            "a blue square to the left of two red circles and three green triangles", "red"]


@pytest.fixture(scope="module")
def scoring_setup(tmp_path_factory):
  """(our model, its checkpoint dir, tokenizer, images, HF cosine of each image and caption)."""
  tokenizer_dir = tmp_path_factory.mktemp("tokenizer")
  write_clip_tokenizer_dir(tokenizer_dir)
  tokenizer = clip_tokenizer.load_clip_tokenizer(tokenizer_dir)
  common = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
            "num_hidden_layers": 2}
  config = transformers.CLIPConfig(
      text_config=dict(vocab_size=tokenizer.vocab_size, max_position_embeddings=MAX_LENGTH,
                       bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                       pad_token_id=tokenizer.pad_id, **common),
      vision_config=dict(image_size=IMAGE_SIZE, patch_size=8, **common), projection_dim=16)
  torch.manual_seed(0)
  hf_model = transformers.CLIPModel(config).eval()
  model_dir = tmp_path_factory.mktemp("clip")
  hf_model.save_pretrained(model_dir, safe_serialization=True)

  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(len(CAPTIONS), 40, 48, 3), dtype=np.uint8)
  pixels = clip.preprocess_images(images, IMAGE_SIZE)
  ids, mask = tokenizer.encode_batch(CAPTIONS, MAX_LENGTH)
  cosines = transformers_clip_cosines(hf_model, pixels, ids, mask)
  return clip.load_clip(model_dir), model_dir, tokenizer, images, cosines


def test_score_is_clamped_cosine_of_transformers_features(scoring_setup):
  model, _, tokenizer, images, cosines = scoring_setup
  result = clip_score(model, tokenizer, images, CAPTIONS, batch_size=4)
  assert np.any(cosines > 0) and np.any(cosines < 0)  # both sides of the clamp are exercised
  expected = 100.0 * np.maximum(cosines, 0.0)
  assert result["per_image"].shape == (len(CAPTIONS),)
  np.testing.assert_allclose(result["per_image"], expected, rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(result["mean"], expected.mean(), rtol=1e-4, atol=1e-3)


def test_negative_cosines_score_zero(scoring_setup):
  # Negating the image projection negates every cosine: each pair that scored above zero now
  # has a negative cosine, and the pairs that scored zero now score 100 * |cos|.
  model, model_dir, tokenizer, images, cosines = scoring_setup
  negated = clip.load_clip(model_dir)
  negated.visual_projection.kernel[...] = -negated.visual_projection.kernel[...]
  scores = clip_score(model, tokenizer, images, CAPTIONS)["per_image"]
  negated_scores = clip_score(negated, tokenizer, images, CAPTIONS)["per_image"]
  assert np.all(cosines != 0)
  assert np.all((scores == 0) | (negated_scores == 0))
  np.testing.assert_array_equal(negated_scores == 0, cosines > 0)
  np.testing.assert_allclose(scores + negated_scores, 100.0 * np.abs(cosines), rtol=1e-4,
                             atol=1e-3)


def test_score_does_not_depend_on_batch_size(scoring_setup):
  model, _, tokenizer, images, _ = scoring_setup
  reference = clip_score(model, tokenizer, images, CAPTIONS, batch_size=len(CAPTIONS))
  for batch_size in (1, 4, 16):
    result = clip_score(model, tokenizer, images, CAPTIONS, batch_size=batch_size)
    np.testing.assert_allclose(result["per_image"], reference["per_image"], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(result["mean"], reference["mean"], rtol=1e-5, atol=1e-4)


def test_mismatched_inputs_raise(scoring_setup):
  model, _, tokenizer, images, _ = scoring_setup
  with pytest.raises(ValueError, match="captions"):
    clip_score(model, tokenizer, images, CAPTIONS[:-1])
