"""Model FLOPs: the one convention that every benchmark, table and evaluation report uses.

Conventions (tests/model/test_flops.py checks the counts against traced forward passes):

* Only matrix multiplications count, at 2 FLOPs per multiply-accumulate: an (m x k) @ (k x n)
  product is 2 m n k. Elementwise work (norms, softmax, GELU, modulation, residuals), routing
  (top-k, gathers, scatters) and the text token-embedding lookup are not counted. The DiT paper's
  "Gflops" count multiply-accumulates: halve our numbers to compare with it.
* Counts are per image: one image's row of a batch. The dtype does not matter: the router's
  float32 matmul counts like any other.
* Attention is counted as the XLA implementation computes it: q k^T and p v over every query
  and every key, padded text positions included (masked, not skipped; counting them also keeps
  the number independent of the prompt), 4 S_q S_kv d per layer for d = heads x head_dim.
  Grouped KV heads shrink only the key and value projections (to kv_heads x head_dim outputs);
  the scores are the same as with full heads, because the queries are not reduced.
* Cross-attention projects keys and values from the text encoder's width (text_hidden_size)
  over ``text_tokens`` text positions (default text_max_len, the padded length the data pipeline
  and the sampler feed).
* MoE layers count what the experts compute, not what the routing keeps: under expert choice
  each of the E experts processes C = expert_capacity(group tokens, f, E) tokens of every
  routing group of routing_group_size images, so an image costs E C / routing_group_size expert
  FFNs, about f times the dense FFN. Token choice computes every one of its E buffers of
  C = round(top_k f_tc S / E) slots, empty slots included; dense blocks run one FFN per token.
  The router (d x E) counts in every MoE layer.
* ``num_tokens`` is the image tokens the transformer sees: pass the kept count for masked
  training. The patch embedding still runs on every token (the model embeds before it drops
  tokens), so it is always counted at config.num_tokens.
* ``total`` is everything one call of TextToImageDiT computes: ``backbone`` (the DiT) plus
  ``text_encoder`` (the prompt's encoding, once per image). A frozen pretrained text encoder
  (``text_encoder`` "t5" or "clip") is not part of the model and counts 0 here: its size is
  known only from its weights. Samplers encode the prompt once and run the DiT every step, so
  benchmarks of the DiT alone use ``backbone``.
* Training is 3 x forward (the backward pass taken as 2 x forward), for every entry. No remat
  recompute, loss or optimizer work is included. The traced backward is slightly cheaper: the
  matmuls whose input needs no gradient (the patch embedding, the timestep MLP's first layer,
  the text pooling weights) skip half of their backward.
* Generation (:func:`generation_flops_per_image`) runs the DiT once per Euler step or twice per
  Heun step, always on the conditional and the unconditional half of the batch together (the
  sampler does so even at guidance scale 1), and encodes the prompt and the null caption once.
"""

from __future__ import annotations

import math

from ecdit_jax.model.config import ModelConfig

# The sinusoidal width that layers.TimestepEmbedder feeds its first dense layer.
TIMESTEP_FREQUENCY_DIM = 256

# The breakdown's entries, in order; "backbone" sums all but text_encoder, "total" sums all.
COMPONENTS = (
    "patch_embed",  # patches -> d, on every image token
    "conditioning",  # timestep MLP, masked mean of the text, its projection to d
    "adaln",  # every block's 6 d-wide modulation vectors and the final layer's 2
    "self_attn_q", "self_attn_k", "self_attn_v", "self_attn_out",
    "self_attn_scores_values",  # q k^T and p v
    "cross_attn_q", "cross_attn_k", "cross_attn_v", "cross_attn_out",
    "cross_attn_scores_values",
    "ffn_dense",  # the FFN of the blocks without MoE
    "moe_router",
    "moe_experts",
    "final_layer",  # d -> patch pixels
    "text_encoder",
)
TOTALS = ("backbone", "total")
SAMPLING_METHODS = {"euler": 1, "heun": 2}  # DiT evaluations per sampling step
SI_PREFIXES = ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))


def matmul_flops(m: int, n: int, k: int) -> int:
  """An (m x k) @ (k x n) product: m n multiply-accumulates of length k, 2 FLOPs each."""
  return 2 * m * n * k


def text_encoder_flops(config: ModelConfig, text_tokens: int | None = None) -> int:
  """One prompt through the text encoder: per layer, 4 w x w projections, attention, a 4w FFN.

  0 for a frozen pretrained encoder, which is not part of the model.
  """
  length = config.text_max_len if text_tokens is None else text_tokens
  if not 1 <= length <= config.text_max_len:
    raise ValueError(f"text_tokens={length} must be in [1, config.model.text_max_len="
                     f"{config.text_max_len}]")
  if config.has_pretrained_text_encoder:
    return 0
  width = config.text_hidden_size
  projections = 4 * matmul_flops(length, width, width)  # q, k, v, out: full heads
  attention = 2 * matmul_flops(length, length, width)  # q k^T and p v
  ffn = 2 * matmul_flops(length, 4 * width, width)
  return config.text_num_layers * (projections + attention + ffn)


def forward_flops_per_image(config: ModelConfig, *, train: bool = True,
                            capacity_factor: float | None = None, num_tokens: int | None = None,
                            text_tokens: int | None = None) -> dict[str, float]:
  """FLOPs of one image through ``TextToImageDiT``, by component (see the module docstring).

  Args:
    config: the model.
    train, capacity_factor: pick the MoE capacity as the model does
      (``ModelConfig.moe_capacity``).
    num_tokens: image tokens the transformer sees (default config.num_tokens; the kept count
      under token masking).
    text_tokens: the (padded) prompt length (default config.text_max_len).
  Returns:
    {component: FLOPs} for every name in COMPONENTS, plus "backbone" (all but the text encoder)
    and "total".
  """
  n_all = config.num_tokens
  n = n_all if num_tokens is None else num_tokens
  if not 1 <= n <= n_all:
    raise ValueError(f"num_tokens={n} must be in [1, {n_all}] (the image's tokens)")
  length = config.text_max_len if text_tokens is None else text_tokens
  d, width, experts = config.hidden_size, config.text_hidden_size, config.num_experts
  kv_width = config.kv_heads * config.head_dim  # grouped KV heads project to this width
  hidden = config.mlp_hidden_size
  ffn_per_token = 2 * matmul_flops(1, hidden, d)  # d -> hidden -> d
  moe_layers = len(config.moe_layer_indices)
  dense_layers = config.num_layers - moe_layers
  layers = config.num_layers

  expert_flops = 0.0
  if moe_layers:
    group_size = config.routing_group_size
    capacity = config.moe_capacity(group_size * n, train=train, capacity_factor=capacity_factor)
    # E experts x C tokens per routing group, shared by the group's images.
    expert_flops = moe_layers * experts * capacity * ffn_per_token / group_size

  counts = {
      "patch_embed": matmul_flops(n_all, d, config.patch_dim),
      "conditioning": (matmul_flops(1, d, TIMESTEP_FREQUENCY_DIM) + matmul_flops(1, d, d)
                       + matmul_flops(1, width, length)  # masked mean of the text embeddings
                       + matmul_flops(1, d, width)),
      "adaln": layers * matmul_flops(1, 6 * d, d) + matmul_flops(1, 2 * d, d),
      "self_attn_q": layers * matmul_flops(n, d, d),
      "self_attn_k": layers * matmul_flops(n, kv_width, d),
      "self_attn_v": layers * matmul_flops(n, kv_width, d),
      "self_attn_out": layers * matmul_flops(n, d, d),
      "self_attn_scores_values": layers * 2 * matmul_flops(n, n, d),
      "cross_attn_q": layers * matmul_flops(n, d, d),
      "cross_attn_k": layers * matmul_flops(length, kv_width, width),
      "cross_attn_v": layers * matmul_flops(length, kv_width, width),
      "cross_attn_out": layers * matmul_flops(n, d, d),
      "cross_attn_scores_values": layers * 2 * matmul_flops(n, length, d),
      "ffn_dense": dense_layers * n * ffn_per_token,
      "moe_router": moe_layers * matmul_flops(n, experts, d),
      "moe_experts": expert_flops,
      "final_layer": matmul_flops(n, config.patch_dim, d),
      "text_encoder": text_encoder_flops(config, length),
  }
  breakdown = {name: float(counts[name]) for name in COMPONENTS}
  breakdown["backbone"] = math.fsum(v for k, v in breakdown.items() if k != "text_encoder")
  breakdown["total"] = breakdown["backbone"] + breakdown["text_encoder"]
  return breakdown


def train_flops_per_image(config: ModelConfig, *, capacity_factor: float | None = None,
                          num_tokens: int | None = None,
                          text_tokens: int | None = None) -> dict[str, float]:
  """Forward + backward per training image: 3 x the training-mode forward, entry by entry."""
  forward = forward_flops_per_image(config, train=True, capacity_factor=capacity_factor,
                                    num_tokens=num_tokens, text_tokens=text_tokens)
  return {name: 3 * value for name, value in forward.items()}


def generation_flops_per_image(config: ModelConfig, *, num_steps: int, method: str = "euler",
                               capacity_factor: float | None = None,
                               text_tokens: int | None = None) -> dict[str, float]:
  """FLOPs to generate one image with the sampler (``diffusion.generate``), at inference.

  Returns:
    "per_forward": the DiT on one image row (the backbone of ``forward_flops_per_image`` with
    train=False); "forwards": DiT rows per generated image (steps x evaluations per step x 2 for
    the conditional and unconditional halves); "text_encoder": the prompt and the null caption
    encoded once each; "total": per_forward x forwards + text_encoder.
  """
  if method not in SAMPLING_METHODS:
    raise ValueError(f"method must be one of {sorted(SAMPLING_METHODS)}, got {method!r}")
  forward = forward_flops_per_image(config, train=False, capacity_factor=capacity_factor,
                                    text_tokens=text_tokens)
  forwards = num_steps * SAMPLING_METHODS[method] * 2
  text = 2 * forward["text_encoder"]
  return {"per_forward": forward["backbone"], "forwards": float(forwards), "text_encoder": text,
          "total": forward["backbone"] * forwards + text}


def format_flops(flops: float, digits: int = 4) -> str:
  """A FLOP count with an SI prefix and ``digits`` significant digits, e.g. '152.3M'."""
  for scale, prefix in SI_PREFIXES:
    if abs(flops) >= scale:
      return f"{flops / scale:.{digits}g}{prefix}"
  return f"{flops:.{digits}g}"
