r"""The embedded default: a tiny EC-DiT (8 experts) trained on GenEval-Shapes, 32x32 pixels.

Sized to learn visibly within minutes on a 2-core CPU; the same code scales to the paper's
models (configs/ecdit.py). Every other key keeps the default documented in ecdit_jax/config.py
(training) and ecdit_jax/model/config.py (the model). Run it with:

  python -m ecdit_jax.main --config=configs/default.py --workdir=workdirs/default

Any key can be overridden on the command line, e.g. ``--config.batch_size=64``.
"""

import ml_collections

from ecdit_jax.config import config_dict


def get_config() -> ml_collections.ConfigDict:
  config = config_dict()
  # 64 tokens of 4x4 pixels and a small text encoder: learns within minutes on a CPU (the paper
  # uses patch 2 on latents). float32: bfloat16 is slower than float32 on most CPUs.
  config.model.update(image_size=32, in_channels=3, patch_size=4, hidden_size=128, num_layers=6,
                      num_heads=4, num_kv_heads=2, text_vocab_size=128, text_max_len=16,
                      text_hidden_size=128, text_num_layers=2, text_num_heads=4,
                      dtype="float32")
  return config


def runlocal_schedule(config: ml_collections.ConfigDict) -> None:
  """The step counts of every ``runlocal`` variant: a few steps of batch 8 that still log,
  checkpoint and sample, so a laptop run goes through the whole loop in seconds."""
  config.batch_size = 8
  config.num_train_steps = 20
  config.warmup_steps = 5
  config.log_every_steps = 5
  config.checkpoint_every_steps = 10
  config.sample_every_steps = 20
