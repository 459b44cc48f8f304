"""A random CLIP text tower saved as a Hugging Face CLIPTextModel directory (config.json,
model.safetensors, the BPE files): what ``config.pretrained.text_encoder`` names for
``model.text_encoder="clip"``, for tests that need one without transformers."""

from __future__ import annotations

import json

from flax import nnx

from ecdit_jax.encoders import clip, random_init, safetensors_weights
from ecdit_jax.model.keys import ParamKeys
from tests.eval.reference_models import write_clip_tokenizer_dir


class _ClipTextCheckpoint(nnx.Module):
  """The text tower under the name a CLIPTextModel checkpoint stores it as."""

  def __init__(self, config, rngs):
    self.text_model = clip.ClipTextTransformer(config, rngs=rngs, precision=None)


def write_random_clip_text(directory, *, width: int = 32, positions: int = 16, seed: int = 1):
  """Writes the directory; returns (the saved module, whose ``text_model`` is the tower, the
  end token's id)."""
  write_clip_tokenizer_dir(directory)
  vocab = json.loads((directory / "vocab.json").read_text())
  eos = vocab["<|endoftext|>"]
  values = dict(vocab_size=len(vocab), hidden_size=width, intermediate_size=2 * width,
                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=positions,
                hidden_act="quick_gelu", eos_token_id=eos)
  config = clip.ClipTextConfig(**values)
  saved = random_init.random_module(lambda: _ClipTextCheckpoint(config, ParamKeys(0)), seed=seed)
  safetensors_weights.save_parameters(saved, directory / "model.safetensors")
  (directory / "config.json").write_text(json.dumps({**values, "architectures": ["CLIPTextModel"]}))
  return saved, eos
