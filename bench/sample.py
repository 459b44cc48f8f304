r"""Sampling throughput: an expert-choice model against a dense model of the same activated FLOPs.

  python bench/sample.py --out=bench/out/sample.json        # EC-XL-8E vs its FLOP-matched dense
  python bench/sample.py --num_steps=50 --batch_size=16
  python bench/sample.py --smoke                           # tiny, checks it on a CPU
  python bench/sample.py --moe_dispatch=einsum --profile_dir=bench/out/prof_sample

The FLOP-matched dense model has the EC model's shape with no MoE and the FFN width h that
makes its DiT forward FLOPs (``flops.forward_flops_per_image(...)["backbone"]`` at inference)
equal to the EC model's at the sampling capacity factor: h solves
``L N 4 d h = EC backbone - dense backbone without FFNs`` and is then rounded to a multiple of
``--dense_width_multiple`` (odd widths would slow the dense matmuls for reasons unrelated to
MoE); both counts and their difference are printed and recorded.

Both models sample with the package's sampler (``train.sampling.make_sampler``: prompt and null
caption encoded once, CFG batch of 2B rows per step) from random parameters, since the cost
does not depend on their values. Each is compiled (timed), warmed up, and then their timed
windows alternate (EC, dense, EC, ...) so that clock or thermal drift hits both alike. A window
is ``--calls`` sampler calls dispatched back to back and blocked on at the end.

``--profile_dir`` traces one more call of each sampler with ``jax.profiler`` (into DIR/ec or
DIR/tc, and DIR/dense) and adds their summaries (``bench/trace_summary.py``, per ODE step) to
the printout and the record, so the two models' time by kind of op and by source line
(``bench/hlo_sources.py``) can be set side by side.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys

import common  # also puts the repository root on sys.path
import hlo_sources
import jax
import numpy as np
import trace_summary

from ecdit_jax import jax_settings
from ecdit_jax.data.tokenizer import pad_ids
from ecdit_jax.inference import sampler as sampler_lib
from ecdit_jax.inference.sampler import make_sampler
from ecdit_jax.model import ModelConfig, flops
from ecdit_jax.model.counting import count_params
from ecdit_jax.model.params import abstract_params, init_params
from ecdit_jax.train.profiling import profile_options

TARGET_RATIO = 1.03  # the EC time / dense time asked for (issue 24)


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  common.add_common_flags(parser, default_batch=64)
  parser.add_argument("--num_steps", type=int, default=25, help="ODE steps per image")
  parser.add_argument("--cfg_scale", type=float, default=3.0)
  parser.add_argument("--method", choices=sorted(flops.SAMPLING_METHODS), default="euler")
  parser.add_argument("--calls", type=int, default=2, help="sampler calls per timed window")
  parser.add_argument("--dense_width_multiple", type=int, default=128,
                      help="round the matched dense FFN width to this multiple")
  parser.add_argument("--cast_weights_once", choices=("true", "false"), default="true",
                      help="false: the samplers leave the weights as they are, so the model "
                           "casts them to the compute dtype in every ODE step (the sampler "
                           "before it cast them once), to time what the cast costs")
  parser.add_argument("--profile_dir", default=None,
                      help="trace one more call of each sampler into DIR/<model> and summarise "
                           "it per ODE step; the compiled HLO goes there too")
  args = parser.parse_args(argv)
  common.apply_smoke(args, calls_flag="calls")
  if args.smoke:
    args.num_steps = min(args.num_steps, 2)
  return args


def matched_dense(moe: ModelConfig, capacity_factor: float | None, multiple: int) -> ModelConfig:
  """The dense model of ``moe``'s shape whose DiT forward FLOPs match ``moe``'s at inference."""
  target = flops.forward_flops_per_image(moe, train=False,
                                         capacity_factor=capacity_factor)["backbone"]
  dense = dataclasses.replace(moe, moe_layout="none")
  base = flops.forward_flops_per_image(dense, train=False)
  without_ffn = base["backbone"] - base["ffn_dense"]
  per_width = moe.num_layers * moe.num_tokens * 4 * moe.hidden_size  # FFN FLOPs per unit of h
  hidden = (target - without_ffn) / per_width
  rounded = max(multiple, round(hidden / multiple) * multiple)
  dense = dataclasses.replace(dense, mlp_ratio=rounded / moe.hidden_size)
  assert dense.mlp_hidden_size == rounded, (dense.mlp_hidden_size, rounded)
  return dense


class SamplerBench:
  """One model's sampler, compiled for a fixed batch, timed window by window."""

  def __init__(self, name: str, model_config: ModelConfig, args, tokens, null):
    self.name, self.config, self.args = name, model_config, args
    graphdef, _ = abstract_params(model_config)
    self.params = jax.jit(lambda: init_params(model_config, args.seed)[1])()
    sampler = make_sampler(graphdef, model_config, num_steps=args.num_steps,
                           cfg_scale=args.cfg_scale, method=args.method,
                           capacity_factor=args.capacity_factor)
    # The package's jitted sampling function, lowered and compiled here so that compilation is
    # timed on its own; no text encoder or VAE parameters (the model encodes its prompts).
    indices = np.arange(len(tokens), dtype=np.int32)
    self.inputs = (self.params, None, None, np.asarray(tokens), np.asarray(null),
                   np.uint32(args.seed), indices)
    lowered, self.lower_s = common.timed(lambda: sampler.jitted.lower(*self.inputs))
    self.compiled, self.compile_s = common.timed(lowered.compile)
    self.seconds: list[float] = []
    self.last = None

  def call_window(self, calls: int) -> None:
    outputs = [self.compiled(*self.inputs) for _ in range(calls)]  # dispatched without waiting
    jax.block_until_ready(outputs)
    self.last = outputs[-1]

  def timed_window(self) -> None:
    self.seconds.extend(common.timed_windows(lambda: self.call_window(self.args.calls), 1))

  def record(self, matmul_tflops: float) -> dict:
    args, cfg = self.args, self.config
    stats = common.window_stats(self.seconds, args.calls, args.batch_size)
    gen = flops.generation_flops_per_image(cfg, num_steps=args.num_steps, method=args.method,
                                           capacity_factor=args.capacity_factor)
    tflops = gen["total"] * stats["images_per_s"] / 1e12
    params = count_params(cfg)
    finite = bool(np.isfinite(np.asarray(self.last)).all())
    return {"name": self.name, "model": dataclasses.asdict(cfg),
            "param_count": {"total": params.total, "backbone": params.backbone,
                            "activated_per_token": params.activated_per_token},
            "lower_s": self.lower_s, "compile_s": self.compile_s, **stats,
            "dit_forward_flops_per_image": gen["per_forward"],
            "generation_flops_per_image": gen["total"],
            "model_tflops_per_s": tflops, "mfu": tflops / matmul_tflops,
            "outputs_finite": finite}


def main(argv=None) -> dict:
  args = parse_args(argv)
  jax_settings.apply()  # as every tool of the package runs
  moe_config = common.build_config(args).model
  if moe_config.moe_layout == "none":
    raise SystemExit("sample.py compares an MoE model with its FLOP-matched dense model: pick "
                     "--model=ec or tc, or an MoE --preset")
  dense_config = matched_dense(moe_config, args.capacity_factor, args.dense_width_multiple)
  moe_flops = flops.forward_flops_per_image(moe_config, train=False,
                                            capacity_factor=args.capacity_factor)["backbone"]
  dense_flops = flops.forward_flops_per_image(dense_config, train=False)["backbone"]
  flop_diff = dense_flops / moe_flops - 1
  print(f"DiT forward FLOPs per image: MoE {flops.format_flops(moe_flops)} "
        f"(mlp {moe_config.mlp_hidden_size}), dense {flops.format_flops(dense_flops)} "
        f"(mlp {dense_config.mlp_hidden_size}), dense/MoE - 1 = {flop_diff:+.3%}")
  if abs(flop_diff) > 0.01:
    print("warning: the matched dense model is more than 1% off; lower --dense_width_multiple")

  if args.cast_weights_once == "false":
    sampler_lib.params_for_compute = lambda params, dtype: params
  rng = np.random.default_rng(args.seed)
  tokens = jax.device_put(common.synthetic_tokens(rng, args.batch_size, moe_config.text_max_len,
                                                  moe_config.text_vocab_size))
  null = jax.device_put(pad_ids([], moe_config.text_max_len))
  label = "ec" if moe_config.router == "expert_choice" else "tc"
  benches = [SamplerBench(label, moe_config, args, tokens, null),
             SamplerBench("dense", dense_config, args, tokens, null)]
  for bench in benches:
    for _ in range(args.warmup):
      bench.call_window(1)
  for _ in range(args.windows):
    for bench in benches:  # alternating, so drift in clocks or temperature hits both alike
      bench.timed_window()
  profiles = None
  if args.profile_dir:
    profiles = {}
    for bench in benches:
      path = os.path.join(args.profile_dir, bench.name)
      with jax.profiler.trace(path, create_perfetto_trace=True,
                              profiler_options=profile_options()):
        bench.call_window(1)
      hlo_text = bench.compiled.as_text()
      common.write_text(os.path.join(path, "optimized_hlo.txt.gz"), hlo_text)  # for reading
      sources = hlo_sources.parse(hlo_text)  # time by source line too
      profiles[bench.name] = trace_summary.summarize(trace_summary.load_events(path),
                                                     args.num_steps, sources=sources)
  devices = jax.devices()[:1]
  peak = common.peak_memory_bytes(devices)
  for bench in benches:
    bench.params = bench.inputs = None  # free them before the matmul reference

  matmul = common.matmul_reference(args.matmul_size, device=devices[0])
  moe, dense = (bench.record(matmul["tflops"]) for bench in benches)
  ratio = moe["median_call_s"] / dense["median_call_s"]
  # The same ratio from each alternating pair of windows shows its spread.
  pair_ratios = [a / b for a, b in zip(benches[0].seconds, benches[1].seconds)]
  record = {
      "benchmark": "sampling",
      "name": common.config_name(args, moe_config) + (
          "" if args.cast_weights_once == "true" else "-cast_in_loop"),
      "batch_size": args.batch_size,
      "num_steps": args.num_steps,
      "cfg_scale": args.cfg_scale,
      "method": args.method,
      "cast_weights_once": args.cast_weights_once == "true",
      "capacity_factor": args.capacity_factor,
      "calls_per_window": args.calls,
      "warmup_calls": args.warmup,
      "environment": common.environment(devices),
      "moe": moe,  # moe["name"]: ec (expert choice) or tc (token choice)
      "dense": dense,
      "flops_match": {"moe_dit_forward": moe_flops, "dense_dit_forward": dense_flops,
                      "dense_over_moe_minus_1": flop_diff,
                      "dense_width_multiple": args.dense_width_multiple},
      "time_ratio_moe_over_dense": ratio,
      "time_ratio_per_window_pair": pair_ratios,
      "time_ratio_pair_spread": (min(pair_ratios), statistics.median(pair_ratios),
                                 max(pair_ratios)),
      "target_ratio": TARGET_RATIO,
      "within_target": ratio <= TARGET_RATIO,
      "matmul_reference": matmul,
      "peak_bytes_in_use": peak,
      "peak_note": "process peak over both models",
      "profile_per_ode_step": profiles,
  }
  print(f"sample {record['name']} batch={args.batch_size} steps={args.num_steps} "
        f"cfg={args.cfg_scale} {record['environment']['device_kind']}: "
        f"{label} {moe['images_per_s']:.2f} img/s (compile {moe['compile_s']:.1f}s), "
        f"dense {dense['images_per_s']:.2f} img/s (compile {dense['compile_s']:.1f}s), "
        f"{label}/dense time {ratio:.3f} (target <= {TARGET_RATIO}), "
        f"matmul {matmul['tflops']:.1f} TFLOP/s")
  for name, profile in (profiles or {}).items():
    print(f"== {name}, one call, per ODE step:")
    print(trace_summary.format_summary(profile))
  common.write_json(args.out, record)
  return record


if __name__ == "__main__":
  main(sys.argv[1:])
