"""Logical axis names carried by every parameter of the model.

The model annotates each parameter with logical names (``nnx.with_partitioning``) and never with
mesh axes. The mapping from these names to the mesh axes (data, fsdp, expert, tensor) lives with
the mesh code, so changing a parallelism strategy never needs a model edit.
"""

from __future__ import annotations

from typing import Callable, Sequence

from flax import nnx

EMBED = "embed"  # the model width d
MLP = "mlp"  # hidden width of feed-forward layers and of the adaLN projections
HEADS = "heads"  # query heads
KV_HEADS = "kv_heads"  # key/value heads (grouped-query attention)
HEAD_DIM = "kv"  # per-head feature width
EXPERT = "expert"  # the expert dimension of MoE weights
VOCAB = "vocab"  # text vocabulary
TEXT_EMBED = "text_embed"  # width of the text encoder's output (the cross-attention context)
LAYERS = "layers"  # the leading axis of blocks' parameters stacked for a scan over layers
UNSHARDED = None  # small axes that are never split (patch pixels, timestep frequencies)

ALL_LOGICAL_AXES = (EMBED, MLP, HEADS, KV_HEADS, HEAD_DIM, EXPERT, VOCAB, TEXT_EMBED, LAYERS)


def partitioned(initializer: Callable, names: Sequence[str | None]) -> Callable:
  """Wraps ``initializer`` so the created parameter carries ``names`` as sharding metadata.

  Eager sharding is switched off: the names are logical, so they only become a sharding once a
  mesh and rules are chosen (at jit time), and a model can still be built with no mesh at all.
  """
  return nnx.with_partitioning(initializer, tuple(names), eager_sharding=False)
