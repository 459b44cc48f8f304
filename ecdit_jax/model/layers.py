"""Building blocks of the DiT: dense layers with logical axes, embeddings, adaLN modulation."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ecdit_jax.model import fused_norm
from ecdit_jax.parallel import axes

default_kernel_init = nnx.initializers.xavier_uniform()
zeros_init = nnx.initializers.zeros_init()


def dense(in_features: int, out_features: int, names: Sequence[str | None], *, rngs: nnx.Rngs,
          dtype, param_dtype, use_bias: bool = True, zero_init: bool = False,
          kernel_init=default_kernel_init) -> nnx.Linear:
  """An ``nnx.Linear`` whose kernel carries ``names`` (in, out) and bias ``names[1]``."""
  return nnx.Linear(
      in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
      kernel_init=axes.partitioned(zeros_init if zero_init else kernel_init, names),
      bias_init=axes.partitioned(zeros_init, (names[1],)), rngs=rngs)


def layer_norm(features: int, *, dtype, param_dtype, rngs: nnx.Rngs,
               affine: bool = False) -> nnx.LayerNorm:
  """LayerNorm computed in float32; without affine parameters where adaLN supplies them."""
  return nnx.LayerNorm(
      features, epsilon=1e-6, use_scale=affine, use_bias=affine, dtype=dtype,
      param_dtype=param_dtype, scale_init=axes.partitioned(nnx.initializers.ones_init(),
                                                           (axes.EMBED,)),
      bias_init=axes.partitioned(zeros_init, (axes.EMBED,)), rngs=rngs)


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """(B, H, W, C) -> (B, N, p*p*C): patch (i, j) is token i*(W/p)+j, features in (dy, dx, c)."""
  b, h, w, c = images.shape
  p = patch_size
  if h % p or w % p:
    raise ValueError(f"image size {h}x{w} is not divisible by patch_size {p}")
  x = images.reshape(b, h // p, p, w // p, p, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)  # (B, rows, cols, dy, dx, C)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: jax.Array, patch_size: int, height: int, width: int) -> jax.Array:
  """The inverse of :func:`patchify`: (B, N, p*p*C) -> (B, H, W, C)."""
  b, n, d = tokens.shape
  p = patch_size
  if height % p or width % p or n != (height // p) * (width // p) or d % (p * p):
    raise ValueError(f"tokens of shape {tokens.shape[1:]} do not tile a {height}x{width} image "
                     f"with patch_size {p}")
  c = d // (p * p)
  x = tokens.reshape(b, height // p, width // p, p, p, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)  # (B, rows, dy, cols, dx, C)
  return x.reshape(b, height, width, c)


def sincos_2d_positions(dim: int, grid_size: int) -> np.ndarray:
  """Fixed 2-D sine-cosine position embeddings, (grid_size**2, dim), in patch order.

  Half of the channels encode the row, half the column, each as sin/cos at geometrically spaced
  frequencies. A numpy constant: nothing to train, nothing stored in checkpoints.
  """
  if dim % 4:
    raise ValueError(f"position embedding width {dim} must be divisible by 4")
  quarter = dim // 4
  freqs = 1.0 / (10000.0**(np.arange(quarter, dtype=np.float64) / quarter))
  rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")

  def encode(positions):
    angles = positions.reshape(-1, 1).astype(np.float64) * freqs[None]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

  return np.concatenate([encode(rows), encode(cols)], axis=1).astype(np.float32)


def timestep_features(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal features of t in [0, 1]; t is scaled by 1000 so the fast frequencies resolve it."""
  half = dim // 2
  freqs = jnp.exp(-np.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  angles = (1000.0 * t.astype(jnp.float32))[:, None] * freqs[None]
  features = jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)
  if dim % 2:
    features = jnp.pad(features, ((0, 0), (0, 1)))
  return features


class TimestepEmbedder(nnx.Module):
  """t -> sinusoidal features -> MLP -> a d-wide conditioning vector."""

  def __init__(self, hidden_size: int, *, rngs: nnx.Rngs, dtype, param_dtype,
               frequency_dim: int = 256):
    self.frequency_dim = frequency_dim
    init = nnx.initializers.normal(0.02)
    self.fc1 = dense(frequency_dim, hidden_size, (axes.UNSHARDED, axes.EMBED), rngs=rngs,
                     dtype=dtype, param_dtype=param_dtype, kernel_init=init)
    self.fc2 = dense(hidden_size, hidden_size, (axes.EMBED, axes.MLP), rngs=rngs, dtype=dtype,
                     param_dtype=param_dtype, kernel_init=init)

  def __call__(self, t: jax.Array) -> jax.Array:
    return self.fc2(nnx.silu(self.fc1(timestep_features(t, self.frequency_dim))))


class PatchEmbed(nnx.Module):
  """Non-overlapping p x p patches -> linear projection; same as a stride-p convolution."""

  def __init__(self, patch_size: int, in_channels: int, hidden_size: int, *, rngs: nnx.Rngs,
               dtype, param_dtype):
    self.patch_size = patch_size
    self.proj = dense(patch_size * patch_size * in_channels, hidden_size,
                      (axes.UNSHARDED, axes.EMBED), rngs=rngs, dtype=dtype,
                      param_dtype=param_dtype)

  def __call__(self, images: jax.Array) -> jax.Array:
    return self.proj(patchify(images, self.patch_size))


class FeedForward(nnx.Module):
  """The dense FFN: d -> hidden (GELU) -> d."""

  def __init__(self, hidden_size: int, mlp_hidden_size: int, *, rngs: nnx.Rngs, dtype,
               param_dtype):
    self.fc1 = dense(hidden_size, mlp_hidden_size, (axes.EMBED, axes.MLP), rngs=rngs,
                     dtype=dtype, param_dtype=param_dtype)
    self.fc2 = dense(mlp_hidden_size, hidden_size, (axes.MLP, axes.EMBED), rngs=rngs,
                     dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(nnx.gelu(self.fc1(x), approximate=True))


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """adaLN: per-image affine modulation of normalised tokens (B, S, d) by (B, d) vectors."""
  return x * (1 + scale[:, None, :]) + shift[:, None, :]


class AdaLNNorm(nnx.Module):
  """LayerNorm without parameters, then adaLN's modulation: ``norm(x, shift, scale)``.

  ``impl`` (config.model.norm_impl): "xla" (a LayerNorm in float32, then ``modulate``), or the
  fused Pallas kernels of ``fused_norm`` ("pallas"; "pallas_interpret" in the interpreter), run
  per device on ``mesh``. No parameters either way: the choice never changes a checkpoint.
  """

  def __init__(self, features: int, impl: str, *, rngs: nnx.Rngs, dtype, param_dtype,
               mesh=None):
    self.norm = layer_norm(features, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.impl = impl
    self.mesh = mesh

  def __call__(self, x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    if self.impl == "xla":
      return modulate(self.norm(x), shift, scale)
    return fused_norm.norm_modulate(x, shift, scale, eps=self.norm.epsilon, mesh=self.mesh,
                                    interpret=self.impl == "pallas_interpret")


class AdaLNModulation(nnx.Module):
  """SiLU -> linear from the conditioning vector to ``chunks`` modulation vectors of width d.

  Zero-initialised (adaLN-Zero): at initialisation every shift/scale/gate is 0, so each residual
  branch starts switched off and every block is the identity.
  """

  def __init__(self, hidden_size: int, chunks: int, *, rngs: nnx.Rngs, dtype, param_dtype):
    self.chunks = chunks
    self.proj = dense(hidden_size, chunks * hidden_size, (axes.EMBED, axes.MLP), rngs=rngs,
                      dtype=dtype, param_dtype=param_dtype, zero_init=True)

  def __call__(self, c: jax.Array) -> tuple[jax.Array, ...]:
    return tuple(jnp.split(self.proj(nnx.silu(c)), self.chunks, axis=-1))
