r"""Scores a trained run on GenEval-Shapes, and with FID and CLIP score.

  python -m ecdit_jax.evaluate --workdir=DIR --eval=geneval_shapes \
      [--num_per_category=100 --capacity_factors=1,2,4 --steps --cfg_scale --seed]
  python -m ecdit_jax.evaluate --workdir=DIR --eval=fid,clip \
      --inception_weights=pt_inception-2015-12-05-6726825d.safetensors --clip_weights=CLIP_DIR \
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

from absl import flags
from etils import epath

from ecdit_jax import cli, pretrained_flags
from ecdit_jax.errors import ConfigError
from ecdit_jax.fileio import write_atomic
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
                    "FID: pytorch-fid's Inception weights converted to safetensors "
                    "(python -m ecdit_jax.encoders.convert_torch pt_inception-2015-12-05-*.pth).")
flags.DEFINE_string("clip_weights", None, "CLIP score: a Hugging Face format CLIP directory.")
flags.DEFINE_string("reference", "", "FID/CLIP captions and real images: '' = the run's dataset "
                    "(test split), or tfds:NAME[:SPLIT].")
flags.DEFINE_string("reference_stats", None, "FID: .npz cache of the real images' statistics; "
                    "read if it exists, else written.")
flags.DEFINE_string("data_dir", None, "TFDS data_dir of --reference (default: the run's).")
flags.DEFINE_integer("num_images", 1000, "FID/CLIP: images generated (one per caption).")
flags.DEFINE_string("mesh", "", "Sample on a device mesh, e.g. 'expert=2,fsdp=2' (axes left "
                    "out are 1; data fills the rest). Empty: one device (all devices of the job "
                    "when it has several processes).")
flags.mark_flags_as_required(["workdir"])

SUPPORTED = ("geneval_shapes", "fid", "clip")


def evaluate_geneval_shapes(run, *, num_per_category, capacity_factor, steps, cfg_scale, seed,
                            batch_size):
  """Samples the standard prompts and scores them; returns the scorer's summary."""
  from ecdit_jax.inference import geneval, run as run_lib  # pylint: disable=import-outside-toplevel

  sampler = run_lib.make_run_sampler(run, num_steps=steps, cfg_scale=cfg_scale,
                                     method=run.config.sample.method,
                                     capacity_factor=capacity_factor)
  import jax  # pylint: disable=import-outside-toplevel

  def progress(done, total):
    if jax.process_index() == 0:
      print(f"capacity factor {capacity_factor}: sampled {done} of {total} images", flush=True)

  return geneval.geneval_shapes_score(sampler, run.params, run.tokenizer, run.null_tokens,
                                      run.model_config.text_max_len,
                                      num_per_category=num_per_category, seed=seed,
                                      batch_size=batch_size, progress=progress)


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


def _report(name: str, payload: dict, lines: list[str]) -> None:
  """Writes WORKDIR/eval/NAME and prints ``lines``: in one process of a job (process 0)."""
  import jax  # pylint: disable=import-outside-toplevel  (after joining the job)
  if jax.process_index() != 0:
    return
  path = epath.Path(FLAGS.workdir) / "eval" / name
  write_atomic(path, json.dumps(payload, indent=2))
  print("\n".join([*lines, f"wrote {path}"]), flush=True)


def run_geneval_shapes(run, steps: int) -> None:
  factors = _capacity_factors() or [run.model_config.eval_capacity_factor]
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
  payload = {"step": run.step, "use_ema": FLAGS.use_ema, "seed": FLAGS.seed,
             "num_per_category": FLAGS.num_per_category,
             "results": {str(k): v for k, v in results.items()}}
  _report(name, payload, [f"GenEval-Shapes, checkpoint step {run.step}, "
                          f"{FLAGS.num_per_category} prompts/category", format_table(results)])


def run_fid_clip(run, steps: int, wanted: set[str]) -> None:
  """FID and/or CLIP score of ``--num_images`` images generated from the reference captions."""
  from ecdit_jax.inference import image_metrics  # pylint: disable=import-outside-toplevel
  from ecdit_jax.inference.run import make_run_sampler  # pylint: disable=import-outside-toplevel

  reference = image_metrics.reference_dataset(run.config, FLAGS.reference, FLAGS.data_dir,
                                              image_size=run.image_size)
  captions = image_metrics.reference_captions(reference, FLAGS.num_images)
  metric_models = {}
  if "fid" in wanted:
    from ecdit_jax.eval import inception  # pylint: disable=import-outside-toplevel
    feature_fn = inception.make_feature_fn(inception.load_fid_inception(FLAGS.inception_weights))
    metric_models.update(feature_fn=feature_fn, reference_stats=image_metrics.reference_statistics(
        reference, feature_fn, FLAGS.num_images, FLAGS.reference_stats, FLAGS.batch_size))
  if "clip" in wanted:
    from ecdit_jax.encoders.clip import load_clip  # pylint: disable=import-outside-toplevel
    from ecdit_jax.encoders.clip_tokenizer import load_clip_tokenizer  # pylint: disable=import-outside-toplevel
    metric_models.update(clip_model=load_clip(FLAGS.clip_weights),
                         clip_tokenizer=load_clip_tokenizer(FLAGS.clip_weights))
  cfg_scale = run.config.sample.cfg_scale if FLAGS.cfg_scale is None else FLAGS.cfg_scale
  sampler = make_run_sampler(run, num_steps=steps, cfg_scale=cfg_scale,
                             method=run.config.sample.method)
  results = image_metrics.fid_and_clip(run, sampler, captions, seed=FLAGS.seed,
                                       batch_size=FLAGS.batch_size, **metric_models)
  metrics = "_".join(m for m in ("fid", "clip") if m in wanted)
  name = (f"{metrics}_step{run.step}_n{len(captions)}_seed{FLAGS.seed}_cfg{cfg_scale}"
          f"{'' if FLAGS.use_ema else '_raw'}.json")
  lines = [f"checkpoint step {run.step}, {results['num_images']} images from the captions of "
           f"{reference.description}, {steps} steps, guidance {cfg_scale}"]
  if "fid" in results:
    lines.append(f"FID {results['fid']:.3f}")
  if "clip_score" in results:
    lines.append(f"CLIP score {results['clip_score']:.3f}")
  _report(name, {"step": run.step, "use_ema": FLAGS.use_ema, "seed": FLAGS.seed,
                 "steps": steps, "cfg_scale": cfg_scale, "reference": reference.description,
                 **results}, lines)


def _capacity_factors() -> list[float]:
  try:
    factors = [float(f) for f in FLAGS.capacity_factors]
  except ValueError as e:
    raise ConfigError(f"--capacity_factors={','.join(FLAGS.capacity_factors)}: not numbers "
                      "(e.g. --capacity_factors=1,2,4)") from e
  if any(f <= 0 for f in factors):
    raise ConfigError(f"--capacity_factors={','.join(FLAGS.capacity_factors)} must be > 0")
  return factors


def _check_flags(wanted: set[str]) -> None:
  """Flag mistakes fail here, before any model is loaded."""
  unknown = sorted(wanted - set(SUPPORTED))
  if unknown:
    raise ConfigError(f"--eval: unknown evaluation(s) {unknown}; available: {SUPPORTED}")
  for metric, flag in (("fid", "inception_weights"), ("clip", "clip_weights")):
    value = getattr(FLAGS, flag)
    if metric in wanted and not value:
      raise ConfigError(f"--eval={metric} needs --{flag}")
    if metric in wanted and not epath.Path(value).exists():
      raise ConfigError(f"--{flag}={value}: no such file or directory")
  for flag in ("num_per_category", "batch_size", "num_images"):
    if getattr(FLAGS, flag) < 1:
      raise ConfigError(f"--{flag}={getattr(FLAGS, flag)} must be at least 1")
  if wanted & {"fid", "clip"} and FLAGS.num_images < 2:
    raise ConfigError(f"--num_images={FLAGS.num_images}: FID needs at least 2 images")
  _capacity_factors()


def main(argv):
  del argv
  wanted = set(FLAGS.eval)
  _check_flags(wanted)
  cli.start_processes()
  # After joining the job: JAX's backends must not start before.
  import jax  # pylint: disable=import-outside-toplevel
  from ecdit_jax.inference import run as run_lib  # pylint: disable=import-outside-toplevel
  from ecdit_jax.parallel.mesh import MeshConfig  # pylint: disable=import-outside-toplevel

  mesh = MeshConfig.parse(FLAGS.mesh) or (MeshConfig() if jax.process_count() > 1 else None)
  run = run_lib.load_run(FLAGS.workdir, use_ema=FLAGS.use_ema, mesh_config=mesh,
                         pretrained_overrides=pretrained_flags.overrides())
  steps = FLAGS.steps or run.config.sample.num_steps
  if "geneval_shapes" in wanted:
    run_geneval_shapes(run, steps)
  if wanted & {"fid", "clip"}:
    run_fid_clip(run, steps, wanted)


if __name__ == "__main__":
  cli.run(main)
