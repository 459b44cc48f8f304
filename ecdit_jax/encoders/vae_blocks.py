"""Building blocks of the Stable Diffusion VAE (``diffusers``' ``AutoencoderKL``) in Flax NNX.

The encoder and decoder are convolutional towers of pre-activation residual blocks (GroupNorm,
SiLU, 3x3 conv, twice) with a stride-2 conv between encoder stages and a nearest-neighbour 2x
upsample + conv between decoder stages; both meet the latent through a middle block of a residual
block, single-head self-attention over all pixels, and another residual block.

Layout is NHWC throughout. Module and attribute names mirror the ``diffusers`` checkpoint keys
(``down_blocks.0.resnets.1.norm2``, ``mid_block.attentions.0.to_out.0``, ...), so each
parameter's key is its path in the module tree. Every GroupNorm uses eps 1e-6, as the VAE does.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

GROUP_NORM_EPS = 1e-6
# A 3x3 conv padded by one on each side, as PyTorch's Conv2d(padding=1).
SAME_3X3 = ((1, 1), (1, 1))


def group_norm(channels: int, groups: int, rngs) -> nnx.GroupNorm:
  if channels % groups:
    raise ValueError(f"norm_num_groups={groups} must divide every block width; got {channels}")
  # Two-pass variance, as in PyTorch: the one-pass formula loses digits when activations have a
  # large mean, which the decoder's late stages do.
  return nnx.GroupNorm(channels, num_groups=groups, epsilon=GROUP_NORM_EPS,
                       use_fast_variance=False, rngs=rngs)


def conv(in_channels: int, out_channels: int, size: int, *, rngs, precision,
         strides: int = 1, padding=None) -> nnx.Conv:
  if padding is None:
    padding = SAME_3X3 if size == 3 else "VALID"
  return nnx.Conv(in_channels, out_channels, (size, size), strides=(strides, strides),
                  padding=padding, precision=precision, rngs=rngs)


class ResnetBlock2D(nnx.Module):
  """norm1 -> silu -> conv1 -> norm2 -> silu -> conv2, added to the (projected) input."""

  def __init__(self, in_channels: int, out_channels: int, groups: int, *, rngs, precision):
    self.norm1 = group_norm(in_channels, groups, rngs)
    self.conv1 = conv(in_channels, out_channels, 3, rngs=rngs, precision=precision)
    self.norm2 = group_norm(out_channels, groups, rngs)
    self.conv2 = conv(out_channels, out_channels, 3, rngs=rngs, precision=precision)
    # Only blocks that change width carry a 1x1 projection of the skip path.
    self.conv_shortcut = (conv(in_channels, out_channels, 1, rngs=rngs, precision=precision)
                          if in_channels != out_channels else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
    return skip + h


class Downsample2D(nnx.Module):
  """A stride-2 3x3 conv, padded by one row and column at the bottom/right only.

  The checkpoints were trained with this asymmetric padding; a symmetric one shifts every
  encoder feature map by half a pixel.
  """

  def __init__(self, channels: int, *, rngs, precision):
    self.conv = conv(channels, channels, 3, strides=2, padding=((0, 1), (0, 1)), rngs=rngs,
                     precision=precision)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(x)


class Upsample2D(nnx.Module):
  """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

  def __init__(self, channels: int, *, rngs, precision):
    self.conv = conv(channels, channels, 3, rngs=rngs, precision=precision)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return self.conv(x)


class SpatialSelfAttention(nnx.Module):
  """One-head self-attention over all pixels of a (B, H, W, C) map, with its own GroupNorm.

  The residual is the un-normalised input; the output is not rescaled (the VAE's factor is 1).
  """

  def __init__(self, channels: int, groups: int, *, rngs, precision):
    self.precision = precision
    self.group_norm = group_norm(channels, groups, rngs)
    linear = functools.partial(nnx.Linear, channels, channels, precision=precision, rngs=rngs)
    self.to_q, self.to_k, self.to_v = linear(), linear(), linear()
    # A list so that the key is ``to_out.0``: the checkpoints keep a dropout at ``to_out.1``.
    self.to_out = nnx.List([linear()])

  def __call__(self, x: jax.Array) -> jax.Array:
    b, height, width, channels = x.shape
    h = self.group_norm(x).reshape(b, height * width, channels)
    q = self.to_q(h) * channels**-0.5
    k, v = self.to_k(h), self.to_v(h)
    logits = jnp.einsum("bqc,bkc->bqk", q, k, precision=self.precision)
    # Softmax in at least float32, as the reference upcasts it for half-precision runs.
    weights = jax.nn.softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
    out = jnp.einsum("bqk,bkc->bqc", weights.astype(v.dtype), v, precision=self.precision)
    out = self.to_out[0](out).reshape(b, height, width, channels)
    return x + out


class MidBlock2D(nnx.Module):
  """resnet -> (attention) -> resnet at the lowest resolution, width unchanged."""

  def __init__(self, channels: int, groups: int, add_attention: bool, *, rngs, precision):
    block = functools.partial(ResnetBlock2D, channels, channels, groups, rngs=rngs,
                              precision=precision)
    self.resnets = nnx.List([block(), block()])
    self.attentions = nnx.List(
        [SpatialSelfAttention(channels, groups, rngs=rngs, precision=precision)]
        if add_attention else [])

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.resnets[0](x)
    for attention in self.attentions:
      x = attention(x)
    return self.resnets[1](x)


class DownEncoderBlock2D(nnx.Module):
  """``num_layers`` residual blocks, the first changing the width, then an optional downsample."""

  def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int,
               add_downsample: bool, *, rngs, precision):
    self.resnets = nnx.List([
        ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, rngs=rngs,
                      precision=precision) for i in range(num_layers)])
    self.downsamplers = nnx.List([Downsample2D(out_channels, rngs=rngs, precision=precision)]
                                 if add_downsample else [])

  def __call__(self, x: jax.Array) -> jax.Array:
    for layer in (*self.resnets, *self.downsamplers):
      x = layer(x)
    return x


class UpDecoderBlock2D(nnx.Module):
  """``num_layers`` residual blocks, the first changing the width, then an optional upsample."""

  def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int,
               add_upsample: bool, *, rngs, precision):
    self.resnets = nnx.List([
        ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, rngs=rngs,
                      precision=precision) for i in range(num_layers)])
    self.upsamplers = nnx.List([Upsample2D(out_channels, rngs=rngs, precision=precision)]
                               if add_upsample else [])

  def __call__(self, x: jax.Array) -> jax.Array:
    for layer in (*self.resnets, *self.upsamplers):
      x = layer(x)
    return x


class Encoder(nnx.Module):
  """(B, H, W, in_channels) images -> (B, H/f, W/f, 2 * latent_channels) moments, f = 2^(n-1)."""

  def __init__(self, in_channels: int, latent_channels: int, block_out_channels: Sequence[int],
               layers_per_block: int, groups: int, mid_attention: bool, *, rngs, precision):
    widths = tuple(block_out_channels)
    self.conv_in = conv(in_channels, widths[0], 3, rngs=rngs, precision=precision)
    self.down_blocks = nnx.List([
        DownEncoderBlock2D(widths[max(i - 1, 0)], width, layers_per_block, groups,
                           add_downsample=i < len(widths) - 1, rngs=rngs, precision=precision)
        for i, width in enumerate(widths)])
    self.mid_block = MidBlock2D(widths[-1], groups, mid_attention, rngs=rngs, precision=precision)
    self.conv_norm_out = group_norm(widths[-1], groups, rngs)
    self.conv_out = conv(widths[-1], 2 * latent_channels, 3, rngs=rngs, precision=precision)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
  """(B, h, w, latent_channels) latents -> (B, h*f, w*f, out_channels) images.

  The stages run from the widest (``block_out_channels[-1]``) to the narrowest, each with one
  more residual block than the encoder's.
  """

  def __init__(self, latent_channels: int, out_channels: int, block_out_channels: Sequence[int],
               layers_per_block: int, groups: int, mid_attention: bool, *, rngs, precision):
    widths = tuple(reversed(block_out_channels))
    self.conv_in = conv(latent_channels, widths[0], 3, rngs=rngs, precision=precision)
    self.mid_block = MidBlock2D(widths[0], groups, mid_attention, rngs=rngs, precision=precision)
    self.up_blocks = nnx.List([
        UpDecoderBlock2D(widths[max(i - 1, 0)], width, layers_per_block + 1, groups,
                         add_upsample=i < len(widths) - 1, rngs=rngs, precision=precision)
        for i, width in enumerate(widths)])
    self.conv_norm_out = group_norm(widths[-1], groups, rngs)
    self.conv_out = conv(widths[-1], out_channels, 3, rngs=rngs, precision=precision)

  def __call__(self, z: jax.Array) -> jax.Array:
    x = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))
