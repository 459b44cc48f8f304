"""Self-attention with grouped key/value heads and cross-attention to text tokens.

Both run through ``jax.nn.dot_product_attention``: cuDNN flash attention on GPU when the
configuration allows it, the XLA implementation elsewhere. Projections are einsums against
(d, heads, head_dim) kernels so that heads carry their own logical axis for tensor parallelism.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ecdit_jax.model import fused_qk_norm
from ecdit_jax.parallel import axes
from ecdit_jax.parallel import mesh as mesh_lib


def resolve_attention_impl(requested: str, dtype) -> str | None:
  """'auto' picks cuDNN flash attention on GPU for half-precision inputs, XLA otherwise."""
  if requested == "auto":
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if half and jax.default_backend() == "gpu" else "xla"
  return requested


class HeadProjection(nnx.Module):
  """x (B, S, d_in) -> (B, S, heads, head_dim) with a (d_in, heads, head_dim) kernel."""

  def __init__(self, in_features: int, num_heads: int, head_dim: int, head_axis: str, *,
               rngs: nnx.Rngs, dtype, param_dtype, in_axis: str = axes.EMBED):
    init = axes.partitioned(nnx.initializers.xavier_uniform(in_axis=0, out_axis=(1, 2)),
                            (in_axis, head_axis, axes.HEAD_DIM))
    self.kernel = nnx.Param(init(rngs.params(), (in_features, num_heads, head_dim), param_dtype))
    bias_init = axes.partitioned(nnx.initializers.zeros_init(), (head_axis, axes.HEAD_DIM))
    self.bias = nnx.Param(bias_init(rngs.params(), (num_heads, head_dim), param_dtype))
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.project(x) + self.bias[...].astype(self.dtype)

  def project(self, x: jax.Array) -> jax.Array:
    """The projection without its bias (which the fused qk-norm adds itself)."""
    return jnp.einsum("bsd,dhk->bshk", x.astype(self.dtype), self.kernel[...].astype(self.dtype))


class OutputProjection(nnx.Module):
  """(B, S, heads, head_dim) -> (B, S, d)."""

  def __init__(self, num_heads: int, head_dim: int, out_features: int, *, rngs: nnx.Rngs, dtype,
               param_dtype, zero_init: bool = False):
    base = (nnx.initializers.zeros_init() if zero_init else
            nnx.initializers.xavier_uniform(in_axis=(0, 1), out_axis=2))
    init = axes.partitioned(base, (axes.HEADS, axes.HEAD_DIM, axes.EMBED))
    self.kernel = nnx.Param(init(rngs.params(), (num_heads, head_dim, out_features), param_dtype))
    bias_init = axes.partitioned(nnx.initializers.zeros_init(), (axes.EMBED,))
    self.bias = nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype))
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.kernel[...].astype(self.dtype)
    return jnp.einsum("bshk,hkd->bsd", x, kernel) + self.bias[...].astype(self.dtype)


class HeadRMSNorm(nnx.Module):
  """RMS normalisation over each head's features (qk-norm), computed in float32.

  ``row_view``: normalise a (tokens x heads, head_dim) view of the input. XLA GPU fuses either
  form with the projection's bias into one kernel, but the 4-D form broadcasts each row's
  statistic back over three axes and is much slower in sampling
  (bench/records/2026-11-26_h100_qk-norm-row-view/). With the heads split over devices (tensor
  parallelism) the merged view would need a reshard, so the norm then keeps the 4-D form.
  """

  eps = 1e-6

  def __init__(self, head_dim: int, *, rngs: nnx.Rngs, param_dtype, row_view: bool = True):
    init = axes.partitioned(nnx.initializers.ones_init(), (axes.HEAD_DIM,))
    self.scale = nnx.Param(init(rngs.params(), (head_dim,), param_dtype))
    self.row_view = row_view

  def __call__(self, x: jax.Array) -> jax.Array:
    shape = x.shape
    if self.row_view:
      x = x.reshape(-1, shape[-1])
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (normed * self.scale[...].astype(jnp.float32)).astype(x.dtype).reshape(shape)


class Attention(nnx.Module):
  """Multi-head attention with ``num_kv_heads`` key/value heads shared by groups of queries.

  Used as self-attention (context = x) and as cross-attention (context = text tokens, with
  ``context_lengths`` marking the valid prefix of each padded text sequence). ``mesh``: the
  device mesh the layer runs on (None: one device), on which the query, key and value layouts
  are pinned and which decides the qk-norm's form.
  """

  def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, *, rngs: nnx.Rngs,
               dtype, param_dtype, qk_norm: bool = False, context_size: int | None = None,
               zero_init_output: bool = False, attention_impl: str = "auto",
               qk_norm_impl: str = "xla", mesh=None):
    if hidden_size % num_heads:
      raise ValueError(f"num_heads={num_heads} must divide hidden_size={hidden_size}")
    if num_heads % num_kv_heads:
      raise ValueError(f"num_kv_heads={num_kv_heads} must divide num_heads={num_heads}")
    head_dim = hidden_size // num_heads
    context_size = hidden_size if context_size is None else context_size
    context_axis = axes.EMBED if context_size == hidden_size else axes.TEXT_EMBED
    common = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.query = HeadProjection(hidden_size, num_heads, head_dim, axes.HEADS, **common)
    self.key = HeadProjection(context_size, num_kv_heads, head_dim, axes.KV_HEADS,
                              in_axis=context_axis, **common)
    self.value = HeadProjection(context_size, num_kv_heads, head_dim, axes.KV_HEADS,
                                in_axis=context_axis, **common)
    self.out = OutputProjection(num_heads, head_dim, hidden_size, zero_init=zero_init_output,
                                **common)
    if qk_norm:
      row_view = mesh is None or mesh.shape["tensor"] == 1
      self.query_norm = HeadRMSNorm(head_dim, rngs=rngs, param_dtype=param_dtype,
                                    row_view=row_view)
      self.key_norm = HeadRMSNorm(head_dim, rngs=rngs, param_dtype=param_dtype,
                                  row_view=row_view)
    else:
      self.query_norm = self.key_norm = None
    self.implementation = resolve_attention_impl(attention_impl, dtype)
    self.qk_norm_impl = qk_norm_impl
    self.mesh = mesh

  def __call__(self, x: jax.Array, context: jax.Array | None = None,
               context_lengths: jax.Array | None = None) -> jax.Array:
    context = x if context is None else context
    v = self.value(context)
    if self.query_norm is None:
      q, k = self.query(x), self.key(context)
    elif self.qk_norm_impl == "xla":
      q, k = self.query_norm(self.query(x)), self.key_norm(self.key(context))
    else:
      q = self._fused_norm(self.query, self.query_norm, x, axes.HEADS)
      k = self._fused_norm(self.key, self.key_norm, context, axes.KV_HEADS)
    # Batch over the data-like axes, heads over tensor: with parameters split over fsdp, the
    # propagated layouts of q, k and v can differ, which cuDNN's attention refuses.
    q = mesh_lib.constrain(q, (mesh_lib.BATCH, None, axes.HEADS, axes.HEAD_DIM), self.mesh)
    k = mesh_lib.constrain(k, (mesh_lib.BATCH, None, axes.KV_HEADS, axes.HEAD_DIM), self.mesh)
    v = mesh_lib.constrain(v, (mesh_lib.BATCH, None, axes.KV_HEADS, axes.HEAD_DIM), self.mesh)
    lengths = None if context_lengths is None else context_lengths.astype(jnp.int32)
    out = jax.nn.dot_product_attention(
        q, k, v, key_value_seq_lengths=lengths, implementation=self.implementation)
    return self.out(out)

  def _fused_norm(self, projection: HeadProjection, norm: HeadRMSNorm, x: jax.Array,
                  head_axis: str) -> jax.Array:
    """``norm(projection(x))`` with the bias, norm and scale in model/fused_qk_norm's kernels."""
    return fused_qk_norm.bias_rms_norm(
        projection.project(x), projection.bias[...], norm.scale[...], eps=norm.eps,
        head_axis=head_axis, mesh=self.mesh, interpret=self.qk_norm_impl == "pallas_interpret",
        tpu_kernel=self.qk_norm_impl != "auto")
