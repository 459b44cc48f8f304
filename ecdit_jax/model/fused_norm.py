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

One kernel body serves every backend (``pallas_blocks``): Triton on GPUs, blocks widened to a
power of two by masked loads; Mosaic on TPUs, exact-width blocks (a multiple of 128 in every
preset); the Pallas interpreter anywhere (the tests); the same two steps as XLA ops on CPUs.
On a mesh the kernel runs per device under ``shard_map`` over the batch, the dimension that the
activations are split along; the model width is never split in activations.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec as P

from ecdit_jax.model import pallas_blocks as blocks
from ecdit_jax.parallel import mesh as mesh_lib

# Rows a program takes: Triton keeps its (rows, width) values in registers, so few rows of a
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
  batch split as the activations are (None or one device: no ``shard_map``). ``widen``: load
  blocks widened to a power of two by masked loads, as Triton needs (True), or as they are
  (False); None: as the compiling platform needs (as they are in the interpreter)."""
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


def _forward_without_kernel(x, shift, scale, eps):
  """The forward kernel's outputs (y, mean, rstd) by XLA ops."""
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, axis=-1, keepdims=True)
  centred = xf - mean
  rstd = lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + eps)
  y = centred * rstd * (1.0 + scale.astype(jnp.float32)[:, None]) + shift.astype(
      jnp.float32)[:, None]
  return y.astype(x.dtype), mean, rstd


def _backward_without_kernel(x, scale, mean, rstd, dy):
  """The backward kernel's outputs (dx, dscale, dshift) by XLA ops."""
  xhat = (x.astype(jnp.float32) - mean) * rstd
  dyf = dy.astype(jnp.float32)
  g = dyf * (1.0 + scale.astype(jnp.float32)[:, None])
  dx = (g - jnp.mean(g, axis=-1, keepdims=True)
        - xhat * jnp.mean(g * xhat, axis=-1, keepdims=True)) * rstd
  return dx.astype(x.dtype), jnp.sum(dyf * xhat, axis=1), jnp.sum(dyf, axis=1)


def _layout(x: jax.Array, gpu: bool) -> tuple[int, int, tuple[int, int]]:
  """(rows a program takes, width it computes on, grid) for x (B, S, d). Blocks are always the
  exact width d; on GPUs the kernel loads them widened to a power of two (masked)."""
  b, s, d = x.shape
  if gpu:  # Triton's blocks are a power of two tall: the largest one up to GPU_ROWS dividing s
    rows = math.gcd(s, GPU_ROWS)
  else:
    rows = OTHER_ROWS if s % OTHER_ROWS == 0 else s  # else a whole image: always a legal block
  width = pl.next_power_of_2(d) if gpu else d
  return rows, width, (b, s // rows)


def _forward(x, shift, scale, eps, mode):
  def call(x, shift, scale, *, gpu, interpret):
    rows, width, grid = _layout(x, gpu)
    b, s, d = x.shape
    row_block = pl.BlockSpec((None, rows, d), lambda i, j: (i, j, 0))
    vector = pl.BlockSpec((None, 1, d), lambda i, j: (i, 0, 0))
    stat = pl.BlockSpec((None, rows, 1), lambda i, j: (i, j, 0))
    kernel = functools.partial(_forward_kernel, width=width, eps=eps)
    return pl.pallas_call(
        kernel, grid=grid, in_specs=[row_block, vector, vector],
        out_specs=[row_block, stat, stat],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype),
                   jax.ShapeDtypeStruct((b, s, 1), jnp.float32),
                   jax.ShapeDtypeStruct((b, s, 1), jnp.float32)],
        interpret=interpret, compiler_params=blocks.triton_params(gpu, interpret),
        name="adaln_norm_modulate_fwd")(x, shift[:, None, :], scale[:, None, :])
  return blocks.per_platform(call, functools.partial(_forward_without_kernel, eps=eps), x, shift,
                       scale, mode=mode)


def _backward(x, scale, mean, rstd, dy, mode):
  def call(x, scale, mean, rstd, dy, *, gpu, interpret):
    rows, width, grid = _layout(x, gpu)
    b, _, d = x.shape
    row_block = pl.BlockSpec((None, rows, d), lambda i, j: (i, j, 0))
    vector = pl.BlockSpec((None, 1, d), lambda i, j: (i, 0, 0))
    stat = pl.BlockSpec((None, rows, 1), lambda i, j: (i, j, 0))
    partial_sum = pl.BlockSpec((None, None, 1, d), lambda i, j: (i, j, 0, 0))
    partial_shape = jax.ShapeDtypeStruct((b, grid[1], 1, d), jnp.float32)
    dx, dscale, dshift = pl.pallas_call(
        functools.partial(_backward_kernel, width=width), grid=grid,
        in_specs=[row_block, vector, stat, stat, row_block],
        out_specs=[row_block, partial_sum, partial_sum],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype), partial_shape, partial_shape],
        interpret=interpret, compiler_params=blocks.triton_params(gpu, interpret),
        name="adaln_norm_modulate_bwd")(x, scale[:, None, :], mean, rstd, dy)
    return dx, dscale.sum(axis=(1, 2)), dshift.sum(axis=(1, 2))
  return blocks.per_platform(call, _backward_without_kernel, x, scale, mean, rstd, dy, mode=mode)


def _forward_kernel(x_ref, shift_ref, scale_ref, y_ref, mean_ref, rstd_ref, *, width, eps):
  model_width = x_ref.shape[1]
  x = blocks.read(x_ref, width)  # zeros past the model width: they add nothing to the sums
  mean = jnp.sum(x, axis=1, keepdims=True) / model_width
  centred = x - mean
  if width != model_width:
    centred = jnp.where(blocks.inside(x_ref.shape[0], width, model_width), centred, 0.0)
  rstd = lax.rsqrt(jnp.sum(centred * centred, axis=1, keepdims=True) / model_width + eps)
  modulated = centred * rstd * (1.0 + blocks.read(scale_ref, width))
  blocks.write(y_ref, modulated + blocks.read(shift_ref, width))
  mean_ref[...] = mean
  rstd_ref[...] = rstd


def _backward_kernel(x_ref, scale_ref, mean_ref, rstd_ref, dy_ref, dx_ref, dscale_ref,
                     dshift_ref, *, width):
  model_width = x_ref.shape[1]
  rstd = rstd_ref[...]
  xhat = (blocks.read(x_ref, width) - mean_ref[...]) * rstd
  if width != model_width:  # the widened columns: x = 0 there, so xhat = -mean * rstd
    xhat = jnp.where(blocks.inside(x_ref.shape[0], width, model_width), xhat, 0.0)
  dy = blocks.read(dy_ref, width)  # zeros past the model width, and so is g
  g = dy * (1.0 + blocks.read(scale_ref, width))
  mean_g = jnp.sum(g, axis=1, keepdims=True) / model_width
  mean_gx = jnp.sum(g * xhat, axis=1, keepdims=True) / model_width
  blocks.write(dx_ref, (g - mean_g - xhat * mean_gx) * rstd)
  blocks.write(dscale_ref, jnp.sum(dy * xhat, axis=0, keepdims=True))
  blocks.write(dshift_ref, jnp.sum(dy, axis=0, keepdims=True))
