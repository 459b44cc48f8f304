r"""Samples images for prompts from a trained run.

  python -m ecdit_jax.sample --workdir=DIR --prompts=prompts.txt --outdir=OUT \
      [--steps=25 --cfg_scale=3 --seed=0 --use_ema --method=euler --batch_size=64]
      [--mesh=expert=2,fsdp=2] [--pretrained_text_encoder=DIR --pretrained_vae=DIR]

Writes OUT/00000.png, OUT/00001.png, ... in prompt order (one prompt per line of the file), at
the training resolution (a model trained on VAE latents: the VAE's output resolution), from the
latest checkpoint. Image i depends only on (seed, i) and its prompt, not on the batch it was
generated in. ``--mesh`` restores the parameters sharded over the local devices (FSDP / expert
parallelism, as in training) for models too large for one. The frozen text encoder and VAE of a
run come from its config.pretrained; the ``--pretrained_*`` flags point at other copies
(weights moved since training).
"""

import os

from absl import app, flags, logging

from ecdit_jax import pretrained_flags

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
                    "out are 1; data fills the rest). Empty: one device.")
flags.mark_flags_as_required(["workdir", "prompts", "outdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  from ecdit_jax.train import inference  # after flag parsing
  from ecdit_jax.train.sampling import to_uint8, write_pngs

  try:
    prompts = inference.read_prompts(FLAGS.prompts)
    mesh_sizes = inference.parse_mesh(FLAGS.mesh)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  if os.path.isdir(FLAGS.outdir) and os.listdir(FLAGS.outdir):
    raise app.UsageError(f"--outdir={FLAGS.outdir} is not empty; refusing to overwrite")
  overrides = pretrained_flags.overrides()
  try:
    run = inference.load_run(FLAGS.workdir, step=FLAGS.checkpoint_step, use_ema=FLAGS.use_ema,
                             mesh_sizes=mesh_sizes, pretrained_overrides=overrides)
    sample_cfg = run.config.sample
    sampler = inference.make_run_sampler(
        run, num_steps=FLAGS.steps or sample_cfg.num_steps,
        cfg_scale=sample_cfg.cfg_scale if FLAGS.cfg_scale is None else FLAGS.cfg_scale,
        method=FLAGS.method or sample_cfg.method)
  except ValueError as e:  # a mesh that does not fit, missing pretrained weights
    raise app.UsageError(str(e)) from e
  tokens = run.tokenizer.encode_batch(prompts, run.model_config.text_max_len)
  with inference.on_mesh(run):
    for start in range(0, len(prompts), FLAGS.batch_size):
      images = sampler(run.params, tokens[start:start + FLAGS.batch_size], run.null_tokens,
                       FLAGS.seed, first_index=start)
      write_pngs(to_uint8(images), FLAGS.outdir, first_index=start)
  print(f"wrote {len(prompts)} images to {FLAGS.outdir} (checkpoint step {run.step})")


if __name__ == "__main__":
  app.run(main)
