"""bench/trace_summary.py: device time by op and kind, busy and idle time, from a trace."""

import gzip
import json
import os
import sys

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
import trace_summary


def _meta(pid, tid, process, thread):
  return [{"ph": "M", "name": "process_name", "pid": pid, "args": {"name": process}},
          {"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": thread}}]


def _op(pid, tid, name, ts, dur, **args):
  return {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": ts, "dur": dur, "args": args}


def _gpu_trace():
  events = _meta(1, 10, "/device:GPU:0", "Stream #13") + _meta(1, 11, "/device:GPU:0", "Stream #14")
  events += _meta(2, 20, "/host:CPU", "python")
  events += [
      _op(1, 10, "gemm_fusion.3", 0, 40),
      _op(1, 11, "all-to-all.1", 30, 20),        # overlaps the gemm by 10
      _op(1, 10, "loop_fusion.7", 60, 10),
      _op(1, 10, "fusion.2", 90, 5, hlo_op="sort.4"),  # kind from the HLO details
      _op(1, 10, "cudnn_fmha", 100, 20),
      _op(2, 20, "PjitFunction(step)", 0, 500),   # host time: not device time
  ]
  return events


@pytest.mark.parametrize("name,kind", [
    ("nvjet_sm90_tst_144x128_64x6_1x2_h_bz_TNN", "matmul"),  # cuBLAS on Hopper
    ("gemm_fusion_dot_1393", "matmul"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop", "attention"),
    ("loop_select_fusion_14", "fusion"),
    ("input_scatter_fusion_28", "gather/scatter"),
    ("ncclDevKernel_AllReduce_Sum_f32", "collective"),
])
def test_kernel_names_of_real_gpu_profiles(name, kind):
  assert trace_summary.kind_of(name) == kind


def test_sums_kinds_and_busy_time_of_a_gpu_trace():
  summary = trace_summary.summarize(_gpu_trace(), steps=2)
  assert summary["source"] == "device" and summary["devices"] == 1
  assert summary["op_time_us_per_step"] == pytest.approx(95 / 2)
  kinds = {r["kind"]: r["us_per_step"] for r in summary["by_kind"]}
  assert kinds == {"matmul": 20, "collective": 10, "fusion": 5, "sort/top-k": 2.5,
                   "attention": 10}
  # Busy: [0, 50) + [60, 70) + [90, 95) + [100, 120) = 85 of the span 120.
  assert summary["busy_us_per_step"] == pytest.approx(85 / 2)
  assert summary["span_us_per_step"] == pytest.approx(120 / 2)
  assert summary["idle_fraction"] == pytest.approx(35 / 120)
  assert summary["top_ops"][0] == {"name": "gemm_fusion.3", "us_per_step": 20, "share": 40 / 95}
  assert "| matmul | 20 | 42.1% |" in trace_summary.format_summary(summary)


def test_reads_the_newest_trace_of_a_directory_and_refuses_an_empty_one(tmp_path):
  run = tmp_path / "plugins" / "profile" / "run1"
  run.mkdir(parents=True)
  with gzip.open(run / "perfetto_trace.json.gz", "wt") as f:
    json.dump({"traceEvents": _gpu_trace()}, f)
  assert len(trace_summary.load_events(str(tmp_path))) == len(_gpu_trace())
  with pytest.raises(ValueError, match="no op events"):
    trace_summary.summarize(_meta(2, 20, "/host:CPU", "python"))
  with pytest.raises(FileNotFoundError):
    trace_summary.find_trace(str(tmp_path / "plugins" / "elsewhere"))


def test_a_real_cpu_trace_yields_host_ops(tmp_path):
  f = jax.jit(lambda x: jnp.tanh(x @ x).sum())
  x = jnp.ones((256, 256))
  f(x).block_until_ready()
  with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
    for _ in range(3):
      f(x).block_until_ready()
  summary = trace_summary.summarize(trace_summary.load_events(str(tmp_path)), steps=3)
  assert summary["source"] == "host executor"
  assert summary["op_time_us_per_step"] > 0
  assert 0 <= summary["idle_fraction"] < 1
  assert sum(r["share"] for r in summary["by_kind"]) == pytest.approx(1.0)
