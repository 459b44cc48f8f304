"""Training data for a config: the dataset's source, the run's tokenizer, batches from a step.

``config.data.dataset`` is "geneval_shapes" (generated on first use), the name of a prepared
TFDS image-text dataset, or "latents:DIR": VAE latents written by ``ecdit_jax.precompute``.
Batches follow ``data.pipeline.GlobalOrder``: the position in the data is the step, so a run
resumes from its train state alone, on any number of processes.
"""

from __future__ import annotations

import hashlib
import os
import time

import numpy as np
from etils import epath

from ecdit_jax.config import TrainConfig
from ecdit_jax.data import latents, memory_cache, pipeline
from ecdit_jax.data import tokenizer as tokenizer_lib
from ecdit_jax.errors import ConfigError
from ecdit_jax.fileio import absolute, write_atomic
from ecdit_jax.inference.run import TOKENIZER_FILE
from ecdit_jax.model.config import ModelConfig
from ecdit_jax.train.metrics import log_line


def tokenizer_for(cfg: TrainConfig, workdir: str, source, process_index: int):
  """The workdir's tokenizer if it has one (resuming), else config's or one trained on the
  captions and cached under the data directory. Process 0 copies it into the workdir: the
  run's checkpoints are only valid with that vocabulary."""
  in_workdir = epath.Path(workdir) / TOKENIZER_FILE
  if in_workdir.exists():
    return tokenizer_lib.load_tokenizer(in_workdir)
  data = cfg.data
  cache = os.path.join(data.tfds_dir, "tokenizers",
                       f"{_cache_name(cfg)}_{data.generator_seed}_{data.num_train}_"
                       f"v{data.tokenizer_vocab_size}.model")
  _, text_key = data.record_keys
  tok = tokenizer_lib.get_or_train_tokenizer(
      data.tokenizer_path or None, cache, lambda: pipeline.read_captions(source, text_key),
      data.tokenizer_vocab_size)
  if process_index == 0:
    write_atomic(in_workdir, epath.Path(data.tokenizer_path or cache).read_bytes())
  return tok


def _cache_name(cfg: TrainConfig) -> str:
  """A file name for the dataset: a latent directory's path holds slashes, so it becomes its
  last component and a hash of the whole path (two directories named alike stay apart)."""
  directory = cfg.data.latent_dir
  if directory is None:
    return cfg.data.dataset
  path = absolute(directory)
  digest = hashlib.sha256(path.encode("utf-8")).hexdigest()[:12]
  return f"latents_{path.rstrip('/').rsplit('/', 1)[-1] or 'root'}_{digest}"


def check_latent_shape(cfg: TrainConfig, source) -> None:
  """For a latent dataset: its latent shape (info.json, else the first record's) must be
  (image_size, image_size, in_channels) of config.model; the error names the keys to change."""
  directory = cfg.data.latent_dir
  if directory is None:
    return
  info = latents.read_info(directory)
  if info is not None and info.get("latent_shape"):
    shape, where = tuple(int(n) for n in info["latent_shape"]), f"{directory}/{latents.INFO_FILE}"
  else:
    shape, where = tuple(source[0]["latent"].shape), f"the first record of {directory}"
  model = cfg.model
  expected = (model.image_size, model.image_size, model.in_channels)
  if shape == expected:
    return
  wrong = []
  if len(shape) != 3 or shape[0] != shape[1] or shape[0] != model.image_size:
    wrong.append(f"config.model.image_size={model.image_size}")
  if len(shape) != 3 or shape[2] != model.in_channels:
    wrong.append(f"config.model.in_channels={model.in_channels}")
  raise ConfigError(f"latents of shape {shape} ({where}) do not match {' and '.join(wrong)}: "
                    f"the model expects {expected}")


def check_tokenizer_fits(tok, model_config: ModelConfig) -> None:
  if tok.vocab_size > model_config.text_vocab_size:
    raise ConfigError(f"the tokenizer has {tok.vocab_size} pieces but "
                      f"config.model.text_vocab_size={model_config.text_vocab_size}; raise it")


def cached_context(cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
  """For ``config.data.cached_context``: the dataset's empty caption (context, length), after
  checking that its captions were encoded by the model's kind of encoder, at its width and
  prompt length; the error names what differs."""
  directory = cfg.data.latent_dir
  info = (latents.read_info(directory) or {}).get("text_context")
  null = latents.read_null_context(directory)
  if info is None or null is None:
    raise ConfigError(f"config.data.cached_context is on, but {directory} holds no encoded "
                      "captions: precompute them with --text_encoder=DIR, or turn it off to "
                      "encode captions as batches are read")
  model = cfg.model
  wanted = {"kind": model.text_encoder, "width": model.text_hidden_size,
            "max_len": model.text_max_len}
  keys = {"kind": "text_encoder", "width": "text_hidden_size", "max_len": "text_max_len"}
  differ = [f"config.model.{keys[k]}={v!r} but the captions in {directory} were encoded "
            f"{'by' if k == 'kind' else 'with'} {k} {info.get(k)!r}"
            for k, v in wanted.items() if info.get(k) != v]
  if differ:
    raise ConfigError("; ".join(differ) + f" ({directory}/{latents.INFO_FILE}): precompute "
                      "them again with this encoder, or turn config.data.cached_context off")
  return null[0], np.asarray(null[1], np.int32)


def data_order(cfg: TrainConfig, source) -> dict:
  """What fixes the order of the training data (saved with every checkpoint)."""
  return {"dataset": cfg.data.dataset, "num_records": len(source),
          "global_batch": cfg.batch_size, "seed": cfg.seed,
          "cache_in_memory": cfg.data.cache_in_memory}


def _preprocess(cfg: TrainConfig, tok, vae_factor: int, scale: bool) -> pipeline.Preprocess:
  image_key, text_key = cfg.data.record_keys
  latent_dir = cfg.data.latent_dir
  return pipeline.Preprocess(
      tok, cfg.model.image_size * (vae_factor if cfg.data.vae_encode else 1),
      cfg.model.text_max_len, image_key, text_key,
      latent_channels=cfg.model.in_channels if latent_dir is not None else None,
      resize_images=cfg.data.vae_encode, scale=scale,
      context_width=cfg.model.text_hidden_size if cfg.data.cached_context else None)


def train_batches(cfg: TrainConfig, source, tok, *, start_step: int, process_index: int,
                  process_count: int, vae_factor: int = 1):
  """This process's rows of every global batch from ``start_step`` on, endlessly.

  With ``config.data.vae_encode`` the images are center-cropped and resized to
  ``image_size * vae_factor`` pixels, which the VAE (downsampling ``vae_factor`` times) then
  encodes to ``image_size`` latents. With ``config.data.cache_in_memory`` the records are
  decoded once and batches are drawn from memory (``data.memory_cache``)."""
  if cfg.data.cache_in_memory:
    start = time.perf_counter()
    records = memory_cache.decode_all(source, _preprocess(cfg, tok, vae_factor, scale=False))
    log_line(f"decoded {len(records)} records into memory ({records.nbytes / 1e6:.1f} MB, "
             f"{records.num_skipped} skipped) in {time.perf_counter() - start:.1f} s")
    return memory_cache.CachedBatches(records, global_batch=cfg.batch_size, seed=cfg.seed,
                                      process_index=process_index,
                                      process_count=process_count, start_step=start_step)
  order = pipeline.GlobalOrder(len(source), cfg.seed, cfg.batch_size)
  return pipeline.make_batches(source, _preprocess(cfg, tok, vae_factor, scale=True),
                               order=order, process_index=process_index,
                               process_count=process_count, start_step=start_step,
                               worker_count=cfg.data.worker_count)
