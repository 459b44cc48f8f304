"""CLIP (text and vision towers) in Flax NNX, loadable from Hugging Face checkpoints.

The architecture and numerics follow ``transformers``' ``CLIPModel`` in float32:

* text: token + learned position embeddings, a pre-LayerNorm transformer under a causal mask
  (combined with the padding mask when one is given), a final LayerNorm, and the state at the end
  token projected without bias;
* vision: a bias-free patch convolution, a class token, learned position embeddings,
  ``pre_layrnorm`` (sic, as in the checkpoints), a pre-LayerNorm transformer, ``post_layernorm`` on
  the class token, and a bias-free projection.

Module and attribute names mirror the checkpoint's key names, so that each parameter's key is
its path in the module tree (``kernel``/``scale``/``embedding`` are stored as ``weight``).
Matrix products run at ``Precision.HIGHEST`` by default: on GPUs the default precision uses
TF32, which moves embeddings by about 1e-3 relative to the float32 reference.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from ecdit_jax.encoders.safetensors_weights import (
  config_file,
  dataclass_from_mapping,
  load_parameters,
  open_checkpoint,
)
from ecdit_jax.fileio import read_json
from ecdit_jax.model.keys import ParamKeys

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Checkpoints written before the end token was configured properly carry eos_token_id == 2; for
# those the pooled state is taken at the largest token id, which is the end token in CLIP's vocab.
LEGACY_EOS_TOKEN_ID = 2


def _quick_gelu(x: jax.Array) -> jax.Array:
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    "quick_gelu": _quick_gelu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class ClipTextConfig:
  """The text tower; defaults are those of ``transformers``' CLIPTextConfig."""

  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  bos_token_id: int | None = 49406
  eos_token_id: int | None = 49407
  pad_token_id: int | None = 1


@dataclasses.dataclass(frozen=True)
class ClipVisionConfig:
  """The vision tower; defaults are those of ``transformers``' CLIPVisionConfig."""

  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 32
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5

  def __post_init__(self):
    if self.image_size % self.patch_size:
      raise ValueError(f"patch_size {self.patch_size} does not divide image_size "
                       f"{self.image_size}")

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size)**2


@dataclasses.dataclass(frozen=True)
class ClipConfig:
  """Both towers and the shared embedding space, as in a ``CLIPModel`` ``config.json``."""

  text: ClipTextConfig = dataclasses.field(default_factory=ClipTextConfig)
  vision: ClipVisionConfig = dataclasses.field(default_factory=ClipVisionConfig)
  projection_dim: int = 512
  logit_scale_init_value: float = 2.6592

  @classmethod
  def from_dict(cls, values: dict) -> ClipConfig:
    text_values = values.get("text_config") or {}
    vision_values = values.get("vision_config") or {}
    top = {k: v for k, v in values.items() if k in ("projection_dim", "logit_scale_init_value")}
    return cls(text=dataclass_from_mapping(ClipTextConfig, text_values),
               vision=dataclass_from_mapping(ClipVisionConfig, vision_values), **top)

  @classmethod
  def from_json_file(cls, path: str | os.PathLike) -> ClipConfig:
    return cls.from_dict(read_json(path))


class ClipAttention(nnx.Module):
  """Multi-head self-attention with biased q/k/v/out projections."""

  def __init__(self, width: int, num_heads: int, *, rngs, precision):
    if width % num_heads:
      raise ValueError(f"num_attention_heads={num_heads} must divide hidden_size={width}")
    self.num_heads = num_heads
    self.precision = precision
    linear = functools.partial(nnx.Linear, width, width, precision=precision, rngs=rngs)
    self.q_proj, self.k_proj, self.v_proj, self.out_proj = linear(), linear(), linear(), linear()

  def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """``mask`` broadcasts to (B, heads, queries, keys); True where attention is allowed."""
    b, length, width = x.shape
    head_dim = width // self.num_heads

    def heads(y):
      return y.reshape(b, length, self.num_heads, head_dim)

    q = heads(self.q_proj(x)) * head_dim**-0.5
    k, v = heads(self.k_proj(x)), heads(self.v_proj(x))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=self.precision)
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v, precision=self.precision)
    return self.out_proj(out.reshape(b, length, width))


class ClipMlp(nnx.Module):
  def __init__(self, width: int, hidden: int, activation: str, *, rngs, precision):
    if activation not in ACTIVATIONS:
      raise ValueError(f"unsupported hidden_act {activation!r}; known: {sorted(ACTIVATIONS)}")
    self.activation = activation
    self.fc1 = nnx.Linear(width, hidden, precision=precision, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, width, precision=precision, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(ACTIVATIONS[self.activation](self.fc1(x)))


def _layer_norm(width: int, eps: float, rngs) -> nnx.LayerNorm:
  # Two-pass variance, as in PyTorch: the one-pass formula loses digits on CLIP's large
  # residual-stream activations.
  return nnx.LayerNorm(width, epsilon=eps, use_fast_variance=False, rngs=rngs)


class ClipEncoderLayer(nnx.Module):
  """Pre-LayerNorm transformer block."""

  def __init__(self, config: ClipTextConfig | ClipVisionConfig, *, rngs, precision):
    width = config.hidden_size
    self.layer_norm1 = _layer_norm(width, config.layer_norm_eps, rngs)
    self.self_attn = ClipAttention(width, config.num_attention_heads, rngs=rngs,
                                   precision=precision)
    self.layer_norm2 = _layer_norm(width, config.layer_norm_eps, rngs)
    self.mlp = ClipMlp(width, config.intermediate_size, config.hidden_act, rngs=rngs,
                       precision=precision)

  def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    x = x + self.self_attn(self.layer_norm1(x), mask)
    return x + self.mlp(self.layer_norm2(x))


class ClipEncoder(nnx.Module):
  def __init__(self, config: ClipTextConfig | ClipVisionConfig, *, rngs, precision):
    self.layers = nnx.List([ClipEncoderLayer(config, rngs=rngs, precision=precision)
                            for _ in range(config.num_hidden_layers)])

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    for layer in self.layers:
      x = layer(x, mask)
    return x


class ClipTextEmbeddings(nnx.Module):
  def __init__(self, config: ClipTextConfig, *, rngs):
    self.token_embedding = nnx.Embed(config.vocab_size, config.hidden_size, rngs=rngs)
    self.position_embedding = nnx.Embed(config.max_position_embeddings, config.hidden_size,
                                        rngs=rngs)

  def __call__(self, input_ids: jax.Array) -> jax.Array:
    length = input_ids.shape[1]
    max_length = self.position_embedding.embedding.shape[0]
    if length > max_length:
      raise ValueError(f"sequence length {length} exceeds max_position_embeddings {max_length}")
    return self.token_embedding(input_ids) + self.position_embedding.embedding[:length]


class ClipTextTransformer(nnx.Module):
  """Token ids -> per-token states after the final LayerNorm."""

  def __init__(self, config: ClipTextConfig, *, rngs, precision):
    self.config = config
    self.embeddings = ClipTextEmbeddings(config, rngs=rngs)
    self.encoder = ClipEncoder(config, rngs=rngs, precision=precision)
    self.final_layer_norm = _layer_norm(config.hidden_size, config.layer_norm_eps, rngs)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    length = input_ids.shape[1]
    mask = jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]
    if attention_mask is not None:
      mask = mask & attention_mask.astype(bool)[:, None, None, :]
    hidden = self.encoder(self.embeddings(input_ids), mask)
    return self.final_layer_norm(hidden)


class ClipVisionEmbeddings(nnx.Module):
  def __init__(self, config: ClipVisionConfig, *, rngs, precision):
    width, patch = config.hidden_size, config.patch_size
    self.image_size = config.image_size
    self.class_embedding = nnx.Param(nnx.initializers.normal(1.0)(rngs.params(), (width,)))
    self.patch_embedding = nnx.Conv(config.num_channels, width, (patch, patch),
                                    strides=(patch, patch), padding="VALID", use_bias=False,
                                    precision=precision, rngs=rngs)
    self.position_embedding = nnx.Embed(config.num_patches + 1, width, rngs=rngs)

  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    b, height, width, _ = pixel_values.shape
    if (height, width) != (self.image_size, self.image_size):
      raise ValueError(f"expected {self.image_size}x{self.image_size} images, got "
                       f"{height}x{width}")
    patches = self.patch_embedding(pixel_values)  # (B, rows, cols, width), row-major patches
    patches = patches.reshape(b, -1, patches.shape[-1])
    cls = jnp.broadcast_to(self.class_embedding[...], (b, 1, patches.shape[-1]))
    return jnp.concatenate([cls, patches], axis=1) + self.position_embedding.embedding[...]


class ClipVisionTransformer(nnx.Module):
  """Normalised (B, H, W, C) pixels -> the class token's state after ``post_layernorm``."""

  def __init__(self, config: ClipVisionConfig, *, rngs, precision):
    self.embeddings = ClipVisionEmbeddings(config, rngs=rngs, precision=precision)
    self.pre_layrnorm = _layer_norm(config.hidden_size, config.layer_norm_eps, rngs)
    self.encoder = ClipEncoder(config, rngs=rngs, precision=precision)
    self.post_layernorm = _layer_norm(config.hidden_size, config.layer_norm_eps, rngs)

  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    hidden = self.encoder(self.pre_layrnorm(self.embeddings(pixel_values)))
    return self.post_layernorm(hidden[:, 0])


class ClipModel(nnx.Module):
  """Both towers and their projections into the shared embedding space."""

  def __init__(self, config: ClipConfig, *, rngs,
               precision: jax.lax.Precision | None = jax.lax.Precision.HIGHEST):
    self.config = config
    self.text_model = ClipTextTransformer(config.text, rngs=rngs, precision=precision)
    self.vision_model = ClipVisionTransformer(config.vision, rngs=rngs, precision=precision)
    self.text_projection = nnx.Linear(config.text.hidden_size, config.projection_dim,
                                      use_bias=False, precision=precision, rngs=rngs)
    self.visual_projection = nnx.Linear(config.vision.hidden_size, config.projection_dim,
                                        use_bias=False, precision=precision, rngs=rngs)
    self.logit_scale = nnx.Param(jnp.asarray(config.logit_scale_init_value, jnp.float32))

  def text_hidden_states(self, input_ids: jax.Array,
                         attention_mask: jax.Array | None = None) -> jax.Array:
    """(B, L) ids -> (B, L, text width): every token's state after the final LayerNorm.

    Padding goes on the right, as the tokenizer puts it: the causal mask then leaves every
    position at least the start token to attend to.
    """
    return self.text_model(input_ids, attention_mask)

  def end_token_positions(self, input_ids: jax.Array) -> jax.Array:
    """(B,) index of the state pooled for the text embedding.

    The first end token; with the legacy ``eos_token_id == 2`` (or none configured), the first
    occurrence of the largest id instead.
    """
    eos = self.config.text.eos_token_id
    ids = input_ids.astype(jnp.int32)
    if eos is None or eos == LEGACY_EOS_TOKEN_ID:
      return jnp.argmax(ids, axis=-1)
    return jnp.argmax((ids == eos).astype(jnp.int32), axis=-1)

  def encode_text(self, input_ids: jax.Array,
                  attention_mask: jax.Array | None = None) -> jax.Array:
    """(B, L) int ids -> (B, projection_dim) unnormalised text embeddings."""
    hidden = self.text_hidden_states(input_ids, attention_mask)
    positions = self.end_token_positions(input_ids)
    pooled = jnp.take_along_axis(hidden, positions[:, None, None], axis=1)[:, 0]
    return self.text_projection(pooled)

  def encode_image(self, pixel_values: jax.Array) -> jax.Array:
    """(B, H, W, 3) normalised float pixels -> (B, projection_dim) unnormalised embeddings."""
    return self.visual_projection(self.vision_model(pixel_values))


def load_clip(model_dir: str | os.PathLike, *,
              precision: jax.lax.Precision | None = jax.lax.Precision.HIGHEST) -> ClipModel:
  """A ``ClipModel`` from a Hugging Face ``CLIPModel`` directory (config.json + weights).

  The weights are ``model.safetensors`` (possibly sharded); a directory with only PyTorch
  ``pytorch_model.bin`` files is refused, naming ``encoders/convert_torch.py``. Weights are
  cast to float32. Keys the model does not use are ignored; a missing key or one of the wrong
  shape raises, naming the key and the file.
  """
  model_dir = os.fspath(model_dir)
  config = ClipConfig.from_json_file(config_file(model_dir, "CLIP"))
  # Built abstractly: nothing is initialised only to be overwritten.
  abstract = nnx.eval_shape(lambda: ClipModel(config, rngs=ParamKeys(0), precision=precision))
  with contextlib.closing(open_checkpoint(model_dir)) as reader:
    return load_parameters(abstract, reader)


def load_clip_text(model_dir: str | os.PathLike, *,
                   precision: jax.lax.Precision | None = jax.lax.Precision.HIGHEST
                   ) -> ClipTextTransformer:
  """The text tower alone, from a ``CLIPModel`` or a text-only ``CLIPTextModel`` directory.

  A ``CLIPModel`` config.json nests the tower's settings under ``text_config``; a
  ``CLIPTextModel`` one (e.g. a Stable Diffusion ``text_encoder`` folder) has them at the top.
  Both store the tower's weights under ``text_model.``; nothing of the vision tower is read.
  """
  model_dir = os.fspath(model_dir)
  values = read_json(config_file(model_dir, "CLIP"))
  config = dataclass_from_mapping(ClipTextConfig, values.get("text_config") or values)
  abstract = nnx.eval_shape(lambda: ClipTextTransformer(config, rngs=ParamKeys(0),
                                                        precision=precision))
  with contextlib.closing(open_checkpoint(model_dir)) as reader:
    return load_parameters(abstract, reader, stored_key=lambda key: "text_model." + key)


def _resize_and_crop(image: np.ndarray, image_size: int) -> np.ndarray:
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f"expected a (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
  height, width = image.shape[:2]
  # The shorter side becomes image_size; the longer one scales with it, rounded down.
  scale = image_size / min(height, width)
  if height <= width:
    new_height, new_width = image_size, int(width * scale)
  else:
    new_height, new_width = int(height * scale), image_size
  resized = Image.fromarray(image).resize((new_width, new_height), Image.Resampling.BICUBIC)
  resized = np.asarray(resized)
  top, left = (new_height - image_size) // 2, (new_width - image_size) // 2
  return resized[top:top + image_size, left:left + image_size]


def preprocess_images(images: np.ndarray | Sequence[np.ndarray], image_size: int) -> np.ndarray:
  """uint8 (B, H, W, 3) images (or a list of differently sized ones) -> CLIP inputs.

  Resizes the shorter side to ``image_size`` (PIL bicubic), centre-crops to a square, scales to
  [0, 1] and normalises with OpenAI CLIP's mean and std: (B, image_size, image_size, 3) float32.
  This matches ``transformers``' PIL-based CLIP image processor; its torchvision-based default
  resizes with a different bicubic kernel, so its pixels can differ slightly for resized inputs.
  """
  crops = np.stack([_resize_and_crop(np.asarray(image), image_size) for image in images])
  scaled = crops.astype(np.float32) / 255.0
  mean = np.asarray(OPENAI_CLIP_MEAN, np.float32)
  std = np.asarray(OPENAI_CLIP_STD, np.float32)
  return (scaled - mean) / std
