"""Wires config.data to the data package: dataset on disk, tokenizer, per-process iterator."""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from ecdit_jax.data import geneval_shapes_tfds, pipeline, tokenizer as tokenizer_lib
from ecdit_jax.model import ConfigError, ModelConfig

TOKENIZER_FILE = "tokenizer.model"  # copied into the workdir so that sampling needs no data_dir


def data_dir(config: ml_collections.ConfigDict) -> str:
  return os.path.expanduser(config.data.data_dir or "~/tensorflow_datasets")


def data_source(config: ml_collections.ConfigDict, split: str):
  """Random-access source for ``split``: GenEval-Shapes is generated here on first use; any
  other TFDS dataset must already be prepared under data_dir (ArrayRecord)."""
  dcfg = config.data
  if dcfg.dataset == "geneval_shapes":
    builder = geneval_shapes_tfds.prepare(
        data_dir(config), image_size=config.model.image_size, num_train=dcfg.num_train,
        num_test=dcfg.num_test, seed=dcfg.generator_seed)
    return builder.as_data_source(split)
  return tfds.data_source(dcfg.dataset, split=split, data_dir=data_dir(config))


def tokenizer_for(config: ml_collections.ConfigDict, workdir: str, source):
  """The workdir's tokenizer if it has one (resuming), else config's or one trained and cached.

  The workdir copy pins the vocabulary of a run: its checkpoints are only valid with it.
  """
  in_workdir = epath.Path(workdir) / TOKENIZER_FILE
  if in_workdir.exists():
    return tokenizer_lib.load_tokenizer(in_workdir)
  dcfg = config.data
  cache = os.path.join(data_dir(config), "tokenizers",
                       f"{dcfg.dataset}_{dcfg.generator_seed}_{dcfg.num_train}_"
                       f"v{dcfg.tokenizer_vocab_size}.model")
  os.makedirs(os.path.dirname(cache), exist_ok=True)
  tok = tokenizer_lib.get_or_train_tokenizer(
      dcfg.tokenizer_path or None, cache, lambda: pipeline.read_captions(source, dcfg.text_key),
      dcfg.tokenizer_vocab_size)
  src = dcfg.tokenizer_path or cache
  if jax.process_index() == 0:
    # Written whole, then renamed: a reader never sees a partial file.
    tmp = in_workdir.parent / (TOKENIZER_FILE + ".tmp")
    tmp.write_bytes(epath.Path(src).read_bytes())
    tmp.rename(in_workdir)
  return tok


def check_tokenizer_fits(tok, model_config: ModelConfig) -> None:
  if tok.vocab_size > model_config.text_vocab_size:
    raise ConfigError(f"the tokenizer has {tok.vocab_size} pieces but "
                      f"config.model.text_vocab_size={model_config.text_vocab_size}; raise it")


def null_tokens(tok, max_len: int) -> np.ndarray:
  """The empty caption, [eos, pad, ...]: the unconditional input for guidance."""
  return tok.encode_batch([""], max_len)[0]


def train_iterator(config: ml_collections.ConfigDict, source, tok):
  """This process's share of the global batch, repeated forever, shuffled from config.seed."""
  per_process = config.batch_size // jax.process_count()
  return pipeline.make_dataset_iterator(
      source, tokenizer=tok, batch_size=per_process, image_size=config.model.image_size,
      max_text_len=config.model.text_max_len, seed=config.seed,
      image_key=config.data.image_key, text_key=config.data.text_key,
      worker_count=config.data.worker_count)
