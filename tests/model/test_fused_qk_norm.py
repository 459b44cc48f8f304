"""The fused qk-norm kernels (model/fused_qk_norm.py) against the XLA path: outputs and gradients
in the Pallas interpreter in both layouts (the GPU loop and the TPU grid), with several blocks a
program, on a mesh with the heads split, and inside the DiT; and the kernels lowered for GPUs
(Triton) and TPUs (Mosaic) on this CPU."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ecdit_jax.model import fused_qk_norm
from ecdit_jax.parallel import axes
from ecdit_jax.parallel import mesh as mesh_lib
from tests.tiny import (assert_same_loss_and_grads, dit_runs_by, tiny_model_config,
                        value_and_grads)

EPS = 1e-6


def _inputs(shape, dtype=jnp.float32, seed=0):
  *_, heads, d = shape
  keys = jax.random.split(jax.random.key(seed), 4)
  z = 2 * jax.random.normal(keys[0], shape) + 0.5  # rows far from zero mean and unit spread
  bias = jax.random.normal(keys[1], (heads, d))
  scale = 1 + 0.3 * jax.random.normal(keys[2], (d,))
  dy = jax.random.normal(keys[3], shape)
  return tuple(a.astype(dtype) for a in (z, bias, scale, dy))


def _numpy_reference(z, bias, scale):
  u = np.asarray(z, np.float64) + np.asarray(bias, np.float64)
  return u / np.sqrt(np.mean(u * u, axis=-1, keepdims=True) + EPS) * np.asarray(scale)


def test_the_xla_reference_is_the_projection_bias_then_rms_norm():
  z, bias, scale, _ = _inputs((2, 8, 4, 24))
  np.testing.assert_allclose(fused_qk_norm.reference(z, bias, scale, EPS),
                             _numpy_reference(z, bias, scale), rtol=1e-5, atol=1e-5)


def _check(got, want, tol):
  for name, g, w in zip(("y", "dz", "dbias", "dscale"), got, want):
    assert g.shape == w.shape and g.dtype == w.dtype, name
    # dbias and dscale sum over every token: compare relative to their size.
    size = max(1.0, float(np.abs(w).max())) if name in ("dbias", "dscale") else 1.0
    np.testing.assert_allclose(np.asarray(g, np.float32) / size,
                               np.asarray(w, np.float32) / size, rtol=tol, atol=tol,
                               err_msg=name)


# (B, S, H, D): GPU blocks of 4 tokens of 4 heads; 6 heads (GPU blocks of 6 rows loaded 8
# tall, a TPU block of the whole array); a width not a power of two (the GPU layout widens it);
# 3 heads (GPU blocks of 5 tokens, the last one cut short by the array's end); 18 heads (more
# rows than GPU_ROWS: one token a block, loaded 32 rows tall).
SHAPES = [(2, 32, 4, 24), (2, 16, 6, 40), (1, 64, 16, 72), (3, 8, 3, 8), (1, 20, 18, 16)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("widen", [False, True], ids=["grid", "loop"])
@pytest.mark.parametrize("programs", [None, 2], ids=["one-block-each", "several-blocks-each"])
def test_kernels_match_xla_outputs_and_gradients(shape, widen, programs, monkeypatch):
  if programs:  # few programs, small TPU blocks: each program takes several blocks in turn
    monkeypatch.setattr(fused_qk_norm, "GPU_PROGRAMS", programs)
    monkeypatch.setattr(fused_qk_norm, "OTHER_PROGRAMS", programs)
    monkeypatch.setattr(fused_qk_norm, "OTHER_ROWS", 16)
  n = int(np.prod(shape[:3]))
  layout = fused_qk_norm._layout(n, shape[3], shape[2], widen)
  if programs:  # unless a TPU block is the whole array (heads 3 and 6 here)
    assert layout.steps > 1 or (not widen and layout.rows == n)
  inputs = _inputs(shape)
  want = value_and_grads(lambda *a: fused_qk_norm.reference(*a, EPS), *inputs)
  got = value_and_grads(
      lambda *a: fused_qk_norm.bias_rms_norm(*a, eps=EPS, interpret=True, widen=widen), *inputs)
  _check(got, want, 3e-5)


@pytest.mark.parametrize("tokens,heads", [(16384, 16), (16384, 18), (77 * 4, 16), (100, 12),
                                          (7, 3), (16384, 24), (16384, 36), (16384, 48)])
def test_the_layouts_cover_every_row_once(tokens, heads):
  """A block is whole tokens, so its rows fold onto the heads. On GPUs it is loaded a power of
  two tall, at most GPU_ROWS unless one token's heads are more, and the programs' blocks cover
  the rows, the last step's blocks possibly past the end; on TPUs the blocks tile the rows."""
  n = tokens * heads
  layout = fused_qk_norm._layout(n, 72, heads, gpu=True)
  blocks = -(-n // layout.rows)
  assert layout.rows % heads == 0 and layout.rows <= layout.height < 2 * layout.rows
  assert layout.height & (layout.height - 1) == 0 and layout.width == 128
  assert layout.height <= max(fused_qk_norm.GPU_ROWS, 2 * heads)
  assert layout.programs * (layout.steps - 1) < blocks <= layout.programs * layout.steps
  layout = fused_qk_norm._layout(n, 72, heads, gpu=False)
  assert layout.programs * layout.steps * layout.rows == n and layout.rows % heads == 0
  assert layout.rows % 8 == 0 or layout.rows == n


def test_compiled_for_a_cpu_the_same_steps_run_as_xla_ops():
  """No Pallas kernel compiles for a CPU: there both directions are XLA ops with the kernels'
  results (a run trained on GPUs with the kernels samples on a laptop)."""
  inputs = _inputs((2, 24, 4, 40))
  assert jax.default_backend() == "cpu"
  fused = lambda *a: fused_qk_norm.bias_rms_norm(*a, eps=EPS)
  got = jax.jit(lambda *a: value_and_grads(fused, *a))(*inputs)
  want = value_and_grads(lambda *a: fused_qk_norm.reference(*a, EPS), *inputs)
  _check(got, want, 2e-5)


def test_bfloat16_inputs_give_bfloat16_results_close_to_the_float32_ones():
  z, bias, scale, dy = _inputs((2, 32, 4, 64))
  want = value_and_grads(lambda *a: fused_qk_norm.reference(*a, EPS), z, bias, scale, dy)
  z16, dy16 = z.astype(jnp.bfloat16), dy.astype(jnp.bfloat16)
  got = value_and_grads(lambda *a: fused_qk_norm.bias_rms_norm(*a, eps=EPS, interpret=True),
                         z16, bias, scale, dy16)
  assert got[0].dtype == got[1].dtype == jnp.bfloat16 and got[2].dtype == jnp.float32
  _check([g.astype(w.dtype) for g, w in zip(got, want)], want, 5e-2)


def test_on_a_mesh_each_device_normalises_its_batch_and_heads():
  mesh = mesh_lib.create_mesh(mesh_lib.MeshConfig.parse("data=2,fsdp=2,tensor=2"),
                              jax.devices()[:8])
  inputs = _inputs((8, 16, 4, 32))
  fused = lambda m: lambda *b: fused_qk_norm.bias_rms_norm(
      *b, eps=EPS, head_axis=axes.HEADS, mesh=m, interpret=True)
  run = lambda m: jax.jit(lambda *a: value_and_grads(fused(m), *a))(*inputs)
  assert "shard_map" in str(jax.make_jaxpr(fused(mesh))(*inputs[:3]))
  for got, want in zip(run(mesh), run(None)):  # dscale: summed over devices in another order
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_the_dit_trains_the_same_with_the_fused_qk_norm():
  runs = dit_runs_by("qk_norm_impl")
  # Queries and keys of self- and cross-attention in each block: 4 kernel pairs a block.
  assert runs["xla"][0] == 0 and runs["pallas_interpret"][0] == 4 * tiny_model_config().num_layers
  assert_same_loss_and_grads(runs["pallas_interpret"], runs["xla"])


@pytest.mark.parametrize("platform,custom_call", [("cuda", "__gpu$xla.gpu.triton"),
                                                  ("tpu", "tpu_custom_call")])
@pytest.mark.parametrize("heads,d", [(16, 72), (18, 64)])
def test_the_kernels_lower_for_gpus_and_tpus(platform, custom_call, heads, d):
  """Lowered (not run) on this CPU at an XL model's shapes, heads 72 and 64 wide: Triton's loop
  over blocks of a power of two, Mosaic's grid of exact blocks, forward and backward."""
  args = [jax.ShapeDtypeStruct((8, 256, heads, d), jnp.bfloat16),
          jax.ShapeDtypeStruct((heads, d), jnp.float32), jax.ShapeDtypeStruct((d,), jnp.float32)]
  loss = lambda *a: jnp.sum(fused_qk_norm.bias_rms_norm(*a, eps=EPS).astype(jnp.float32))
  try:
    exported = jax.export.export(
        jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=[platform],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(custom_call)])(*args)
  except RuntimeError as error:  # newer jax: Triton lowers only where a GPU is
    if "No supported GPU devices" not in str(error):
      raise
    pytest.skip("this jax lowers Triton kernels only on a machine with a GPU")
  assert exported.mlir_module().count(f"@{custom_call}(") == 2


def test_auto_lowers_no_kernel_for_tpus():
  """``qk_norm_impl="auto"`` (``tpu_kernel=False``): on TPUs, where the kernels are untimed, the
  same math in XLA ops, with no Mosaic kernel in the program; the GPU branch keeps Triton's."""
  args = [jax.ShapeDtypeStruct((8, 256, 18, 64), jnp.bfloat16),
          jax.ShapeDtypeStruct((18, 64), jnp.float32), jax.ShapeDtypeStruct((64,), jnp.float32)]
  loss = lambda *a, tpu_kernel: jnp.sum(fused_qk_norm.bias_rms_norm(
      *a, eps=EPS, tpu_kernel=tpu_kernel).astype(jnp.float32))
  for tpu_kernel, kernels in ((True, 2), (False, 0)):
    step = jax.jit(jax.grad(functools.partial(loss, tpu_kernel=tpu_kernel), argnums=(0, 1, 2)))
    exported = jax.export.export(step, platforms=["tpu"], disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call("tpu_custom_call")])(*args)
    assert exported.mlir_module().count("@tpu_custom_call(") == kernels


@pytest.mark.skipif(jax.default_backend() != "gpu",
                    reason="the compiled kernels need a GPU (run with JAX_PLATFORMS=cuda)")
@pytest.mark.parametrize("shape", [(64, 256, 16, 72), (64, 256, 18, 64), (16, 77, 16, 72)])
def test_on_a_gpu_the_compiled_kernels_match_xla(shape):
  """The Triton kernels themselves, in bfloat16 at an XL model's shapes (self-attention, heads
  64 wide, and text keys), against XLA's float32 math."""
  z, bias, scale, dy = _inputs(shape)
  fused = lambda *a: fused_qk_norm.bias_rms_norm(*a, eps=EPS)
  got = jax.jit(lambda *a: value_and_grads(fused, *a))(
      z.astype(jnp.bfloat16), bias, scale, dy.astype(jnp.bfloat16))
  want = jax.jit(lambda *a: value_and_grads(
      lambda *b: fused_qk_norm.reference(*b, EPS), *a))(
      z.astype(jnp.bfloat16).astype(jnp.float32), bias, scale,
      dy.astype(jnp.bfloat16).astype(jnp.float32))
  assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in got)
  _check([g.astype(w.dtype) for g, w in zip(got, want)], want, 5e-2)
