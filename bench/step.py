r"""Training-step throughput of the real sharded train step, on synthetic batches already on device.

  python bench/step.py --model=ec --out=bench/out/step_ec.json        # EC-XL, 8 experts
  python bench/step.py --model=dense                                  # the same shape, no MoE
  python bench/step.py --preset=XL-32E --num_devices=2 --mesh=fsdp=1,expert=2
  python bench/step.py --smoke                                        # tiny, checks it on a CPU
  python bench/step.py --model=ec --profile_dir=bench/out/prof_ec     # + a profiled window
  python bench/step.py --model=ec --hlo_out=bench/out/ec.hlo.gz       # + the optimized HLO
  python bench/step.py --config=configs/shapes_gpu.py --batch_size=512 # a config file's model
  python bench/step.py --config=configs/shapes_gpu.py --steps_per_call=8  # 8 steps a dispatch
  python bench/step.py --model=ec --moe_dispatch=hybrid --momentum_dtype=bfloat16

The step is exactly what training runs: ``sharding.init_train_state`` lays the state out on the
mesh, ``step.make_train_step`` (noise, caption dropout, loss, gradients, RMSProp-momentum, EMA)
is jitted by ``sharding.jit_train_step``. The input pipeline
is left out: one random batch (latents, full-length random prompts) sits on the devices and is
fed to every step. ``--steps_per_call=K`` runs K steps a call, as ``config.steps_per_call`` does
in training (a scan over K stacked copies of the batch), to show what dispatch costs.

Reported: lower and compile seconds, images/s and tokens/s (tokens the backbone sees: all of
them, or the kept ones under token masking) from the median of ``--windows`` windows of
``--steps`` steps, model TFLOP/s = ``flops.train_flops_per_image(config)["total"]`` x images/s
(the text encoder included: the step runs it for every image), and MFU against the bf16 matmul
rate measured in the same run on one device of the mesh times the mesh's devices.

``--profile_dir`` traces one more window after the timed ones with ``jax.profiler`` (view it in
TensorBoard or Perfetto) and adds its summary (``bench/trace_summary.py``: time by op and kind
of op, device idle time, and time by line of source and pass through ``bench/hlo_sources.py``)
to the printout and the record.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys

import common  # also puts the repository root on sys.path
import hlo_sources
import jax
import numpy as np
import trace_summary

from ecdit_jax import config as config_lib
from ecdit_jax import jax_settings
from ecdit_jax.data.tokenizer import pad_ids
from ecdit_jax.diffusion.masking import num_kept_tokens
from ecdit_jax.model import ModelConfig, flops
from ecdit_jax.model.counting import count_params
from ecdit_jax.parallel import mesh as mesh_lib
from ecdit_jax.train import sharding
from ecdit_jax.train.optimizer import make_optimizer
from ecdit_jax.train.profiling import profile_options
from ecdit_jax.train.step import make_train_step


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  common.add_common_flags(parser, default_batch=64)
  parser.add_argument("--steps", type=int, default=10, help="train steps per timed window")
  parser.add_argument("--mesh", default="data=-1",
                      help="mesh sizes, e.g. data=1,fsdp=2,expert=2 (-1 = the rest)")
  parser.add_argument("--dense_over_expert", action="store_true",
                      help="config.mesh.dense_over_expert: the expert axis also splits the "
                           "dense weights, as fsdp does")
  parser.add_argument("--num_devices", type=int, default=None,
                      help="use the first N devices (default: all)")
  parser.add_argument("--grad_accum_steps", type=int, default=1)
  parser.add_argument("--mask_ratio", type=float, default=None,
                      help="token masking (default: 0 for --model, the preset's for --preset)")
  parser.add_argument("--steps_per_call", type=int, default=1,
                      help="train steps a jitted call (a scan over stacked batches); must "
                           "divide --steps")
  parser.add_argument("--momentum_dtype", default=None, choices=("float32", "bfloat16"),
                      help="override config.momentum_dtype (the optimizer's momentum trace)")
  parser.add_argument("--cast_weights_once", choices=("true", "false"), default=None,
                      help="override config.cast_weights_once: the weights cast to the compute "
                           "dtype once a step (true) or in every micro-batch (false)")
  parser.add_argument("--gather_weights_per_micro_batch", action="store_true",
                      help="config.gather_weights_per_micro_batch: split weights gathered in "
                           "every micro-batch, none held whole through the accumulation loop")
  parser.add_argument("--host_offload", default=None,
                      help="override config.host_offload: state parts kept in host memory "
                           "between steps, e.g. ema,optimizer")
  parser.add_argument("--profile_dir", default=None,
                      help="trace one more window into this directory and summarise it")
  parser.add_argument("--hlo_out", default=None,
                      help="write the compiled step's optimized HLO text here (gzipped if the "
                           "name ends in .gz), to read what a profile's fusions compute")
  args = parser.parse_args(argv)
  common.apply_smoke(args, calls_flag="steps")
  if args.smoke:  # the smoke batch is tiny: as many micro-batches as each device has rows
    devices = args.num_devices or jax.device_count()
    args.grad_accum_steps = math.gcd(args.grad_accum_steps, max(args.batch_size // devices, 1))
  if args.smoke and args.steps_per_call > 1:
    args.steps = args.steps_per_call  # one call
  if args.steps_per_call < 1 or args.steps % args.steps_per_call:
    parser.error(f"--steps_per_call={args.steps_per_call} must be positive and divide "
                 f"--steps={args.steps}")
  return args


def synthetic_batch(model_config: ModelConfig, batch_size: int, seed: int) -> dict:
  rng = np.random.default_rng(seed)
  size, channels = model_config.image_size, model_config.in_channels
  return {"image": rng.standard_normal((batch_size, size, size, channels), np.float32),
          "tokens": common.synthetic_tokens(rng, batch_size, model_config.text_max_len,
                                            model_config.text_vocab_size)}


def main(argv=None) -> dict:
  args = parse_args(argv)
  jax_settings.apply()  # as every tool of the package runs
  config = common.build_config(args)
  diffusion = config.diffusion
  if args.mask_ratio is not None:
    diffusion = dataclasses.replace(diffusion, mask_ratio=args.mask_ratio)
  config = config.replace(grad_accum_steps=args.grad_accum_steps, diffusion=diffusion,
                          momentum_dtype=args.momentum_dtype or config.momentum_dtype,
                          host_offload=(config.host_offload if args.host_offload is None
                                        else args.host_offload),
                          cast_weights_once=(config.cast_weights_once
                                             if args.cast_weights_once is None
                                             else args.cast_weights_once == "true"),
                          gather_weights_per_micro_batch=args.gather_weights_per_micro_batch,
                          mesh=dataclasses.replace(mesh_lib.MeshConfig.parse(args.mesh),
                                                   dense_over_expert=args.dense_over_expert))
  model_config = config.model
  devices = jax.devices()[:args.num_devices] if args.num_devices else jax.devices()
  config_lib.check_devices(config, len(devices), 1)  # as training checks it
  mesh = mesh_lib.create_mesh(config.mesh, devices)

  optimizer = make_optimizer(config)
  (graphdef, state, shardings), init_s = common.timed(
      lambda: sharding.init_train_state(model_config, optimizer, config.seed, mesh,
                                        config.host_offloaded, config.mesh.param_rules()))
  jax.block_until_ready(state)
  mask_ratio = config.diffusion.mask_ratio
  masked = mask_ratio > 0
  step_fn = make_train_step(graphdef, config, optimizer, pad_ids([], model_config.text_max_len),
                            masked=masked)
  per_call = args.steps_per_call
  jitted = sharding.jit_train_step(step_fn, shardings, mesh, stacked=per_call > 1)
  batch = sharding.global_batch(synthetic_batch(model_config, config.batch_size, args.seed), mesh)
  if per_call > 1:
    batch = sharding.make_batch_stacker(mesh)([batch] * per_call)
  calls = args.steps // per_call

  lowered, lower_s = common.timed(lambda: jitted.lower(state, batch))
  compiled, compile_s = common.timed(lowered.compile)
  hlo_text = compiled.as_text() if args.hlo_out or args.profile_dir else None
  if args.hlo_out:
    common.write_text(args.hlo_out, hlo_text)
  metrics = None
  for _ in range(args.warmup):
    state, metrics = compiled(state, batch)  # warm-up calls: steps_per_call steps each
  jax.block_until_ready(state)

  def window():
    nonlocal state, metrics
    for _ in range(calls):
      state, metrics = compiled(state, batch)  # dispatched without waiting
    jax.block_until_ready(state)

  seconds = common.timed_windows(window, args.windows)
  profile = None
  if args.profile_dir:
    with jax.profiler.trace(args.profile_dir, create_perfetto_trace=True,
                            profiler_options=profile_options()):
      window()
    profile = trace_summary.summarize(trace_summary.load_events(args.profile_dir), args.steps,
                                      sources=hlo_sources.parse(hlo_text))
  if per_call > 1:  # the metrics of the last call's steps: keep its last
    metrics = jax.tree.map(lambda x: x[-1], metrics)
  loss, nonfinite = float(metrics["loss"]), bool(metrics["nonfinite"])
  peak = common.peak_memory_bytes(devices)  # before the matmul reference allocates anything
  state = batch = metrics = None  # free the devices for the matmul reference

  matmul = common.matmul_reference(args.matmul_size, device=devices[0])
  tokens = num_kept_tokens(model_config.num_tokens, mask_ratio) if masked else None
  per_image = flops.train_flops_per_image(model_config, num_tokens=tokens)
  stats = common.window_stats(seconds, args.steps, config.batch_size)
  images_per_s = stats["images_per_s"]
  model_tflops = per_image["total"] * images_per_s / 1e12
  params = count_params(model_config)
  record = {
      "benchmark": "train_step",
      "name": common.config_name(args, model_config) + (
          "-bf16momentum" if config.momentum_dtype == "bfloat16" else "") + (
          f"-offload({config.host_offload})" if config.host_offload else "") + (
          "" if config.cast_weights_once else "-cast_in_loop") + (
          "-gather_per_micro_batch" if config.gather_weights_per_micro_batch else "") + (
          "-dense_over_expert" if config.mesh.dense_over_expert else ""),
      "model": dataclasses.asdict(config.model),
      "param_count": {"total": params.total, "backbone": params.backbone,
                      "experts": params.experts,
                      "activated_per_token": params.activated_per_token},
      "batch_size": config.batch_size,
      "grad_accum_steps": config.grad_accum_steps,
      "momentum_dtype": config.momentum_dtype,
      "host_offload": config.host_offload,
      "cast_weights_once": config.cast_weights_once,
      "gather_weights_per_micro_batch": config.gather_weights_per_micro_batch,
      "mask_ratio": mask_ratio,
      "tokens_per_image": tokens or model_config.num_tokens,
      "mesh": dict(mesh.shape),
      "dense_over_expert": config.mesh.dense_over_expert,
      "environment": common.environment(devices),
      "init_s": init_s,
      "lower_s": lower_s,
      "compile_s": compile_s,
      "warmup_steps": args.warmup,
      "steps_per_window": args.steps,
      "steps_per_call": per_call,
      **stats,
      "images_per_s_per_device": images_per_s / len(devices),
      "tokens_per_s": images_per_s * (tokens or model_config.num_tokens),
      "train_flops_per_image": per_image["total"],
      "train_flops_per_image_backbone": per_image["backbone"],
      "flops_convention": "flops.train_flops_per_image()['total']: 3 x forward matmuls, "
                          "text encoder included",
      "model_tflops_per_s": model_tflops,
      "matmul_reference": matmul,
      "mfu": model_tflops / (matmul["tflops"] * len(devices)),
      "peak_bytes_in_use": peak,
      "compiled_memory": common.compiled_memory(compiled),
      "final_loss": loss,
      "final_step_nonfinite": nonfinite,
      "profile": profile,
  }
  peak_text = "n/a" if peak is None else f"{peak / 2**30:.1f} GiB"
  per_call_text = f" steps/call={per_call}" if per_call > 1 else ""
  print(f"step {record['name']} mesh={args.mesh} batch={config.batch_size}{per_call_text} "
        f"{record['environment']['device_kind']} x{len(devices)}: compile {compile_s:.1f}s, "
        f"{images_per_s:.1f} img/s, {record['tokens_per_s']:.0f} tok/s, "
        f"{model_tflops:.1f} model TFLOP/s, matmul {matmul['tflops']:.1f} TFLOP/s/device, "
        f"MFU {record['mfu']:.1%}, peak {peak_text}, loss {loss:.4f}")
  if profile is not None:
    print(trace_summary.format_summary(profile))
  common.write_json(args.out, record)
  return record


if __name__ == "__main__":
  main(sys.argv[1:])
