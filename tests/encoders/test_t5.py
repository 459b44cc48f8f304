"""T5 encoder in NNX against ``transformers``: hidden states, checkpoints, errors, tokenizer."""

from __future__ import annotations

import contextlib
import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import sentencepiece as spm
from safetensors.numpy import load_file, save_file

from ecdit_jax.data import tokenizer as tk
from ecdit_jax.encoders import convert_torch, safetensors_weights, t5
from ecdit_jax.errors import ConfigError

VOCAB_SIZE = 100
NUM_BUCKETS, MAX_DISTANCE = 8, 16
# Longer than MAX_DISTANCE, so that offsets fall in the exact, log-spaced and saturated buckets.
MAX_LENGTH = 40
# Sequence lengths of the batch: one full row and two right-padded ones.
LENGTHS = (MAX_LENGTH, 23, 5)
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


def tiny_hf_config(feed_forward_proj: str):
  return transformers.T5Config(
      vocab_size=VOCAB_SIZE, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
      relative_attention_num_buckets=NUM_BUCKETS, relative_attention_max_distance=MAX_DISTANCE,
      feed_forward_proj=feed_forward_proj)


def randomise_norms(model, seed: int):
  """Moves every T5 norm scale away from its initial 1, so that a misplaced norm shows."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in model.named_parameters():
      if "layer_norm" in name:
        param.copy_(1.0 + 0.3 * torch.randn(param.shape, generator=generator))
  return model


def random_hf_encoder(feed_forward_proj: str, seed: int = 0):
  torch.manual_seed(seed)
  model = transformers.T5EncoderModel(tiny_hf_config(feed_forward_proj)).eval()
  return randomise_norms(model, seed)


def padded_batch(rng):
  """Right-padded ids (pad 0, ending in eos 1) and their attention mask."""
  ids = np.zeros((len(LENGTHS), MAX_LENGTH), dtype=np.int32)
  mask = np.zeros_like(ids)
  for row, length in enumerate(LENGTHS):
    ids[row, :length - 1] = rng.integers(2, VOCAB_SIZE, size=length - 1)
    ids[row, length - 1] = 1
    mask[row, :length] = 1
  return ids, mask


def hf_hidden(encoder, ids, mask=None):
  kwargs = {} if mask is None else {"attention_mask": torch.from_numpy(mask).long()}
  with torch.no_grad():
    return encoder(input_ids=torch.from_numpy(ids).long(), **kwargs).last_hidden_state.numpy()


@pytest.fixture(scope="module", params=["gated-gelu", "relu"])
def encoder_pair(request, tmp_path_factory):
  hf_model = random_hf_encoder(request.param)
  model_dir = tmp_path_factory.mktemp(request.param)
  hf_model.save_pretrained(model_dir, safe_serialization=True)
  return hf_model, t5.load_t5_encoder(model_dir), model_dir


def test_hidden_states_match_transformers(encoder_pair):
  hf_model, model, _ = encoder_pair
  ids, mask = padded_batch(np.random.default_rng(1))
  out = model(ids, mask)
  assert out.shape == (len(LENGTHS), MAX_LENGTH, 32) and out.dtype == np.float32
  np.testing.assert_allclose(out, hf_hidden(hf_model, ids, mask), **TOLERANCE)
  np.testing.assert_allclose(model(ids), hf_hidden(hf_model, ids), **TOLERANCE)
  # Padding is excluded: a short row encodes the same alone and unpadded.
  short = LENGTHS[2]
  np.testing.assert_allclose(out[2, :short], model(ids[2:, :short])[0], **TOLERANCE)


def test_config_reads_activation_and_gating(encoder_pair):
  hf_model, model, model_dir = encoder_pair
  gated = hf_model.config.feed_forward_proj == "gated-gelu"
  assert model.config == t5.T5Config.from_json_file(model_dir / "config.json")
  assert model.config.is_gated_act == gated
  assert model.config.dense_act_fn == ("gelu_new" if gated else "relu")
  assert model.config.relative_attention_num_buckets == NUM_BUCKETS


def test_config_derivation_and_validation():
  assert t5.T5Config().dense_act_fn == "relu" and not t5.T5Config().is_gated_act
  silu = t5.T5Config.from_dict({"feed_forward_proj": "gated-silu", "decoder_start_token_id": 0})
  assert silu.dense_act_fn == "silu" and silu.is_gated_act
  # Stated values win over feed_forward_proj, as in transformers.
  stated = t5.T5Config.from_dict({"feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu"})
  assert stated.dense_act_fn == "gelu" and stated.is_gated_act
  for proj in ("gated-gelu-x", "fancy-gelu", "gated-tanh"):
    with pytest.raises(ValueError, match="feed_forward_proj|dense_act_fn"):
      t5.T5Config(feed_forward_proj=proj)
  with pytest.raises(ValueError, match="buckets"):
    t5.T5Config(relative_attention_num_buckets=2)


@pytest.mark.parametrize("num_buckets,max_distance", [(NUM_BUCKETS, MAX_DISTANCE), (32, 128),
                                                      (64, 256), (16, 200)])
def test_relative_position_buckets_match_transformers(num_buckets, max_distance):
  length = 300
  offsets = torch.arange(length)[None, :] - torch.arange(length)[:, None]
  expected = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
      offsets, bidirectional=True, num_buckets=num_buckets, max_distance=max_distance)
  ours = t5.relative_position_buckets(length, length, num_buckets, max_distance)
  assert ours.dtype == np.int32
  np.testing.assert_array_equal(ours, expected.numpy())
  # Every bucket is used but the upper half's first: offset 0 counts as looking back.
  assert set(np.unique(ours).tolist()) == set(range(num_buckets)) - {num_buckets // 2}


def _rewrite_single_file(model_dir, edit):
  path = str(model_dir / "model.safetensors")
  tensors = load_file(path)
  edit(tensors)
  save_file(tensors, path, metadata={"format": "pt"})


def test_seq2seq_checkpoint_with_either_embedding_key(tmp_path):
  torch.manual_seed(3)
  hf_model = transformers.T5ForConditionalGeneration(tiny_hf_config("gated-gelu")).eval()
  randomise_norms(hf_model, 3)
  hf_model.save_pretrained(tmp_path, safe_serialization=True)
  keys = set(load_file(str(tmp_path / "model.safetensors")))
  assert "shared.weight" in keys and any(k.startswith("decoder.") for k in keys)
  ids, mask = padded_batch(np.random.default_rng(4))
  expected = hf_hidden(hf_model.encoder, ids, mask)
  np.testing.assert_allclose(t5.load_t5_encoder(tmp_path)(ids, mask), expected, **TOLERANCE)

  def add_encoder_copy(tensors):
    tensors["encoder.embed_tokens.weight"] = tensors["shared.weight"].copy()

  def keep_only_encoder_copy(tensors):
    tensors["encoder.embed_tokens.weight"] = tensors.pop("shared.weight")

  for edit in (add_encoder_copy, keep_only_encoder_copy):
    _rewrite_single_file(tmp_path, edit)
    np.testing.assert_allclose(t5.load_t5_encoder(tmp_path)(ids, mask), expected, **TOLERANCE)


def test_sharded_bfloat16_checkpoint_reads_only_needed_shards(encoder_pair, tmp_path):
  hf_model, _, _ = encoder_pair
  rounded = random_hf_encoder(hf_model.config.feed_forward_proj).to(torch.bfloat16)
  rounded.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
  index_file = tmp_path / "model.safetensors.index.json"
  with open(index_file, encoding="utf-8") as f:
    index = json.load(f)
  # An unused extra shard, listed but absent, must not be opened.
  index["weight_map"]["decoder.final_layer_norm.weight"] = "model-absent.safetensors"
  with open(index_file, "w", encoding="utf-8") as f:
    json.dump(index, f)
  assert len(set(index["weight_map"].values())) > 2
  model = t5.load_t5_encoder(tmp_path)
  assert model.shared.embedding.dtype == np.float32
  ids, mask = padded_batch(np.random.default_rng(5))
  np.testing.assert_allclose(model(ids, mask), hf_hidden(rounded.float(), ids, mask),
                             **TOLERANCE)

  os.remove(tmp_path / index["weight_map"]["encoder.final_layer_norm.weight"])
  with pytest.raises(FileNotFoundError, match="checkpoint shard not found"):
    t5.load_t5_encoder(tmp_path)


def _copy_config(source, target):
  shutil.copy(source / "config.json", target / "config.json")


def test_missing_key_names_key_and_file(encoder_pair, tmp_path):
  _, _, model_dir = encoder_pair
  key = "encoder.block.1.layer.1.DenseReluDense.wo.weight"
  _copy_config(model_dir, tmp_path)
  shutil.copy(model_dir / "model.safetensors", tmp_path / "model.safetensors")
  _rewrite_single_file(tmp_path, lambda tensors: tensors.pop(key))
  with pytest.raises(KeyError, match=key) as error:
    t5.load_t5_encoder(tmp_path)
  assert str(tmp_path / "model.safetensors") in str(error.value)

  shutil.copy(model_dir / "model.safetensors", tmp_path / "model.safetensors")
  _rewrite_single_file(tmp_path, lambda tensors: tensors.pop("shared.weight"))
  with pytest.raises(KeyError, match="shared.weight or encoder.embed_tokens.weight"):
    t5.load_t5_encoder(tmp_path)


def test_wrong_shape_names_key_and_file(encoder_pair, tmp_path):
  _, _, model_dir = encoder_pair
  key = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
  _copy_config(model_dir, tmp_path)
  shutil.copy(model_dir / "model.safetensors", tmp_path / "model.safetensors")

  def shrink(tensors):
    tensors[key] = tensors[key][:-1].copy()

  _rewrite_single_file(tmp_path, shrink)
  with pytest.raises(ValueError, match=key) as error:
    t5.load_t5_encoder(tmp_path)
  assert str(tmp_path / "model.safetensors") in str(error.value)
  assert f"({NUM_BUCKETS - 1}, 4)" in str(error.value)


def test_missing_files_raise_file_not_found(encoder_pair, tmp_path):
  _, _, model_dir = encoder_pair
  with pytest.raises(FileNotFoundError, match="does-not-exist"):
    t5.load_t5_encoder(tmp_path / "does-not-exist")
  with pytest.raises(FileNotFoundError, match="config.json"):
    t5.load_t5_encoder(tmp_path)
  _copy_config(model_dir, tmp_path)
  with pytest.raises(FileNotFoundError, match="model.safetensors") as error:
    t5.load_t5_encoder(tmp_path)
  assert "pytorch_model.bin" in str(error.value)


def save_pytorch_bin(model, directory, max_shard_size: int | None = None):
  """``save_pretrained(safe_serialization=False)``: pytorch_model.bin, or shards and an index.

  transformers 5 writes safetensors whatever ``safe_serialization`` says; the state dict is then
  written as earlier releases wrote it: shards of at most ``max_shard_size`` bytes, tied tensors
  left sharing their storage.
  """
  kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
  model.save_pretrained(directory, safe_serialization=False, **kwargs)
  if list(directory.glob("pytorch_model*.bin")):
    return
  for path in directory.glob("*.safetensors*"):
    path.unlink()
  state = model.state_dict()
  if max_shard_size is None:
    torch.save(state, directory / "pytorch_model.bin")
    return
  shards, size = [{}], 0
  for key, tensor in state.items():
    nbytes = tensor.numel() * tensor.element_size()
    if shards[-1] and size + nbytes > max_shard_size:
      shards.append({})
      size = 0
    shards[-1][key] = tensor
    size += nbytes
  weight_map = {}
  for number, shard in enumerate(shards, start=1):
    name = f"pytorch_model-{number:05d}-of-{len(shards):05d}.bin"
    torch.save(shard, directory / name)
    weight_map.update(dict.fromkeys(shard, name))
  total = sum(t.numel() * t.element_size() for t in state.values())
  with open(directory / "pytorch_model.bin.index.json", "w", encoding="utf-8") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)


@pytest.mark.parametrize("max_shard_size", [None, 20_000], ids=["single", "sharded"])
def test_pytorch_bin_checkpoints_are_refused_then_converted_once(max_shard_size, tmp_path):
  hf_model = random_hf_encoder("gated-gelu", seed=6)
  save_pytorch_bin(hf_model, tmp_path, max_shard_size)
  assert not list(tmp_path.glob("*.safetensors*"))
  # A pickle is never read at run time: the error names the one-off converter.
  with pytest.raises(ConfigError, match="python -m ecdit_jax.encoders.convert_torch"):
    t5.load_t5_encoder(tmp_path)
  written = convert_torch.convert(str(tmp_path))
  if max_shard_size is not None:
    assert (tmp_path / "model.safetensors.index.json").exists() and len(written) > 3
  model = t5.load_t5_encoder(tmp_path)
  ids, mask = padded_batch(np.random.default_rng(7))
  np.testing.assert_allclose(model(ids, mask), hf_hidden(hf_model, ids, mask), **TOLERANCE)
  key = "encoder.final_layer_norm.weight"
  with contextlib.closing(safetensors_weights.open_checkpoint(tmp_path)) as reader:
    np.testing.assert_array_equal(reader.read(key), hf_model.state_dict()[key].numpy())
  with pytest.raises(ConfigError, match="never overwrite"):
    convert_torch.convert(str(tmp_path))


def test_safetensors_preferred_over_pytorch_bin(encoder_pair, tmp_path):
  hf_model, _, model_dir = encoder_pair
  _copy_config(model_dir, tmp_path)
  shutil.copy(model_dir / "model.safetensors", tmp_path / "model.safetensors")
  # Never read: not even a pickle.
  (tmp_path / "pytorch_model.bin").write_bytes(b"not a checkpoint")
  ids, mask = padded_batch(np.random.default_rng(8))
  np.testing.assert_allclose(t5.load_t5_encoder(tmp_path)(ids, mask),
                             hf_hidden(hf_model, ids, mask), **TOLERANCE)
  os.remove(tmp_path / "model.safetensors")
  with pytest.raises(ConfigError, match="pytorch_model.bin"):
    t5.load_t5_encoder(tmp_path)


CAPTIONS = ["a red circle to the left of a blue square", "two green triangles",
            "three yellow stars above a purple hexagon", "an orange ellipse",
            "A Big Red Dog, running!"]
# Ordinary text, including whitespace runs, unknown characters, NFKC-normalised forms, an
# empty caption and one cut by truncation.
TEXTS = ["a red circle", "two  green\ttriangles ", " leading space", "A Big Red Dog, running!",
         "", "zebra ünïcode 日本 ½ ｆｕｌｌ", "don't stop",
         "a red circle to the left of a blue square above three yellow stars"]


@pytest.fixture(scope="module")
def spiece_dir(tmp_path_factory):
  """A tiny unigram vocabulary with T5's special ids, saved under T5's file name."""
  directory = tmp_path_factory.mktemp("t5_tokenizer")
  tk.train_tokenizer(CAPTIONS * 3, directory / "spiece.model", vocab_size=100)
  return directory


def test_tokenizer_matches_transformers(spiece_dir):
  max_len = 12
  reference = transformers.T5Tokenizer.from_pretrained(str(spiece_dir))
  ours = t5.load_t5_tokenizer(spiece_dir)
  assert (ours.pad_id, ours.eos_id, ours.unk_id) == (0, 1, 2)
  assert (reference.pad_token_id, reference.eos_token_id) == (ours.pad_id, ours.eos_id)
  expected = reference(TEXTS, padding="max_length", truncation=True, max_length=max_len)
  ids = ours.encode_batch(TEXTS, max_len)
  assert len(ours.encode(TEXTS[-1])) >= max_len  # truncation is exercised
  np.testing.assert_array_equal(ids, np.array(expected["input_ids"]))
  np.testing.assert_array_equal(ids != ours.pad_id, np.array(expected["attention_mask"]) == 1)
  by_file = t5.load_t5_tokenizer(spiece_dir / "spiece.model")
  np.testing.assert_array_equal(by_file.encode_batch(TEXTS, max_len), ids)
  # The documented difference: special-token strings are plain text to SentencePiece.
  assert reference("</s> a")["input_ids"][0] == ours.eos_id
  assert ours.eos_id not in ours.encode("</s> a")


def test_tokenizer_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="spiece.model"):
    t5.load_t5_tokenizer(tmp_path)
  other = tmp_path / "other.model"
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(CAPTIONS), model_prefix=str(tmp_path / "other"), vocab_size=40,
      hard_vocab_limit=False, unk_id=0, bos_id=1, eos_id=2, pad_id=3, num_threads=1,
      minloglevel=2)
  with pytest.raises(ValueError, match="pad id 3 and eos id 2"):
    t5.load_t5_tokenizer(other)
