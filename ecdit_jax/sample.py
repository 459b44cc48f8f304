r"""Samples images for prompts from a trained run.

  python -m ecdit_jax.sample --workdir=DIR --prompts=prompts.txt --outdir=OUT \
      [--steps=25 --cfg_scale=3 --seed=0 --use_ema --method=euler --batch_size=64]
      [--mesh=expert=2,fsdp=2] [--pretrained_text_encoder=DIR --pretrained_vae=DIR]

Writes OUT/00000.png, OUT/00001.png, ... in prompt order (one prompt per line of the file), at
the training resolution (a model trained on VAE latents: the VAE's output resolution), from the
latest checkpoint. Image i depends only on (seed, i) and its prompt, not on the batch it was
generated in. ``--mesh`` restores the parameters sharded over the devices (FSDP / expert
parallelism, as in training) for models too large for one; on several processes (a pod) the
mesh spans all of them and process 0 writes the images. The frozen text encoder and VAE of a
run come from its config.pretrained; the ``--pretrained_*`` flags point at other copies
(weights moved since training).
"""

import sys

from absl import flags
from etils import epath

from ecdit_jax import cli, pretrained_flags
from ecdit_jax.errors import ConfigError

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/, or an export.")
flags.DEFINE_string("prompts", None, "Text file with one prompt per line.")
flags.DEFINE_string("outdir", None, "Where to write the PNGs.")
flags.DEFINE_integer("steps", None, "Sampling steps (default: the run's config.sample.num_steps).")
flags.DEFINE_float("cfg_scale", None, "Guidance scale (default: the run's config).")
flags.DEFINE_enum("method", None, ["euler", "heun"], "ODE solver (default: the run's config).")
flags.DEFINE_integer("seed", 0, "Noise seed.")
flags.DEFINE_bool("use_ema", True, "Sample with the EMA parameters.")
flags.DEFINE_integer("batch_size", 64, "Prompts per sampling batch.")
flags.DEFINE_integer("checkpoint_step", None, "Checkpoint to use (default: the latest).")
flags.DEFINE_string("mesh", "", "Sample on a device mesh, e.g. 'expert=2,fsdp=2' (axes left "
                    "out are 1; data fills the rest). Empty: one device (all devices of the job "
                    "when it has several processes).")
flags.mark_flags_as_required(["workdir", "prompts", "outdir"])


def main(argv):
  del argv
  cli.start_processes()
  # After joining the job: JAX's backends must not start before.
  import jax  # pylint: disable=import-outside-toplevel
  from ecdit_jax.data import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
  from ecdit_jax.inference import images, run as run_lib  # pylint: disable=import-outside-toplevel
  from ecdit_jax.parallel.mesh import MeshConfig  # pylint: disable=import-outside-toplevel

  if FLAGS.batch_size < 1:
    raise ConfigError(f"--batch_size={FLAGS.batch_size} must be at least 1")
  prompts = run_lib.read_prompts(FLAGS.prompts)
  outdir = epath.Path(FLAGS.outdir)
  if outdir.exists() and any(outdir.iterdir()):
    raise ConfigError(f"--outdir={FLAGS.outdir} is not empty; refusing to overwrite")
  mesh = MeshConfig.parse(FLAGS.mesh) or (MeshConfig() if jax.process_count() > 1 else None)
  run = run_lib.load_run(FLAGS.workdir, step=FLAGS.checkpoint_step, use_ema=FLAGS.use_ema,
                         mesh_config=mesh, pretrained_overrides=pretrained_flags.overrides())
  sample_cfg = run.config.sample
  sampler = run_lib.make_run_sampler(
      run, num_steps=FLAGS.steps or sample_cfg.num_steps,
      cfg_scale=sample_cfg.cfg_scale if FLAGS.cfg_scale is None else FLAGS.cfg_scale,
      method=FLAGS.method or sample_cfg.method)
  max_len = run.model_config.text_max_len
  for line in tokenizer_lib.prompt_warnings(run.tokenizer, prompts, max_len):
    print(f"warning: {line}", file=sys.stderr, flush=True)
  tokens = run.tokenizer.encode_batch(prompts, max_len)
  for start in range(0, len(prompts), FLAGS.batch_size):
    batch = images.to_uint8(sampler(run.params, tokens[start:start + FLAGS.batch_size],
                                    run.null_tokens, FLAGS.seed, first_index=start))
    if jax.process_index() == 0:
      images.write_pngs(batch, FLAGS.outdir, first_index=start)
      if len(prompts) > FLAGS.batch_size:
        print(f"sampled {start + len(batch)} of {len(prompts)} images", flush=True)
  print(f"wrote {len(prompts)} images to {FLAGS.outdir} (checkpoint step {run.step})")


if __name__ == "__main__":
  cli.run(main)
