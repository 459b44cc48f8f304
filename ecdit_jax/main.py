r"""Trains an EC-DiT: ``python -m ecdit_jax.main --config=configs/default.py --workdir=DIR``.

Override any config key with ``--config.KEY=VALUE`` (e.g. ``--config.num_train_steps=5000``);
unknown keys and bad values fail at start, naming the key. Re-running on an existing workdir
resumes from its latest checkpoint.

Multi-process runs start the same command in every process: TPU pods and SLURM jobs are
detected; elsewhere pass ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I``.
"""

from absl import flags
from ml_collections import config_flags

from ecdit_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
config_flags.DEFINE_config_file("config", None, "Training configuration file.",
                                lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  cli.start_processes()
  from ecdit_jax.train.loop import train_and_evaluate  # pylint: disable=import-outside-toplevel
  train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  cli.run(main)
