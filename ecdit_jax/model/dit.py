"""The EC-DiT backbone: DiT blocks with adaLN-Zero, grouped-KV self-attention, cross-attention to
text, and an expert-choice MoE feed-forward in every other block (configurable).

Call convention (all models): ``model(x_t, t, ...) -> (prediction, aux)`` where ``aux`` holds the
summed auxiliary loss and per-MoE-layer routing statistics stacked along a leading layer axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ecdit_jax.model import layer_stacking, layers
from ecdit_jax.model.attention import Attention
from ecdit_jax.model.config import ModelConfig
from ecdit_jax.model.moe import ExpertChoiceFFN, TokenChoiceFFN
from ecdit_jax.model.text import TextEncoder
from ecdit_jax.parallel import axes

# What each config.model.remat policy keeps for the backward pass (None: only the block's inputs).
REMAT_SAVES = {"block": None,
               "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
               "matmuls": jax.checkpoint_policies.dots_saveable}


def make_ffn(config: ModelConfig, layer_index: int, rngs: nnx.Rngs, mesh=None) -> nnx.Module:
  """The feed-forward of block ``layer_index``: an MoE layer where the layout puts one."""
  if not config.is_moe_layer(layer_index):
    return layers.FeedForward(config.hidden_size, config.mlp_hidden_size, rngs=rngs,
                              dtype=config.compute_dtype, param_dtype=config.parameter_dtype)
  if config.router == "expert_choice":
    return ExpertChoiceFFN(config, rngs=rngs, mesh=mesh)
  return TokenChoiceFFN(config, rngs=rngs)


class DiTBlock(nnx.Module):
  """adaLN-Zero self-attention, cross-attention to text, adaLN-Zero FFN or MoE."""

  def __init__(self, config: ModelConfig, layer_index: int, *, rngs: nnx.Rngs, mesh=None):
    d = config.hidden_size
    common = dict(rngs=rngs, dtype=config.compute_dtype, param_dtype=config.parameter_dtype)
    self.is_moe = config.is_moe_layer(layer_index)
    self.modulation = layers.AdaLNModulation(d, 6, **common)
    self.norm1 = layers.AdaLNNorm(d, config.norm_impl, mesh=mesh, **common)
    self.self_attn = Attention(d, config.num_heads, config.kv_heads, qk_norm=config.qk_norm,
                               qk_norm_impl=config.qk_norm_impl,
                               attention_impl=config.attention_impl, mesh=mesh, **common)
    self.norm_cross = layers.layer_norm(d, affine=True, **common)
    # Zero-initialised output: the cross-attention branch also starts switched off.
    self.cross_attn = Attention(d, config.num_heads, config.kv_heads, qk_norm=config.qk_norm,
                                context_size=config.text_hidden_size, zero_init_output=True,
                                qk_norm_impl=config.qk_norm_impl,
                                attention_impl=config.attention_impl, mesh=mesh, **common)
    self.norm2 = layers.AdaLNNorm(d, config.norm_impl, mesh=mesh, **common)
    self.ffn = make_ffn(config, layer_index, rngs, mesh)

  def __call__(self, x, c, context, context_lengths, *, train: bool,
               capacity_factor: float | None):
    shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = self.modulation(c)
    x = x + gate_sa[:, None] * self.self_attn(self.norm1(x, shift_sa, scale_sa))
    x = x + self.cross_attn(self.norm_cross(x), context, context_lengths)
    h = self.norm2(x, shift_ff, scale_ff)
    if self.is_moe:
      y, aux = self.ffn(h, train=train, capacity_factor=capacity_factor)
    else:
      y, aux = self.ffn(h), None
    return x + gate_ff[:, None] * y, aux


class FinalLayer(nnx.Module):
  """adaLN-modulated LayerNorm and a zero-initialised projection to patch pixels."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, mesh=None):
    d = config.hidden_size
    common = dict(rngs=rngs, dtype=config.compute_dtype, param_dtype=config.parameter_dtype)
    self.modulation = layers.AdaLNModulation(d, 2, **common)
    self.norm = layers.AdaLNNorm(d, config.norm_impl, mesh=mesh, **common)
    self.proj = layers.dense(d, config.patch_dim, (axes.EMBED, axes.UNSHARDED), zero_init=True,
                             **common)

  def __call__(self, x, c):
    shift, scale = self.modulation(c)
    return self.proj(self.norm(x, shift, scale))


class DiT(nnx.Module):
  """The diffusion backbone on patch tokens, conditioned on t and on text embeddings.

  ``mesh``: the device mesh the model runs on (None: one device, or left to XLA); it decides
  whether the MoE layers run expert-parallel and how attention lays out its inputs.
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, mesh=None):
    self.config = config
    d = config.hidden_size
    common = dict(rngs=rngs, dtype=config.compute_dtype, param_dtype=config.parameter_dtype)
    self.patch_embed = layers.PatchEmbed(config.patch_size, config.in_channels, d, **common)
    self.time_embed = layers.TimestepEmbedder(d, **common)
    # The pooled text vector joins the timestep vector in every adaLN modulation.
    self.text_pool = layers.dense(config.text_hidden_size, d, (axes.TEXT_EMBED, axes.EMBED),
                                  **common)
    blocks = [DiTBlock(config, i, rngs=rngs, mesh=mesh) for i in range(config.num_layers)]
    if config.scan_layers:
      period = config.layer_period
      self.stacked_blocks = nnx.List([layer_stacking.stack_modules(blocks[j::period])
                                      for j in range(period)])
    else:
      self.blocks = nnx.List(blocks)
    self.final = FinalLayer(config, rngs=rngs, mesh=mesh)

  def block_modules(self) -> list[DiTBlock]:
    """The block modules: one per layer, or one stacked module per position of the pattern."""
    return list(self.stacked_blocks if self.config.scan_layers else self.blocks)

  def embed(self, x_t: jax.Array) -> jax.Array:
    cfg = self.config
    positions = layers.sincos_2d_positions(cfg.hidden_size, cfg.grid_size)
    return self.patch_embed(x_t) + jnp.asarray(positions, cfg.compute_dtype)

  def conditioning(self, t: jax.Array, context: jax.Array, context_lengths: jax.Array):
    valid = jnp.arange(context.shape[1])[None, :] < context_lengths[:, None]
    weights = valid.astype(jnp.float32) / jnp.maximum(context_lengths[:, None], 1)
    pooled = jnp.einsum("bl,bld->bd", weights, context.astype(jnp.float32))
    return self.time_embed(t) + self.text_pool(pooled)

  def __call__(self, x_t: jax.Array, t: jax.Array, context: jax.Array,
               context_lengths: jax.Array, *, keep_index: jax.Array | None = None,
               train: bool = True, capacity_factor: float | None = None):
    """Predicts the velocity.

    Args:
      x_t: (B, H, W, C) noisy images or latents.
      t: (B,) times in [0, 1].
      context: (B, L, text_width) text embeddings; context_lengths: (B,) valid prefix lengths.
      keep_index: optional (B, K) sorted token indices kept by token masking; the backbone (and
        so the routing) sees only those tokens.
      train: selects the training or the inference capacity factor.
      capacity_factor: overrides either (e.g. for capacity sweeps).
    Returns:
      (prediction, aux): prediction (B, H, W, C) float32, or (B, K, p*p*C) patch tokens when
      ``keep_index`` is given; aux = {"aux_loss": scalar, "moe": {stat: (num_moe_layers,)},
      "token_counts": (num_moe_layers, B, S) experts per token} (no MoE: the first two only).
    """
    cfg = self.config
    b, h, w, c = x_t.shape
    if (h, w, c) != (cfg.image_size, cfg.image_size, cfg.in_channels):
      raise ValueError(f"input of shape {(h, w, c)} does not match config.model.image_size="
                       f"{cfg.image_size}, config.model.in_channels={cfg.in_channels}")
    x = self.embed(x_t)
    if keep_index is not None:
      x = jnp.take_along_axis(x, keep_index[..., None], axis=1)
    cond = self.conditioning(t, context, context_lengths)

    def run_block(block, x, cond, context, context_lengths):
      return block(x, cond, context, context_lengths, train=train,
                   capacity_factor=capacity_factor)

    if cfg.remat != "none":
      run_block = nnx.remat(run_block, policy=REMAT_SAVES[cfg.remat])
    if cfg.scan_layers:
      x, layer_aux = layer_stacking.scan_blocks(
          self.stacked_blocks, x,
          lambda block, x: run_block(block, x, cond, context, context_lengths),
          compute_dtype=cfg.compute_dtype)
    else:
      layer_aux = []
      for block in self.blocks:
        x, aux = run_block(block, x, cond, context, context_lengths)
        if aux is not None:
          layer_aux.append(aux)
      layer_aux = jax.tree.map(lambda *a: jnp.stack(a), *layer_aux) if layer_aux else None
    out = self.final(x, cond).astype(jnp.float32)
    if keep_index is None:
      out = layers.unpatchify(out, cfg.patch_size, h, w)
    return out, summarize_layer_aux(layer_aux)


def summarize_layer_aux(layer_aux: dict | None) -> dict:
  """The MoE layers' aux dicts, stacked along a leading layer axis -> the model's aux.

  Sums the auxiliary losses and keeps the statistics per layer. ``token_counts``
  (num_moe_layers, B, S) says how many experts processed each image token in each MoE layer
  (for routing analysis; training drops it).
  """
  if layer_aux is None:
    return {"aux_loss": jnp.zeros((), jnp.float32), "moe": {}}
  per_token = ("aux_loss", "token_counts")
  return {"aux_loss": jnp.sum(layer_aux["aux_loss"]),
          "moe": {k: v for k, v in layer_aux.items() if k not in per_token},
          "token_counts": layer_aux["token_counts"]}


class TextToImageDiT(nnx.Module):
  """Text encoder + DiT: ``model(x_t, t, tokens) -> (velocity, aux)``.

  ``encode_text`` and ``dit`` are exposed separately so that a sampler encodes the prompt once
  and reuses the embeddings at every step. With a frozen pretrained text encoder
  (``config.text_encoder`` "t5" or "clip") the model holds no text encoder: the caller encodes
  the text outside it and calls ``dit`` (or ``from_context``) with the context. ``mesh`` as in
  ``DiT``.
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, mesh=None):
    self.config = config
    self.text_encoder = (None if config.has_pretrained_text_encoder
                         else TextEncoder(config, rngs=rngs))
    self.dit = DiT(config, rngs=rngs, mesh=mesh)

  def encode_text(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    if self.text_encoder is None:
      raise ValueError(f"config.model.text_encoder={self.config.text_encoder!r} is a frozen "
                       "pretrained encoder outside the model: encode the text with it and call "
                       "the model's dit (or from_context) with the context")
    return self.text_encoder(tokens)

  def from_context(self, x_t: jax.Array, t: jax.Array, context: jax.Array,
                   context_lengths: jax.Array, **kwargs):
    """The velocity given already-encoded text (B, L, text_hidden_size) and its lengths."""
    return self.dit(x_t, t, context, context_lengths, **kwargs)

  def __call__(self, x_t: jax.Array, t: jax.Array, tokens: jax.Array, **kwargs):
    context, lengths = self.encode_text(tokens)
    return self.dit(x_t, t, context, lengths, **kwargs)
