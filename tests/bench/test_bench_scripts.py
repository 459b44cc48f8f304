"""The benchmark scripts run (tiny --smoke models on CPU) and write complete records; their
numbers are not checked here: speed is what bench/RESULTS.md records from real cards."""

import gzip
import json
import os
import subprocess
import sys

import pytest

from tests.commands import xla_flags

pytestmark = pytest.mark.slow  # trains, or runs the tools: CI runs it, the fast lane skips it

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def _run(script, tmp_path, *flags):
  out = tmp_path / "record.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1))  # one CPU device
  subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), "--smoke",
                  f"--out={out}", *flags], check=True, env=env, cwd=ROOT, timeout=600)
  with open(out) as f:
    return json.load(f)


def test_step_benchmark_writes_a_record_and_a_profile(tmp_path):
  record = _run("step.py", tmp_path, "--moe_dispatch=einsum",
                f"--profile_dir={tmp_path / 'profile'}", f"--hlo_out={tmp_path / 'step.hlo.gz'}")
  assert record["model"]["moe_dispatch"] == "einsum"
  assert record["images_per_s"] > 0 and record["compile_s"] > 0
  assert not record["final_step_nonfinite"]
  memory = record["compiled_memory"]  # the state is donated: the outputs reuse its buffers
  assert 0 < memory["alias_size"] <= memory["argument_size"] and memory["temp_size"] > 0
  assert record["profile"]["op_time_us_per_step"] > 0
  assert any(r["source"].startswith("ecdit_jax/model/") for r in record["profile"]["top_sources"])
  with gzip.open(tmp_path / "step.hlo.gz", "rt") as f:
    assert "ENTRY" in f.read()  # the compiled module's text


def test_step_benchmark_smoke_takes_a_head_count_as_run_all_asks(tmp_path):
  """run_all.sh's 18-head runs: the smoke model widens to keep its head width."""
  record = _run("step.py", tmp_path, "--num_heads=18", "--num_kv_heads=18")
  assert record["model"]["num_heads"] == 18 and record["model"]["hidden_size"] % 18 == 0
  assert record["images_per_s"] > 0


def test_sample_benchmark_compares_ec_with_dense_and_profiles_both(tmp_path):
  record = _run("sample.py", tmp_path, f"--profile_dir={tmp_path / 'profile'}")
  assert record["benchmark"] == "sampling" and set(record) >= {"moe", "dense"}
  assert record["time_ratio_moe_over_dense"] > 0
  assert set(record["profile_per_ode_step"]) == {"ec", "dense"}
  assert all(p["op_time_us_per_step"] > 0 for p in record["profile_per_ode_step"].values())


def test_kernel_benchmark_times_xla_and_the_kernels_over_the_sweep(tmp_path):
  record = _run("fused_kernels.py", tmp_path, "--sweep")
  results = record["results"]
  assert record["kernel"] == "qk_norm" and record["least_bytes_per_call"] > 0
  assert len(results) == 1 + 3 * 3 * 2 * 2 and results[0]["setting"] == "default"
  assert len({tuple(sorted(r["setting"].items())) for r in results[1:]}) == len(results) - 1
  assert all(r["xla_us"] > 0 and r["fused_us"] > 0 for r in results)
