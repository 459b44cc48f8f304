r"""The fused Pallas kernels against XLA's fusions, forward and backward, at a model's shapes.

  python bench/fused_kernels.py                            # qk-norm, EC-XL-8E's 16 heads of 72
  python bench/fused_kernels.py --heads=18 --head_dim=64   # the XL presets' heads
  python bench/fused_kernels.py --heads=18 --head_dim=64 --sweep --out=bench/out/qk_sweep.json
  python bench/fused_kernels.py --kernel=adaln --width=1152  # adaLN's norm + modulate
  python bench/fused_kernels.py --smoke                    # tiny, checks it on a CPU

Each implementation is one jitted function returning the output and the input gradients (a
``jax.vjp`` with random cotangents) of one layer's worth of activations: batch x tokens rows
(x heads for the qk-norm), bf16. A window is ``--calls`` calls dispatched back to back and
blocked on at the end; the two implementations' windows alternate, and the record keeps the
median window of each as microseconds a call, with the bytes a call must move at the least
(inputs read and outputs written once, float32 statistics included) over that time.
``--sweep`` also times the qk-norm kernels' GPU layouts (``fused_qk_norm.GPU_*``: rows a
block, programs, warps, pipeline stages), each against the same XLA windows. On a CPU no Pallas
kernel compiles, so both columns time XLA ops there: only the GPU figures mean anything.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys

import common  # also puts the repository root on sys.path
import jax
import jax.numpy as jnp

from ecdit_jax.model import fused_norm, fused_qk_norm

EPS = 1e-6
SWEEP = {"GPU_ROWS": (16, 32, 64), "GPU_PROGRAMS": (264, 528, 1056), "GPU_WARPS": (4, 8),
         "GPU_STAGES": (2, 3)}


def _qk_norm_case(args, key):
  shape = (args.batch_size, args.tokens, args.heads, args.head_dim)
  keys = jax.random.split(key, 4)
  inputs = (jax.random.normal(keys[0], shape, jnp.bfloat16),
            jax.random.normal(keys[1], shape[2:], jnp.float32),
            1 + 0.1 * jax.random.normal(keys[2], shape[3:], jnp.float32))
  dy = jax.random.normal(keys[3], shape, jnp.bfloat16)
  rows = shape[0] * shape[1] * shape[2]
  # forward: z in, y and rstd out; backward: z, rstd and dy in, dz out.
  least_bytes = 5 * inputs[0].nbytes + 2 * rows * 4
  return (inputs, dy, least_bytes, lambda *a: fused_qk_norm.reference(*a, EPS),
          lambda *a: fused_qk_norm.bias_rms_norm(*a, eps=EPS))


def _adaln_case(args, key):
  shape = (args.batch_size, args.tokens, args.width)
  keys = jax.random.split(key, 4)
  inputs = (jax.random.normal(keys[0], shape, jnp.bfloat16),
            *(jax.random.normal(k, (shape[0], shape[2]), jnp.bfloat16) for k in keys[1:3]))
  dy = jax.random.normal(keys[3], shape, jnp.bfloat16)
  least_bytes = 5 * inputs[0].nbytes + 4 * shape[0] * shape[1] * 4  # mean and rstd
  return (inputs, dy, least_bytes, lambda *a: fused_norm.reference(*a, EPS),
          lambda *a: fused_norm.norm_modulate(*a, eps=EPS))


def _value_and_grads(fn):
  def call(inputs, dy):
    y, vjp = jax.vjp(fn, *inputs)
    return y, vjp(dy)
  return jax.jit(call)


def _timed_pair(xla, fused, inputs, dy, args) -> tuple[float, float]:
  """Median microseconds a call of each, from alternating windows."""
  calls = {"xla": xla, "fused": fused}
  for fn in calls.values():
    jax.block_until_ready(fn(inputs, dy))  # compile
  seconds = {name: [] for name in calls}
  for _ in range(args.windows):
    for name, fn in calls.items():
      def window(fn=fn):
        out = None
        for _ in range(args.calls):
          out = fn(inputs, dy)
        jax.block_until_ready(out)
      seconds[name] += common.timed_windows(window, 1)
  return tuple(statistics.median(seconds[n]) / args.calls * 1e6 for n in calls)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--kernel", choices=("qk_norm", "adaln"), default="qk_norm")
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--tokens", type=int, default=256, help="tokens an image (or prompt)")
  parser.add_argument("--heads", type=int, default=16)
  parser.add_argument("--head_dim", type=int, default=72)
  parser.add_argument("--width", type=int, default=1152, help="adaLN: the model width")
  parser.add_argument("--calls", type=int, default=50, help="calls a timed window")
  parser.add_argument("--windows", type=int, default=5)
  parser.add_argument("--sweep", action="store_true", help="time the qk-norm GPU layouts too")
  parser.add_argument("--smoke", action="store_true", help="tiny shapes, few calls (CPU check)")
  parser.add_argument("--out", default=None, help="write the JSON record here")
  args = parser.parse_args(argv)
  if args.smoke:
    args.batch_size, args.tokens, args.calls, args.windows = 2, 16, 2, 1
    args.heads, args.head_dim, args.width = 4, 24, 48
  case = _qk_norm_case if args.kernel == "qk_norm" else _adaln_case
  inputs, dy, least_bytes, xla_fn, fused_fn = case(args, jax.random.key(0))
  xla = _value_and_grads(xla_fn)
  settings = [{}]
  if args.sweep and args.kernel == "qk_norm":
    settings += [dict(zip(SWEEP, values)) for values in itertools.product(*SWEEP.values())]
  results = []
  for setting in settings:
    defaults = {name: getattr(fused_qk_norm, name) for name in setting}
    for name, value in setting.items():  # read when the kernels are traced: a new jit each
      setattr(fused_qk_norm, name, value)
    xla_us, fused_us = _timed_pair(xla, _value_and_grads(fused_fn), inputs, dy, args)
    for name, value in defaults.items():
      setattr(fused_qk_norm, name, value)
    results.append({"setting": setting or "default", "xla_us": xla_us, "fused_us": fused_us,
                    "fused_over_xla": fused_us / xla_us,
                    "fused_gb_per_s": least_bytes / fused_us / 1e3})
    print(f"{args.kernel} {setting or 'default'}: xla {xla_us:.1f} us, fused {fused_us:.1f} us "
          f"({fused_us / xla_us:.3f}), {least_bytes / fused_us / 1e3:.0f} GB/s", flush=True)
  record = {"benchmark": "kernels", "kernel": args.kernel, "args": vars(args),
            "least_bytes_per_call": least_bytes, "results": results,
            "environment": common.environment(jax.devices())}
  common.write_json(args.out, record)
  return 0


if __name__ == "__main__":
  sys.exit(main())
