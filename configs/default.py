r"""The embedded default: a tiny EC-DiT (8 experts) trained on GenEval-Shapes, 32x32 pixels.

Sized to learn visibly within minutes on a 2-core CPU; the same code scales to the paper's
models (configs/ecdit.py). Every other key keeps the default documented in ecdit_jax/config.py
(training) and ecdit_jax/model/config.py (the model); the tiny model is
ecdit_jax.config.default_run_config. Run it with:

  python -m ecdit_jax.main --config=configs/default.py --workdir=workdirs/default

Any key can be overridden on the command line, e.g. ``--config.batch_size=64``.
"""

import ml_collections

from ecdit_jax.config import default_run_config


def get_config() -> ml_collections.ConfigDict:
  # Defined in the package, so that an installed ecdit_jax (the Colab notebook) has it too.
  return default_run_config()


def runlocal_schedule(config: ml_collections.ConfigDict) -> None:
  """The step counts of every ``runlocal`` variant: a few steps of batch 8 that still log,
  checkpoint and sample, so a laptop run goes through the whole loop in seconds."""
  config.batch_size = 8
  config.num_train_steps = 20
  config.warmup_steps = 5
  config.log_every_steps = 5
  config.checkpoint_every_steps = 10
  config.sample_every_steps = 20
