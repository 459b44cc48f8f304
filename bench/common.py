"""Shared pieces of the benchmark scripts: configs, the matmul reference, timing, JSON records.

Timing discipline (every script): compile is timed on its own (``lower`` then ``compile``), a
few warm-up calls run and are excluded, then ``windows`` windows of ``calls`` calls each are
timed. JAX dispatches asynchronously, so a window only blocks (``jax.block_until_ready``) on
its last output; blocking after every call would time the host's round trips too. The reported
rate comes from the median window.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import importlib.util
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

# Scripts run as ``python bench/<name>.py`` from anywhere: make the package and configs/ importable.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import default as default_config
from configs import ecdit as ecdit_config
from ecdit_jax import jax_settings
from ecdit_jax.config import TrainConfig

MODELS = ("ec", "dense", "tc")

# The benchmark configuration of the issue: XL width and depth with 16 heads (head_dim 72),
# 32x32x4 latents in 2x2 patches (256 tokens), a 32-token prompt through cross-attention, MoE
# every other block with 8 experts at capacity factor 2, routed per image. The text encoder
# follows the presets (configs/ecdit.py).
BENCH_MODEL = {
    "image_size": 32, "in_channels": 4, "patch_size": 2, "hidden_size": 1152, "num_layers": 28,
    "num_heads": 16, "num_kv_heads": 16, "moe_layout": "every_other", "router": "expert_choice",
    "num_experts": 8, "capacity_factor": 2.0, "eval_capacity_factor": 2.0,
    "routing_group_size": 1, "text_max_len": 32}

# --smoke: the same structure (layout, router, experts, latents, prompt) at a size a CPU steps
# through in seconds.
SMOKE_MODEL = {
    "image_size": 8, "hidden_size": 64, "num_layers": 2, "num_heads": 2, "num_kv_heads": None,
    "text_max_len": 8, "text_hidden_size": 32, "text_num_layers": 1, "text_num_heads": 2}


def add_common_flags(parser: argparse.ArgumentParser, *, default_batch: int) -> None:
  """Flags that pick the model and the timing, shared by step.py and sample.py."""
  parser.add_argument("--model", choices=MODELS, default="ec",
                      help="benchmark configuration: ec (expert choice), dense (no MoE), "
                      "tc (token choice, top-2 at capacity 1: the expert compute of ec)")
  parser.add_argument("--preset", default=None,
                      help="a configs/ecdit.py preset (e.g. XL-8E, XL-dense, XL-32E,runlocal) "
                      "instead of --model; its training config is used as it is")
  parser.add_argument("--config", default=None,
                      help="a config file, e.g. configs/shapes_gpu.py, instead of --model or "
                      "--preset: its model, with --dtype and --batch_size applied")
  parser.add_argument("--batch_size", type=int, default=default_batch, help="global batch")
  parser.add_argument("--dtype", default="bfloat16", help="compute dtype (params stay float32)")
  parser.add_argument("--num_heads", type=int, default=None, help="override the heads")
  parser.add_argument("--num_kv_heads", type=int, default=None, help="override the KV heads")
  parser.add_argument("--num_experts", type=int, default=None, help="override the experts")
  parser.add_argument("--capacity_factor", type=float, default=None,
                      help="override the expert-choice capacity factor (training and eval)")
  parser.add_argument("--attention_impl", choices=("auto", "xla", "cudnn"), default=None,
                      help="override config.model.attention_impl")
  parser.add_argument("--norm_impl", choices=("xla", "pallas"), default=None,
                      help="adaLN norm + modulate: XLA ops or the fused Pallas kernels")
  parser.add_argument("--qk_norm_impl", choices=("xla", "pallas"), default=None,
                      help="qk-norm with the projection's bias: XLA ops or the Pallas kernels")
  parser.add_argument("--remat", choices=("none", "block", "dots", "matmuls"), default=None,
                      help="override config.model.remat (recompute blocks in the backward)")
  parser.add_argument("--moe_dispatch", choices=("gather", "einsum", "hybrid"), default=None,
                      help="override config.model.moe_dispatch (token gather, one-hot einsum, "
                           "or gather with one-hot gradients)")
  parser.add_argument("--scan_layers", choices=("true", "false"), default=None,
                      help="override config.model.scan_layers (stack the blocks, scan over "
                           "layers)")
  parser.add_argument("--windows", type=int, default=5, help="timed windows")
  parser.add_argument("--warmup", type=int, default=2, help="untimed calls after compile")
  parser.add_argument("--matmul_size", type=int, default=8192,
                      help="n of the n x n x n bf16 matmul reference")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--smoke", action="store_true",
                      help="tiny model and few calls: checks the script on a CPU")
  parser.add_argument("--out", default=None, help="write the JSON record here")


def apply_smoke(args: argparse.Namespace, *, calls_flag: str) -> None:
  """--smoke: a small batch, 2 windows of 1 call, a small matmul reference."""
  if not args.smoke:
    return
  args.batch_size = min(args.batch_size, 4)
  args.windows = 2
  args.warmup = 1
  setattr(args, calls_flag, 1)
  args.matmul_size = min(args.matmul_size, 256)


def build_config(args: argparse.Namespace) -> TrainConfig:
  """The full training config for --model, --preset or --config, with the flags' overrides,
  checked as training checks it (errors name the key)."""
  if args.config and args.preset:
    raise SystemExit("give --config or --preset, not both")
  if args.config:
    config = load_config_file(args.config)
  elif args.preset:
    config = ecdit_config.get_config(args.preset)
  else:
    config = default_config.get_config()
    config.model.update(ecdit_config.get_config("XL-8E").model.to_dict())  # text encoder etc.
    config.model.update(BENCH_MODEL)
    config.diffusion.mask_ratio = 0.0  # all 256 tokens: the benchmark configuration
    if args.model == "dense":
      config.model.moe_layout = "none"
    elif args.model == "tc":
      # Top-2 into buffers of 2 x S / E slots: E C = 2 S expert FFNs, as ec at f = 2.
      config.model.update(router="token_choice", token_choice_top_k=2,
                          token_choice_capacity_factor=1.0)
  if args.smoke:
    config.model.update(SMOKE_MODEL)
  config.model.dtype = args.dtype
  overrides = {"num_heads": args.num_heads, "num_kv_heads": args.num_kv_heads,
               "num_experts": args.num_experts, "attention_impl": args.attention_impl,
               "remat": args.remat, "moe_dispatch": args.moe_dispatch,
               "norm_impl": args.norm_impl, "qk_norm_impl": args.qk_norm_impl,
               "capacity_factor": args.capacity_factor,
               "eval_capacity_factor": args.capacity_factor,
               "scan_layers": None if args.scan_layers is None else args.scan_layers == "true"}
  config.model.update({k: v for k, v in overrides.items() if v is not None})
  if args.smoke and args.num_heads:  # the smoke model's head width, at the heads asked for
    config.model.hidden_size = args.num_heads * (SMOKE_MODEL["hidden_size"]
                                                 // SMOKE_MODEL["num_heads"])
  config.batch_size = args.batch_size
  config.seed = args.seed
  for key in ("sample_every_steps", "eval_every_steps"):  # training's own sampling: not timed
    config[key] = 0
  return TrainConfig.from_mapping(config)


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """``get_config()`` of a config file, as ``python -m ecdit_jax.main --config=PATH`` reads it."""
  spec = importlib.util.spec_from_file_location("bench_config", path)
  if spec is None or not os.path.isfile(path):
    raise SystemExit(f"--config={path}: no such config file")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def config_name(args: argparse.Namespace, model_config) -> str:
  """e.g. 'EC-XL-8E', 'dense-XL', 'TC-XL-8E', the preset's or config file's name; '(smoke)'
  when tiny."""
  if args.config:
    name = os.path.splitext(os.path.basename(args.config))[0]
  elif args.preset:
    name = args.preset
  elif args.model == "dense":
    name = "dense-XL"
  else:
    name = f"{args.model.upper()}-XL-{model_config.num_experts}E"
  if getattr(args, "moe_dispatch", None) in ("einsum", "hybrid"):
    name += f"-{args.moe_dispatch}"
  if model_config.scan_layers:
    name += "-scan"
  if model_config.norm_impl != "xla":
    name += f"-{model_config.norm_impl}norm"
  if model_config.qk_norm_impl != "xla":
    name += f"-{model_config.qk_norm_impl}qknorm"
  return f"{name}(smoke)" if args.smoke else name


def synthetic_tokens(rng: np.random.Generator, batch: int, length: int, vocab: int) -> np.ndarray:
  """Random prompts of the full padded length (pad = 0 and eos = 1 are left out)."""
  return rng.integers(2, vocab, (batch, length)).astype(np.int32)


def timed_windows(run_window: Callable[[], Any], windows: int) -> list[float]:
  """Seconds of each of ``windows`` calls of ``run_window``, which must block at its end."""
  seconds = []
  for _ in range(windows):
    start = time.perf_counter()
    run_window()
    seconds.append(time.perf_counter() - start)
  return seconds


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
  start = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - start


def matmul_reference(n: int, *, chain: int = 8, repeats: int = 10,
                     device: jax.Device | None = None) -> dict[str, Any]:
  """The device's bf16 matmul rate: a jitted chain of ``chain`` (n x n) @ (n x n) products.

  The chain keeps each call long enough that launch overhead does not count; every product
  depends on the last, so none can be skipped or overlapped. Median of ``repeats`` timed calls.
  """
  device = device or jax.devices()[0]
  keys = jax.random.split(jax.random.key(0), 2)
  # Scaled so that repeated products stay O(1) in bf16 rather than overflowing.
  x = jax.device_put(jax.random.normal(keys[0], (n, n), jnp.bfloat16), device)
  w = jax.device_put((jax.random.normal(keys[1], (n, n)) / np.sqrt(n)).astype(jnp.bfloat16),
                     device)

  @jax.jit
  def run(x, w):
    for _ in range(chain):
      x = x @ w
    return x

  compiled = run.lower(x, w).compile()
  jax.block_until_ready(compiled(x, w))  # warm-up
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(x, w))
    seconds.append(time.perf_counter() - start)
  median = statistics.median(seconds)
  flops = chain * 2.0 * n**3
  return {"n": n, "chain": chain, "repeats": repeats, "median_s": median,
          "tflops": flops / median / 1e12, "device": str(device.device_kind)}


def peak_memory_bytes(devices) -> int | None:
  """The largest peak_bytes_in_use over ``devices``, or None where the backend has no stats."""
  peaks = []
  for device in devices:
    try:
      stats = device.memory_stats()
    except Exception:  # noqa: BLE001  (some backends raise rather than return None)
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  return max(peaks) if peaks else None


def compiled_memory(compiled) -> dict[str, int] | None:
  """XLA's memory plan of a compiled function (bytes per device): its arguments, outputs, the
  temporaries and what outputs reuse of the arguments; None where the backend gives none."""
  try:
    analysis = compiled.memory_analysis()
  except Exception:  # noqa: BLE001  (not every backend implements it)
    return None
  if analysis is None:
    return None
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
            "alias_size_in_bytes", "host_argument_size_in_bytes", "host_temp_size_in_bytes")
  return {name.removesuffix("_in_bytes"): int(getattr(analysis, name))
          for name in fields if hasattr(analysis, name)}


def environment(devices) -> dict[str, Any]:
  import jaxlib  # pylint: disable=import-outside-toplevel
  return {
      "jax": jax.__version__,
      "jaxlib": getattr(jaxlib, "__version__", None),
      "backend": jax.default_backend(),
      "device_kind": devices[0].device_kind,
      "num_devices": len(devices),
      "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
      "jax_settings": {name: getattr(jax.config, name, None) for name in jax_settings.DEFAULTS},
  }


def window_stats(seconds: list[float], calls: int, images_per_call: int) -> dict[str, Any]:
  median = statistics.median(seconds)
  return {"window_s": seconds, "median_window_s": median,
          "median_call_s": median / calls, "images_per_s": calls * images_per_call / median}


def write_json(path: str | None, record: dict[str, Any]) -> None:
  if not path:
    return
  directory = os.path.dirname(path)
  if directory:
    os.makedirs(directory, exist_ok=True)
  with open(path, "w") as f:
    json.dump(record, f, indent=2, sort_keys=True)
    f.write("\n")
  print(f"wrote {path}")


def write_text(path: str, text: str) -> None:
  """Writes text to ``path`` (gzipped when it ends in .gz), making its directory."""
  directory = os.path.dirname(path)
  if directory:
    os.makedirs(directory, exist_ok=True)
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "wt", encoding="utf-8") as f:
    f.write(text)
  print(f"wrote {path}")


# The suite's summary: ``python bench/common.py OUT_DIR`` prints the records there as tables.
def _gib(value) -> str:
  return "n/a" if value is None else f"{value / 2**30:.1f}"


def summarize(directory: str) -> str:
  records = []
  for name in sorted(os.listdir(directory)):
    if name.endswith(".json"):
      with open(os.path.join(directory, name)) as f:
        records.append((name, json.load(f)))
  lines = ["Training step (median window)", "",
           ("| record | config | device | mesh | batch | accum | compile s | img/s | "
            "img/s/device | tok/s | model TFLOP/s | matmul TFLOP/s/device | MFU | peak GiB | "
            "XLA temp GiB |"),
           "|" + "---|" * 15]
  for file, r in records:
    if r.get("benchmark") != "train_step":
      continue
    env = r["environment"]
    mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1) or "1 device"
    temp = (r.get("compiled_memory") or {}).get("temp_size")  # older records lack it
    lines.append(
        f"| {file} | {r['name']} | {env['device_kind']} x{env['num_devices']} | {mesh} | "
        f"{r['batch_size']} | {r['grad_accum_steps']} | {r['compile_s']:.1f} | "
        f"{r['images_per_s']:.1f} | {r['images_per_s_per_device']:.1f} | "
        f"{r['tokens_per_s']:.0f} | {r['model_tflops_per_s']:.1f} | "
        f"{r['matmul_reference']['tflops']:.1f} | {r['mfu']:.1%} | "
        f"{_gib(r['peak_bytes_in_use'])} | {_gib(temp)} |")
  lines += ["", "Sampling (median window; MoE vs its FLOP-matched dense model)", "",
            ("| record | config | device | batch | steps | cfg | MoE img/s | dense img/s | "
             "MoE/dense time | FLOPs dense/MoE - 1 | target |"),
            "|" + "---|" * 11]
  for file, r in records:
    if r.get("benchmark") != "sampling":
      continue
    lines.append(
        f"| {file} | {r['name']} | {r['environment']['device_kind']} | {r['batch_size']} | "
        f"{r['num_steps']} | {r['cfg_scale']} | {r['moe']['images_per_s']:.2f} | "
        f"{r['dense']['images_per_s']:.2f} | {r['time_ratio_moe_over_dense']:.3f} | "
        f"{r['flops_match']['dense_over_moe_minus_1']:+.2%} | <= {r['target_ratio']} |")
  lines += ["", "Fused kernels against XLA, forward + backward (bench/fused_kernels.py; the "
            "default layout and, after a sweep, the fastest)", "",
            "| record | kernel | device | layout | XLA us | kernels us | kernels/XLA | GB/s |",
            "|" + "---|" * 8]
  for file, r in records:
    if r.get("benchmark") != "kernels":
      continue
    default, *swept = r["results"]
    for row in [default] + ([min(swept, key=lambda x: x["fused_us"])] if swept else []):
      lines.append(
          f"| {file} | {r['kernel']} | {r['environment']['device_kind']} | {row['setting']} | "
          f"{row['xla_us']:.1f} | {row['fused_us']:.1f} | {row['fused_over_xla']:.3f} | "
          f"{row['fused_gb_per_s']:.0f} |")
  return "\n".join(lines)


if __name__ == "__main__":
  if len(sys.argv) != 2:
    raise SystemExit("usage: python bench/common.py OUT_DIR  (prints the records as tables)")
  print(summarize(sys.argv[1]))
