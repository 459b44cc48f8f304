r"""Exports a run's parameters for inference: ``python -m ecdit_jax.export --workdir=DIR --out=DIR2``.

DIR2 receives the EMA parameters (``--use_ema=false``: the raw ones) of the latest checkpoint
(or ``--checkpoint_step``) as a standalone Orbax checkpoint without optimizer state, the run's
config as JSON, its tokenizer (a run with a frozen pretrained text encoder has none of its own:
the config names the encoder's weights), and ``export.json`` (step, which parameters). The
sample and evaluate commands take DIR2 in place of a workdir. DIR2 must not exist yet or be
empty: an export never overwrites anything.
"""

import json

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
flags.DEFINE_string("out", None, "New (or empty) directory for the export.")
flags.DEFINE_bool("use_ema", True, "Export the EMA parameters (else the raw ones).")
flags.DEFINE_integer("checkpoint_step", None, "Checkpoint to export (default: the latest).")
flags.mark_flags_as_required(["workdir", "out"])


def export(workdir: str, out: str, *, step: int | None = None, use_ema: bool = True) -> int:
  """Writes the export; returns the exported step."""
  import orbax.checkpoint as ocp
  from etils import epath

  from ecdit_jax.train import inference
  from ecdit_jax.train.input_pipeline import TOKENIZER_FILE

  target = epath.Path(out)
  if target.exists() and any(target.iterdir()):
    raise FileExistsError(f"--out={out} is not empty; exports never overwrite")
  if inference.is_export(workdir):
    raise ValueError(f"--workdir={workdir} is already an export")
  # The frozen pretrained networks stay where the config names them: not part of an export.
  run = inference.load_run(workdir, step=step, use_ema=use_ema, load_pretrained=False)
  target.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(target.absolute() / inference.EXPORT_PARAMS, run.params)
  (target / "config.json").write_text(json.dumps(run.config.to_dict(), indent=2))
  tokenizer = epath.Path(workdir) / TOKENIZER_FILE
  if tokenizer.exists():  # absent when the run's text encoder is a frozen pretrained one
    (target / TOKENIZER_FILE).write_bytes(tokenizer.read_bytes())
  # Written last: its presence marks a complete export.
  (target / inference.EXPORT_INFO).write_text(json.dumps(
      {"step": run.step, "parameters": "ema" if use_ema else "raw"}, indent=2))
  return run.step


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  step = export(FLAGS.workdir, FLAGS.out, step=FLAGS.checkpoint_step, use_ema=FLAGS.use_ema)
  print(f"exported step {step} ({'EMA' if FLAGS.use_ema else 'raw'} parameters) to {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
