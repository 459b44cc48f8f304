"""Frozen pretrained networks outside the DiT: a T5 / CLIP text encoder and the SD-VAE.

Each is a graphdef, its parameters (cast to the compute dtype, on the host until placed) and
pure functions of those parameters, so that jitted code takes the parameters as arguments: the
text encoder's ``encode(params, tokens) -> (context, lengths)``, the VAE's ``encode`` (images to
latents) and ``decode``. Neither is trained, in the train state or checkpointed; a run's config
names their weights directories (``config.pretrained``).

The context is the text encoder's last hidden states: T5's after its final RMS norm, CLIP's
after the final LayerNorm. Lengths count the tokens up to and including the first end token (T5
pads with 0 after it; CLIP pads with the end token itself), and the DiT masks everything after.

On a mesh the parameters are split over ``fsdp`` and ``tensor`` by the model's own rule table
(``placed``, ``logical_names``): each device holds its share of a T5-XXL, not a copy.
``make_batch_encoder`` and ``make_image_encoder`` run them on a training batch split over the
batch axes, before the train step, so that the step stays a pure function of (state, batch).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

from ecdit_jax.data import batch as batch_keys
from ecdit_jax.encoders import vae as vae_lib
from ecdit_jax.encoders.clip import load_clip_text
from ecdit_jax.encoders.clip_tokenizer import load_clip_tokenizer
from ecdit_jax.encoders.t5 import load_t5_encoder, load_t5_tokenizer
from ecdit_jax.errors import ConfigError
from ecdit_jax.fileio import read_json
from ecdit_jax.model.config import ModelConfig
from ecdit_jax.parallel import axes
from ecdit_jax.parallel import mesh as mesh_lib


class ClipIdsTokenizer:
  """CLIP's BPE behind the pipeline's tokenizer interface: ``encode_batch`` gives ids only.

  ``ClipTokenizer.encode_batch`` returns (ids, attention mask); the mask is implied by the ids
  (everything after the first end token is padding), so the pipeline carries the ids alone.
  """

  def __init__(self, clip_tokenizer):
    self._tokenizer = clip_tokenizer

  @property
  def vocab_size(self) -> int:
    return self._tokenizer.vocab_size

  @property
  def eos_id(self) -> int:
    return self._tokenizer.eos_id

  @property
  def pad_id(self) -> int:
    return self._tokenizer.pad_id

  def encode_batch(self, texts: Sequence[str], max_len: int) -> np.ndarray:
    ids, _ = self._tokenizer.encode_batch(texts, max_len)
    return ids


def lengths_to_first_eos(tokens: jax.Array, eos_id: int) -> jax.Array:
  """(B,) int32: the index of each row's first end token + 1, or the full length if it has none."""
  is_eos = tokens == eos_id
  first = jnp.argmax(is_eos, axis=-1)
  return jnp.where(jnp.any(is_eos, axis=-1), first + 1, tokens.shape[-1]).astype(jnp.int32)


@dataclasses.dataclass
class FrozenTextEncoder:
  """A pretrained encoder split into graphdef + parameters, with its tokenizer.

  ``encode(params, tokens)`` is pure (jit it, pass ``params`` as an argument); the parameters
  are in ``config.pretrained.dtype``, the context comes out in ``output_dtype``.
  """

  kind: str  # "t5" or "clip"
  weights_dir: str
  graphdef: nnx.GraphDef
  params: Any
  tokenizer: Any  # encode_batch(texts, max_len) -> int32 (N, max_len)
  eos_id: int
  width: int
  max_len: int
  output_dtype: Any

  def encode(self, params, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """int32 (B, L) tokens -> (context (B, L, width) in output_dtype, lengths (B,) int32)."""
    tokens = jnp.asarray(tokens, jnp.int32)
    lengths = lengths_to_first_eos(tokens, self.eos_id)
    mask = jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]
    # T5Encoder and ClipTextTransformer both take (ids, attention mask).
    context = nnx.merge(self.graphdef, params)(tokens, mask)
    return context.astype(self.output_dtype), lengths

  def tokenize(self, texts: Sequence[str]) -> np.ndarray:
    return self.tokenizer.encode_batch(list(texts), self.max_len)

  def null_caption(self) -> tuple[np.ndarray, np.ndarray]:
    """The empty caption encoded once: (context (L, width), length ()), as host arrays.

    Host arrays, so that the train step may close over them on any mesh and in any process.
    """
    context, lengths = jax.jit(self.encode)(self.params, self.tokenize([""]))
    return np.asarray(context[0]), np.asarray(lengths[0])

  def placed(self, mesh: Mesh | None) -> FrozenTextEncoder:
    """A copy whose parameters are on the devices (``place``: split over ``mesh``, or on the
    default device), so that jitted calls do not copy them from the host each time."""
    return dataclasses.replace(self, params=place(self.params, mesh))


def to_host(tree, dtype) -> Any:
  """Every leaf as a numpy array of ``dtype``: loaded weights wait on the host, in the compute
  dtype, until ``place`` puts them where they are used."""
  return jax.tree.map(lambda x: np.asarray(x).astype(jnp.dtype(dtype)), tree)


def logical_names(path, shape) -> tuple[str | None, ...]:
  """The logical axes of a frozen network's parameter, by its kind, for the model's own rule
  table (``parallel.mesh.RULES``): an embedding table's rows over ``vocab`` and width over
  ``embed``; a dense kernel (in, out) over ``embed`` and ``mlp``; a convolution (h, w, in, out)
  the same on its channels. So FSDP splits the encoder's width and tensor parallelism its other
  side, as in the DiT. Vectors (biases, norm scales) and T5's relative position table stay
  whole."""
  keys = [str(getattr(k, "key", k)) for k in path]
  if len(shape) <= 1 or "relative_attention_bias" in keys:
    return (None,) * len(shape)
  if keys[-1] == "embedding":
    return (axes.VOCAB, axes.EMBED)
  if len(shape) == 2:
    return (axes.EMBED, axes.MLP)
  if len(shape) == 4:
    return (None, None, axes.EMBED, axes.MLP)
  return (None,) * len(shape)


def frozen_shardings(tree, mesh: Mesh):
  """NamedShardings of a frozen network's parameters on ``mesh`` (see ``logical_names``)."""
  specs = jax.tree_util.tree_map_with_path(
      lambda path, leaf: PartitionSpec(*logical_names(path, np.shape(leaf))), tree)
  return mesh_lib.tree_shardings(tree, specs, mesh)


def place(tree, mesh: Mesh | None):
  """Every leaf of ``tree`` on the default device (``mesh`` None), or split over ``mesh`` as
  ``frozen_shardings`` says, each device holding only its share; built from host copies
  (valid in multi-process runs, where every process holds the same values)."""
  if mesh is None:
    return jax.device_put(tree)

  def put(leaf, sharding):
    host = np.asarray(leaf)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(put, tree, frozen_shardings(tree, mesh))


def shardings_of(tree):
  """The shardings of placed arrays (for the ``in_shardings`` of the jits that take them)."""
  return jax.tree.map(lambda leaf: leaf.sharding, tree)


def encoder_width(kind: str, weights_dir: str,
                  key: str = "config.pretrained.text_encoder") -> int:
  """The context width of the T5 or CLIP text encoder in ``weights_dir``, from its config.json
  (no weight is read); errors name ``key``, the setting that gave the directory."""
  if not weights_dir or not epath.Path(weights_dir).is_dir():
    raise ConfigError(f"{key}={weights_dir!r} is not a directory")
  path = epath.Path(weights_dir) / "config.json"
  if not path.is_file():
    raise ConfigError(f"{key}={weights_dir}: no config.json there "
                      f"(expected a Hugging Face {kind.upper()} directory)")
  values = read_json(path)
  if kind == "t5":
    return int(values.get("d_model", 512))
  return int((values.get("text_config") or values).get("hidden_size", 512))


def load_text_encoder(kind: str, weights_dir: str, dtype: str, *, max_len: int, output_dtype,
                      width: int | None = None,
                      key: str = "config.pretrained.text_encoder") -> FrozenTextEncoder:
  """Loads a T5 or CLIP text encoder and its tokenizer from a Hugging Face directory.

  ``width``, when given, must be the encoder's (checked from config.json before any weight is
  read). Parameters are cast to ``dtype`` and kept on the host: ``placed`` puts them on the
  devices. Errors name ``key``, the setting that gave ``weights_dir``.
  """
  if kind not in ("t5", "clip"):
    raise ConfigError(f"config.model.text_encoder={kind!r} is not a pretrained encoder")
  found_width = encoder_width(kind, weights_dir, key)
  if width is not None and found_width != width:
    raise ConfigError(f"config.model.text_hidden_size={width} must equal the width "
                      f"{found_width} of the {kind.upper()} encoder in {weights_dir}")
  if kind == "t5":
    encoder, tokenizer = load_t5_encoder(weights_dir), load_t5_tokenizer(weights_dir)
  else:
    encoder = load_clip_text(weights_dir)
    tokenizer = ClipIdsTokenizer(load_clip_tokenizer(weights_dir))
    positions = encoder.config.max_position_embeddings
    if max_len > positions:
      raise ConfigError(f"config.model.text_max_len={max_len} exceeds the {positions} positions "
                        f"of the CLIP text encoder in {weights_dir}")
  graphdef, params = nnx.split(encoder)
  return FrozenTextEncoder(kind=kind, weights_dir=weights_dir, graphdef=graphdef,
                           params=to_host(params, dtype), tokenizer=tokenizer,
                           eos_id=int(tokenizer.eos_id), width=found_width, max_len=max_len,
                           output_dtype=jnp.dtype(output_dtype))


def load_frozen_text_encoder(kind: str, weights_dir: str, dtype: str,
                             model_config: ModelConfig) -> FrozenTextEncoder:
  """The text encoder of a model: its context width must be ``config.model.text_hidden_size``,
  prompts are ``text_max_len`` tokens, and the context comes out in the compute dtype."""
  return load_text_encoder(kind, weights_dir, dtype, max_len=model_config.text_max_len,
                           output_dtype=model_config.compute_dtype,
                           width=model_config.text_hidden_size)


@dataclasses.dataclass
class PrecomputedContext:
  """A fixed set of prompts encoded once, behind a text encoder's interface.

  ``encode(params, rows)`` looks up rows of the table (the empty caption is the last row);
  ``rows`` is the matching tokenizer, turning each prompt into its row. A run that trains on
  cached context uses it for its sample grids and evaluations: the frozen encoder is loaded
  once, at start, to fill the table, and is not kept on the devices.
  """

  prompts: tuple[str, ...]
  params: dict  # {"context": (N + 1, L, width), "lengths": (N + 1,)}
  tokenizer: Any  # the encoder's own, for what ``prompt_warnings`` checks

  @classmethod
  def of(cls, encoder: FrozenTextEncoder, prompts) -> PrecomputedContext:
    prompts = tuple(prompts)
    context, lengths = jax.jit(encoder.encode)(encoder.params, encoder.tokenize([*prompts, ""]))
    return cls(prompts, {"context": np.asarray(context), "lengths": np.asarray(lengths)},
               encoder.tokenizer)

  @property
  def null_row(self) -> np.ndarray:
    return np.asarray(len(self.prompts), np.int32)

  @property
  def rows(self) -> PromptRows:
    return PromptRows(self.prompts, self.tokenizer)

  def encode(self, params, rows: jax.Array) -> tuple[jax.Array, jax.Array]:
    return params["context"][rows], params["lengths"][rows]

  def placed(self, mesh: Mesh | None) -> PrecomputedContext:
    return dataclasses.replace(self, params=place(self.params, mesh))


@dataclasses.dataclass(frozen=True)
class PromptRows:
  """The tokenizer of a ``PrecomputedContext``: a prompt's "tokens" are its row of the table.
  Other attributes (``encode``, ``unk_id``) are the encoder's tokenizer's."""

  prompts: tuple[str, ...]
  tokenizer: Any

  def encode_batch(self, texts: Sequence[str], max_len: int) -> np.ndarray:
    del max_len  # the table's rows hold the whole padded context
    unknown = [t for t in texts if t not in self.prompts]
    if unknown:
      raise ValueError(f"prompts {unknown} were not encoded beforehand")
    return np.asarray([self.prompts.index(t) for t in texts], np.int32)

  def __getattr__(self, name):
    if name == "tokenizer":  # not set yet (copying): no recursion
      raise AttributeError(name)
    return getattr(self.tokenizer, name)


@dataclasses.dataclass
class FrozenVae:
  """A diffusers VAE split into graphdef + parameters (in ``dtype``), for decoding samples."""

  weights_dir: str
  graphdef: nnx.GraphDef
  params: Any
  downsample_factor: int  # pixels per latent along each side
  dtype: Any

  def decode(self, params, latents: jax.Array) -> jax.Array:
    """Scaled latents (B, h, w, C) -> float32 images (B, h f, w f, 3), nominally in [-1, 1]."""
    vae = nnx.merge(self.graphdef, params)
    return vae.decode(latents.astype(self.dtype)).astype(jnp.float32)

  def encode(self, params, images: jax.Array) -> jax.Array:
    """Images (B, H, W, 3) in [-1, 1] -> float32 scaled latents (B, H/f, W/f, C): the
    posterior mean, as ``ecdit_jax.precompute`` writes by default."""
    vae = nnx.merge(self.graphdef, params)
    return vae.latents_from_images(images.astype(self.dtype)).astype(jnp.float32)

  def placed(self, mesh: Mesh | None) -> FrozenVae:
    """A copy with the parameters on the devices (see ``place``)."""
    return dataclasses.replace(self, params=place(self.params, mesh))


def make_image_encoder(vae: FrozenVae, mesh: Mesh):
  """batch -> batch with its pixel ``image`` replaced by the VAE's latents, jitted with the
  images and latents split over the batch axes like the train batch; ``vae`` must be placed on
  ``mesh``."""
  rows = mesh_lib.batch_sharding(mesh, 4)
  encode = jax.jit(vae.encode, in_shardings=(shardings_of(vae.params), rows), out_shardings=rows)

  def encode_batch(batch: dict) -> dict:
    return {**batch, batch_keys.IMAGE: encode(vae.params, batch[batch_keys.IMAGE])}

  return encode_batch


def load_frozen_vae(weights_dir: str, dtype: str, model_config: ModelConfig) -> FrozenVae:
  """The VAE of ``weights_dir``; its latent channels must be ``config.model.in_channels``.

  Parameters are cast to ``dtype`` and kept on the host until ``placed``."""
  if not weights_dir or not epath.Path(weights_dir).is_dir():
    raise ConfigError(f"config.pretrained.vae={weights_dir!r} is not a directory")
  vae = vae_lib.load_vae(weights_dir)
  if vae.config.latent_channels != model_config.in_channels:
    raise ConfigError(f"config.model.in_channels={model_config.in_channels} must equal the "
                      f"{vae.config.latent_channels} latent channels of the VAE in {weights_dir}")
  graphdef, params = nnx.split(vae)
  return FrozenVae(weights_dir=weights_dir, graphdef=graphdef, params=to_host(params, dtype),
                   downsample_factor=vae.config.downsample_factor, dtype=jnp.dtype(dtype))


def make_batch_encoder(encoder: FrozenTextEncoder, mesh: Mesh) -> Callable[[dict], dict]:
  """batch -> batch with ``tokens`` replaced by ``context`` and ``context_lengths``.

  Jitted with the tokens split over the batch axes like the train batch, and the outputs split
  the same way; ``encoder``'s parameters must be placed on ``mesh`` (``FrozenTextEncoder.placed``).
  """
  encode = jax.jit(encoder.encode, in_shardings=(shardings_of(encoder.params),
                                                 mesh_lib.batch_sharding(mesh, 2)),
                   out_shardings=(mesh_lib.batch_sharding(mesh, 3),
                                  mesh_lib.batch_sharding(mesh, 1)))

  def encode_batch(batch: dict) -> dict:
    batch = dict(batch)
    batch[batch_keys.CONTEXT], batch[batch_keys.CONTEXT_LENGTHS] = encode(
        encoder.params, batch.pop(batch_keys.TOKENS))
    return batch

  return encode_batch
