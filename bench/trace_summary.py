r"""Where a profiled window spent its device time: the top ops and op kinds of a jax.profiler trace.

  python bench/step.py --model=ec --profile_dir=bench/out/prof_ec   # traces one extra window
  python bench/trace_summary.py bench/out/prof_ec --steps=10

Reads the Chrome-format trace that ``jax.profiler.trace(..., create_perfetto_trace=True)`` writes
(``perfetto_trace.json.gz``, the newest under the directory). Device time is the complete events
("ph": "X") on the accelerators' processes (``/device:...``); on a CPU-only run, where there are
none, the ops on the host's XLA threads stand in. For each op name and each kind of op
(matmul, attention, collective, sort/top-k, gather/scatter, other fusions, copies) it reports
the time per step and its share; "busy" is the union of the op intervals of each device, and
"idle" the rest of the span from the first op to the last, which is where a step waits on the
host (dispatch, input) rather than computing.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys

import hlo_sources

# First match wins; checked against the op name and its HLO details, lower-cased.
KINDS = (
    ("collective", (r"all-to-all|all_to_all|alltoall|all-reduce|allreduce|all-gather|allgather|"
                    r"reduce-scatter|reducescatter|nccl|collective-permute")),
    ("attention", r"cudnn|flash|fmha|attention|sdpa"),
    # nvjet_*: the names of cuBLAS's Hopper GEMM kernels.
    ("matmul", r"gemm|cublas|nvjet|\bdot\b|dot[._]|matmul|cutlass|wgmma|convolution"),
    ("sort/top-k", r"sort|topk|top-k|top_k"),
    ("gather/scatter", r"gather|scatter|dynamic-slice|dynamic_slice|dynamic-update-slice"),
    ("copy/transpose", r"copy|transpose|memcpy|memset"),
    ("fusion", r"fusion"),
)


def find_trace(path: str) -> str:
  """The trace file itself, or the newest perfetto trace under a profile directory."""
  if os.path.isfile(path):
    return path
  found = glob.glob(os.path.join(path, "**", "perfetto_trace.json.gz"), recursive=True)
  if not found:
    raise FileNotFoundError(f"no perfetto_trace.json.gz under {path}")
  return max(found, key=os.path.getmtime)


def load_events(path: str) -> list[dict]:
  path = find_trace(path)
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8") as f:
    data = json.load(f)
  return data["traceEvents"] if isinstance(data, dict) else data


def kind_of(name: str, details: str = "") -> str:
  text = f"{name} {details}".lower()
  for kind, pattern in KINDS:
    if re.search(pattern, text):
      return kind
  return "other"


def device_ops(events: list[dict]) -> tuple[list[dict], str]:
  """The op events of the accelerators, else of the host's XLA executor threads; and which."""
  processes = {e["pid"]: e.get("args", {}).get("name", "") for e in events
               if e.get("ph") == "M" and e.get("name") == "process_name"}
  threads = {(e["pid"], e.get("tid")): e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
  devices = {pid for pid, name in processes.items() if "/device:" in name}
  if devices:
    return [e for e in complete if e["pid"] in devices], "device"
  # On the host, XLA's own threads run the ops; events named like C++ methods
  # ("ThunkExecutor::Execute") are the runtime waiting on them, and "end: <op>" marks the
  # executor's bookkeeping after an op, not the op.
  executor = {key for key, name in threads.items() if name.startswith("tf_XLA")}
  return [e for e in complete
          if (e["pid"], e.get("tid")) in executor and "::" not in e["name"]
          and not e["name"].startswith("end: ")], "host executor"


def _union_length(intervals: list[tuple[float, float]]) -> float:
  total, end = 0.0, float("-inf")
  for start, stop in sorted(intervals):
    if stop > end:
      total += stop - max(start, end)
      end = stop
  return total


def _instruction_of(event: dict, sources) -> str | None:
  """The HLO instruction an op event ran, if the module names it.

  Outside CUDA graphs the event's ``hlo_op`` is the instruction. Inside one, ``hlo_op`` names
  the command buffer, and the kernel's own name is the fusion's with "." made "_"
  ("loop_add_fusion_159" for %loop_add_fusion.159). XLA reuses one kernel for fusions of the
  same body, which then all count under the first of them: the same code, as a rule, in
  another layer. Library kernels (cuBLAS's nvjet_*, cuDNN's) have names of their own."""
  name = event["name"]
  for candidate in (str(event.get("args", {}).get("hlo_op", "")), name,
                    re.sub(r"_(\d+)$", r".\1", name)):
    if candidate in sources.instructions:
      return candidate
  return None


def summarize(events: list[dict], steps: int = 1, top: int = 15, sources=None) -> dict:
  """Per-step device time by op and by kind (microseconds), busy and idle time per device.

  With ``sources`` (``hlo_sources.HloSources`` of the traced module) also by the line of source
  and pass (forward, backward, neither) each op came from."""
  if steps < 1:
    raise ValueError(f"steps must be positive, got {steps}")
  ops, source = device_ops(events)
  if not ops:
    raise ValueError("the trace holds no op events of a device or of the XLA executor")
  by_name, by_kind, by_source = (collections.Counter() for _ in range(3))
  unmatched = 0.0
  per_device = collections.defaultdict(list)
  for e in ops:
    args = e.get("args", {})
    details = " ".join(str(args.get(k, "")) for k in ("hlo_op", "long_name", "hlo_category"))
    kind = kind_of(e["name"], details)
    by_name[e["name"]] += e["dur"]
    by_kind[kind] += e["dur"]
    per_device[e["pid"]].append((e["ts"], e["ts"] + e["dur"]))
    if sources is not None:
      instruction = _instruction_of(e, sources)
      if instruction is None:
        unmatched += e["dur"]
        key = ("?", "(kernel named nowhere in the HLO)", kind)
      else:  # by kind too: one line's matmul (e.g. a Triton GEMM fusion) apart from its fusions
        key = (sources.phase(instruction), sources.source(instruction), kind)
      by_source[key] += e["dur"]
  total = sum(by_name.values())
  busy = [_union_length(v) for v in per_device.values()]
  span = [max(b for _, b in v) - min(a for a, _ in v) for v in per_device.values()]
  summary = {
      "source": source,
      "devices": len(per_device),
      "op_time_us_per_step": total / steps,
      "busy_us_per_step": sum(busy) / len(busy) / steps,
      "span_us_per_step": sum(span) / len(span) / steps,
      "idle_fraction": 1.0 - sum(busy) / sum(span) if sum(span) else 0.0,
      "by_kind": [{"kind": k, "us_per_step": v / steps, "share": v / total}
                  for k, v in by_kind.most_common()],
      "top_ops": [{"name": k, "us_per_step": v / steps, "share": v / total}
                  for k, v in by_name.most_common(top)],
  }
  if sources is not None:
    summary["top_sources"] = [
        {"phase": phase, "source": source, "kind": kind, "us_per_step": v / steps,
         "share": v / total}
        for (phase, source, kind), v in by_source.most_common(top)]
    summary["unmatched_share"] = unmatched / total
  return summary


def format_summary(summary: dict) -> str:
  head = (f"{summary['source']} time, {summary['devices']} device(s): ops "
          f"{summary['op_time_us_per_step']:.0f} us/step, busy {summary['busy_us_per_step']:.0f}"
          f" of {summary['span_us_per_step']:.0f} us/step (idle {summary['idle_fraction']:.1%})")
  lines = [head, "", "| kind | us/step | share |", "|---|---|---|"]
  lines += [f"| {r['kind']} | {r['us_per_step']:.0f} | {r['share']:.1%} |"
            for r in summary["by_kind"]]
  lines += ["", "| op | us/step | share |", "|---|---|---|"]
  lines += [f"| {r['name'][:80]} | {r['us_per_step']:.0f} | {r['share']:.1%} |"
            for r in summary["top_ops"]]
  if "top_sources" in summary:
    lines += ["", f"| pass | source line | kind | us/step | share |  (ops not found in the "
                  f"HLO: {summary['unmatched_share']:.1%} of the time)", "|---|---|---|---|---|"]
    lines += [f"| {r['phase']} | {r['source'][:90]} | {r['kind']} | {r['us_per_step']:.0f} | "
              f"{r['share']:.1%} |" for r in summary["top_sources"]]
  return "\n".join(lines)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("trace", help="a profile directory or a perfetto_trace.json.gz")
  parser.add_argument("--steps", type=int, default=1, help="steps in the traced window")
  parser.add_argument("--top", type=int, default=15, help="ops to list")
  parser.add_argument("--hlo", default=None,
                      help="the traced module's optimized HLO (bench/step.py --hlo_out): adds "
                           "time by source line and pass")
  args = parser.parse_args(argv)
  sources = hlo_sources.load(args.hlo) if args.hlo else None
  summary = summarize(load_events(args.trace), args.steps, args.top, sources)
  print(format_summary(summary))
  return summary


if __name__ == "__main__":
  main(sys.argv[1:])
