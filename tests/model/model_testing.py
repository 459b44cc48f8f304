"""Small model configurations shared by the model tests."""

import jax

from ecdit_jax.model import ModelConfig


def tiny_config(**overrides) -> ModelConfig:
  base = dict(image_size=16, in_channels=3, patch_size=4, hidden_size=32, num_layers=2,
              num_heads=4, num_kv_heads=2, num_experts=4, capacity_factor=2.0,
              eval_capacity_factor=2.0, text_vocab_size=50, text_max_len=8,
              text_hidden_size=16, text_num_layers=1, text_num_heads=2, dtype="float32")
  base.update(overrides)
  return ModelConfig(**base)


def perturbed(params, seed: int = 1, scale: float = 0.05):
  """Params plus small noise: zero-initialised branches (adaLN-Zero gates, cross-attention and
  final projections) become live, so that a check exercises every path of the model."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(
      treedef, [p + scale * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)])
