"""Tiny randomly initialised T5 and VAE directories in Hugging Face format, written without torch.

They stand in for the pretrained text encoder and autoencoder where downloading them is not an
option (a laptop run, tests): the loaders and every code path after them are the same as for the
real weights, only the numbers are meaningless. The directories are built from our own Flax
modules and written as ``transformers`` and ``diffusers`` write theirs, so those libraries load
them too::

  python -m ecdit_jax.encoders.random_init --out=DIR [--captions=FILE] [--seed=0]

writes DIR/t5 (config.json, model.safetensors, spiece.model) and DIR/vae (config.json,
diffusion_pytorch_model.safetensors). The T5 vocabulary is trained on the captions (one per line
of FILE; by default every GenEval-Shapes caption), so that none of their characters is unknown.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ecdit_jax.data import geneval_shapes as shapes
from ecdit_jax.data.tokenizer import EOS_ID, PAD_ID, train_tokenizer
from ecdit_jax.encoders.safetensors_weights import save_parameters
from ecdit_jax.encoders.t5 import T5Config, T5Encoder
from ecdit_jax.encoders.vae import WEIGHT_FILE_NAMES, AutoencoderKL, AutoencoderKLConfig
from ecdit_jax.model.keys import ParamKeys

T5_WEIGHTS = "model.safetensors"
T5_VOCABULARY = "spiece.model"
VAE_WEIGHTS = WEIGHT_FILE_NAMES[0]
# Spread of the norm scales around 1 and of the biases around 0: away from the usual constants,
# so that a parameter stored under the wrong name cannot go unnoticed in a comparison.
_AFFINE_STD = 0.1


def random_module(build: Callable[[], nnx.Module], seed: int = 0) -> nnx.Module:
  """The module ``build()`` returns, with parameters drawn by numpy from ``seed``.

  Matrices and convolution kernels are normal with variance 1/fan_in, embeddings standard
  normal, norm scales 1 + N(0, 0.1^2) and biases N(0, 0.1^2). Drawing them in numpy rather than
  with the modules' own initialisers is much faster (JAX compiles its samplers for every
  parameter shape, seconds for a VAE) and gives the same files on every JAX version and device.
  """
  graphdef, state = nnx.split(nnx.eval_shape(build))
  rng = np.random.default_rng(seed)
  filled = []
  for path, variable in nnx.to_flat_state(state):
    leaf, shape = str(path[-1]), tuple(variable.shape)
    if leaf == "kernel":
      value = rng.normal(size=shape) / math.sqrt(math.prod(shape[:-1]))
    elif leaf == "embedding":
      value = rng.normal(size=shape)
    elif leaf in ("scale", "weight"):  # norm scales (T5's RMS norm calls its own "weight")
      value = 1.0 + _AFFINE_STD * rng.normal(size=shape)
    elif leaf == "bias":
      value = _AFFINE_STD * rng.normal(size=shape)
    else:
      raise ValueError(f"no initialisation rule for parameter {'.'.join(map(str, path))}")
    filled.append((path, variable.replace(jnp.asarray(value, variable.dtype))))
  return nnx.merge(graphdef, nnx.from_flat_state(filled))


def default_captions() -> list[str]:
  """Every caption the GenEval-Shapes templates can produce, in a fixed order."""
  pairs = list(itertools.permutations(shapes.SHAPES, 2))
  colour_pairs = list(itertools.permutations(shapes.COLORS, 2))
  captions = [f"a {shape}" for shape in shapes.SHAPES]
  captions += [f"a {colour} {shape}" for colour in shapes.COLORS for shape in shapes.SHAPES]
  captions += [f"{word} {shape}s" for word in shapes.COUNT_WORDS.values()
               for shape in shapes.SHAPES]
  captions += [f"a {s1} and a {s2}" for s1, s2 in pairs]
  captions += [f"a {s1} {relation} a {s2}" for s1, s2 in pairs for relation in shapes.RELATIONS]
  captions += [f"a {c1} {s1} and a {c2} {s2}" for s1, s2 in pairs for c1, c2 in colour_pairs]
  return captions


def _check_new(out_dir: str | os.PathLike) -> str:
  # Never overwrite: pointed at a real model directory by mistake, this would replace its weights.
  out_dir = os.fspath(out_dir)
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    raise FileExistsError(f"{out_dir} is not empty; random models are only written to new or "
                          "empty directories")
  return out_dir


def _new_directory(out_dir: str | os.PathLike) -> str:
  out_dir = _check_new(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  return out_dir


def _write_json(path: str, values: dict):
  with open(path, "w", encoding="utf-8") as f:
    json.dump(values, f, indent=2, sort_keys=True)
    f.write("\n")


def write_random_t5(out_dir: str | os.PathLike, captions: Iterable[str], *, d_model: int = 32,
                    d_kv: int = 8, d_ff: int = 64, num_layers: int = 2, num_heads: int = 4,
                    relative_attention_num_buckets: int = 8,
                    relative_attention_max_distance: int = 16, vocab_size: int = 128,
                    seed: int = 0) -> T5Config:
  """Writes a random T5 v1.1 encoder (gated GELU) and a vocabulary trained on ``captions``.

  ``out_dir`` receives what a ``T5EncoderModel`` checkpoint holds: config.json,
  model.safetensors and a SentencePiece unigram spiece.model (pad 0, eos 1, unk 2).
  ``vocab_size`` bounds the vocabulary; the model's embedding table has one row per piece the
  captions support. ``out_dir`` must be new or empty. Returns the model's config.
  """
  values = {
      "d_model": d_model, "d_kv": d_kv, "d_ff": d_ff, "num_layers": num_layers,
      "num_heads": num_heads, "relative_attention_num_buckets": relative_attention_num_buckets,
      "relative_attention_max_distance": relative_attention_max_distance,
      "layer_norm_epsilon": 1e-6, "feed_forward_proj": "gated-gelu",
  }
  T5Config.from_dict(values)  # validates before anything is written
  out_dir = _new_directory(out_dir)
  tokenizer = train_tokenizer(captions, os.path.join(out_dir, T5_VOCABULARY), vocab_size)
  values["vocab_size"] = tokenizer.vocab_size
  config = T5Config.from_dict(values)
  model = random_module(lambda: T5Encoder(config, rngs=ParamKeys(0)), seed)
  save_parameters(model, os.path.join(out_dir, T5_WEIGHTS))
  # The rest is what transformers writes for an encoder-only T5 v1.1; T5Config reads the above.
  _write_json(os.path.join(out_dir, "config.json"), {
      **values,
      "architectures": ["T5EncoderModel"],
      "model_type": "t5",
      "dense_act_fn": config.dense_act_fn,
      "is_gated_act": config.is_gated_act,
      "num_decoder_layers": num_layers,
      "dropout_rate": 0.0,
      "initializer_factor": 1.0,
      "is_encoder_decoder": False,
      "use_cache": False,
      "tie_word_embeddings": False,
      "pad_token_id": PAD_ID,
      "eos_token_id": EOS_ID,
      "decoder_start_token_id": PAD_ID,
  })
  return config


def write_random_vae(out_dir: str | os.PathLike, *,
                     block_out_channels: Sequence[int] = (8, 16), latent_channels: int = 4,
                     layers_per_block: int = 1, norm_num_groups: int = 4,
                     sample_size: int = 32, scaling_factor: float = 1.0,
                     shift_factor: float | None = None, seed: int = 0) -> AutoencoderKLConfig:
  """Writes a random diffusers ``AutoencoderKL``: config.json and its safetensors weights.

  Each of the ``len(block_out_channels)`` stages but the last halves the resolution;
  ``norm_num_groups`` must divide every width. ``scaling_factor``/``shift_factor`` are stored
  for the diffusion model's latent scaling, as in the real VAEs' configs; the posterior means of
  a random VAE have a standard deviation of roughly 0.4 to 0.7 on images in [-1, 1], depending
  on the seed. ``out_dir`` must be new or empty. Returns the model's config.
  """
  stages = len(block_out_channels)
  values = {
      "in_channels": 3, "out_channels": 3,
      "down_block_types": ["DownEncoderBlock2D"] * stages,
      "up_block_types": ["UpDecoderBlock2D"] * stages,
      "block_out_channels": [int(c) for c in block_out_channels],
      "layers_per_block": layers_per_block, "act_fn": "silu",
      "latent_channels": latent_channels, "norm_num_groups": norm_num_groups,
      "sample_size": sample_size, "scaling_factor": scaling_factor,
      "shift_factor": shift_factor, "mid_block_add_attention": True,
      "use_quant_conv": True, "use_post_quant_conv": True,
  }
  # Validates before anything is written.
  config = AutoencoderKLConfig.from_dict(values)
  model = random_module(lambda: AutoencoderKL(config, rngs=ParamKeys(0)), seed)
  out_dir = _new_directory(out_dir)
  save_parameters(model, os.path.join(out_dir, VAE_WEIGHTS))
  _write_json(os.path.join(out_dir, "config.json"), {
      **values,
      "_class_name": "AutoencoderKL",
      "force_upcast": True,
      "latents_mean": None,
      "latents_std": None,
  })
  return config


def write_random_models(out_dir: str | os.PathLike, captions: Iterable[str] | None = None, *,
                        seed: int = 0) -> tuple[str, str]:
  """``out_dir``/t5 and ``out_dir``/vae with the default sizes; returns their paths.

  Without ``captions``, the T5 vocabulary is trained on ``default_captions()``.
  """
  t5_dir, vae_dir = (os.path.join(os.fspath(out_dir), name) for name in ("t5", "vae"))
  for directory in (t5_dir, vae_dir):  # checked up front, so that a refusal writes nothing
    _check_new(directory)
  write_random_t5(t5_dir, default_captions() if captions is None else captions, seed=seed)
  write_random_vae(vae_dir, seed=seed)
  return t5_dir, vae_dir


def read_captions(path: str | os.PathLike) -> list[str]:
  """The non-blank lines of a text file, stripped."""
  with open(path, encoding="utf-8") as f:
    captions = [line.strip() for line in f]
  captions = [caption for caption in captions if caption]
  if not captions:
    raise ValueError(f"{path} holds no captions")
  return captions


def _define_flags():
  # Defined only when run as a program: imported as a library next to another command-line
  # module (in tests, say), these names would clash with that module's --out and --seed.
  from absl import flags

  flags.DEFINE_string("out", None, "Directory for t5/ and vae/ (each must be new or empty).")
  flags.DEFINE_string("captions", None, "Text file of captions, one per line, for the T5 "
                      "vocabulary (default: the GenEval-Shapes captions).")
  flags.DEFINE_integer("seed", 0, "Seed of the random weights.")
  flags.mark_flags_as_required(["out"])


def main(argv):
  from absl import app, flags

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  values = flags.FLAGS
  captions = read_captions(values.captions) if values.captions else None
  t5_dir, vae_dir = write_random_models(values.out, captions, seed=values.seed)
  print(f"wrote a random T5 encoder to {t5_dir} and a random VAE to {vae_dir}")


if __name__ == "__main__":
  from absl import app

  _define_flags()
  app.run(main)
