"""The qk-norm with its projection's bias, ``RMSNorm(z + bias) * scale`` per head, in Pallas.

Every attention layer normalises its queries and keys per head (head_dim wide, 64 to 96 in the
presets). XLA fuses the projection's bias into the norm, but spends separate reduction fusions on
the bias and scale gradients (column sums over every token): in an H100 profile of EC-XL-8E
(16 heads of 72) the qk-norm and the bias took 9% of the step. Here each direction is one kernel
over the (tokens x heads, head_dim) row view:

* forward: ``u = z + bias`` (rounded to z's dtype, as the XLA path adds them), its row's inverse
  RMS ``rstd`` in float32 (kept for the backward pass), ``y = u * rstd * scale``;
* backward: ``du = rstd * (g - xhat * mean(g * xhat))`` with ``g = dy * scale`` and
  ``xhat = u * rstd``; ``dz = du`` (u is recomputed from z, which the backward pass keeps anyway),
  and each program's running sums of ``du`` by row (``dbias``, folded by head afterwards) and of
  ``dy * xhat`` (``dscale``).

A block is ``rows`` consecutive rows of the view, whole tokens, so row r of every block holds
head r % H. Each of ``programs`` programs takes blocks p, p + programs, ... in turn, keeping the
gradient sums, which leave as one partial sum per program for XLA to add up. On GPUs (Triton)
that is a loop inside the program over blocks loaded a power of two tall and wide (masked loads
and stores: rows past the block or the array, columns past head_dim); on TPUs (Mosaic) it is
the grid's second, sequential axis over exact blocks, the sums accumulated in the programs'
output blocks. The interpreter runs either (``widen``), which is how the tests check both.

Measured on one H200 (bench/records/2026-12-05_h200_qk-norm-kernel): the EC-XL-8E step at batch
64 went from 349.1 to 358.3 model TFLOP/s with 16 heads. Heads that are no power of two (the
presets' 18, 24, 36, 48) load blocks with masked rows: with 18 heads the step went from 330.6 to
340.2 on one H100 (bench/records/2026-12-05_h100_qk-norm-18-heads-and-expert-major-dispatch).

On a mesh the kernels run per device under ``shard_map``: batch over the data-like axes, heads
over the tensor axis, as the attention's activations are laid out.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ecdit_jax.model import pallas_blocks as blocks
from ecdit_jax.parallel import axes
from ecdit_jax.parallel import mesh as mesh_lib

# GPUs: the most rows a loop step loads (a power of two; more only when one token's heads are
# more), the most programs (a few per multiprocessor; a divisor of the blocks if one lies in
# the upper half), the fewest warps a program (more for taller blocks), and the pipeline stages
# of the loop's loads. The measured kernels (16 heads of 72) ran 512 programs of 16 rows, 4
# warps, 3 stages.
GPU_ROWS = 16
GPU_PROGRAMS = 528
GPU_WARPS = 4
GPU_STAGES = 3
# TPUs: rows a grid step takes (VMEM blocks: more rows amortise a step) and parallel programs.
OTHER_ROWS = 512
OTHER_PROGRAMS = 8


def reference(z: jax.Array, bias: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """The XLA path: the projection's bias added in z's dtype, then HeadRMSNorm's float32 math."""
  u = (z + bias.astype(z.dtype)).astype(jnp.float32)
  normed = u * lax.rsqrt(jnp.mean(u * u, axis=-1, keepdims=True) + eps)
  return (normed * scale.astype(jnp.float32)).astype(z.dtype)


def bias_rms_norm(z: jax.Array, bias: jax.Array, scale: jax.Array, *, eps: float,
                  head_axis: str = axes.HEADS, mesh=None, interpret: bool = False,
                  widen: bool | None = None, tpu_kernel: bool = True) -> jax.Array:
  """``reference(z, bias, scale)`` by the fused kernels, differentiable in all three: z
  (B, S, H, D) (a projection's output without its bias), bias (H, D), scale (D,). ``head_axis``:
  the logical axis of z's heads (queries' or keys'); ``mesh``: run per device with the
  activations' layout (None or one device: no ``shard_map``). ``widen``: the GPU layout (True),
  the TPU one (False), or the compiling platform's (None; the TPU one in the interpreter).
  ``tpu_kernel=False``: on TPUs the same math in XLA ops instead of the Mosaic kernels."""
  fn = functools.partial(_per_device, eps=eps, mode=(interpret, widen, tpu_kernel))
  bias = bias.astype(z.dtype)  # added in z's dtype; its gradient returns through this cast
  if mesh is None or mesh.size == 1:
    return fn(z, bias, scale)
  names = (mesh_lib.BATCH, None, head_axis, axes.HEAD_DIM)
  rows = mesh_lib.logical_to_mesh(names, z.shape, mesh)
  heads = jax.sharding.PartitionSpec(*rows[2:])
  return jax.shard_map(fn, mesh=mesh, in_specs=(rows, heads, jax.sharding.PartitionSpec()),
                       out_specs=rows, check_vma=False)(z, bias, scale)


def _per_device(z, bias, scale, *, eps, mode):
  shape = z.shape
  y = _fused(z.reshape(-1, shape[-1]), bias, scale, eps, mode)
  return y.reshape(shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fused(z, bias, scale, eps, mode):
  return _forward(z, bias, scale, eps, mode)[0]


def _fused_fwd(z, bias, scale, eps, mode):
  y, rstd = _forward(z, bias, scale, eps, mode)
  return y, (z, bias, scale, rstd)


def _fused_bwd(eps, mode, residuals, dy):
  del eps
  z, bias, scale, rstd = residuals
  dz, dbias, dscale = _backward(z, bias, scale, rstd, dy, mode)
  return dz, dbias.astype(bias.dtype), dscale.astype(scale.dtype)


_fused.defvjp(_fused_fwd, _fused_bwd)


@dataclasses.dataclass(frozen=True)
class _Layout:
  """How the (n, d) row view of z is cut. A block is ``rows`` consecutive rows: whole tokens,
  so every block holds the heads in the same places and reads one tiling of the bias.
  ``programs`` run in parallel, each taking ``steps`` blocks (program p: blocks p, p +
  programs, ...). On GPUs a block is loaded ``height`` rows tall (a power of two), the rows past
  the block or past the array masked; on TPUs blocks are exact and tile the array."""
  n: int
  rows: int
  height: int
  programs: int
  steps: int
  width: int  # the width the kernels compute on: d, or on GPUs d widened to a power of two

  @property
  def exact(self) -> bool:  # every loaded row belongs to a block inside the array
    return self.height == self.rows and self.programs * self.steps * self.rows == self.n

  @property
  def warps(self) -> int:  # about 16 values a thread for each (height, width) value
    return min(16, max(GPU_WARPS, self.height * self.width // 512))


def _layout(n: int, d: int, heads: int, gpu: bool) -> _Layout:
  tokens = n // heads
  if gpu:  # the most rows loaded that belong to the block, in at most GPU_ROWS loaded rows
    per_block = max(range(1, max(1, GPU_ROWS // heads) + 1),
                    key=lambda m: (m * heads / pl.next_power_of_2(m * heads), -m))
    rows = per_block * heads
    height = pl.next_power_of_2(rows)
    count = -(-n // rows)  # the last block may be cut short by the array's end
  else:  # Mosaic: a multiple of 8 rows (and of h) dividing n, or else the whole array
    rows = next((r for r in range(OTHER_ROWS - OTHER_ROWS % heads, 0, -heads)
                 if r % 8 == 0 and tokens % (r // heads) == 0), n)
    height, count = rows, n // rows
  if gpu:  # a divisor of the blocks if one is near GPU_PROGRAMS: then no block is masked
    programs = next((c for c in range(min(count, GPU_PROGRAMS), GPU_PROGRAMS // 2, -1)
                     if count % c == 0), min(count, GPU_PROGRAMS))
  else:  # the grid must tile: a divisor of the blocks
    programs = next(c for c in range(min(count, OTHER_PROGRAMS), 0, -1) if count % c == 0)
  return _Layout(n, rows, height, programs, -(-count // programs),
                 pl.next_power_of_2(d) if gpu else d)


def _bias_array(bias: jax.Array, layout: _Layout) -> jax.Array:
  """The bias rows of one block: (h, d) tiled over the block's tokens."""
  return jnp.tile(bias, (layout.rows // bias.shape[0], 1))


def _forward_math(z, bias, scale, *, d, eps, dtype):
  u = (z + bias).astype(dtype).astype(jnp.float32)  # the XLA path adds in z's dtype
  rstd = lax.rsqrt(jnp.sum(u * u, axis=1, keepdims=True) / d + eps)
  return u * rstd * scale, rstd


def _backward_math(z, bias, scale, rstd, dy, *, d, dtype):
  xhat = (z + bias).astype(dtype).astype(jnp.float32) * rstd
  g = dy * scale
  du = (g - xhat * (jnp.sum(g * xhat, axis=1, keepdims=True) / d)) * rstd
  return du, jnp.sum(dy * xhat, axis=0, keepdims=True)


def _forward_without_kernel(z, bias, scale, eps):
  """The forward kernel's outputs (y, rstd) by XLA ops."""
  tiled = jnp.tile(bias, (z.shape[0] // bias.shape[0], 1)).astype(jnp.float32)
  y, rstd = _forward_math(z.astype(jnp.float32), tiled, scale.astype(jnp.float32)[None],
                          d=z.shape[1], eps=eps, dtype=z.dtype)
  return y.astype(z.dtype), rstd


def _backward_without_kernel(z, bias, scale, rstd, dy):
  """The backward kernel's outputs (dz, dbias, dscale) by XLA ops."""
  heads, d = bias.shape
  tiled = jnp.tile(bias, (z.shape[0] // heads, 1)).astype(jnp.float32)
  du, dscale = _backward_math(z.astype(jnp.float32), tiled, scale.astype(jnp.float32)[None],
                              rstd, dy.astype(jnp.float32), d=d, dtype=z.dtype)
  return du.astype(z.dtype), du.reshape(-1, heads, d).sum(0), dscale[0]


def _compiler_params(layout: _Layout, gpu: bool, interpret: bool):
  """Triton's warps and stages; on TPUs, the grid's second axis revisits each program's sums,
  so it runs in order on a core."""
  if interpret:
    return None
  if gpu:
    return blocks.triton_params(gpu, interpret, num_warps=layout.warps, num_stages=GPU_STAGES)
  from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415 (TPU layout only)
  return pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"))


def _specs(layout: _Layout, d: int, gpu: bool):
  """(row block, bias, scale, rstd, per-program sum) BlockSpecs: whole arrays that the GPU loop
  slices itself, or the grid's (program i, step k) blocks."""
  per_program = (lambda i: (i, 0, 0)) if gpu else (lambda i, k: (i, 0, 0))
  sums = lambda height: pl.BlockSpec((None, height, d), per_program)
  if gpu:
    whole = pl.BlockSpec()
    return whole, whole, whole, whole, sums
  rows, programs = layout.rows, layout.programs
  row_block = pl.BlockSpec((rows, d), lambda i, k: (i + k * programs, 0))
  return (row_block, pl.BlockSpec((rows, d), lambda i, k: (0, 0)),
          pl.BlockSpec((1, d), lambda i, k: (0, 0)),
          pl.BlockSpec((rows, 1), lambda i, k: (i + k * programs, 0)), sums)


def _grid(layout: _Layout, gpu: bool):
  return (layout.programs,) if gpu else (layout.programs, layout.steps)


def _forward(z, bias, scale, eps, mode):
  def call(z, bias, scale, *, gpu, interpret):
    (n, d), heads = z.shape, bias.shape[0]
    layout = _layout(n, d, heads, gpu)
    row_block, bias_spec, scale_spec, stat, _ = _specs(layout, d, gpu)
    body = _forward_loop_kernel if gpu else _forward_grid_kernel
    return pl.pallas_call(
        functools.partial(body, layout=layout, eps=eps), grid=_grid(layout, gpu),
        in_specs=[row_block, bias_spec, scale_spec], out_specs=[row_block, stat],
        out_shape=[jax.ShapeDtypeStruct(z.shape, z.dtype),
                   jax.ShapeDtypeStruct((n, 1), jnp.float32)],
        interpret=interpret,
        compiler_params=_compiler_params(layout, gpu, interpret),
        name="qk_bias_rms_norm_fwd")(z, _bias_array(bias, layout), scale[None])
  return blocks.per_platform(call, functools.partial(_forward_without_kernel, eps=eps), z, bias,
                             scale, mode=mode[:2], tpu_kernel=mode[2])


def _backward(z, bias, scale, rstd, dy, mode):
  def call(z, bias, scale, rstd, dy, *, gpu, interpret):
    (n, d), heads = z.shape, bias.shape[0]
    layout = _layout(n, d, heads, gpu)
    row_block, bias_spec, scale_spec, stat, sums = _specs(layout, d, gpu)
    body = _backward_loop_kernel if gpu else _backward_grid_kernel
    dz, dbias, dscale = pl.pallas_call(
        functools.partial(body, layout=layout), grid=_grid(layout, gpu),
        in_specs=[row_block, bias_spec, scale_spec, stat, row_block],
        out_specs=[row_block, sums(layout.height), sums(1)],
        out_shape=[jax.ShapeDtypeStruct(z.shape, z.dtype),
                   jax.ShapeDtypeStruct((layout.programs, layout.height, d), jnp.float32),
                   jax.ShapeDtypeStruct((layout.programs, 1, d), jnp.float32)],
        interpret=interpret,
        compiler_params=_compiler_params(layout, gpu, interpret),
        name="qk_bias_rms_norm_bwd")(z, _bias_array(bias, layout), scale[None], rstd, dy)
    # Row r of every block holds head r % h: fold the programs' sums by head.
    dbias = dbias[:, :layout.rows].reshape(-1, heads, d).sum(0)
    return dz, dbias, dscale.sum((0, 1))
  return blocks.per_platform(call, _backward_without_kernel, z, bias, scale, rstd, dy,
                             mode=mode[:2], tpu_kernel=mode[2])


def _loop_block(layout: _Layout, program, step):
  """The rows of ``program``'s ``step``-th block, loaded ``height`` tall, and which of them
  belong to the block and lie inside the array (GPU loop)."""
  start = (program + step * layout.programs) * layout.rows
  rows = pl.ds(pl.multiple_of(start, layout.rows & -layout.rows), layout.height)
  if layout.exact:
    return rows, None
  row = lax.broadcasted_iota(jnp.int32, (layout.height, 1), 0)
  return rows, (row < layout.rows) & (start + row < layout.n)


def _loop_constants(bias_ref, scale_ref, layout: _Layout):
  """A block's bias rows (zeros below them) and the scale (GPU loop)."""
  row = lax.broadcasted_iota(jnp.int32, (layout.height, 1), 0)
  in_block = None if layout.height == layout.rows else row < layout.rows
  bias = blocks.read(bias_ref, layout.width, pl.ds(0, layout.height), in_block)
  return bias, blocks.read(scale_ref, layout.width)


def _forward_loop_kernel(z_ref, bias_ref, scale_ref, y_ref, rstd_ref, *, layout, eps):
  program = pl.program_id(0)  # read here: the interpreter has none inside the loop
  bias, scale = _loop_constants(bias_ref, scale_ref, layout)

  def step(k, carry):
    rows, valid = _loop_block(layout, program, k)
    y, rstd = _forward_math(blocks.read(z_ref, layout.width, rows, valid), bias, scale,
                            d=z_ref.shape[1], eps=eps, dtype=z_ref.dtype)
    blocks.write(y_ref, y, rows, valid)
    blocks.write(rstd_ref, rstd, rows, valid)
    return carry

  lax.fori_loop(0, layout.steps, step, 0)


def _backward_loop_kernel(z_ref, bias_ref, scale_ref, rstd_ref, dy_ref, dz_ref, dbias_ref,
                          dscale_ref, *, layout):
  program = pl.program_id(0)  # read here: the interpreter has none inside the loop
  bias, scale = _loop_constants(bias_ref, scale_ref, layout)

  def step(k, sums):  # rows outside the block read as zeros and add nothing to the sums
    rows, valid = _loop_block(layout, program, k)
    du, dscale = _backward_math(blocks.read(z_ref, layout.width, rows, valid), bias, scale,
                                blocks.read(rstd_ref, 1, rows, valid),
                                blocks.read(dy_ref, layout.width, rows, valid),
                                d=z_ref.shape[1], dtype=z_ref.dtype)
    blocks.write(dz_ref, du, rows, valid)
    return sums[0] + du, sums[1] + dscale

  zeros = (jnp.zeros((layout.height, layout.width), jnp.float32),
           jnp.zeros((1, layout.width), jnp.float32))
  dbias, dscale = lax.fori_loop(0, layout.steps, step, zeros)
  blocks.write(dbias_ref, dbias)
  blocks.write(dscale_ref, dscale)


def _forward_grid_kernel(z_ref, bias_ref, scale_ref, y_ref, rstd_ref, *, layout, eps):
  del layout
  f32 = lambda ref: ref[...].astype(jnp.float32)
  y, rstd = _forward_math(f32(z_ref), f32(bias_ref), f32(scale_ref), d=z_ref.shape[1], eps=eps,
                          dtype=z_ref.dtype)
  y_ref[...] = y.astype(y_ref.dtype)
  rstd_ref[...] = rstd


def _backward_grid_kernel(z_ref, bias_ref, scale_ref, rstd_ref, dy_ref, dz_ref, dbias_ref,
                          dscale_ref, *, layout):
  del layout

  @pl.when(pl.program_id(1) == 0)
  def _():
    dbias_ref[...] = jnp.zeros(dbias_ref.shape, jnp.float32)
    dscale_ref[...] = jnp.zeros(dscale_ref.shape, jnp.float32)

  f32 = lambda ref: ref[...].astype(jnp.float32)
  du, dscale = _backward_math(f32(z_ref), f32(bias_ref), f32(scale_ref), rstd_ref[...],
                              f32(dy_ref), d=z_ref.shape[1], dtype=z_ref.dtype)
  dz_ref[...] = du.astype(dz_ref.dtype)
  dbias_ref[...] += du
  dscale_ref[...] += dscale
