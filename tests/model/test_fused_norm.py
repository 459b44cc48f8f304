"""The fused adaLN norm-and-modulate kernels (model/fused_norm.py) against the XLA path: outputs
and gradients in the Pallas interpreter, in both block layouts, on a mesh and inside the DiT;
and the same kernels lowered for GPUs (Triton) and TPUs (Mosaic) on this CPU."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ecdit_jax.model import fused_norm
from ecdit_jax.parallel import mesh as mesh_lib
from tests.tiny import assert_same_loss_and_grads, dit_runs_by, value_and_grads

EPS = 1e-6


def _inputs(shape, dtype=jnp.float32, seed=0):
  b, _, d = shape
  keys = jax.random.split(jax.random.key(seed), 4)
  x = 3 * jax.random.normal(keys[0], shape) + 1  # a mean and spread far from 0 and 1
  shift, scale = (jax.random.normal(k, (b, d)) for k in keys[1:3])
  dy = jax.random.normal(keys[3], shape)
  return tuple(a.astype(dtype) for a in (x, shift, scale, dy))


def _layer_norm_numpy(x, shift, scale):
  x = np.asarray(x, np.float64)
  normed = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + EPS)
  return normed * (1 + np.asarray(scale, np.float64)[:, None]) + np.asarray(shift)[:, None]


def test_the_xla_reference_is_layer_norm_then_modulate():
  x, shift, scale, _ = _inputs((2, 8, 24))
  np.testing.assert_allclose(fused_norm.reference(x, shift, scale, EPS),
                             _layer_norm_numpy(x, shift, scale), rtol=1e-5, atol=1e-5)


# (B, S, d): rows that fill several row blocks, rows that do not divide into blocks (a whole
# image a program), a width that is not a power of two (the GPU layout widens and masks it).
@pytest.mark.parametrize("shape", [(2, 256, 48), (3, 12, 40), (1, 16, 64)])
@pytest.mark.parametrize("widen", [False, True], ids=["exact", "widened"])
def test_kernels_match_xla_outputs_and_gradients(shape, widen):
  inputs = _inputs(shape)
  want = value_and_grads(lambda *a: fused_norm.reference(*a, EPS), *inputs)
  got = value_and_grads(
      lambda *a: fused_norm.norm_modulate(*a, eps=EPS, interpret=True, widen=widen), *inputs)
  for name, g, w in zip(("y", "dx", "dshift", "dscale"), got, want):
    assert g.shape == w.shape and g.dtype == w.dtype, name
    np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5, err_msg=name)


def test_compiled_for_a_cpu_the_same_steps_run_as_xla_ops():
  """No Pallas kernel compiles for a CPU: there the forward and backward steps are XLA ops with
  the kernels' results (a run trained on GPUs with the kernels samples on a laptop)."""
  inputs = _inputs((2, 24, 40))
  fused = lambda *a: fused_norm.norm_modulate(*a, eps=EPS)
  assert jax.default_backend() == "cpu"
  got = jax.jit(lambda *a: value_and_grads(fused, *a))(*inputs)
  want = value_and_grads(lambda *a: fused_norm.reference(*a, EPS), *inputs)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5)


def test_bfloat16_inputs_give_bfloat16_results_close_to_the_float32_ones():
  inputs = _inputs((2, 32, 64))
  want = value_and_grads(lambda *a: fused_norm.reference(*a, EPS), *inputs)
  low = tuple(a.astype(jnp.bfloat16) for a in inputs)
  got = value_and_grads(lambda *a: fused_norm.norm_modulate(*a, eps=EPS, interpret=True), *low)
  for g, w in zip(got, want):
    assert g.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(g, np.float32), w, rtol=5e-2, atol=5e-2)


def test_on_a_mesh_each_device_normalises_its_share_of_the_batch():
  mesh = mesh_lib.create_mesh(mesh_lib.MeshConfig.parse("data=2,fsdp=4"), jax.devices()[:8])
  inputs = _inputs((8, 16, 32))
  run = lambda m: jax.jit(lambda *a: value_and_grads(
      lambda *b: fused_norm.norm_modulate(*b, eps=EPS, mesh=m, interpret=True), *a))(*inputs)
  program = str(jax.make_jaxpr(
      lambda *a: fused_norm.norm_modulate(*a, eps=EPS, mesh=mesh, interpret=True))(*inputs[:3]))
  assert "shard_map" in program
  for got, want in zip(run(mesh), run(None)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_the_dit_trains_the_same_with_the_fused_kernels():
  runs = dit_runs_by("norm_impl")
  # Five kernel pairs (two norms in each of two blocks, one in the final layer) or none.
  assert runs["xla"][0] == 0 and runs["pallas_interpret"][0] == 5
  assert_same_loss_and_grads(runs["pallas_interpret"], runs["xla"])


@pytest.mark.parametrize("platform,custom_call", [("cuda", "__gpu$xla.gpu.triton"),
                                                  ("tpu", "tpu_custom_call")])
def test_the_kernels_lower_for_gpus_and_tpus(platform, custom_call):
  """Lowered (not run) for the other platforms on this CPU: Triton takes the widened blocks of
  an XL model's width and Mosaic the exact ones, forward and backward."""
  vector = jax.ShapeDtypeStruct((4, 1152), jnp.bfloat16)
  args = [jax.ShapeDtypeStruct((4, 128, 1152), jnp.bfloat16), vector, vector]
  loss = lambda *a: jnp.sum(fused_norm.norm_modulate(*a, eps=EPS).astype(jnp.float32))
  step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  try:
    exported = jax.export.export(
        step, platforms=[platform],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(custom_call)])(*args)
  except RuntimeError as error:  # newer jax: Triton lowers only where a GPU is
    if "No supported GPU devices" not in str(error):
      raise
    pytest.skip("this jax lowers Triton kernels only on a machine with a GPU")
  text = exported.mlir_module()
  assert text.count(f"@{custom_call}(") == 2  # the forward and the backward kernel


def _pallas_calls(jaxpr):
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      yield eqn
    for value in eqn.params.values():
      inner = getattr(value, "jaxpr", value)
      if hasattr(inner, "eqns"):
        yield from _pallas_calls(inner)


@pytest.mark.parametrize("widen", [False, True], ids=["exact", "widened"])
@pytest.mark.parametrize("shape", [(2, 16, 48), (3, 100, 40)])
def test_every_block_tiles_its_array(widen, shape):
  """No block reaches past its array: on a GPU the widened values are masked loads and stores
  of exact blocks, never wider blocks (which Triton would read and write out of bounds). On a
  GPU every block is also a power of two tall (Triton's values are a power of two in every
  dimension; the width is widened in the kernel), also for images of 100 tokens."""
  x, shift, scale, _ = _inputs(shape)
  loss = lambda *a: jnp.sum(fused_norm.norm_modulate(*a, eps=EPS, interpret=True, widen=widen))
  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(x, shift, scale).jaxpr
  calls = list(_pallas_calls(jaxpr))
  assert len(calls) == 2
  for call in calls:
    for block in call.params["grid_mapping"].block_mappings:
      sizes = [getattr(dim, "block_size", 1) for dim in block.block_shape]
      for size, extent in zip(sizes, block.array_aval.shape):
        assert extent % size == 0, (sizes, block.array_aval.shape)
      if widen:
        assert all(size & (size - 1) == 0 for size in sizes[:-1]), sizes


@pytest.mark.skipif(jax.default_backend() != "gpu",
                    reason="the compiled kernels need a GPU (run with JAX_PLATFORMS=cuda)")
@pytest.mark.parametrize("shape", [(2, 128, 1152), (3, 100, 1536), (4, 256, 2304)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_on_a_gpu_the_compiled_kernels_match_xla(shape, dtype):
  """The Triton kernels themselves (not the interpreter), at the models' widths (none a power of
  two) and with rows that do not fill a block: outputs and gradients against XLA's."""
  inputs = _inputs(shape, dtype)
  fused = lambda *a: fused_norm.norm_modulate(*a, eps=EPS)
  got = jax.jit(lambda *a: value_and_grads(fused, *a))(*inputs)
  want = jax.jit(lambda *a: value_and_grads(lambda *b: fused_norm.reference(*b, EPS), *a))(
      *(a.astype(jnp.float32) for a in inputs))
  tol = 2e-4 if dtype == jnp.float32 else 5e-2
  for name, g, w in zip(("y", "dx", "dshift", "dscale"), got, want):
    assert g.dtype == dtype, name
    g, w = np.asarray(g, np.float32), np.asarray(w)
    assert np.isfinite(g).all(), name
    # dshift and dscale sum over S rows: compare relative to their size.
    scale = max(1.0, float(np.abs(w).max())) if name in ("dshift", "dscale") else 1.0
    np.testing.assert_allclose(g / scale, w / scale, rtol=tol, atol=tol, err_msg=name)
