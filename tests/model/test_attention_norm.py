"""The qk RMS-norm against a NumPy reference, in its row view and its per-head (4-D) form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ecdit_jax.model import attention
from ecdit_jax.parallel import mesh as mesh_lib


def reference_rms_norm(x, scale):
  x = np.asarray(x, np.float64)
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6) * np.asarray(scale)


@pytest.mark.parametrize("sizes, row_view", [(None, True), ({"fsdp": 8}, True),
                                             ({"fsdp": 4, "tensor": 2}, False)])
def test_head_rms_norm_matches_reference_with_and_without_split_heads(sizes, row_view):
  mesh = None if sizes is None else mesh_lib.create_mesh(mesh_lib.MeshConfig(**sizes))
  layer = attention.Attention(48, 8, 8, rngs=nnx.Rngs(0), dtype=jnp.float32,
                              param_dtype=jnp.float32, qk_norm=True, mesh=mesh)
  # The layer decides the form from its mesh: the row view while heads are whole everywhere.
  assert layer.query_norm.row_view == layer.key_norm.row_view == row_view
  norm = attention.HeadRMSNorm(6, rngs=nnx.Rngs(0), param_dtype=jnp.float32, row_view=row_view)
  norm.scale[...] = jnp.linspace(0.5, 2.0, 6)
  x = 3.0 * jax.random.normal(jax.random.key(0), (8, 5, 4, 6)) + 1.0
  expected = reference_rms_norm(x, norm.scale[...])
  graphdef, params = nnx.split(norm)

  def forward(params, x):
    return nnx.merge(graphdef, params)(x)

  if mesh is not None:
    names = (mesh_lib.BATCH, None, "heads", "kv")
    x = jax.device_put(x, jax.sharding.NamedSharding(
        mesh, mesh_lib.logical_to_mesh(names, x.shape, mesh)))
  got = jax.jit(forward)(params, x)
  assert got.shape == x.shape
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_head_rms_norm_keeps_the_input_dtype_and_normalises_in_float32():
  norm = attention.HeadRMSNorm(8, rngs=nnx.Rngs(0), param_dtype=jnp.float32)
  x = (1e3 * jax.random.normal(jax.random.key(1), (2, 3, 2, 8))).astype(jnp.bfloat16)
  got = norm(x)
  assert got.dtype == jnp.bfloat16
  expected = reference_rms_norm(np.asarray(x, np.float32), norm.scale[...])
  np.testing.assert_allclose(np.asarray(got, np.float32), expected, rtol=1e-2, atol=1e-2)
