r"""Exports a run's parameters for inference.

  python -m ecdit_jax.export --workdir=DIR --out=DIR2 [--dtype=bfloat16 --mesh=fsdp=8]

DIR2 receives the EMA parameters (``--use_ema=false``: the raw ones) of the latest checkpoint
(or ``--checkpoint_step``), optionally cast (``--dtype=bfloat16`` halves the size), as a
standalone Orbax checkpoint without optimizer state; the run's config as JSON; its tokenizer (a
run with a frozen pretrained text encoder has none of its own: the config names the encoder's
weights); and ``export.json`` (step, which parameters). Only the parameters are read from the
checkpoint. The sample and evaluate commands take DIR2 in place of a workdir. DIR2 must not
exist yet or be empty: an export never overwrites anything.
"""

from absl import flags

from ecdit_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
flags.DEFINE_string("out", None, "New (or empty) directory for the export.")
flags.DEFINE_bool("use_ema", True, "Export the EMA parameters (else the raw ones).")
flags.DEFINE_integer("checkpoint_step", None, "Checkpoint to export (default: the latest).")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Cast the parameters (default: as "
                  "trained).")
flags.DEFINE_string("mesh", "", "Restore the parameters into their shards on a device mesh, e.g. "
                    "'fsdp=8' (axes left out are 1; data fills the rest). Empty: one device "
                    "(split over every device of the job when it has several processes).")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
  del argv
  cli.start_processes()
  # After joining the job: JAX's backends must not start before.
  import jax  # pylint: disable=import-outside-toplevel
  from ecdit_jax.inference.run import export_run  # pylint: disable=import-outside-toplevel
  from ecdit_jax.parallel.mesh import MeshConfig  # pylint: disable=import-outside-toplevel

  pod = jax.process_count() > 1
  mesh = MeshConfig.parse(FLAGS.mesh) or (MeshConfig(data=1, fsdp=-1) if pod else None)
  step = export_run(FLAGS.workdir, FLAGS.out, step=FLAGS.checkpoint_step, use_ema=FLAGS.use_ema,
                    dtype=FLAGS.dtype, mesh_config=mesh, write_files=jax.process_index() == 0)
  print(f"exported step {step} ({'EMA' if FLAGS.use_ema else 'raw'} parameters) to {FLAGS.out}")


if __name__ == "__main__":
  cli.run(main)
