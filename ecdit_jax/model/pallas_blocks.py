"""What the fused Pallas kernels share: the platform switch and the widened block reads.

One kernel body serves every backend: Triton on GPUs (values must be a power of two in every
dimension, so a block is loaded widened, by masked loads and stores that never touch memory past
the block), Mosaic on TPUs (exact-width blocks), and the Pallas interpreter anywhere
(``interpret=True``: how the tests check the kernels on a CPU against the XLA path). CPUs compile
no Pallas kernel: there each kernel's math runs as XLA ops, so a run trained with the kernels
samples on a laptop.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl


def per_platform(call, without_kernel, *args, mode: tuple[bool, bool | None],
                 tpu_kernel: bool = True):
  """``call(*args, gpu=..., interpret=...)`` for the platform that compiles it: values widened
  to a power of two on GPUs, blocks as they are on TPUs; on CPUs, which compile no Pallas
  kernel, ``without_kernel(*args)``, the same math in XLA ops (on TPUs too unless
  ``tpu_kernel``). ``mode`` = (interpret, widen): the interpreter, or a forced layout
  (widen=True: the GPU one)."""
  interpret, widen = mode
  if interpret or widen is not None:
    return call(*args, gpu=bool(widen), interpret=interpret)
  call = functools.partial(call, interpret=False)
  tpu = functools.partial(call, gpu=False) if tpu_kernel else without_kernel
  return lax.platform_dependent(*args, cuda=functools.partial(call, gpu=True),
                                rocm=functools.partial(call, gpu=True), tpu=tpu,
                                default=without_kernel)


def triton():
  from jax.experimental.pallas import triton as pl_triton  # noqa: PLC0415 (GPU layout only)
  return pl_triton


def triton_params(gpu: bool, interpret: bool, *, num_warps: int = 4, num_stages: int = 1):
  """Triton's compiler parameters for a compiled GPU kernel; None otherwise."""
  if interpret or not gpu:
    return None
  return triton().CompilerParams(num_warps=num_warps, num_stages=num_stages)


def inside(rows: int, width: int, model_width: int) -> jnp.ndarray:
  """The columns of a (rows, width) value that lie inside a block ``model_width`` wide."""
  return lax.broadcasted_iota(jnp.int32, (rows, width), 1) < model_width


def read(ref, width: int, rows=None, row_mask=None) -> jnp.ndarray:
  """A block (or, with ``rows`` a ``pl.ds``, those rows of it) as float32, widened to ``width``
  columns with zeros past its own, and zeros in the rows where ``row_mask`` (height, 1) is
  False (Triton's masked load: nothing outside is touched)."""
  rows = slice(None) if rows is None else rows
  model_width = ref.shape[1]
  if width == model_width and row_mask is None:
    return ref[rows, :].astype(jnp.float32)
  view = ref.at[rows, pl.ds(0, width)]
  mask = _mask(view.shape[0], width, model_width, row_mask)
  return triton().load(view, mask=mask, other=0.0).astype(jnp.float32)


def write(ref, value: jnp.ndarray, rows=None, row_mask=None) -> None:
  """Stores the block's own columns of a possibly widened ``value`` (into ``rows`` of it; only
  the rows where ``row_mask`` is True)."""
  rows = slice(None) if rows is None else rows
  model_width = ref.shape[1]
  if value.shape[1] == model_width and row_mask is None:
    ref[rows, :] = value.astype(ref.dtype)
  else:
    mask = _mask(value.shape[0], value.shape[1], model_width, row_mask)
    triton().store(ref.at[rows, pl.ds(0, value.shape[1])], value.astype(ref.dtype), mask=mask)


def _mask(height: int, width: int, model_width: int, row_mask):
  mask = inside(height, width, model_width)
  return mask if row_mask is None else mask & row_mask
