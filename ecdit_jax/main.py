r"""Trains an EC-DiT: ``python -m ecdit_jax.main --config=configs/default.py --workdir=DIR``.

Override any config key with ``--config.KEY=VALUE`` (e.g. ``--config.num_train_steps=5000``);
unknown keys and bad values fail at start, naming the key. Re-running on an existing workdir
resumes from its latest checkpoint.

Multi-process runs start the same command in every process: TPU pods and SLURM jobs are
detected; elsewhere pass ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I``.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from ecdit_jax.parallel import distributed
from ecdit_jax.train.loop import train_and_evaluate

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
config_flags.DEFINE_config_file("config", None, "Training configuration file.",
                                lock_config=True)
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-process).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-process).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # progress lines go to stdout
  how = distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  if how != "single process":
    print(f"multi-process: {how}", flush=True)
  train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
