"""The T5 text encoder in Flax NNX, loadable from Hugging Face checkpoints.

The architecture and numerics follow ``transformers``' ``T5EncoderModel`` in float32: a token
embedding (not scaled), then blocks of [RMS-normalised self-attention, RMS-normalised
feed-forward], each added to the residual stream, and a final RMS norm. The details that set T5
apart from other transformers:

* the norms neither subtract the mean nor add a bias, and are computed in float32;
* attention has no biases and no 1/sqrt(head_dim) scaling of the logits (the scale is folded
  into the initialisation of the query projection);
* positions enter only through a learned per-head bias indexed by bucketed query-key offsets;
  the first block owns the table and every block reuses the same bias;
* the feed-forward is either ``relu`` (original T5) or a gated GELU, ``gelu(x wi_0) * (x wi_1)``
  with the tanh approximation (T5 v1.1, flan-t5): ``feed_forward_proj`` in config.json picks it.

Module and attribute names mirror the checkpoint's key names, so that each parameter's key is
its path in the module tree (``kernel``/``embedding`` are stored as ``weight``). Matrix products
run at ``Precision.HIGHEST`` by default: on GPUs the default precision uses TF32.

Tokenization uses the project's SentencePiece ``Tokenizer`` (see ``load_t5_tokenizer``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, for bfloat16 checkpoints)
import numpy as np
from etils import epath
from flax import nnx

from ecdit_jax.data.tokenizer import EOS_ID, PAD_ID, Tokenizer, load_tokenizer
from ecdit_jax.encoders.safetensors_weights import (
  config_file,
  dataclass_from_mapping,
  load_parameters,
  open_checkpoint,
)
from ecdit_jax.fileio import read_json
from ecdit_jax.model.keys import ParamKeys

ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}
# The encoder embeds tokens with the table shared with the decoder. Encoder-only exports may
# store it under the encoder's own name instead (or under both, with equal values).
_EMBEDDING_KEYS = ("shared.weight", "encoder.embed_tokens.weight")


@dataclasses.dataclass(frozen=True)
class T5Config:
  """The encoder's part of a T5 ``config.json``; defaults are those of ``transformers``.

  ``dense_act_fn`` and ``is_gated_act`` follow from ``feed_forward_proj`` ("relu",
  "gated-gelu", or "[gated-]<activation>") unless config.json states them, as it does when
  written by recent ``transformers``; "gated-gelu" means the tanh-approximated GELU.
  """

  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 2048
  num_layers: int = 6
  num_heads: int = 8
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "relu"
  dense_act_fn: str | None = None
  is_gated_act: bool | None = None

  def __post_init__(self):
    parts = self.feed_forward_proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
      raise ValueError(f"feed_forward_proj must be '<activation>' or 'gated-<activation>', got "
                       f"{self.feed_forward_proj!r}")
    # Frozen dataclass: fill the derived fields once, so that readers see resolved values.
    if self.dense_act_fn is None:
      activation = "gelu_new" if self.feed_forward_proj == "gated-gelu" else parts[-1]
      object.__setattr__(self, "dense_act_fn", activation)
    if self.is_gated_act is None:
      object.__setattr__(self, "is_gated_act", len(parts) == 2)
    if self.dense_act_fn not in ACTIVATIONS:
      raise ValueError(f"unsupported dense_act_fn {self.dense_act_fn!r}; known: "
                       f"{sorted(ACTIVATIONS)}")
    # Bucketing needs at least one exact bucket per direction and room for the log-spaced ones.
    exact = self.relative_attention_num_buckets // 4
    if exact < 1 or self.relative_attention_max_distance <= exact:
      raise ValueError(f"relative_attention_num_buckets={self.relative_attention_num_buckets} "
                       f"and relative_attention_max_distance="
                       f"{self.relative_attention_max_distance} leave no log-spaced buckets")

  @classmethod
  def from_dict(cls, values: dict) -> T5Config:
    """Reads the known keys of ``values``; the rest (decoder, dropout, ...) are ignored."""
    return dataclass_from_mapping(cls, values)

  @classmethod
  def from_json_file(cls, path: str | os.PathLike) -> T5Config:
    return cls.from_dict(read_json(path))


def relative_position_buckets(query_length: int, key_length: int, num_buckets: int,
                              max_distance: int) -> np.ndarray:
  """(query_length, key_length) int32 bucket of each key's offset from its query.

  Bidirectional: keys after the query take the upper half of the buckets. In each half, the
  first quarter of all buckets holds one offset each; the rest widen logarithmically up to
  ``max_distance``, beyond which every offset shares the last bucket.
  """
  offset = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
  half = num_buckets // 2
  exact = half // 2
  distance = np.abs(offset)
  # float32, as in the reference implementations: at the edges of the log-spaced buckets,
  # float64 arithmetic can land on the other side of an integer and pick the neighbour bucket.
  # The maximum keeps log() away from 0 for the exact offsets, which do not use it.
  ratio = np.maximum(distance, exact).astype(np.float32) / np.float32(exact)
  scaled = (np.log(ratio) / np.float32(math.log(max_distance / exact))
            * np.float32(half - exact))
  far = np.minimum(exact + scaled.astype(np.int64), half - 1)
  bucket = np.where(distance < exact, distance, far) + np.where(offset > 0, half, 0)
  return bucket.astype(np.int32)


class T5RmsNorm(nnx.Module):
  """Scale-only RMS norm, computed in float32 whatever the input dtype."""

  def __init__(self, width: int, eps: float):
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((width,), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    return (self.weight[...] * (x32 * jax.lax.rsqrt(variance + self.eps))).astype(x.dtype)


class T5SelfAttention(nnx.Module):
  """Bias-free multi-head self-attention without logit scaling; ``position_bias`` is added."""

  def __init__(self, config: T5Config, has_relative_attention_bias: bool, *, rngs, precision):
    self.num_heads, self.head_dim = config.num_heads, config.d_kv
    self.num_buckets = config.relative_attention_num_buckets
    self.max_distance = config.relative_attention_max_distance
    self.precision = precision
    inner = config.num_heads * config.d_kv
    linear = functools.partial(nnx.Linear, use_bias=False, precision=precision, rngs=rngs)
    self.q, self.k, self.v = (linear(config.d_model, inner) for _ in range(3))
    self.o = linear(inner, config.d_model)
    if has_relative_attention_bias:
      self.relative_attention_bias = nnx.Embed(self.num_buckets, self.num_heads, rngs=rngs)

  def position_bias(self, length: int) -> jax.Array:
    """(1, heads, length, length) bias for a sequence of ``length`` tokens."""
    # The buckets depend only on the (static) length, so they are constants of the trace.
    buckets = relative_position_buckets(length, length, self.num_buckets, self.max_distance)
    values = self.relative_attention_bias.embedding[...][buckets]  # (L, L, heads)
    return jnp.transpose(values, (2, 0, 1))[None]

  def __call__(self, x: jax.Array, position_bias: jax.Array,
               mask: jax.Array | None) -> jax.Array:
    """``mask`` broadcasts to (B, heads, queries, keys); True where attention is allowed."""
    b, length, _ = x.shape

    def heads(y):
      return y.reshape(b, length, self.num_heads, self.head_dim)

    q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=self.precision) + position_bias
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v, precision=self.precision)
    return self.o(out.reshape(b, length, self.num_heads * self.head_dim))


class T5AttentionSublayer(nnx.Module):
  def __init__(self, config: T5Config, has_relative_attention_bias: bool, *, rngs, precision):
    self.SelfAttention = T5SelfAttention(config, has_relative_attention_bias, rngs=rngs,
                                         precision=precision)
    self.layer_norm = T5RmsNorm(config.d_model, config.layer_norm_epsilon)

  def __call__(self, x: jax.Array, position_bias: jax.Array,
               mask: jax.Array | None) -> jax.Array:
    return x + self.SelfAttention(self.layer_norm(x), position_bias, mask)


class T5Mlp(nnx.Module):
  """``wo(act(wi x))``: the original T5 feed-forward."""

  def __init__(self, config: T5Config, *, rngs, precision):
    linear = functools.partial(nnx.Linear, use_bias=False, precision=precision, rngs=rngs)
    self.activation = config.dense_act_fn
    self.wi = linear(config.d_model, config.d_ff)
    self.wo = linear(config.d_ff, config.d_model)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.wo(ACTIVATIONS[self.activation](self.wi(x)))


class T5GatedMlp(nnx.Module):
  """``wo(act(wi_0 x) * wi_1 x)``: the T5 v1.1 feed-forward."""

  def __init__(self, config: T5Config, *, rngs, precision):
    linear = functools.partial(nnx.Linear, use_bias=False, precision=precision, rngs=rngs)
    self.activation = config.dense_act_fn
    self.wi_0 = linear(config.d_model, config.d_ff)
    self.wi_1 = linear(config.d_model, config.d_ff)
    self.wo = linear(config.d_ff, config.d_model)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.wo(ACTIVATIONS[self.activation](self.wi_0(x)) * self.wi_1(x))


class T5FeedForwardSublayer(nnx.Module):
  def __init__(self, config: T5Config, *, rngs, precision):
    mlp = T5GatedMlp if config.is_gated_act else T5Mlp
    # The checkpoints call the feed-forward DenseReluDense whatever its activation.
    self.DenseReluDense = mlp(config, rngs=rngs, precision=precision)
    self.layer_norm = T5RmsNorm(config.d_model, config.layer_norm_epsilon)

  def __call__(self, x: jax.Array) -> jax.Array:
    return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nnx.Module):
  def __init__(self, config: T5Config, has_relative_attention_bias: bool, *, rngs, precision):
    self.layer = nnx.List([
        T5AttentionSublayer(config, has_relative_attention_bias, rngs=rngs, precision=precision),
        T5FeedForwardSublayer(config, rngs=rngs, precision=precision),
    ])

  def __call__(self, x: jax.Array, position_bias: jax.Array,
               mask: jax.Array | None) -> jax.Array:
    return self.layer[1](self.layer[0](x, position_bias, mask))


class T5EncoderStack(nnx.Module):
  """Embedded tokens -> states after the final norm; block 0 owns the position-bias table."""

  def __init__(self, config: T5Config, *, rngs, precision):
    self.block = nnx.List([T5Block(config, i == 0, rngs=rngs, precision=precision)
                           for i in range(config.num_layers)])
    self.final_layer_norm = T5RmsNorm(config.d_model, config.layer_norm_epsilon)

  def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    position_bias = self.block[0].layer[0].SelfAttention.position_bias(x.shape[1])
    for block in self.block:
      x = block(x, position_bias, mask)
    return self.final_layer_norm(x)


class T5Encoder(nnx.Module):
  """Token ids -> the encoder's last hidden states, as ``T5EncoderModel`` computes them."""

  def __init__(self, config: T5Config, *, rngs,
               precision: jax.lax.Precision | None = jax.lax.Precision.HIGHEST):
    if config.num_layers < 1:
      raise ValueError(f"num_layers must be at least 1, got {config.num_layers}")
    self.config = config
    self.shared = nnx.Embed(config.vocab_size, config.d_model, rngs=rngs)
    self.encoder = T5EncoderStack(config, rngs=rngs, precision=precision)

  def __call__(self, input_ids: jax.Array,
               attention_mask: jax.Array | None = None) -> jax.Array:
    """(B, L) int ids and optional (B, L) mask (nonzero = real token) -> (B, L, d_model).

    Masked positions are excluded as keys; their own outputs are computed all the same (from
    the real tokens) and are meaningless.
    """
    mask = None
    if attention_mask is not None:
      mask = jnp.asarray(attention_mask).astype(bool)[:, None, None, :]
    return self.encoder(self.shared(jnp.asarray(input_ids)), mask)


def load_t5_encoder(model_dir: str | os.PathLike, *,
                    precision: jax.lax.Precision | None = jax.lax.Precision.HIGHEST
                    ) -> T5Encoder:
  """A ``T5Encoder`` from a Hugging Face T5 directory (config.json + weights).

  The weights are ``model.safetensors`` (possibly sharded); a directory with only PyTorch
  ``pytorch_model.bin`` files is refused, naming ``encoders/convert_torch.py``. Reads
  ``T5EncoderModel`` and full ``T5ForConditionalGeneration`` checkpoints alike (decoder tensors
  are never converted). Weights are cast to float32. A missing key or one of the wrong shape
  raises, naming the key and the file.
  """
  model_dir = os.fspath(model_dir)
  config = T5Config.from_json_file(config_file(model_dir, "T5"))

  # Built abstractly: nothing is initialised only to be overwritten.
  abstract = nnx.eval_shape(lambda: T5Encoder(config, rngs=ParamKeys(0), precision=precision))

  def stored_key(key: str) -> str:
    # The token embedding is "shared" (tied with the decoder), or the encoder's own copy.
    names = _EMBEDDING_KEYS if key == _EMBEDDING_KEYS[0] else (key,)
    found = [name for name in names if name in reader]
    if not found:
      raise KeyError(f"parameter {' or '.join(names)} is missing from {reader.listing}")
    return found[0]

  with contextlib.closing(open_checkpoint(model_dir)) as reader:
    return load_parameters(abstract, reader, stored_key=stored_key)


def load_t5_tokenizer(path: str | os.PathLike) -> Tokenizer:
  """The SentencePiece tokenizer of a T5 checkpoint: its ``spiece.model``, or a directory with one.

  ``Tokenizer.encode_batch`` then gives what ``transformers``' ``T5Tokenizer`` gives with
  ``padding="max_length", truncation=True``: the pieces, eos (1), then pad (0), truncated
  before the eos. Strings that ``T5Tokenizer`` treats as special tokens ("</s>", "<pad>",
  "<unk>", "<extra_id_N>") are read here as plain text; the sentinel ids
  ``T5Tokenizer`` appends after the SentencePiece vocabulary are not produced.
  """
  model_path = epath.Path(path)
  if model_path.is_dir():
    model_path = model_path / "spiece.model"
  if not model_path.exists():
    raise FileNotFoundError(f"T5 SentencePiece model not found: {model_path}")
  tokenizer = load_tokenizer(model_path)
  # T5 encoders were trained with these ids; another vocabulary would encode silently wrong.
  if (tokenizer.pad_id, tokenizer.eos_id) != (PAD_ID, EOS_ID):
    raise ValueError(f"{model_path} has pad id {tokenizer.pad_id} and eos id "
                     f"{tokenizer.eos_id}; T5 vocabularies use pad {PAD_ID} and eos {EOS_ID}")
  return tokenizer
