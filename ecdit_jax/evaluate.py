r"""Scores a trained run on GenEval-Shapes.

  python -m ecdit_jax.evaluate --workdir=DIR --eval=geneval_shapes \
      [--num_per_category=100 --capacity_factors=1,2,4 --steps --cfg_scale --seed]

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
"""

import json
import os

from absl import app, flags, logging

from ecdit_jax.model.flops import format_flops, generation_flops_per_image

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/, or an export.")
flags.DEFINE_list("eval", ["geneval_shapes"], "Evaluations to run: geneval_shapes.")
flags.DEFINE_integer("num_per_category", 100, "Prompts per GenEval-Shapes category.")
flags.DEFINE_list("capacity_factors", [], "Inference capacity factors (default: the config's).")
flags.DEFINE_integer("steps", None, "Sampling steps (default: the run's config.sample.num_steps).")
flags.DEFINE_float("cfg_scale", None, "Guidance scale (default: the run's config).")
flags.DEFINE_integer("seed", 0, "Noise seed.")
flags.DEFINE_integer("batch_size", 100, "Images per sampling batch.")
flags.DEFINE_bool("use_ema", True, "Evaluate the EMA parameters.")
flags.mark_flags_as_required(["workdir"])

SUPPORTED = ("geneval_shapes",)


def evaluate_geneval_shapes(run, *, num_per_category, capacity_factor, steps, cfg_scale, seed,
                            batch_size):
  """Samples the standard prompts and scores them; returns the scorer's summary."""
  from ecdit_jax.train.geneval import geneval_shapes_score
  from ecdit_jax.train.sampling import make_sampler

  sampler = make_sampler(run.graphdef, run.model_config, num_steps=steps, cfg_scale=cfg_scale,
                         method=run.config.sample.method, capacity_factor=capacity_factor)
  return geneval_shapes_score(sampler, run.params, run.tokenizer, run.null_tokens,
                              run.model_config.text_max_len, num_per_category=num_per_category,
                              seed=seed, batch_size=batch_size)


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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  unknown = sorted(set(FLAGS.eval) - set(SUPPORTED))
  if unknown:
    raise app.UsageError(f"--eval: unknown evaluation(s) {unknown}; available: {SUPPORTED}")
  logging.set_verbosity(logging.WARNING)
  from ecdit_jax.train.inference import load_run  # after flag parsing: keeps --help fast

  run = load_run(FLAGS.workdir, use_ema=FLAGS.use_ema)
  factors = [float(f) for f in FLAGS.capacity_factors] or [run.model_config.eval_capacity_factor]
  steps = FLAGS.steps or run.config.sample.num_steps
  results = {}
  for factor in factors:
    results[factor] = evaluate_geneval_shapes(
        run, num_per_category=FLAGS.num_per_category, capacity_factor=factor, steps=steps,
        cfg_scale=run.config.sample.cfg_scale if FLAGS.cfg_scale is None else FLAGS.cfg_scale,
        seed=FLAGS.seed, batch_size=FLAGS.batch_size)
    results[factor]["flops"] = flops_report(run.model_config, capacity_factor=factor,
                                            num_steps=steps, method=run.config.sample.method)
  outdir = os.path.join(FLAGS.workdir, "eval")
  os.makedirs(outdir, exist_ok=True)
  # The name holds every setting, so a file is only ever replaced by the same evaluation.
  name = (f"geneval_shapes_step{run.step}_n{FLAGS.num_per_category}_seed{FLAGS.seed}_"
          f"f{'-'.join(str(f) for f in factors)}{'' if FLAGS.use_ema else '_raw'}.json")
  path = os.path.join(outdir, name)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump({"step": run.step, "use_ema": FLAGS.use_ema, "seed": FLAGS.seed,
               "num_per_category": FLAGS.num_per_category,
               "results": {str(k): v for k, v in results.items()}}, f, indent=2)
  os.replace(path + ".tmp", path)
  print(f"GenEval-Shapes, checkpoint step {run.step}, {FLAGS.num_per_category} prompts/category")
  print(format_table(results))
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
