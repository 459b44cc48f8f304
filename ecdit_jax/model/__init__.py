"""The EC-DiT model: configuration, layers, attention, MoE routing, backbone, text encoder."""

from ecdit_jax.errors import ConfigError
from ecdit_jax.model.config import ModelConfig, expert_capacity
from ecdit_jax.model.dit import DiT, TextToImageDiT

__all__ = ["ConfigError", "ModelConfig", "expert_capacity", "DiT", "TextToImageDiT"]
