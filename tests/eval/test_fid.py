"""FID: the Inception port against pytorch-fid, streaming statistics, the distance, TFDS stats."""

import io

import numpy as np
import pytest
import scipy.linalg
from PIL import Image

from safetensors.numpy import save_file

from ecdit_jax.data import geneval_shapes_tfds
from ecdit_jax.encoders import convert_torch
from ecdit_jax.errors import ConfigError
from ecdit_jax.eval import fid, inception
from tests.eval.reference_models import save_random_fid_inception

# ---------------------------------------------------------------------------------------------
# The Inception network, against pytorch-fid's with random weights (nothing is downloaded).


@pytest.fixture(scope="module")
def pytorch_fid_reference(tmp_path_factory):
  """A weights file of pytorch-fid's FID Inception with random weights, inputs, their features."""
  torch = pytest.importorskip("torch")
  path = tmp_path_factory.mktemp("inception") / "fid_inception_random.pth"
  network = save_random_fid_inception(path)
  [path] = convert_torch.convert(str(path))  # the .pth once to safetensors, as users do

  rng = np.random.default_rng(2)
  inputs = {
      # Upsampled; 3 images with a batch size of 4 also exercise a padded batch (3 -> 4).
      "float_32x32": rng.random((3, 32, 32, 3), dtype=np.float32),
      "uint8_64x64": rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8),
      # Downsampled, with different factors along height and width (no antialiasing).
      "float_400x360": rng.random((2, 400, 360, 3), dtype=np.float32),
  }
  expected = {}
  with torch.no_grad():
    for name, images in inputs.items():
      unit = images.astype(np.float32) / (255.0 if images.dtype == np.uint8 else 1.0)
      (pool3,) = network(torch.from_numpy(unit).permute(0, 3, 1, 2))
      expected[name] = pool3[:, :, 0, 0].numpy()
  return path, inputs, expected


def test_inception_matches_pytorch_fid(pytorch_fid_reference):
  path, inputs, expected = pytorch_fid_reference
  features = inception.make_feature_fn(inception.load_fid_inception(path), batch_size=4)
  for name, images in inputs.items():
    result = features(images)
    assert result.shape == (images.shape[0], inception.FEATURE_DIM) and result.dtype == np.float32
    # Both sides round float32 through ~100 layers: differences of ~1e-5 of the feature scale
    # are rounding, while any semantic difference (BN epsilon, pooling padding, resize
    # convention, max vs average pool) was measured at 4e-2 of the scale or more.
    scale = np.abs(expected[name]).max()
    np.testing.assert_allclose(result, expected[name], rtol=1e-4, atol=3e-5 * scale,
                               err_msg=name)


def test_inception_weight_file_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"absent\.pth.*pytorch-fid.*convert_torch"):
    inception.load_fid_inception(tmp_path / "absent.pth")
  pickle = tmp_path / "pt_inception.pth"
  pickle.write_bytes(b"never unpickled")
  with pytest.raises(ConfigError, match=r"convert_torch .*pt_inception\.pth"):
    inception.load_fid_inception(pickle)
  # torchvision's ImageNet Inception has a 1000-way classifier: not the FID network.
  torchvision_head = tmp_path / "torchvision_head.safetensors"
  save_file({"fc.weight": np.zeros((1000, 2048), np.float32),
             "fc.bias": np.zeros(1000, np.float32)}, str(torchvision_head))
  with pytest.raises(ValueError, match=r"fc\.weight has shape \(1000, 2048\)"):
    inception.load_fid_inception(torchvision_head)
  head_only = tmp_path / "head_only.safetensors"
  save_file({"fc.weight": np.zeros((1008, 2048), np.float32),
             "fc.bias": np.zeros(1008, np.float32)}, str(head_only))
  with pytest.raises(ValueError, match=r"head_only\.safetensors .* lacks Conv2d_1a_3x3\.\w+"):
    inception.load_fid_inception(head_only)


def test_bilinear_resize_matrix_rows():
  # Rows are convex combinations of at most two neighbouring inputs, and same-size is identity.
  for in_size, out_size in ((32, 299), (400, 299), (299, 299), (1, 5)):
    matrix = inception.bilinear_resize_matrix(in_size, out_size)
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0, rtol=1e-6)
    assert ((matrix > 0).sum(axis=1) <= 2).all()
  np.testing.assert_array_equal(inception.bilinear_resize_matrix(299, 299), np.eye(299))


# ---------------------------------------------------------------------------------------------
# Statistics and the distance.


def test_feature_stats_match_numpy_on_uneven_chunks(tmp_path):
  rng = np.random.default_rng(0)
  # A large common offset: the naive sum-of-squares formula would lose digits to it.
  features = rng.normal(size=(120, 16)) @ rng.normal(size=(16, 16)) + 1e3
  stats = fid.features_from_images(lambda batch: batch,
                                   np.split(features, [1, 8, 8, 40, 41, 100]))
  mu, sigma = stats.mean_and_cov()
  assert stats.count == 120
  np.testing.assert_allclose(mu, features.mean(axis=0), rtol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(features, rowvar=False), rtol=1e-9, atol=1e-9)

  # Saved statistics read back as pytorch-fid's files are, and resume accumulating.
  path = tmp_path / "stats" / "first_half.npz"
  fid.features_from_images(lambda batch: batch, [features[:60]]).save(path)
  with np.load(path) as saved:
    assert {"mu", "sigma"} <= set(saved.files)
    np.testing.assert_allclose(saved["mu"], features[:60].mean(axis=0), rtol=1e-12)
  resumed = fid.FeatureStats.load(path)
  resumed.update(features[60:])
  for value, reference in zip(resumed.mean_and_cov(), (mu, sigma)):
    np.testing.assert_allclose(value, reference, rtol=1e-9, atol=1e-9)
  loaded_mu, loaded_sigma = fid.load_stats(path)
  np.testing.assert_allclose(loaded_sigma, np.cov(features[:60], rowvar=False), rtol=1e-9,
                             atol=1e-9)

  pytorch_fid_style = tmp_path / "mu_sigma_only.npz"
  np.savez(pytorch_fid_style, mu=loaded_mu, sigma=loaded_sigma)
  np.testing.assert_array_equal(fid.load_stats(pytorch_fid_style)[1], loaded_sigma)
  with pytest.raises(ValueError, match="count"):
    fid.FeatureStats.load(pytorch_fid_style)
  with pytest.raises(ValueError, match="at least 2"):
    fid.features_from_images(lambda batch: batch, [features[:1]]).mean_and_cov()


def _scipy_frechet_distance(mu1, sigma1, mu2, sigma2):
  """The textbook formula, with a general matrix square root of sigma1 @ sigma2."""
  root = scipy.linalg.sqrtm(sigma1 @ sigma2)
  diff = mu1 - mu2
  return diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(root.real)


def _random_covariance(rng, dim, rank, floor):
  factor = rng.normal(size=(dim, rank))
  return factor @ factor.T / rank + floor * np.eye(dim)


def test_frechet_distance_matches_scipy():
  rng = np.random.default_rng(0)
  dim = 64
  mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
  full_rank = _random_covariance(rng, dim, 3 * dim, 0.0)
  other = _random_covariance(rng, dim, 2 * dim, 0.1)
  nearly_singular = _random_covariance(rng, dim, dim - 8, 1e-9)
  assert np.linalg.eigvalsh(nearly_singular)[0] < 1e-8
  for sigma1, sigma2 in ((full_rank, other), (nearly_singular, other), (other, nearly_singular),
                         (full_rank, nearly_singular)):
    expected = _scipy_frechet_distance(mu1, sigma1, mu2, sigma2)
    np.testing.assert_allclose(fid.frechet_distance(mu1, sigma1, mu2, sigma2), expected,
                               rtol=1e-6)
  # Only covariances differ: the trace term carries the whole distance.
  np.testing.assert_allclose(fid.frechet_distance(mu1, full_rank, mu1, other),
                             _scipy_frechet_distance(mu1, full_rank, mu1, other), rtol=1e-6)


def test_frechet_distance_of_identical_statistics_is_zero():
  rng = np.random.default_rng(1)
  mu = rng.normal(size=64)
  # A singular covariance leaves eigenvalues of order 1e-16 in the product, whose square roots
  # (1e-8 each) are the rounding floor of any method: scipy's sqrtm lands there as well.
  for rank, tolerance in ((200, 1e-12), (50, 1e-7)):
    sigma = _random_covariance(rng, 64, rank, 0.0)
    distance = fid.frechet_distance(mu, sigma, mu, sigma)
    assert abs(distance) < tolerance * np.trace(sigma), (rank, distance)
  with pytest.raises(ValueError, match="mismatched"):
    fid.frechet_distance(mu, np.eye(64), mu[:32], np.eye(32))


# ---------------------------------------------------------------------------------------------
# Reference statistics from a TFDS dataset.


def test_as_rgb_uint8_handles_bytes_grayscale_and_alpha():
  gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
  buffer = io.BytesIO()
  Image.fromarray(gray, mode="L").save(buffer, format="PNG")
  for image in (buffer.getvalue(), gray, gray[:, :, None]):
    np.testing.assert_array_equal(fid.as_rgb_uint8(image), np.repeat(gray[:, :, None], 3, -1))
  rgba = np.random.default_rng(0).integers(0, 256, (3, 4, 4), dtype=np.uint8)
  np.testing.assert_array_equal(fid.as_rgb_uint8(rgba), rgba[:, :, :3])


def test_reference_stats_from_tfds(tmp_path):
  builder = geneval_shapes_tfds.prepare(str(tmp_path), image_size=32, num_train=40, num_test=8,
                                        seed=0)
  projection = np.random.default_rng(0).normal(size=(32 * 32 * 3, 12))

  def pixel_projection(images):  # a cheap stand-in for the Inception features
    assert images.shape[1:] == (32, 32, 3) and images.dtype == np.uint8
    return images.reshape(images.shape[0], -1) / 255.0 @ projection

  source = builder.as_data_source("train")
  images = np.stack([source[i]["image"] for i in range(len(source))])
  name = f"{geneval_shapes_tfds.DATASET_NAME}/{builder.builder_config.name}"
  for max_images, batch_size in ((None, 16), (25, 7)):
    stats = fid.reference_stats_from_tfds(pixel_projection, name, "train", tmp_path,
                                          batch_size=batch_size, max_images=max_images)
    direct = pixel_projection(images[:max_images])
    assert stats.count == direct.shape[0]
    mu, sigma = stats.mean_and_cov()
    np.testing.assert_allclose(mu, direct.mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(sigma, np.cov(direct, rowvar=False), rtol=1e-9, atol=1e-12)
