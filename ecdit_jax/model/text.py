"""The text encoder: a small bidirectional transformer over sentencepiece tokens.

Trained from scratch with the DiT by default. Pretrained encoders (T5, CLIP) plug in through the
same interface: ``encoder(tokens) -> (embeddings (B, L, width), lengths (B,))``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ecdit_jax.model.attention import Attention
from ecdit_jax.model.config import ModelConfig
from ecdit_jax.model.layers import FeedForward, layer_norm
from ecdit_jax.parallel import axes

PAD_ID = 0  # T5 convention: pad=0, eos=1, unk=2; padding only at the end of a sequence


def text_lengths(tokens: jax.Array) -> jax.Array:
  """Number of non-padding tokens per row (padding is a suffix)."""
  return jnp.sum(tokens != PAD_ID, axis=-1).astype(jnp.int32)


class TextBlock(nnx.Module):
  """Pre-LayerNorm transformer block."""

  def __init__(self, width: int, num_heads: int, *, rngs: nnx.Rngs, dtype, param_dtype):
    common = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.norm1 = layer_norm(width, affine=True, **common)
    self.attn = Attention(width, num_heads, num_heads, **common)
    self.norm2 = layer_norm(width, affine=True, **common)
    self.mlp = FeedForward(width, 4 * width, **common)

  def __call__(self, x: jax.Array, lengths: jax.Array) -> jax.Array:
    x = x + self.attn(self.norm1(x), context_lengths=lengths)
    return x + self.mlp(self.norm2(x))


class TextEncoder(nnx.Module):
  """Token + learned position embeddings -> transformer blocks -> final LayerNorm."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    dtype, param_dtype = config.compute_dtype, config.parameter_dtype
    width = config.text_hidden_size
    self.max_len = config.text_max_len
    self.width = width
    self.dtype = dtype
    self.token_embed = nnx.Embed(
        config.text_vocab_size, width, dtype=dtype, param_dtype=param_dtype,
        embedding_init=axes.partitioned(nnx.initializers.normal(0.02), (axes.VOCAB, axes.EMBED)),
        rngs=rngs)
    pos_init = axes.partitioned(nnx.initializers.normal(0.02), (axes.UNSHARDED, axes.EMBED))
    self.position_embed = nnx.Param(pos_init(rngs.params(), (self.max_len, width), param_dtype))
    self.blocks = nnx.List([
        TextBlock(width, config.text_num_heads, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        for _ in range(config.text_num_layers)
    ])
    self.final_norm = layer_norm(width, affine=True, rngs=rngs, dtype=dtype,
                                 param_dtype=param_dtype)

  def __call__(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    length = tokens.shape[1]
    if length > self.max_len:
      raise ValueError(f"text of {length} tokens exceeds config.model.text_max_len="
                       f"{self.max_len}")
    lengths = text_lengths(tokens)
    x = self.token_embed(tokens) + self.position_embed[...][:length].astype(self.dtype)
    for block in self.blocks:
      x = block(x, lengths)
    return self.final_norm(x), lengths
