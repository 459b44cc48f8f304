"""CLIP in NNX against ``transformers``: tokenizer, preprocessing, embeddings, checkpoint errors."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file, save_file

from ecdit_jax.encoders import clip, clip_tokenizer
from tests.eval.reference_models import write_clip_tokenizer_dir

VOCAB_SIZE = 100
MAX_LENGTH = 16
IMAGE_SIZE = 32
# Sequence lengths of the text batch: one full row and two right-padded ones.
LENGTHS = (MAX_LENGTH, 9, 4)

def write_tokenizer_dir(directory, tokenizer_config: dict | None = None):
  return write_clip_tokenizer_dir(directory, tokenizer_config)


def tiny_hf_config(hidden_act: str, eos_token_id: int, vocab_size: int = VOCAB_SIZE):
  common = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
            "num_hidden_layers": 2, "hidden_act": hidden_act}
  return transformers.CLIPConfig(
      text_config=dict(vocab_size=vocab_size, max_position_embeddings=MAX_LENGTH,
                       bos_token_id=0, eos_token_id=eos_token_id, pad_token_id=1, **common),
      vision_config=dict(image_size=IMAGE_SIZE, patch_size=8, **common), projection_dim=16)


def random_hf_clip(config, seed: int = 0):
  """A random CLIPModel whose LayerNorms, biases and logit scale are not at their initial values."""
  torch.manual_seed(seed)
  model = transformers.CLIPModel(config).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      if name.endswith("bias"):
        param.copy_(0.2 * torch.randn_like(param))
      elif "norm" in name:  # LayerNorm scales
        param.copy_(1.0 + 0.3 * torch.randn_like(param))
    model.logit_scale.fill_(3.1)
  return model


def projected(output):
  """Features from get_*_features, which return a tensor or an output object by version."""
  return (output if isinstance(output, torch.Tensor) else output.pooler_output).numpy()


def text_batch(eos_id: int, rng):
  """Right-padded ids that end in eos and are padded with eos, as CLIP's tokenizer does."""
  ids = np.full((len(LENGTHS), MAX_LENGTH), eos_id, dtype=np.int32)
  mask = np.zeros_like(ids)
  for row, length in enumerate(LENGTHS):
    ids[row, :length - 1] = rng.integers(3, eos_id, size=length - 1)
    ids[row, 0] = 0  # bos
    mask[row, :length] = 1
  return ids, mask


# (hidden_act, eos_token_id, id of the end token in the inputs). With the legacy eos_token_id 2
# the end token is the largest id; otherwise larger ids occur in the text before the end token,
# so pooling at the largest id would pick the wrong position.
CASES = {"quick_gelu_legacy_eos": ("quick_gelu", 2, VOCAB_SIZE - 1),
         "gelu_configured_eos": ("gelu", 90, 90)}


@pytest.fixture(scope="module", params=sorted(CASES))
def clip_pair(request, tmp_path_factory):
  hidden_act, config_eos, input_eos = CASES[request.param]
  hf_model = random_hf_clip(tiny_hf_config(hidden_act, config_eos))
  model_dir = tmp_path_factory.mktemp(request.param)
  hf_model.save_pretrained(model_dir, safe_serialization=True)
  return hf_model, clip.load_clip(model_dir), input_eos, model_dir


def test_text_matches_transformers(clip_pair):
  hf_model, model, eos_id, _ = clip_pair
  ids, mask = text_batch(eos_id, np.random.default_rng(1))
  if eos_id != VOCAB_SIZE - 1:
    ids[1, 3] = VOCAB_SIZE - 1  # a larger id before the end token
  t_ids, t_mask = torch.from_numpy(ids).long(), torch.from_numpy(mask).long()
  with torch.no_grad():
    hf_hidden = hf_model.text_model(input_ids=t_ids, attention_mask=t_mask).last_hidden_state
    hf_embeds = projected(hf_model.get_text_features(input_ids=t_ids, attention_mask=t_mask))
    hf_unmasked = projected(hf_model.get_text_features(input_ids=t_ids))
  tolerance = {"rtol": 1e-4, "atol": 1e-5}
  np.testing.assert_allclose(model.text_hidden_states(ids, mask), hf_hidden.numpy(), **tolerance)
  np.testing.assert_allclose(model.encode_text(ids, mask), hf_embeds, **tolerance)
  np.testing.assert_allclose(model.encode_text(ids), hf_unmasked, **tolerance)
  np.testing.assert_array_equal(model.end_token_positions(ids), np.array(LENGTHS) - 1)
  np.testing.assert_allclose(model.logit_scale[...], hf_model.logit_scale.item())


def test_image_matches_transformers(clip_pair):
  hf_model, model, _, _ = clip_pair
  pixels = np.random.default_rng(2).normal(size=(2, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
  with torch.no_grad():
    hf_embeds = projected(hf_model.get_image_features(
        pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())))
  np.testing.assert_allclose(model.encode_image(pixels), hf_embeds, rtol=1e-4, atol=1e-5)


def test_sharded_checkpoint_loads_the_same(clip_pair, tmp_path):
  hf_model, model, _, _ = clip_pair
  hf_model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="100KB")
  assert (tmp_path / "model.safetensors.index.json").exists()
  sharded = clip.load_clip(tmp_path)
  pixels = np.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
  np.testing.assert_array_equal(sharded.encode_image(pixels), model.encode_image(pixels))


def _copy_checkpoint(source, target, edit):
  shutil.copy(source / "config.json", target / "config.json")
  tensors = load_file(str(source / "model.safetensors"))
  edit(tensors)
  save_file(tensors, str(target / "model.safetensors"))


def test_missing_key_names_key_and_file(clip_pair, tmp_path):
  key = "text_model.encoder.layers.1.mlp.fc2.bias"
  _copy_checkpoint(clip_pair[3], tmp_path, lambda tensors: tensors.pop(key))
  with pytest.raises(KeyError, match=key) as error:
    clip.load_clip(tmp_path)
  assert str(tmp_path / "model.safetensors") in str(error.value)


def test_wrong_shape_names_key_and_file(clip_pair, tmp_path):
  key = "vision_model.embeddings.patch_embedding.weight"

  def shrink(tensors):
    tensors[key] = tensors[key][:, :, :4].copy()

  _copy_checkpoint(clip_pair[3], tmp_path, shrink)
  with pytest.raises(ValueError, match=key) as error:
    clip.load_clip(tmp_path)
  assert str(tmp_path / "model.safetensors") in str(error.value)


def test_missing_files_raise_file_not_found(clip_pair, tmp_path):
  with pytest.raises(FileNotFoundError, match="does-not-exist"):
    clip.load_clip(tmp_path / "does-not-exist")
  with pytest.raises(FileNotFoundError, match="config.json"):
    clip.load_clip(tmp_path)
  shutil.copy(clip_pair[3] / "config.json", tmp_path / "config.json")
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    clip.load_clip(tmp_path)


def test_preprocessing_matches_pil_image_processor():
  processor_class = getattr(transformers, "CLIPImageProcessorPil", None)
  if processor_class is None:
    pytest.skip("this transformers version has no PIL-based CLIP image processor")
  processor = processor_class(size={"shortest_edge": IMAGE_SIZE},
                              crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
  rng = np.random.default_rng(3)
  images = [rng.integers(0, 256, size=shape, dtype=np.uint8)
            for shape in ((40, 53, 3), (61, 35, 3), (32, 32, 3))]
  expected = processor(images=images, return_tensors="np")["pixel_values"]
  ours = clip.preprocess_images(images, IMAGE_SIZE)
  assert ours.shape == (3, IMAGE_SIZE, IMAGE_SIZE, 3) and ours.dtype == np.float32
  np.testing.assert_allclose(ours, expected.transpose(0, 2, 3, 1), atol=1e-5)


CAPTIONS = ["a red circle", "two triangles", "A Purple SQUARE, to the left!", "",
            "red circle to the left of a red square and two triangles in a row, 3 of them",
            "it's  RED\tcafé\n½ x_y 42 日本 <|endoftext|>circle"]


@pytest.mark.parametrize("tokenizer_config", [None, {"pad_token": "!"}])
def test_tokenizer_matches_transformers(tmp_path, tokenizer_config):
  directory = write_tokenizer_dir(tmp_path, tokenizer_config)
  reference = transformers.CLIPTokenizer.from_pretrained(str(directory))
  ours = clip_tokenizer.load_clip_tokenizer(directory)
  assert len(clip_tokenizer.ClipTokenizer.from_dir(directory).encode(CAPTIONS[4])) > MAX_LENGTH
  expected = reference(CAPTIONS, padding="max_length", truncation=True, max_length=MAX_LENGTH)
  ids, mask = ours.encode_batch(CAPTIONS, MAX_LENGTH)
  assert ids.dtype == np.int32 and mask.dtype == np.int32
  np.testing.assert_array_equal(ids, np.array(expected["input_ids"]))
  np.testing.assert_array_equal(mask, np.array(expected["attention_mask"]))
  assert ours.pad_id == reference.pad_token_id
  assert ids[4, -1] == ours.eos_id  # truncation keeps the end token
  for caption in CAPTIONS:
    assert ours.tokenize(caption) == reference.tokenize(caption)
