"""The training configuration: typed, with one source of defaults and one validation pass.

Configs on the command line are ml_collections ConfigDicts (``--config.KEY=VALUE``); ``configs/``
builds them from ``config_dict()`` (every key at its default, from the dataclasses below) and
sets only what differs. ``TrainConfig.from_mapping`` turns a ConfigDict (or a run's saved JSON)
into typed, checked values: unknown keys and values that cannot work raise ``ConfigError``
naming the key. Checks that need the machine (the device and process counts) are
``check_devices``; ``load`` does both. ``upgrade`` fills in the keys that a workdir written by an
older version lacks, with the defaults that reproduce what that version did.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import ml_collections

from ecdit_jax.errors import ConfigError
from ecdit_jax.model.config import ModelConfig
from ecdit_jax.parallel.mesh import MeshConfig

LATENTS_PREFIX = "latents:"
LR_DECAYS = ("none", "cosine", "linear")
MOMENTUM_DTYPES = ("float32", "bfloat16")
SAMPLERS = ("euler", "heun")
NONFINITE_POLICIES = ("stop", "skip")
HOST_OFFLOADS = ("ema", "optimizer")  # config.host_offload's parts


def _check(condition: bool, message: str) -> None:
  if not condition:
    raise ConfigError(message)


def _positive_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _floating_dtype(name) -> bool:
  try:
    return bool(jnp.issubdtype(jnp.dtype(name), jnp.floating))
  except TypeError:
    return False


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """``config.data``: where the images and captions come from."""

  # "geneval_shapes" (generated under data_dir on first use), a prepared TFDS image-text dataset,
  # or "latents:DIR": VAE latents written by `python -m ecdit_jax.precompute`.
  dataset: str = "geneval_shapes"
  data_dir: str = ""  # empty: ~/tensorflow_datasets
  num_train: int = 20_000  # GenEval-Shapes sizes and generator seed
  num_test: int = 1_000
  generator_seed: int = 0
  image_key: str = "image"  # the features of a TFDS dataset's records
  text_key: str = "caption"
  tokenizer_path: str = ""  # empty: train a sentencepiece model on the captions and cache it
  tokenizer_vocab_size: int = 64
  worker_count: int = 0  # grain worker processes; 0 reads in the main process
  # Decode every record once, keep them in host memory and draw batches from there: for
  # datasets that fit in RAM, when decoding is slower than training (small models on GPU).
  cache_in_memory: bool = False
  # Encode images with pretrained.vae as they are read (center crop, resize to image_size x
  # the VAE's factor): training on latents without a precompute pass.
  vae_encode: bool = False
  # Train on the captions' encoder states stored with the latents (`precompute --text_encoder`)
  # instead of running the frozen text encoder on every batch; the run then builds no text
  # encoder on the devices (it loads one at start only to encode the sample and evaluation
  # prompts once, when it samples or evaluates).
  cached_context: bool = False

  def __post_init__(self):
    _check(self.dataset != LATENTS_PREFIX,
           f"config.data.dataset={self.dataset!r}: give the directory, latents:DIR")
    for key in ("num_train", "num_test", "tokenizer_vocab_size"):
      _check(_positive_int(getattr(self, key)),
             f"config.data.{key}={getattr(self, key)!r} must be a positive integer")
    _check(isinstance(self.worker_count, int) and self.worker_count >= 0,
           f"config.data.worker_count={self.worker_count!r} must be an integer >= 0")
    _check(not (self.vae_encode and self.latent_dir is not None),
           f"config.data.vae_encode encodes images, but config.data.dataset={self.dataset!r} "
           "holds latents already; turn it off")
    _check(not self.cached_context or self.latent_dir is not None,
           f"config.data.cached_context reads captions encoded with the latents, but "
           f"config.data.dataset={self.dataset!r} is not latents:DIR")

  @property
  def latent_dir(self) -> str | None:
    """DIR of ``dataset = "latents:DIR"``; None for image datasets."""
    if not self.dataset.startswith(LATENTS_PREFIX):
      return None
    return os.path.expanduser(self.dataset[len(LATENTS_PREFIX):])

  @property
  def on_latents(self) -> bool:
    """Whether the model works on VAE latents: precomputed, or encoded as they are read."""
    return self.latent_dir is not None or self.vae_encode

  @property
  def record_keys(self) -> tuple[str, str]:
    """(image key, text key) of the dataset's records."""
    if self.latent_dir is not None:
      return ("latent", "caption")  # what ecdit_jax.data.latents records hold
    return self.image_key, self.text_key

  @property
  def tfds_dir(self) -> str:
    return os.path.expanduser(self.data_dir or "~/tensorflow_datasets")


@dataclasses.dataclass(frozen=True)
class PretrainedConfig:
  """``config.pretrained``: frozen networks as Hugging Face format directories (never trained,
  never checkpointed; a run's config.json records where they were)."""

  text_encoder: str = ""  # T5 or CLIP weights + tokenizer, when model.text_encoder != "scratch"
  vae: str = ""  # the diffusers VAE of a model on latents: decodes samples, encodes with vae_encode
  dtype: str = "bfloat16"  # compute dtype of both

  def __post_init__(self):
    _check(_floating_dtype(self.dtype), f"config.pretrained.dtype={self.dtype!r} must name a "
                                        "floating dtype, e.g. 'bfloat16'")


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
  """``config.diffusion``: rectified flow."""

  timestep_loc: float = 0.0  # logit-normal timesteps: sigmoid(N(loc, scale^2))
  timestep_scale: float = 1.0
  caption_dropout: float = 0.1  # probability of the null caption (classifier-free guidance)
  mask_ratio: float = 0.0  # MaskDiT-style token masking; the paper uses 0.5
  unmasked_final_steps: int = 0  # last steps trained without masking

  def __post_init__(self):
    _check(0 <= self.mask_ratio < 1,
           f"config.diffusion.mask_ratio={self.mask_ratio} must be in [0, 1)")
    _check(0 <= self.caption_dropout <= 1,
           f"config.diffusion.caption_dropout={self.caption_dropout} must be in [0, 1]")
    _check(self.timestep_scale > 0,
           f"config.diffusion.timestep_scale={self.timestep_scale} must be > 0")
    _check(isinstance(self.unmasked_final_steps, int) and self.unmasked_final_steps >= 0,
           f"config.diffusion.unmasked_final_steps={self.unmasked_final_steps!r} must be an "
           "integer >= 0")


DEFAULT_PROMPTS = ("a red circle", "a blue square", "a green triangle", "a yellow circle",
                   "a purple square", "a cyan triangle", "a red square and a blue circle",
                   "two triangles")


@dataclasses.dataclass(frozen=True)
class SampleConfig:
  """``config.sample``: the sampler of training's sample grids and evaluations (and the
  defaults of the sampling tools)."""

  num_steps: int = 25
  method: str = "euler"  # or heun
  cfg_scale: float = 3.0
  prompts: tuple[str, ...] = DEFAULT_PROMPTS

  def __post_init__(self):
    _check(_positive_int(self.num_steps),
           f"config.sample.num_steps={self.num_steps!r} must be a positive integer")
    _check(self.method in SAMPLERS,
           f"config.sample.method={self.method!r} must be one of {SAMPLERS}")
    _check(bool(self.prompts) and all(isinstance(p, str) and p.strip() for p in self.prompts),
           f"config.sample.prompts={self.prompts!r} must be one or more non-empty prompts")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """``config.eval``: the GenEval-Shapes score during training (``eval_every_steps``)."""

  num_per_category: int = 10
  batch_size: int = 60

  def __post_init__(self):
    for key in ("num_per_category", "batch_size"):
      _check(_positive_int(getattr(self, key)),
             f"config.eval.{key}={getattr(self, key)!r} must be a positive integer")


@dataclasses.dataclass(frozen=True)
class ProfileConfig:
  """``config.profile``: a jax.profiler trace of ``num_steps`` steps (0 = none), starting
  ``skip_steps`` after the run's first step (past compilation), into workdir/profile."""

  num_steps: int = 0
  skip_steps: int = 20

  def __post_init__(self):
    for key in ("num_steps", "skip_steps"):
      value = getattr(self, key)
      _check(isinstance(value, int) and value >= 0,
             f"config.profile.{key}={value!r} must be an integer >= 0")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything a training run is: ``python -m ecdit_jax.main --config=...``'s config."""

  seed: int = 0
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  pretrained: PretrainedConfig = dataclasses.field(default_factory=PretrainedConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  diffusion: DiffusionConfig = dataclasses.field(default_factory=DiffusionConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)

  # Optimisation: RMSProp with momentum (as in the paper), linear warmup, clipping, decay.
  batch_size: int = 32  # global batch; split over processes, devices and accumulation steps
  grad_accum_steps: int = 1
  # With several micro-batches, cast the weights to the compute dtype once a step, before them,
  # rather than in every micro-batch's forward pass: the same results, one pass over the weights
  # a step where XLA leaves the casts in the loop, for their compute-dtype copy held through the
  # step.
  cast_weights_once: bool = True
  # Where the weights are split over devices (fsdp; tensor; expert with mesh.dense_over_expert),
  # with several micro-batches: False leaves it to XLA, which may gather some weights once a
  # step, before the micro-batches, and hold them whole through all of them (fewer collectives,
  # more memory on every device); True gathers them in every micro-batch, so no whole copy is
  # held from one micro-batch to the next (FSDP's memory, one all-gather of the weights per
  # micro-batch). The gradient sums stay split like the parameters either way.
  gather_weights_per_micro_batch: bool = False
  num_train_steps: int = 10_000
  # RMSProp with momentum 0.9 takes steps ~1/(1 - 0.9) = 10x the learning rate in size, so
  # 3e-4 here is comparable to Adam at 3e-3; 1e-3 and above train worse or diverge.
  learning_rate: float = 3e-4
  warmup_steps: int = 500
  lr_decay: str = "none"  # or "cosine" / "linear" to 0 at num_train_steps (fixed budgets)
  momentum: float = 0.9
  momentum_dtype: str = "float32"  # or "bfloat16": less memory traffic a step; fixed for a run
  # Parts of the train state kept in host memory between steps, comma-separated: "ema", the
  # EMA parameters; "optimizer", the optimizer's moments. Each step brings them to the devices
  # for the update, after the gradients, and sends the results back: device memory for the
  # activations, for PCIe (or host-link) traffic of the parts' size each way. Any run may
  # change it on resume.
  host_offload: str = ""
  rmsprop_decay: float = 0.999
  rmsprop_eps: float = 1e-8
  grad_clip_norm: float = 1.0  # 0: no clipping
  weight_decay: float = 0.0
  ema_decay: float = 0.995  # ~200 steps of averaging
  nonfinite_loss: str = "stop"  # or "skip": drop the update of a step with a NaN/inf loss
  # Training steps per jitted call (a lax.scan over stacked batches): dispatching a call costs
  # the host time per state array, which can exceed a small model's device time; the logging,
  # checkpoint, sample and eval intervals must be multiples of it.
  steps_per_call: int = 1

  # Logging, checkpoints, samples, evaluation.
  log_every_steps: int = 100
  checkpoint_every_steps: int = 500
  keep_checkpoints: int = 3
  sample_every_steps: int = 1000  # 0 = never
  # GenEval-Shapes score of the EMA parameters (0 = off), logged as eval/geneval_shapes/*.
  eval_every_steps: int = 2500
  eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
  profile: ProfileConfig = dataclasses.field(default_factory=ProfileConfig)
  sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)

  def __post_init__(self):
    _validate(self)

  @classmethod
  def from_mapping(cls, mapping: Mapping[str, Any]) -> TrainConfig:
    """From a ConfigDict or a dict (a run's config.json); keys left out take their defaults."""
    return _build(cls, mapping, "config")

  def to_dict(self) -> dict[str, Any]:
    """Plain JSON-able values (tuples as lists), as a run's config.json holds them."""
    return json.loads(json.dumps(dataclasses.asdict(self)))

  def replace(self, **changes) -> TrainConfig:
    return dataclasses.replace(self, **changes)

  @property
  def host_offloaded(self) -> tuple[str, ...]:
    """config.host_offload's parts, e.g. ("ema", "optimizer")."""
    return tuple(part.strip() for part in self.host_offload.split(",") if part.strip())

  @property
  def unmasked_from(self) -> int:
    """The first step trained without token masking (0 when no step masks tokens)."""
    if self.diffusion.mask_ratio == 0:
      return 0
    return self.num_train_steps - self.diffusion.unmasked_final_steps


def _validate(c: TrainConfig) -> None:
  """The checks that involve several keys or the whole run; each error names a key to change."""
  for key in ("batch_size", "num_train_steps", "grad_accum_steps", "log_every_steps",
              "checkpoint_every_steps", "keep_checkpoints", "steps_per_call"):
    _check(_positive_int(getattr(c, key)),
           f"config.{key}={getattr(c, key)!r} must be a positive integer")
  for key in ("sample_every_steps", "eval_every_steps", "warmup_steps"):
    _check(isinstance(getattr(c, key), int) and getattr(c, key) >= 0,
           f"config.{key}={getattr(c, key)!r} must be an integer >= 0")
  _check(c.batch_size % c.grad_accum_steps == 0,
         f"config.batch_size={c.batch_size} must be divisible by "
         f"config.grad_accum_steps={c.grad_accum_steps}")
  _check(c.learning_rate > 0, f"config.learning_rate={c.learning_rate} must be > 0")
  _check(c.lr_decay in LR_DECAYS, f"config.lr_decay={c.lr_decay!r} must be one of {LR_DECAYS}")
  _check(c.momentum_dtype in MOMENTUM_DTYPES,
         f"config.momentum_dtype={c.momentum_dtype!r} must be one of {MOMENTUM_DTYPES}")
  _check(isinstance(c.host_offload, str) and all(
      part in HOST_OFFLOADS for part in c.host_offloaded),
         f"config.host_offload={c.host_offload!r} must list parts of {HOST_OFFLOADS}, "
         "comma-separated, or be empty")
  for key in ("cast_weights_once", "gather_weights_per_micro_batch"):
    _check(isinstance(getattr(c, key), bool),
           f"config.{key}={getattr(c, key)!r} must be True or False")
  _check(0 <= c.momentum < 1, f"config.momentum={c.momentum} must be in [0, 1)")
  _check(0 <= c.ema_decay < 1, f"config.ema_decay={c.ema_decay} must be in [0, 1)")
  _check(c.grad_clip_norm >= 0, f"config.grad_clip_norm={c.grad_clip_norm} must be >= 0")
  _check(c.nonfinite_loss in NONFINITE_POLICIES,
         f"config.nonfinite_loss={c.nonfinite_loss!r} must be one of {NONFINITE_POLICIES}")
  for key in ("log_every_steps", "checkpoint_every_steps", "sample_every_steps",
              "eval_every_steps"):
    _check(getattr(c, key) % c.steps_per_call == 0,
           f"config.{key}={getattr(c, key)} must be a multiple of "
           f"config.steps_per_call={c.steps_per_call}")
  _check(not c.eval_every_steps or c.data.dataset == "geneval_shapes",
         f"config.eval_every_steps={c.eval_every_steps} scores GenEval-Shapes prompts, but "
         f"config.data.dataset={c.data.dataset!r}; set it to 0")
  micro = c.batch_size // c.grad_accum_steps
  _check(micro % c.model.routing_group_size == 0,
         f"config.model.routing_group_size={c.model.routing_group_size} must divide the "
         f"micro-batch of {micro} images (config.batch_size / config.grad_accum_steps)")
  _check(c.diffusion.unmasked_final_steps <= c.num_train_steps,
         f"config.diffusion.unmasked_final_steps={c.diffusion.unmasked_final_steps} exceeds "
         f"config.num_train_steps={c.num_train_steps}")
  _validate_pretrained(c)


def _validate_pretrained(c: TrainConfig) -> None:
  _check(not c.data.cached_context or c.model.has_pretrained_text_encoder,
         "config.data.cached_context is for a frozen pretrained text encoder, but "
         "config.model.text_encoder='scratch' trains its own; set it to 't5' or 'clip'")
  # With cached context the encoder is only needed to encode the sample and evaluation prompts.
  needs_encoder = not c.data.cached_context or bool(c.sample_every_steps or c.eval_every_steps)
  if c.model.has_pretrained_text_encoder and needs_encoder:
    _check(bool(c.pretrained.text_encoder),
           f"config.model.text_encoder={c.model.text_encoder!r} needs the weights: set "
           f"config.pretrained.text_encoder to a Hugging Face {c.model.text_encoder.upper()} "
           "directory")
  _check(not c.pretrained.vae or c.data.on_latents,
         f"config.pretrained.vae={c.pretrained.vae!r} is for a model on latents, but "
         f"config.data.dataset={c.data.dataset!r} is not latents:DIR and config.data.vae_encode "
         "is off; leave it empty or set one of them")
  _check(not c.data.vae_encode or bool(c.pretrained.vae),
         "config.data.vae_encode needs the VAE: set config.pretrained.vae to a diffusers VAE "
         "directory")
  if c.data.on_latents and not c.pretrained.vae:
    for key in ("sample_every_steps", "eval_every_steps"):
      _check(not getattr(c, key),
             f"config.{key}={getattr(c, key)} makes images, and a model trained on latents needs "
             f"the VAE for that: set config.pretrained.vae to a diffusers VAE directory or "
             f"config.{key}=0")


def check_devices(c: TrainConfig, num_devices: int, num_processes: int) -> dict[str, int]:
  """The checks that need the machine; returns the resolved mesh shape (across slices)."""
  _check(c.batch_size % num_processes == 0,
         f"config.batch_size={c.batch_size} must be divisible by the {num_processes} processes")
  shape = c.mesh.global_shape(num_devices)
  _check(c.model.moe_layout == "none" or c.model.num_experts % shape["expert"] == 0,
         f"config.model.num_experts={c.model.num_experts} must be divisible by "
         f"config.mesh.expert={shape['expert']}")
  shards = shape["data"] * shape["fsdp"] * shape["expert"]
  _check(c.batch_size % (shards * c.grad_accum_steps) == 0,
         f"config.batch_size={c.batch_size} must be divisible by config.grad_accum_steps="
         f"{c.grad_accum_steps} x the {shards} batch shards of the mesh (config.mesh)")
  return shape


def load(config: Mapping[str, Any] | TrainConfig, num_devices: int,
         num_processes: int) -> TrainConfig:
  """One validation pass: a ConfigDict (or TrainConfig) checked for this machine."""
  typed = config if isinstance(config, TrainConfig) else TrainConfig.from_mapping(config)
  check_devices(typed, num_devices, num_processes)
  return typed


# --- From mappings, to ConfigDicts, and older runs ------------------------------------------------

def _field_types(cls) -> dict[str, Any]:
  return typing.get_type_hints(cls)


def _optional_inner(annotation):
  """``int | None`` -> int; anything else -> None."""
  if typing.get_origin(annotation) in (typing.Union, types.UnionType):
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if len(args) == 1:
      return args[0]
  return None


def _convert(value, annotation, key: str):
  if dataclasses.is_dataclass(annotation):
    if not isinstance(value, Mapping) and not hasattr(value, "items"):
      raise ConfigError(f"{key} must be a group of keys, got {value!r}")
    return _build(annotation, value, key)
  if annotation is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if typing.get_origin(annotation) is tuple and isinstance(value, (list, tuple)):
    return tuple(value)
  return value


def _build(cls, mapping, prefix: str):
  if cls is ModelConfig:
    return ModelConfig.from_mapping(mapping, prefix=prefix)
  hints = _field_types(cls)
  values = dict(mapping.items())
  unknown = sorted(set(values) - set(hints))
  if unknown:
    raise ConfigError(f"unknown key(s) {', '.join(f'{prefix}.{k}' for k in unknown)}; "
                      f"known keys of {prefix}: {', '.join(sorted(hints))}")
  return cls(**{k: _convert(v, hints[k], f"{prefix}.{k}") for k, v in values.items()})


def _as_config_dict(instance) -> ml_collections.ConfigDict:
  out = ml_collections.ConfigDict()
  hints = _field_types(type(instance))
  for field in dataclasses.fields(instance):
    value = getattr(instance, field.name)
    if dataclasses.is_dataclass(value):
      out[field.name] = _as_config_dict(value)
    elif value is None:  # typed, so that --config.KEY=VALUE can set it
      out[field.name] = ml_collections.config_dict.placeholder(_optional_inner(hints[field.name]))
    else:
      out[field.name] = value
  return out


def config_dict(defaults: TrainConfig | None = None) -> ml_collections.ConfigDict:
  """Every key of ``TrainConfig`` (at ``defaults``, or the defaults) as a ConfigDict: what the
  files under configs/ start from."""
  return _as_config_dict(TrainConfig() if defaults is None else defaults)


def default_run_config() -> ml_collections.ConfigDict:
  """The embedded default run (``configs/default.py``, the Colab notebook): the defaults with a
  tiny EC-DiT (8 experts) on 32x32 GenEval-Shapes images, sized to learn visibly within
  minutes on a 2-core CPU. 64 tokens of 4x4 pixels and a small text encoder (the paper uses
  patch 2 on latents); float32, since bfloat16 is slower than float32 on most CPUs."""
  config = config_dict()
  config.model.update(image_size=32, in_channels=3, patch_size=4, hidden_size=128, num_layers=6,
                      num_heads=4, num_kv_heads=2, text_vocab_size=128, text_max_len=16,
                      text_hidden_size=128, text_num_layers=2, text_num_heads=4,
                      dtype="float32")
  return config


def upgrade(saved: Mapping[str, Any]) -> dict[str, Any]:
  """A run's saved config with the keys that later versions added, at the defaults that
  reproduce what the version that wrote it did (every key added so far defaults to the old
  behaviour). The result builds with ``TrainConfig.from_mapping``."""

  def fill(defaults: dict, values: Mapping) -> dict:
    out = dict(defaults)
    for key, value in values.items():
      if isinstance(defaults.get(key), dict) and isinstance(value, Mapping):
        out[key] = fill(defaults[key], value)
      else:
        out[key] = value
    return out

  return fill(json.loads(json.dumps(dataclasses.asdict(TrainConfig()))), dict(saved))
