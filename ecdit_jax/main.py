r"""Trains an EC-DiT: ``python -m ecdit_jax.main --config=configs/default.py --workdir=DIR``.

Override any config key with ``--config.KEY=VALUE`` (e.g. ``--config.num_train_steps=5000``);
unknown keys and bad values fail at start, naming the key. Re-running on an existing workdir
resumes from its latest checkpoint.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from ecdit_jax.train.loop import train_and_evaluate

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
config_flags.DEFINE_config_file("config", None, "Training configuration file.",
                                lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # progress lines go to stdout
  train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
