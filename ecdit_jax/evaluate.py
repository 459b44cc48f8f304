r"""Scores a trained run on GenEval-Shapes, and with FID and CLIP score.

  python -m ecdit_jax.evaluate --workdir=DIR --eval=geneval_shapes \
      [--num_per_category=100 --capacity_factors=1,2,4 --steps --cfg_scale --seed]
  python -m ecdit_jax.evaluate --workdir=DIR --eval=fid,clip \
      --inception_weights=pt_inception-2015-12-05-6726825d.pth --clip_weights=CLIP_DIR \
      [--reference=tfds:NAME[:SPLIT] --reference_stats=STATS.npz --num_images=30000]

Samples the standard prompt set (``num_per_category`` seeded prompts for each of the six
categories) from the latest checkpoint's EMA parameters, scores every image with the exact
GenEval-Shapes scorer, prints a per-category table and writes
``DIR/eval/geneval_shapes_step<N>_...json``. Several ``--capacity_factors`` give the same
evaluation at each inference capacity (expert choice's adaptive-compute knob).

Each capacity also reports its compute, counted by ``ecdit_jax.model.flops`` (matmuls only,
2 FLOPs per multiply-accumulate): "FLOPs per forward" is the DiT on one image at that capacity,
"FLOPs per image" everything that generating one image costs, i.e. the DiT once per Euler step
(twice per Heun step) on the conditional and the unconditional half (the sampler evaluates both
whatever the guidance scale) plus encoding the prompt and the null caption once.

FID and CLIP score generate one image for each caption of the first ``--num_images`` records of
the reference dataset (default: the run's own dataset, test split; ``tfds:NAME[:SPLIT]`` reads any
prepared TFDS image-text dataset, e.g. COCO captions). FID compares their Inception pool3
statistics with those of the same records' real images (pytorch-fid's network and weights file;
``--reference_stats`` caches the real statistics); CLIP score is 100 * max(cos, 0) between each
image and its caption under a Hugging Face format CLIP (a directory with config.json,
model.safetensors, vocab.json and merges.txt). Results go to
``DIR/eval/{fid,clip,fid_clip}_step<N>_...json``.
"""

import json
import os

from absl import app, flags, logging
from etils import epath

from ecdit_jax import pretrained_flags
from ecdit_jax.model.flops import format_flops, generation_flops_per_image

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/, or an export.")
flags.DEFINE_list("eval", ["geneval_shapes"], "Evaluations to run: geneval_shapes, fid, clip.")
flags.DEFINE_integer("num_per_category", 100, "Prompts per GenEval-Shapes category.")
flags.DEFINE_list("capacity_factors", [], "Inference capacity factors (default: the config's).")
flags.DEFINE_integer("steps", None, "Sampling steps (default: the run's config.sample.num_steps).")
flags.DEFINE_float("cfg_scale", None, "Guidance scale (default: the run's config).")
flags.DEFINE_integer("seed", 0, "Noise seed.")
flags.DEFINE_integer("batch_size", 100, "Images per sampling batch.")
flags.DEFINE_bool("use_ema", True, "Evaluate the EMA parameters.")
flags.DEFINE_string("inception_weights", None,
                    "FID: pytorch-fid's Inception weights file (pt_inception-2015-12-05-*.pth).")
flags.DEFINE_string("clip_weights", None, "CLIP score: a Hugging Face format CLIP directory.")
flags.DEFINE_string("reference", "", "FID/CLIP captions and real images: '' = the run's dataset "
                    "(test split), or tfds:NAME[:SPLIT].")
flags.DEFINE_string("reference_stats", None, "FID: .npz cache of the real images' statistics; "
                    "read if it exists, else written.")
flags.DEFINE_string("data_dir", None, "TFDS data_dir of --reference (default: the run's).")
flags.DEFINE_integer("num_images", 1000, "FID/CLIP: images generated (one per caption).")
flags.DEFINE_string("mesh", "", "Sample on a device mesh, e.g. 'expert=2,fsdp=2' (axes left "
                    "out are 1; data fills the rest). Empty: one device.")
flags.mark_flags_as_required(["workdir"])

SUPPORTED = ("geneval_shapes", "fid", "clip")


def evaluate_geneval_shapes(run, *, num_per_category, capacity_factor, steps, cfg_scale, seed,
                            batch_size):
  """Samples the standard prompts and scores them; returns the scorer's summary."""
  from ecdit_jax.train.geneval import geneval_shapes_score
  from ecdit_jax.train.inference import make_run_sampler, on_mesh

  sampler = make_run_sampler(run, num_steps=steps, cfg_scale=cfg_scale,
                             method=run.config.sample.method, capacity_factor=capacity_factor)
  with on_mesh(run):
    return geneval_shapes_score(sampler, run.params, run.tokenizer, run.null_tokens,
                                run.model_config.text_max_len,
                                num_per_category=num_per_category, seed=seed,
                                batch_size=batch_size)


def flops_report(model_config, *, capacity_factor, num_steps, method) -> dict:
  """Compute of one generated image at ``capacity_factor``, as the sampler runs the model."""
  return generation_flops_per_image(model_config, num_steps=num_steps, method=method,
                                    capacity_factor=capacity_factor)


def format_table(results: dict) -> str:
  factors = list(results)
  categories = list(next(iter(results.values()))["per_category"])
  lines = ["| category | " + " | ".join(f"f={f}" for f in factors) + " |",
           "|---" * (len(factors) + 1) + "|"]
  for name in categories + ["overall"]:
    cells = []
    for f in factors:
      value = results[f]["overall"] if name == "overall" else results[f]["per_category"][name]
      cells.append("-" if value is None else f"{value:.3f}")
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  for label, key in (("FLOPs per forward", "per_forward"), ("FLOPs per image", "total")):
    cells = [format_flops(results[f]["flops"][key]) for f in factors]
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _write_json(name: str, payload: dict) -> str:
  outdir = os.path.join(FLAGS.workdir, "eval")
  os.makedirs(outdir, exist_ok=True)
  path = os.path.join(outdir, name)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(payload, f, indent=2)
  os.replace(path + ".tmp", path)
  return path


def run_geneval_shapes(run, steps: int) -> None:
  factors = [float(f) for f in FLAGS.capacity_factors] or [run.model_config.eval_capacity_factor]
  results = {}
  for factor in factors:
    results[factor] = evaluate_geneval_shapes(
        run, num_per_category=FLAGS.num_per_category, capacity_factor=factor, steps=steps,
        cfg_scale=run.config.sample.cfg_scale if FLAGS.cfg_scale is None else FLAGS.cfg_scale,
        seed=FLAGS.seed, batch_size=FLAGS.batch_size)
    results[factor]["flops"] = flops_report(run.model_config, capacity_factor=factor,
                                            num_steps=steps, method=run.config.sample.method)
  # The name holds every setting, so a file is only ever replaced by the same evaluation.
  name = (f"geneval_shapes_step{run.step}_n{FLAGS.num_per_category}_seed{FLAGS.seed}_"
          f"f{'-'.join(str(f) for f in factors)}{'' if FLAGS.use_ema else '_raw'}.json")
  path = _write_json(name, {"step": run.step, "use_ema": FLAGS.use_ema, "seed": FLAGS.seed,
                            "num_per_category": FLAGS.num_per_category,
                            "results": {str(k): v for k, v in results.items()}})
  print(f"GenEval-Shapes, checkpoint step {run.step}, {FLAGS.num_per_category} prompts/category")
  print(format_table(results))
  print(f"wrote {path}")


def run_fid_clip(run, steps: int, wanted: set[str]) -> None:
  """FID and/or CLIP score of ``--num_images`` images generated from the reference captions."""
  from ecdit_jax.train import image_metrics
  from ecdit_jax.train.inference import make_run_sampler, on_mesh

  reference = image_metrics.reference_dataset(run.config, FLAGS.reference, FLAGS.data_dir)
  captions = image_metrics.reference_captions(reference, FLAGS.num_images)
  metric_models = {}
  if "fid" in wanted:
    from ecdit_jax.eval import inception
    feature_fn = inception.make_feature_fn(inception.load_fid_inception(FLAGS.inception_weights))
    metric_models.update(feature_fn=feature_fn, reference_stats=image_metrics.reference_statistics(
        reference, feature_fn, FLAGS.num_images, FLAGS.reference_stats, FLAGS.batch_size))
  if "clip" in wanted:
    from ecdit_jax.encoders.clip import load_clip
    from ecdit_jax.encoders.clip_tokenizer import load_clip_tokenizer
    metric_models.update(clip_model=load_clip(FLAGS.clip_weights),
                         clip_tokenizer=load_clip_tokenizer(FLAGS.clip_weights))
  cfg_scale = run.config.sample.cfg_scale if FLAGS.cfg_scale is None else FLAGS.cfg_scale
  sampler = make_run_sampler(run, num_steps=steps, cfg_scale=cfg_scale,
                             method=run.config.sample.method)
  with on_mesh(run):
    results = image_metrics.fid_and_clip(run, sampler, captions, seed=FLAGS.seed,
                                         batch_size=FLAGS.batch_size, **metric_models)
  metrics = "_".join(m for m in ("fid", "clip") if m in wanted)
  name = (f"{metrics}_step{run.step}_n{len(captions)}_seed{FLAGS.seed}_cfg{cfg_scale}"
          f"{'' if FLAGS.use_ema else '_raw'}.json")
  path = _write_json(name, {"step": run.step, "use_ema": FLAGS.use_ema, "seed": FLAGS.seed,
                            "steps": steps, "cfg_scale": cfg_scale,
                            "reference": reference.description, **results})
  print(f"checkpoint step {run.step}, {results['num_images']} images from the captions of "
        f"{reference.description}, {steps} steps, guidance {cfg_scale}")
  if "fid" in results:
    print(f"FID {results['fid']:.3f}")
  if "clip_score" in results:
    print(f"CLIP score {results['clip_score']:.3f}")
  print(f"wrote {path}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  wanted = set(FLAGS.eval)
  unknown = sorted(wanted - set(SUPPORTED))
  if unknown:
    raise app.UsageError(f"--eval: unknown evaluation(s) {unknown}; available: {SUPPORTED}")
  # Missing weights fail here, before any sampling.
  for metric, flag in (("fid", "inception_weights"), ("clip", "clip_weights")):
    value = getattr(FLAGS, flag)
    if metric in wanted and not value:
      raise app.UsageError(f"--eval={metric} needs --{flag}")
    if metric in wanted and not epath.Path(value).exists():
      raise app.UsageError(f"--{flag}={value}: no such file or directory")
  if FLAGS.num_images < 2:
    raise app.UsageError(f"--num_images={FLAGS.num_images}: FID needs at least 2 images")
  logging.set_verbosity(logging.WARNING)
  from ecdit_jax.train import inference  # after flag parsing: keeps --help fast

  try:
    run = inference.load_run(FLAGS.workdir, use_ema=FLAGS.use_ema,
                             mesh_sizes=inference.parse_mesh(FLAGS.mesh),
                             pretrained_overrides=pretrained_flags.overrides())
  except ValueError as e:  # a mesh that does not fit, missing pretrained weights
    raise app.UsageError(str(e)) from e
  steps = FLAGS.steps or run.config.sample.num_steps
  if "geneval_shapes" in wanted:
    run_geneval_shapes(run, steps)
  if wanted & {"fid", "clip"}:
    run_fid_clip(run, steps, wanted)


if __name__ == "__main__":
  app.run(main)
