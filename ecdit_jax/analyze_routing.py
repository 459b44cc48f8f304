r"""Where expert choice spends compute while sampling: per token, sampling step and MoE layer.

  python -m ecdit_jax.analyze_routing --workdir=DIR --outdir=OUT [--prompts=FILE --steps=25
      --cfg_scale=3 --seed=0 --capacity_factor=2 --pretrained_text_encoder=DIR
      --pretrained_vae=DIR]

Without --prompts it uses GenEval-Shapes evaluation prompts (single and two objects). Writes
OUT/images/NNNNN.png (the samples: the same images as ``ecdit_jax.sample`` with Euler and the
same seed), OUT/heatmaps/NNNNN.png (each sample, a map of experts per token averaged over steps
and MoE layers, dark = fewer, and the map laid over the sample), OUT/compute_by_step.png and
OUT/compute_by_layer.png (experts per object token and per background token),
OUT/counts.npy ((steps, moe_layers, images, tokens) experts per token) and OUT/summary.json,
which includes the ratio of compute on object tokens to compute on background tokens. A model
trained on VAE latents is analysed on its latent tokens; its images are the VAE's decodings
(the run's config.pretrained.vae, or --pretrained_vae), and a token counts as an object token
when its patch of the decoded image holds object pixels.
"""

import json
import os
import sys

import numpy as np
from absl import flags
from PIL import Image, ImageDraw

from ecdit_jax import cli, pretrained_flags
from ecdit_jax.errors import ConfigError

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/, or an export.")
flags.DEFINE_string("outdir", None, "New (or empty) directory for the analysis.")
flags.DEFINE_string("prompts", None, "Text file with one prompt per line (default: GenEval-"
                    "Shapes single- and two-object prompts).")
flags.DEFINE_integer("num_prompts", 8, "Default prompts to use when --prompts is not given.")
flags.DEFINE_integer("steps", None, "Euler steps (default: the run's config.sample.num_steps).")
flags.DEFINE_float("cfg_scale", None, "Guidance scale (default: the run's config).")
flags.DEFINE_float("capacity_factor", None, "Inference capacity factor (default: the config's).")
flags.DEFINE_integer("seed", 0, "Noise seed.")
flags.mark_flags_as_required(["workdir", "outdir"])

SCALE = 8  # heatmap pixels per image pixel


def _default_prompts(n):
  from ecdit_jax.eval import geneval_shapes as scorer
  per = -(-n // 2)
  prompts = [p for p in scorer.evaluation_prompts(per, seed=0)
             if p.category in ("single_object", "two_object")]
  return [p.caption for p in prompts][:n]


_SERIES_COLOURS = {"object": (200, 60, 40), "background": (90, 90, 90)}


def _bar_chart(rows, labels, title, path):
  """Grouped bars: experts per object token and per background token for each row."""
  group, pad, height = 44, 30, 280
  canvas = Image.new("RGB", (max(group * len(rows) + 2 * pad + 60, 420), height), "white")
  draw = ImageDraw.Draw(canvas)
  draw.text((pad, 5), title, fill=(0, 0, 0))
  for k, (series, colour) in enumerate(_SERIES_COLOURS.items()):
    draw.rectangle([pad + 110 * k, 20, pad + 110 * k + 10, 30], fill=colour)
    draw.text((pad + 110 * k + 14, 19), series, fill=(0, 0, 0))
  values = [row[s] for row in rows for s in _SERIES_COLOURS if row[s] is not None]
  top = max(values + [1e-9])
  for i, (row, label) in enumerate(zip(rows, labels)):
    for k, (series, colour) in enumerate(_SERIES_COLOURS.items()):
      if row[series] is None:
        continue
      x0 = pad + group * i + 18 * k
      bar = int((height - 2 * pad - 40) * row[series] / top)
      draw.rectangle([x0, height - pad - bar, x0 + 16, height - pad], fill=colour)
    draw.text((pad + group * i, height - pad + 4), label, fill=(0, 0, 0))
  canvas.save(path)


def _write_charts(result: dict, outdir: str) -> None:
  by_step = result["experts_per_token_by_step"]
  _bar_chart(by_step, [f"{r['t']:.2f}" for r in by_step],
             "experts per object / background token vs t (1 = noise)",
             os.path.join(outdir, "compute_by_step.png"))
  by_layer = result["experts_per_token_by_layer"]
  _bar_chart(by_layer, [str(r["block"]) for r in by_layer],
             "experts per object / background token vs block",
             os.path.join(outdir, "compute_by_layer.png"))


def main(argv):
  del argv
  if os.path.isdir(FLAGS.outdir) and os.listdir(FLAGS.outdir):
    raise ConfigError(f"--outdir={FLAGS.outdir} is not empty; refusing to overwrite")
  cli.start_processes()
  # After joining the job: JAX's backends must not start before.
  from ecdit_jax.data.tokenizer import prompt_warnings  # pylint: disable=import-outside-toplevel
  from ecdit_jax.diffusion.samplers import sampling_timesteps  # pylint: disable=import-outside-toplevel
  from ecdit_jax.eval import routing  # pylint: disable=import-outside-toplevel
  from ecdit_jax.inference import images as images_lib  # pylint: disable=import-outside-toplevel
  from ecdit_jax.inference import run as run_lib  # pylint: disable=import-outside-toplevel

  prompts = (run_lib.read_prompts(FLAGS.prompts) if FLAGS.prompts
             else _default_prompts(FLAGS.num_prompts))
  run = run_lib.load_run(FLAGS.workdir, pretrained_overrides=pretrained_flags.overrides())
  mc = run.model_config
  if mc.moe_layout == "none":
    raise ConfigError("the model has no MoE layer (config.model.moe_layout='none'): there is "
                      "no routing to analyse")
  steps = FLAGS.steps or run.config.sample.num_steps
  cfg_scale = run.config.sample.cfg_scale if FLAGS.cfg_scale is None else FLAGS.cfg_scale
  sampler = run_lib.make_run_sampler(run, num_steps=steps, cfg_scale=cfg_scale, method="euler",
                                     capacity_factor=FLAGS.capacity_factor, record_routing=True)
  for line in prompt_warnings(run.tokenizer, prompts, mc.text_max_len):
    print(f"warning: {line}", file=sys.stderr, flush=True)
  tokens = run.tokenizer.encode_batch(prompts, mc.text_max_len)
  print(f"sampling {len(prompts)} images, recording the experts of every token at each of "
        f"{steps} steps", flush=True)
  images, counts = sampler(run.params, tokens, run.null_tokens, FLAGS.seed)
  images, counts = images_lib.to_uint8(images), np.asarray(counts)
  # A latent token's patch covers f x f pixels per latent of the decoded image.
  pixel_patch = mc.patch_size * (run.vae.downsample_factor if run.vae is not None else 1)
  mask = routing.object_token_mask(images, pixel_patch)
  images_lib.write_pngs(images, os.path.join(FLAGS.outdir, "images"))
  routing.write_heatmaps(images, routing.token_maps(counts, mc.grid_size),
                  os.path.join(FLAGS.outdir, "heatmaps"), mc.image_size * SCALE)
  np.save(os.path.join(FLAGS.outdir, "counts.npy"), counts)
  result = routing.summary(counts, mask, np.asarray(sampling_timesteps(steps)),
                           mc.moe_layer_indices)
  result.update(prompts=prompts, checkpoint_step=run.step, steps=steps, cfg_scale=cfg_scale,
                seed=FLAGS.seed, capacity_factor=FLAGS.capacity_factor or mc.eval_capacity_factor)
  with open(os.path.join(FLAGS.outdir, "summary.json"), "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
  _write_charts(result, FLAGS.outdir)
  ratio = result["object_over_background_compute"]
  print(f"{len(prompts)} images, {steps} steps: object/background compute "
        f"{'n/a' if ratio is None else f'{ratio:.3f}'}; written to {FLAGS.outdir}")


if __name__ == "__main__":
  cli.run(main)
