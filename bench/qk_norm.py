r"""The qk RMS-norm after its projection, per-head (4-D) form against the row view.

  python bench/qk_norm.py --out=bench/out/qk_norm.json     # the sampling shape of EC-XL-8E
  python bench/qk_norm.py --batch=4 --calls=2               # quick, also on a CPU

Times three jitted functions of x (B, S, d): the head projection alone
(``attention.HeadProjection``), the projection followed by the norm computed over
(B, S, heads, head_dim) as the model did before, and the projection followed by the package's
``attention.HeadRMSNorm``, which (with heads whole on the device) normalises a
(B x S x heads, head_dim) view. The norm's cost is each variant's time less the projection's.
The default shape is one sampling step's query of EC-XL-8E at batch 64 with guidance: 128 rows
of 256 tokens, 16 heads of 72. On one H100 (jax 0.11.2) XLA fused either form with the bias
into one Triton kernel with (1, 128, 1, 72) output tiles; in the compiled HLO the two differ only
in how each row's statistic is broadcast back (over three axes in the 4-D form, over one in the
row view), and the 4-D form's kernel was the slow one. The script prints each variant's tiles.
"""

from __future__ import annotations

import argparse
import re
import statistics

import common  # also puts the repository root on sys.path
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ecdit_jax.model import attention


def per_head_norm(x: jax.Array, scale: jax.Array) -> jax.Array:
  """The former form: the mean over the last axis of the 4-D array, computed in float32."""
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6)
  return (normed * scale.astype(jnp.float32)).astype(x.dtype)


def triton_tiles(hlo_text: str) -> list[str]:
  """The output tile sizes of the Triton fusions in a compiled module's text."""
  return sorted(set(re.findall(r'"output_tiles":\[\{"sizes":\[([^\]]*)\]', hlo_text)))


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=128, help="rows (2 x images with guidance)")
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--hidden", type=int, default=1152)
  parser.add_argument("--heads", type=int, default=16)
  parser.add_argument("--calls", type=int, default=50, help="calls per timed window")
  parser.add_argument("--windows", type=int, default=5)
  parser.add_argument("--out", default=None, help="write the JSON record here")
  args = parser.parse_args(argv)

  head_dim = args.hidden // args.heads
  rngs = nnx.Rngs(0)
  projection = attention.HeadProjection(args.hidden, args.heads, head_dim, "heads", rngs=rngs,
                                        dtype=jnp.bfloat16, param_dtype=jnp.float32)
  norm = attention.HeadRMSNorm(head_dim, rngs=rngs, param_dtype=jnp.float32)
  x = jax.random.normal(jax.random.key(1), (args.batch, args.seq, args.hidden), jnp.bfloat16)

  # The weights are arguments, as in the model's jitted functions, not constants of the program.
  graphdef, params = nnx.split((projection, norm))

  def with_modules(fn):
    return lambda params, x: fn(*nnx.merge(graphdef, params), x)

  variants = {
      "projection": with_modules(lambda proj, _, x: proj(x)),
      "projection+per_head_norm": with_modules(
          lambda proj, norm, x: per_head_norm(proj(x), norm.scale[...])),
      "projection+row_view_norm": with_modules(lambda proj, norm, x: norm(proj(x))),
  }
  results, outputs = {}, {}
  for name, fn in variants.items():
    compiled = jax.jit(fn).lower(params, x).compile()
    outputs[name] = np.asarray(jax.block_until_ready(compiled(params, x)), np.float32)

    def window(compiled=compiled):
      out = None
      for _ in range(args.calls):
        out = compiled(params, x)
      jax.block_until_ready(out)

    seconds = common.timed_windows(window, args.windows)
    results[name] = {"us_per_call": statistics.median(seconds) / args.calls * 1e6,
                     "triton_output_tiles": triton_tiles(compiled.as_text())}
  base = results["projection"]["us_per_call"]
  for name in ("projection+per_head_norm", "projection+row_view_norm"):
    results[name]["norm_us"] = results[name]["us_per_call"] - base
  # Same values either way (up to one bf16 rounding), so the comparison is of layouts only.
  difference = float(np.max(np.abs(outputs["projection+per_head_norm"]
                                    - outputs["projection+row_view_norm"])))
  array_bytes = args.batch * args.seq * args.hidden * 2
  record = {"benchmark": "qk_norm", "shape": [args.batch, args.seq, args.heads, head_dim],
            "calls_per_window": args.calls, "windows": args.windows, "variants": results,
            "max_abs_difference": difference, "bytes_per_bf16_array": array_bytes,
            "environment": common.environment(jax.devices())}
  env = record["environment"]
  print(f"qk_norm {record['shape']} {env['device_kind']} jax {env['jax']}: max |difference| "
        f"{difference:.3g}; one bf16 array {array_bytes / 1e6:.1f} MB")
  for name, result in results.items():
    extra = f", norm {result['norm_us']:.1f} us" if "norm_us" in result else ""
    print(f"  {name:26s} {result['us_per_call']:9.1f} us/call{extra}; Triton output tiles "
          f"{result['triton_output_tiles'] or '-'}")
  common.write_json(args.out, record)
  return record


if __name__ == "__main__":
  main()
