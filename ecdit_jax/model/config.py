"""The model's configuration: one frozen dataclass, validated at construction.

Configs on the command line are ml_collections ConfigDicts (``config.model``); ``ModelConfig``
turns that block into typed, checked values. Every check names the key a user would fix, so a
bad run fails at start rather than deep inside a traced function.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from ecdit_jax.errors import ConfigError

ROUTERS = ("expert_choice", "token_choice")
MOE_LAYOUTS = ("every_other", "every", "none")
MOE_DISPATCH = ("gather", "einsum", "hybrid")
REMAT_POLICIES = ("none", "block", "dots", "matmuls")
ATTENTION_IMPLS = ("auto", "xla", "cudnn")
# adaLN's LayerNorm + modulate: XLA ops, or the fused Pallas kernels of model/fused_norm.py
# (Triton on GPUs, Mosaic on TPUs, their math in XLA ops on CPUs); "pallas_interpret" runs
# those kernels in the Pallas interpreter (any backend, slowly: for checking them on a CPU).
NORM_IMPLS = ("xla", "pallas", "pallas_interpret")
# The qk-norm with its projection's bias: XLA ops or model/fused_qk_norm.py's kernels, likewise;
# "auto": the kernels where they were measured faster (GPUs), XLA ops elsewhere (TPUs, CPUs).
QK_NORM_IMPLS = NORM_IMPLS + ("auto",)
# "scratch": the small transformer of model/text.py, trained with the DiT. "t5" / "clip": a
# frozen pretrained encoder outside the model (train/text_conditioning.py); the DiT then gets its
# last hidden states as the context and has no text parameters of its own.
TEXT_ENCODERS = ("scratch", "t5", "clip")
# Keys that change how the parameters are used, not which parameters there are or what they
# mean: a run may resume with new values (e.g. block remat to fit a smaller card). Changing
# any other key refuses the resume (train/checkpoint.check_same_model).
COMPUTE_ONLY_KEYS = ("attention_impl", "eval_capacity_factor", "moe_dispatch", "norm_impl",
                     "qk_norm_impl", "remat")
# Keys that shape only the scratch text encoder: a model with a frozen pretrained one ignores them.
SCRATCH_TEXT_KEYS = ("text_vocab_size", "text_num_layers", "text_num_heads")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything that shapes an EC-DiT. Field names are the keys under ``config.model``."""

  # Input: pixels (3 channels) or VAE latents (e.g. 4 channels), square.
  image_size: int = 32
  in_channels: int = 3
  patch_size: int = 2

  # Transformer backbone.
  hidden_size: int = 1152
  num_layers: int = 28
  num_heads: int = 18
  num_kv_heads: int | None = None  # None: as many as query heads (plain multi-head attention)
  qk_norm: bool = True
  mlp_ratio: float = 4.0  # hidden width of the dense FFN and of every expert, in units of d

  # Mixture of experts.
  moe_layout: str = "every_other"  # every_other (blocks 1, 3, 5, ...), every, none (dense)
  router: str = "expert_choice"  # or token_choice (the GShard/Switch-style baseline)
  num_experts: int = 8
  capacity_factor: float = 2.0  # f at training time: expert-choice capacity C = S * f / E
  eval_capacity_factor: float = 2.0  # f at inference time (the adaptive-compute knob)
  routing_group_size: int = 1  # images pooled into one routing group; 1 = per-image routing
  router_z_loss_weight: float = 0.0
  token_choice_top_k: int = 2
  token_choice_capacity_factor: float = 1.25  # buffer slack for token-choice dispatch
  load_balance_loss_weight: float = 0.01  # token-choice only; expert-choice needs none
  # How expert choice moves tokens to experts and back: "gather", "einsum" (one-hot matmuls)
  # or "hybrid" (gathers one way, one-hot matmuls the other); model/routing.py describes them.
  moe_dispatch: str = "gather"

  # Text conditioning: a small transformer trained from scratch by default, or a frozen
  # pretrained encoder (text_encoder="t5" or "clip"; its weights are config.pretrained's).
  # text_max_len is the padded prompt length either way; text_hidden_size is the context width,
  # which a pretrained encoder fixes; vocab size, layers and heads shape the scratch encoder only.
  text_encoder: str = "scratch"
  text_vocab_size: int = 32128
  text_max_len: int = 32
  text_hidden_size: int = 512
  text_num_layers: int = 4
  text_num_heads: int = 8

  # Numerics.
  dtype: str = "bfloat16"  # compute dtype of activations and matmuls
  param_dtype: str = "float32"
  attention_impl: str = "auto"  # auto: cuDNN flash attention on GPU, XLA elsewhere
  norm_impl: str = "xla"  # adaLN's norm + modulate: "xla", "pallas" (fused kernels), ...
  qk_norm_impl: str = "xla"  # the qk-norm and its projection's bias: "xla", "pallas", ...
  # Rematerialisation of each DiT block in the backward pass: "none"; "block" (keep only the
  # block inputs: least memory); "dots" (keep the outputs of matmuls without batch dimensions,
  # the dense layers', recompute the rest); "matmuls" (keep every matmul's output, the experts'
  # and attention's batched ones too; recompute the elementwise work).
  remat: str = "none"
  # Scan over layers: the blocks' parameters are stacked along a leading "layers" axis (one
  # stack per position in the repeating dense/MoE pattern) and the forward pass is one
  # lax.scan, so XLA compiles one block body instead of num_layers copies and the optimizer
  # updates a few dozen large arrays instead of hundreds. Same numerics; a different parameter
  # layout (model/layer_stacking.py converts between the two).
  scan_layers: bool = False

  @classmethod
  def from_mapping(cls, mapping: Mapping[str, Any], prefix: str = "config.model") -> ModelConfig:
    """Builds from a dict or ConfigDict; unknown keys are an error naming the key."""
    known = {f.name for f in dataclasses.fields(cls)}
    values = dict(mapping.items())
    unknown = sorted(set(values) - known)
    if unknown:
      raise ConfigError(
          f"unknown key(s) {', '.join(f'{prefix}.{k}' for k in unknown)}; "
          f"known keys: {', '.join(sorted(known))}")
    return cls(**values)

  def __post_init__(self):
    _validate(self)

  # Derived quantities -------------------------------------------------------------------------
  @property
  def has_pretrained_text_encoder(self) -> bool:
    return self.text_encoder != "scratch"

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def kv_heads(self) -> int:
    return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

  @property
  def mlp_hidden_size(self) -> int:
    return int(round(self.hidden_size * self.mlp_ratio))

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_tokens(self) -> int:
    return self.grid_size**2

  @property
  def patch_dim(self) -> int:
    return self.patch_size**2 * self.in_channels

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def parameter_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.param_dtype)

  def is_moe_layer(self, layer_index: int) -> bool:
    if self.moe_layout == "none":
      return False
    if self.moe_layout == "every":
      return True
    return layer_index % 2 == 1  # every_other: the second block, the fourth, ...

  @property
  def layer_period(self) -> int:
    """Blocks in the repeating dense/MoE pattern: 2 for every_other, 1 otherwise."""
    return 2 if self.moe_layout == "every_other" else 1

  @property
  def moe_layer_indices(self) -> tuple[int, ...]:
    return tuple(i for i in range(self.num_layers) if self.is_moe_layer(i))

  def moe_capacity(self, group_tokens: int, *, train: bool = True,
                   capacity_factor: float | None = None) -> int:
    """Tokens (or token-choice buffer slots) each expert processes per routing group.

    An explicit ``capacity_factor`` wins; otherwise expert choice uses ``capacity_factor`` when
    training and ``eval_capacity_factor`` at inference, and token choice uses
    ``token_choice_capacity_factor`` either way (k f S / E slots, rounded half up, in [1, S]).
    """
    if self.router == "token_choice":
      factor = self.token_choice_capacity_factor if capacity_factor is None else capacity_factor
      per_expert = group_tokens * self.token_choice_top_k * factor / self.num_experts
      return max(1, min(group_tokens, int(per_expert + 0.5)))
    if capacity_factor is None:
      capacity_factor = self.capacity_factor if train else self.eval_capacity_factor
    capacity = expert_capacity(group_tokens, capacity_factor, self.num_experts)
    if capacity < 1:
      raise ValueError(f"capacity factor {capacity_factor} leaves each of the "
                       f"{self.num_experts} experts < 1 of {group_tokens} tokens")
    return capacity


def expert_capacity(group_tokens: int, capacity_factor: float, num_experts: int) -> int:
  """Tokens each expert takes from a routing group: C = round(S_group * f / E).

  Halves round up (not to even) so that the value does not flip with floating-point noise. An
  expert cannot take a token twice, so C is clipped to S_group (then every expert sees every
  token, which is the dense limit).
  """
  capacity = int(math.floor(group_tokens * capacity_factor / num_experts + 0.5))
  return min(capacity, group_tokens)


def _check(condition: bool, message: str) -> None:
  if not condition:
    raise ConfigError(message)


def _validate(c: ModelConfig) -> None:
  """Checks at construction, each naming the ``config.model`` key to change."""
  for key in ("image_size", "in_channels", "patch_size", "hidden_size", "num_layers",
              "num_heads", "num_experts", "text_vocab_size", "text_max_len", "text_hidden_size",
              "text_num_layers", "text_num_heads", "routing_group_size", "token_choice_top_k"):
    value = getattr(c, key)
    _check(isinstance(value, int) and value >= 1,
           f"config.model.{key}={value!r} must be a positive integer")
  _check(c.image_size % c.patch_size == 0,
         f"config.model.patch_size={c.patch_size} must divide "
         f"config.model.image_size={c.image_size}")
  _check(c.hidden_size % c.num_heads == 0,
         f"config.model.num_heads={c.num_heads} must divide "
         f"config.model.hidden_size={c.hidden_size}")
  _check(c.kv_heads >= 1 and c.num_heads % c.kv_heads == 0,
         f"config.model.num_kv_heads={c.num_kv_heads} must be >= 1 and divide "
         f"config.model.num_heads={c.num_heads}")
  _check(c.text_encoder in TEXT_ENCODERS,
         f"config.model.text_encoder={c.text_encoder!r} must be one of {TEXT_ENCODERS}")
  _check(c.has_pretrained_text_encoder or c.text_hidden_size % c.text_num_heads == 0,
         f"config.model.text_num_heads={c.text_num_heads} must divide "
         f"config.model.text_hidden_size={c.text_hidden_size}")
  _check(c.mlp_ratio > 0, f"config.model.mlp_ratio={c.mlp_ratio} must be > 0")
  _check(c.moe_layout in MOE_LAYOUTS,
         f"config.model.moe_layout={c.moe_layout!r} must be one of {MOE_LAYOUTS}")
  _check(c.router in ROUTERS, f"config.model.router={c.router!r} must be one of {ROUTERS}")
  _check(c.moe_dispatch in MOE_DISPATCH,
         f"config.model.moe_dispatch={c.moe_dispatch!r} must be one of {MOE_DISPATCH}")
  _check(c.remat in REMAT_POLICIES,
         f"config.model.remat={c.remat!r} must be one of {REMAT_POLICIES}")
  _check(c.attention_impl in ATTENTION_IMPLS,
         f"config.model.attention_impl={c.attention_impl!r} must be one of {ATTENTION_IMPLS}")
  _check(c.norm_impl in NORM_IMPLS,
         f"config.model.norm_impl={c.norm_impl!r} must be one of {NORM_IMPLS}")
  _check(c.qk_norm_impl in QK_NORM_IMPLS,
         f"config.model.qk_norm_impl={c.qk_norm_impl!r} must be one of {QK_NORM_IMPLS}")
  for key in ("dtype", "param_dtype"):
    value = getattr(c, key)
    try:
      ok = jnp.issubdtype(jnp.dtype(value), jnp.floating)
    except TypeError:
      ok = False
    _check(ok, f"config.model.{key}={value!r} must name a floating dtype, e.g. 'bfloat16'")
  _check(c.router_z_loss_weight >= 0,
         f"config.model.router_z_loss_weight={c.router_z_loss_weight} must be >= 0")
  _check(c.load_balance_loss_weight >= 0,
         f"config.model.load_balance_loss_weight={c.load_balance_loss_weight} must be >= 0")
  _check(isinstance(c.scan_layers, bool),
         f"config.model.scan_layers={c.scan_layers!r} must be True or False")
  _check(not c.scan_layers or c.num_layers % c.layer_period == 0,
         f"config.model.scan_layers=True stacks the blocks in repeats of the "
         f"config.model.moe_layout={c.moe_layout!r} pattern ({c.layer_period} blocks), which "
         f"must divide config.model.num_layers={c.num_layers}")
  if c.moe_layout == "none":
    return
  _check(c.moe_layout != "every_other" or c.num_layers >= 2,
         f"config.model.moe_layout='every_other' needs config.model.num_layers >= 2, "
         f"got {c.num_layers}")
  group_tokens = c.routing_group_size * c.num_tokens
  if c.router == "expert_choice":
    for key in ("capacity_factor", "eval_capacity_factor"):
      factor = getattr(c, key)
      _check(factor > 0, f"config.model.{key}={factor} must be > 0")
      capacity = expert_capacity(group_tokens, factor, c.num_experts)
      _check(capacity >= 1,
             f"config.model.{key}={factor} gives each of config.model.num_experts="
             f"{c.num_experts} experts a capacity of {group_tokens} * {factor} / "
             f"{c.num_experts} < 1 token per routing group of {group_tokens} tokens; raise "
             f"the factor, config.model.routing_group_size, or lower the expert count")
  else:
    _check(c.token_choice_top_k <= c.num_experts,
           f"config.model.token_choice_top_k={c.token_choice_top_k} must be <= "
           f"config.model.num_experts={c.num_experts}")
    _check(c.token_choice_capacity_factor > 0,
           f"config.model.token_choice_capacity_factor={c.token_choice_capacity_factor} "
           "must be > 0")
