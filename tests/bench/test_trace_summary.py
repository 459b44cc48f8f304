"""bench/trace_summary.py: device time by op and kind, busy and idle time, from a trace."""

import collections
import gzip
import json
import os
import sys

import jax
import jax.numpy as jnp
import pytest

# After site-packages: the pytest session keeps this path, and a bench script must not shadow an
# installed package (diffusers imports one named ``kernels``).
sys.path.append(os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
import hlo_sources
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


def _scaled_matmul(x, w):
  return jnp.tanh(x @ w)  # the line the matmul's time should be charged to


def test_time_is_charged_to_source_lines_and_passes_through_the_compiled_hlo(tmp_path):
  loss = lambda w, x: (_scaled_matmul(x, w) ** 2).sum()
  step = jax.jit(lambda w, x: w - 0.1 * jax.grad(loss)(w, x))
  w, x = jnp.ones((512, 512)) / 512, jnp.ones((512, 512))
  compiled = step.lower(w, x).compile()
  sources = hlo_sources.parse(compiled.as_text())
  compiled(w, x).block_until_ready()
  with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
    for _ in range(3):
      w = compiled(w, x)
    w.block_until_ready()
  summary = trace_summary.summarize(trace_summary.load_events(str(tmp_path)), steps=3,
                                    sources=sources)
  assert summary["unmatched_share"] < 0.5
  line = _scaled_matmul.__code__.co_firstlineno + 1
  charged = collections.Counter()
  for r in summary["top_sources"]:
    charged[r["phase"], r["source"].split(" ")[0]] += r["share"]
  mine = {phase: share for (phase, source), share in charged.items()
          if source.endswith(f"test_trace_summary.py:{line}")}
  # Forward x @ w and its backward (the gradient matmul) are both found, and between them
  # they are most of the step's time.
  assert set(mine) >= {"fwd", "bwd"}, charged
  assert sum(mine.values()) > 0.5, charged
  assert "| bwd |" in trace_summary.format_summary(summary)


def test_stack_frames_of_an_hlo_module_are_read_innermost_first():
  text = "\n".join([
      "HloModule m", "", "FileNames", '1 "/src/ecdit_jax/model/moe.py"', '2 "/lib/flax/linear.py"',
      "", "FunctionNames", '1 "route"', '2 "Linear.__call__"', "", "FileLocations",
      "1 {file_name_id=1 function_name_id=1 line=90 end_line=90 column=1 end_column=2}",
      "2 {file_name_id=2 function_name_id=2 line=422 end_line=422 column=1 end_column=2}", "",
      "StackFrames", "1 {file_location_id=1 parent_frame_id=1}",
      "2 {file_location_id=2 parent_frame_id=2}", "",
      "ENTRY %main {",
      '  %dot.1 = f32[2]{0} dot(%a, %b), metadata={op_name="jit(f)/transpose(jvp())/dot_general" '
      'stack_frame_id=2}',
      '  ROOT %add.2 = f32[2]{0} add(%dot.1, %dot.1), metadata={op_name="jit(f)/add"}', "}"])
  sources = hlo_sources.parse(text)
  assert sources.stack(2) == [("/lib/flax/linear.py", 422, "Linear.__call__"),
                              ("/src/ecdit_jax/model/moe.py", 90, "route")]
  assert sources.source("dot.1") == "ecdit_jax/model/moe.py:90 route"  # the project's frame
  assert sources.phase("dot.1") == "bwd" and sources.phase("add.2") == "-"
  assert sources.source("add.2") == "(no source)"


def test_kernels_inside_cuda_graphs_are_found_by_their_fusion_names():
  text = "\n".join([
      "HloModule m", "", "FileNames", '1 "/src/ecdit_jax/model/moe.py"', "", "FunctionNames",
      '1 "route"', "", "FileLocations",
      "1 {file_name_id=1 function_name_id=1 line=90 end_line=90 column=1 end_column=2}", "",
      "StackFrames", "1 {file_location_id=1 parent_frame_id=1}", "",
      "ENTRY %main {",
      '  %loop_add_fusion.159 = f32[2]{0} fusion(%a), kind=kLoop, calls=%f, '
      'metadata={op_name="jit(f)/jvp()/add" stack_frame_id=1}', "}"])
  events = _meta(1, 10, "/device:GPU:0", "Stream #13") + [
      _op(1, 10, "loop_add_fusion_159", 0, 30, hlo_op="command_buffer_1"),
      _op(1, 10, "nvjet_sm90_tst_144x128", 30, 10, hlo_op="command_buffer_1")]
  summary = trace_summary.summarize(events, sources=hlo_sources.parse(text))
  rows = {(r["phase"], r["source"], r["kind"]): r["us_per_step"] for r in summary["top_sources"]}
  assert rows == {("fwd", "ecdit_jax/model/moe.py:90 route", "fusion"): 30,
                  ("?", "(kernel named nowhere in the HLO)", "matmul"): 10}
  assert "| fwd | ecdit_jax/model/moe.py:90 route | fusion | 30 |" in (
      trace_summary.format_summary(summary))
  assert summary["unmatched_share"] == pytest.approx(0.25)
