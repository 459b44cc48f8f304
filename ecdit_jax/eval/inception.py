"""The Inception-v3 of FID, in Flax NNX, computing the 2048-d pool3 features FID is defined on.

This is the network behind the published FID numbers: TensorFlow's 2015-12-05 Inception graph as
ported to PyTorch by pytorch-fid (``InceptionV3([3])`` there), with its weights file
``pt_inception-2015-12-05-6726825d.pth``. It differs from torchvision's Inception-v3 in the
pooling branches: the average pools of the A, C and first E blocks ignore padded positions (as
TensorFlow's do) and the last E block max-pools. Layer names follow the weights file so that
every tensor maps to one module attribute; only the 1008-way classifier (``fc``) is dropped.

Inputs are processed as pytorch-fid does: values in [0, 1] (uint8 images are divided by 255) are
resized to 299x299 with bilinear interpolation that samples pixel centres and never antialiases,
then mapped to [-1, 1]. Tensors are NHWC; convolutions use the PyTorch padding of each layer
(symmetric, explicit) and run at full float32 precision, since accelerators would otherwise use
reduced-precision matmuls and the features must match the reference implementation.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from safetensors import numpy as safetensors_numpy

from ecdit_jax.errors import ConfigError

FEATURE_DIM = 2048
INPUT_SIZE = 299
WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               + WEIGHTS_FILENAME)
# The classifier is not used for features, but its shape tells the FID weights (1008 classes)
# apart from torchvision's ImageNet Inception (1000 classes), whose features differ.
_CLASSIFIER_SHAPES = {"fc.weight": (1008, FEATURE_DIM), "fc.bias": (1008,)}
_BN_EPSILON = 1e-3
_PRECISION = jax.lax.Precision.HIGHEST


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
  return (value, value) if isinstance(value, int) else value


class BasicConv2d(nnx.Module):
  """Convolution without bias, inference-mode BatchNorm (eps 1e-3), ReLU."""

  def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], *,
               stride: int = 1, padding: int | tuple[int, int] = 0, rngs: nnx.Rngs):
    pad_h, pad_w = _pair(padding)
    self.conv = nnx.Conv(in_channels, out_channels, _pair(kernel_size), strides=stride,
                         padding=((pad_h, pad_h), (pad_w, pad_w)), use_bias=False,
                         precision=_PRECISION, rngs=rngs)
    self.bn = nnx.BatchNorm(out_channels, use_running_average=True, epsilon=_BN_EPSILON,
                            rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.relu(self.bn(self.conv(x)))


def max_pool(x: jax.Array, *, stride: int, padding: int = 0) -> jax.Array:
  """3x3 max pool; padded positions never win (they hold -inf), as in PyTorch."""
  pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1),
                               pad)


def average_pool_excluding_padding(x: jax.Array) -> jax.Array:
  """3x3 average pool, stride 1, padding 1, dividing by the number of real (unpadded) inputs."""
  pad = ((0, 0), (1, 1), (1, 1), (0, 0))
  sums = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad)

  def real_inputs(length):  # window positions inside the image, for each output position
    index = np.arange(length)
    return np.minimum(index + 1, length - 1) - np.maximum(index - 1, 0) + 1

  counts = np.outer(real_inputs(x.shape[1]), real_inputs(x.shape[2])).astype(np.float32)
  return sums / counts[None, :, :, None]


class InceptionA(nnx.Module):
  """35x35 block: 1x1, 5x5, double 3x3 and average-pool branches (Mixed_5b..5d)."""

  def __init__(self, in_channels: int, pool_features: int, *, rngs: nnx.Rngs):
    self.branch1x1 = BasicConv2d(in_channels, 64, 1, rngs=rngs)
    self.branch5x5_1 = BasicConv2d(in_channels, 48, 1, rngs=rngs)
    self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, rngs=rngs)
    self.branch_pool = BasicConv2d(in_channels, pool_features, 1, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
    branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    branch_pool = self.branch_pool(average_pool_excluding_padding(x))
    return jnp.concatenate([self.branch1x1(x), branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nnx.Module):
  """35x35 -> 17x17 reduction (Mixed_6a)."""

  def __init__(self, in_channels: int, *, rngs: nnx.Rngs):
    self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return jnp.concatenate([self.branch3x3(x), branch3x3dbl, max_pool(x, stride=2)], axis=-1)


class InceptionC(nnx.Module):
  """17x17 block with factorised 7x7 convolutions (Mixed_6b..6e)."""

  def __init__(self, in_channels: int, channels_7x7: int, *, rngs: nnx.Rngs):
    c7 = channels_7x7
    self.branch1x1 = BasicConv2d(in_channels, 192, 1, rngs=rngs)
    self.branch7x7_1 = BasicConv2d(in_channels, c7, 1, rngs=rngs)
    self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1, rngs=rngs)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch_pool = BasicConv2d(in_channels, 192, 1, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    branch7x7dbl = self.branch7x7dbl_1(x)
    for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                  self.branch7x7dbl_5):
      branch7x7dbl = layer(branch7x7dbl)
    branch_pool = self.branch_pool(average_pool_excluding_padding(x))
    return jnp.concatenate([self.branch1x1(x), branch7x7, branch7x7dbl, branch_pool], axis=-1)


class InceptionD(nnx.Module):
  """17x17 -> 8x8 reduction (Mixed_7a)."""

  def __init__(self, in_channels: int, *, rngs: nnx.Rngs):
    self.branch3x3_1 = BasicConv2d(in_channels, 192, 1, rngs=rngs)
    self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, rngs=rngs)
    self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1, rngs=rngs)
    self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
    branch7x7x3 = self.branch7x7x3_1(x)
    for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
      branch7x7x3 = layer(branch7x7x3)
    return jnp.concatenate([branch3x3, branch7x7x3, max_pool(x, stride=2)], axis=-1)


class InceptionE(nnx.Module):
  """8x8 block with split 1x3/3x1 branches (Mixed_7b averages, Mixed_7c max-pools)."""

  def __init__(self, in_channels: int, *, max_pool_branch: bool, rngs: nnx.Rngs):
    self.max_pool_branch = max_pool_branch
    self.branch1x1 = BasicConv2d(in_channels, 320, 1, rngs=rngs)
    self.branch3x3_1 = BasicConv2d(in_channels, 384, 1, rngs=rngs)
    self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch_pool = BasicConv2d(in_channels, 192, 1, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    branch3x3 = self.branch3x3_1(x)
    branch3x3 = jnp.concatenate([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)],
                                axis=-1)
    branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    branch3x3dbl = jnp.concatenate(
        [self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], axis=-1)
    pooled = (max_pool(x, stride=1, padding=1) if self.max_pool_branch
              else average_pool_excluding_padding(x))
    branch_pool = self.branch_pool(pooled)
    return jnp.concatenate([self.branch1x1(x), branch3x3, branch3x3dbl, branch_pool], axis=-1)


def bilinear_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) weights of PyTorch's bilinear resize with align_corners=False.

  Output pixel i samples the input at (i + 0.5) * in/out - 0.5, clamped at 0, and mixes the two
  nearest inputs (the last one repeated at the border). No antialiasing when downsampling.
  """
  scale = np.float32(in_size) / np.float32(out_size)
  source = np.maximum((np.arange(out_size, dtype=np.float32) + 0.5) * scale - 0.5, 0.0)
  lower = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
  upper = np.minimum(lower + 1, in_size - 1)
  upper_weight = source - lower
  matrix = np.zeros((out_size, in_size), np.float32)
  rows = np.arange(out_size)
  np.add.at(matrix, (rows, lower), 1.0 - upper_weight)
  np.add.at(matrix, (rows, upper), upper_weight)
  return matrix


def preprocess(images: jax.Array) -> jax.Array:
  """(B, H, W, 3) uint8 or [0, 1] floats -> (B, 299, 299, 3) float32 in [-1, 1]."""
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"expected images of shape (B, H, W, 3), got {images.shape}")
  x = images.astype(jnp.float32)
  if images.dtype == jnp.uint8:
    x = x / 255.0
  rows = bilinear_resize_matrix(images.shape[1], INPUT_SIZE)
  cols = bilinear_resize_matrix(images.shape[2], INPUT_SIZE)
  x = jnp.einsum("oh,bhwc->bowc", rows, x, precision=_PRECISION)
  x = jnp.einsum("pw,bowc->bopc", cols, x, precision=_PRECISION)
  return 2.0 * x - 1.0


class FIDInceptionV3(nnx.Module):
  """Inception-v3 up to the global average pool after Mixed_7c (``pool3``)."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, rngs=rngs)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, rngs=rngs)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, rngs=rngs)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, rngs=rngs)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, rngs=rngs)
    self.Mixed_5b = InceptionA(192, pool_features=32, rngs=rngs)
    self.Mixed_5c = InceptionA(256, pool_features=64, rngs=rngs)
    self.Mixed_5d = InceptionA(288, pool_features=64, rngs=rngs)
    self.Mixed_6a = InceptionB(288, rngs=rngs)
    self.Mixed_6b = InceptionC(768, channels_7x7=128, rngs=rngs)
    self.Mixed_6c = InceptionC(768, channels_7x7=160, rngs=rngs)
    self.Mixed_6d = InceptionC(768, channels_7x7=160, rngs=rngs)
    self.Mixed_6e = InceptionC(768, channels_7x7=192, rngs=rngs)
    self.Mixed_7a = InceptionD(768, rngs=rngs)
    self.Mixed_7b = InceptionE(1280, max_pool_branch=False, rngs=rngs)
    self.Mixed_7c = InceptionE(2048, max_pool_branch=True, rngs=rngs)

  def pool3(self, x: jax.Array) -> jax.Array:
    """Preprocessed (B, 299, 299, 3) inputs -> (B, 2048) features."""
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = max_pool(x, stride=2)
    x = max_pool(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), stride=2)
    for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                  self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                  self.Mixed_7c):
      x = block(x)
    return jnp.mean(x, axis=(1, 2))

  def __call__(self, images: jax.Array) -> jax.Array:
    """(B, H, W, 3) uint8 or [0, 1] float images -> (B, 2048) float32 features."""
    return self.pool3(preprocess(images))


def _weight_entries(conv: BasicConv2d) -> dict[str, tuple[tuple[int, ...], nnx.Variable, bool]]:
  """Weights-file suffix -> (its shape there, the variable it fills, whether OIHW -> HWIO)."""
  kernel = conv.conv.kernel
  kh, kw, cin, cout = kernel.shape
  return {
      "conv.weight": ((cout, cin, kh, kw), kernel, True),
      "bn.weight": ((cout,), conv.bn.scale, False),
      "bn.bias": ((cout,), conv.bn.bias, False),
      "bn.running_mean": ((cout,), conv.bn.mean, False),
      "bn.running_var": ((cout,), conv.bn.var, False),
  }


def load_fid_inception(path: str | os.PathLike) -> FIDInceptionV3:
  """The FID Inception with pytorch-fid's weights, converted to safetensors (its state dict).

  Every tensor the network needs must be in the file with the shape of the FID model; the first
  that is missing or differs is named in a ValueError. The ``.pth`` file itself is a pickle and
  is not read: convert it once with ``python -m ecdit_jax.encoders.convert_torch FILE.pth``.
  """
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(
        f"FID Inception weights not found at {os.fspath(path)}. The standard file is "
        f"{WEIGHTS_FILENAME}, published with the pytorch-fid release 'fid_weights' "
        f"({WEIGHTS_URL}); download it, convert it once with `python -m "
        f"ecdit_jax.encoders.convert_torch FILE.pth` and pass the .safetensors file.")
  if path.suffix != ".safetensors":
    raise ConfigError(f"{os.fspath(path)} is a PyTorch pickle; convert it once with `python -m "
                      f"ecdit_jax.encoders.convert_torch {os.fspath(path)}` and pass the "
                      ".safetensors file it writes")
  weights = safetensors_numpy.load(path.read_bytes())
  for key, shape in _CLASSIFIER_SHAPES.items():
    _check_entry(weights, key, shape, path)
  # Shapes only: every variable is replaced by the file's value below.
  model = nnx.eval_shape(lambda: FIDInceptionV3(rngs=nnx.Rngs(0)))
  for module_path, module in nnx.iter_modules(model):
    if not isinstance(module, BasicConv2d):
      continue
    prefix = ".".join(str(part) for part in module_path)
    for suffix, (shape, variable, is_kernel) in _weight_entries(module).items():
      key = f"{prefix}.{suffix}"
      value = _check_entry(weights, key, shape, path).astype(np.float32)
      variable.set_value(jnp.asarray(value.transpose(2, 3, 1, 0) if is_kernel else value))
  return model


def _check_entry(weights: dict[str, np.ndarray], key: str, shape: tuple[int, ...],
                 path: epath.Path) -> np.ndarray:
  if key not in weights:
    raise ValueError(f"{os.fspath(path)} is not an FID Inception weights file: it lacks {key}")
  if weights[key].shape != shape:
    raise ValueError(f"{os.fspath(path)}: {key} has shape {weights[key].shape}, the FID "
                     f"Inception expects {shape}")
  return weights[key]


def make_feature_fn(model: FIDInceptionV3, *,
                    batch_size: int = 50) -> Callable[[np.ndarray], np.ndarray]:
  """A function from images (N, H, W, 3), uint8 or [0, 1] floats, to (N, 2048) float32 features.

  Images go through the network ``batch_size`` at a time; a last, partial batch is padded to the
  next power of two (at most ``batch_size``), so the network compiles for a few batch sizes at
  most and never runs more than twice the images it is given. The resize compiles once per
  input size.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  graphdef, state = nnx.split(model)

  @jax.jit
  def network(state, inputs):
    return nnx.merge(graphdef, state).pool3(inputs)

  resize = jax.jit(preprocess)

  def features(images) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"expected images of shape (N, H, W, 3), got {images.shape}")
    outputs = []
    for start in range(0, images.shape[0], batch_size):
      batch = images[start:start + batch_size]
      real = batch.shape[0]
      padding = min(batch_size, 1 << (real - 1).bit_length()) - real
      if padding:
        batch = np.concatenate([batch, np.zeros((padding,) + batch.shape[1:], batch.dtype)])
      outputs.append(np.asarray(network(state, resize(batch)))[:real])
    if not outputs:
      return np.zeros((0, FEATURE_DIM), np.float32)
    return np.concatenate(outputs).astype(np.float32, copy=False)

  return features
