"""adaLN's normalise-and-modulate, ``LayerNorm(x) * (1 + scale) + shift``, as one Pallas kernel.

Every DiT block normalises its tokens twice and modulates them with per-image shift and scale
vectors (and the final layer once more). XLA computes this as a reduction fusion for the
statistics and a second pass for the affine part, in the forward pass and again, with more
reductions, in the backward pass. Here each direction is one kernel that reads a block of rows
once:

* forward: ``y = (x - mean) * rstd * (1 + scale_b) + shift_b`` with the row's mean and inverse
  standard deviation computed in float32 (two passes over the block held in registers or VMEM)
  and kept for the backward pass;
* backward: ``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))`` with ``g = dy * (1 + scale_b)``,
  and per-block partial sums of ``dy * xhat`` and ``dy`` that XLA adds up into the image's
  ``dscale`` and ``dshift``.

One kernel body serves every backend: Triton on GPUs (a row block must be a power of two wide, so
the block is widened and the columns past the model width are masked), Mosaic on TPUs (the block
is the exact width, a multiple of 128 in every preset), and the Pallas interpreter anywhere
(``interpret=True``: how the tests check it on a CPU against the XLA path). On a mesh the kernel
runs per device under ``shard_map`` over the batch, the dimension that the activations are split
along; the model width is never split in activations.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec as P

from ecdit_jax.parallel import mesh as mesh_lib

# Rows a program takes: Triton keeps its (rows, width) block in registers, so few rows of a
# power-of-two width; Mosaic stages blocks through VMEM, where more rows amortise each step.
GPU_ROWS = 8
OTHER_ROWS = 128


def reference(x: jax.Array, shift: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """The same computation in XLA ops (float32 statistics, output in x's dtype)."""
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
  y = (xf - mean) * lax.rsqrt(var + eps)
  y = y * (1 + scale.astype(jnp.float32)[:, None]) + shift.astype(jnp.float32)[:, None]
  return y.astype(x.dtype)


def norm_modulate(x: jax.Array, shift: jax.Array, scale: jax.Array, *, eps: float,
                  mesh=None, interpret: bool = False, widen: bool | None = None) -> jax.Array:
  """``LayerNorm(x) * (1 + scale[:, None]) + shift[:, None]`` for x (B, S, d), shift and scale
  (B, d), by the fused kernels; differentiable in all three. ``mesh``: run per device with the
  batch split as the activations are (None or one device: no ``shard_map``). ``widen``: the
  GPU's power-of-two blocks (True) or exact-width ones (False); None: as the compiling platform
  needs (exact in the interpreter)."""
  fn = functools.partial(_fused, eps=eps, interpret=interpret, widen=widen)
  if mesh is None or mesh.size == 1:
    return fn(x, shift, scale)
  batch = mesh_lib.logical_to_mesh((mesh_lib.BATCH,), x.shape[:1], mesh)[0]
  rows, vectors = P(batch, None, None), P(batch, None)
  return jax.shard_map(fn, mesh=mesh, in_specs=(rows, vectors, vectors), out_specs=rows,
                       check_vma=False)(x, shift, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _fused(x, shift, scale, eps, interpret, widen):
  return _forward(x, shift, scale, eps, (interpret, widen))[0]


def _fused_fwd(x, shift, scale, eps, interpret, widen):
  y, mean, rstd = _forward(x, shift, scale, eps, (interpret, widen))
  return y, (x, shift, scale, mean, rstd)  # shift: its dtype (B, d floats)


def _fused_bwd(eps, interpret, widen, residuals, dy):
  del eps
  x, shift, scale, mean, rstd = residuals
  dx, dscale, dshift = _backward(x, scale, mean, rstd, dy, (interpret, widen))
  return dx, dshift.astype(shift.dtype), dscale.astype(scale.dtype)


_fused.defvjp(_fused_fwd, _fused_bwd)


def _per_platform(call, *args, mode: tuple[bool, bool | None]):
  """``call(*args, gpu=..., interpret=...)`` for the platform that compiles it: Triton's
  power-of-two blocks on GPUs, exact-width blocks elsewhere; ``mode`` = (interpret, widen)."""
  interpret, widen = mode
  if interpret or widen is not None:
    return call(*args, gpu=bool(widen), interpret=interpret)
  call = functools.partial(call, interpret=False)
  return lax.platform_dependent(*args, cuda=functools.partial(call, gpu=True),
                                rocm=functools.partial(call, gpu=True),
                                default=functools.partial(call, gpu=False))


def _layout(x: jax.Array, gpu: bool) -> tuple[int, int, tuple[int, int]]:
  """(rows a program takes, block width, grid) for x (B, S, d)."""
  b, s, d = x.shape
  rows = GPU_ROWS if gpu else OTHER_ROWS
  if s % rows:
    rows = s  # a whole image a program: always a legal block
  width = pl.next_power_of_2(d) if gpu else d
  return rows, width, (b, s // rows)


def _compiler_params(gpu: bool, interpret: bool):
  if interpret or not gpu:
    return None
  from jax.experimental.pallas import triton as pl_triton  # noqa: PLC0415 (GPU only)
  return pl_triton.CompilerParams(num_warps=4, num_stages=1)


def _forward(x, shift, scale, eps, mode):
  def call(x, shift, scale, *, gpu, interpret):
    rows, width, grid = _layout(x, gpu)
    b, s, d = x.shape
    row_block = pl.BlockSpec((None, rows, width), lambda i, j: (i, j, 0))
    vector = pl.BlockSpec((None, 1, width), lambda i, j: (i, 0, 0))
    stat = pl.BlockSpec((None, rows, 1), lambda i, j: (i, j, 0))
    kernel = functools.partial(_forward_kernel, model_width=d, eps=eps)
    return pl.pallas_call(
        kernel, grid=grid, in_specs=[row_block, vector, vector],
        out_specs=[row_block, stat, stat],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype),
                   jax.ShapeDtypeStruct((b, s, 1), jnp.float32),
                   jax.ShapeDtypeStruct((b, s, 1), jnp.float32)],
        interpret=interpret, compiler_params=_compiler_params(gpu, interpret),
        name="adaln_norm_modulate_fwd")(x, shift[:, None, :], scale[:, None, :])
  return _per_platform(call, x, shift, scale, mode=mode)


def _backward(x, scale, mean, rstd, dy, mode):
  def call(x, scale, mean, rstd, dy, *, gpu, interpret):
    rows, width, grid = _layout(x, gpu)
    b, _, d = x.shape
    row_block = pl.BlockSpec((None, rows, width), lambda i, j: (i, j, 0))
    vector = pl.BlockSpec((None, 1, width), lambda i, j: (i, 0, 0))
    stat = pl.BlockSpec((None, rows, 1), lambda i, j: (i, j, 0))
    partial_sum = pl.BlockSpec((None, None, 1, width), lambda i, j: (i, j, 0, 0))
    partial_shape = jax.ShapeDtypeStruct((b, grid[1], 1, d), jnp.float32)
    dx, dscale, dshift = pl.pallas_call(
        functools.partial(_backward_kernel, model_width=d), grid=grid,
        in_specs=[row_block, vector, stat, stat, row_block],
        out_specs=[row_block, partial_sum, partial_sum],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype), partial_shape, partial_shape],
        interpret=interpret, compiler_params=_compiler_params(gpu, interpret),
        name="adaln_norm_modulate_bwd")(x, scale[:, None, :], mean, rstd, dy)
    return dx, dscale.sum(axis=(1, 2)), dshift.sum(axis=(1, 2))
  return _per_platform(call, x, scale, mean, rstd, dy, mode=mode)


def _columns_in_model(shape: tuple[int, ...], model_width: int):
  """A mask of the block's columns inside the model width, or None where the block is exact."""
  if shape[-1] == model_width:
    return None
  return lax.broadcasted_iota(jnp.int32, shape, len(shape) - 1) < model_width


def _forward_kernel(x_ref, shift_ref, scale_ref, y_ref, mean_ref, rstd_ref, *, model_width, eps):
  x = x_ref[...].astype(jnp.float32)
  inside = _columns_in_model(x.shape, model_width)
  if inside is not None:  # past the model width a widened block holds anything: zero it
    x = jnp.where(inside, x, 0.0)
  mean = jnp.sum(x, axis=1, keepdims=True) / model_width
  centred = x - mean
  if inside is not None:
    centred = jnp.where(inside, centred, 0.0)
  rstd = lax.rsqrt(jnp.sum(centred * centred, axis=1, keepdims=True) / model_width + eps)
  scale = 1.0 + scale_ref[...].astype(jnp.float32)
  y_ref[...] = (centred * rstd * scale + shift_ref[...].astype(jnp.float32)).astype(y_ref.dtype)
  mean_ref[...] = mean
  rstd_ref[...] = rstd


def _backward_kernel(x_ref, scale_ref, mean_ref, rstd_ref, dy_ref, dx_ref, dscale_ref,
                     dshift_ref, *, model_width):
  x = x_ref[...].astype(jnp.float32)
  dy = dy_ref[...].astype(jnp.float32)
  rstd = rstd_ref[...]
  xhat = (x - mean_ref[...]) * rstd
  g = dy * (1.0 + scale_ref[...].astype(jnp.float32))
  inside = _columns_in_model(x.shape, model_width)
  if inside is not None:  # zeros past the model width, whatever x, dy and scale hold there
    xhat, dy, g = (jnp.where(inside, v, 0.0) for v in (xhat, dy, g))
  mean_g = jnp.sum(g, axis=1, keepdims=True) / model_width
  mean_gx = jnp.sum(g * xhat, axis=1, keepdims=True) / model_width
  dx_ref[...] = ((g - mean_g - xhat * mean_gx) * rstd).astype(dx_ref.dtype)
  dscale_ref[...] = jnp.sum(dy * xhat, axis=0, keepdims=True)
  dshift_ref[...] = jnp.sum(dy, axis=0, keepdims=True)
