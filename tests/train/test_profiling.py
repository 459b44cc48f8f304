"""config.profile: a trace of a window of training steps, stopped even when the run ends first."""

import glob
import gzip
import json
import os

import jax.numpy as jnp
import pytest

from ecdit_jax.train.profiling import ProfileWindow
from tests.commands import run_ok
from tests.tiny import tiny_train_flags

pytestmark = pytest.mark.slow  # trains, or runs the tools: CI runs it, the fast lane skips it


def test_profile_window_cut_short_by_the_end_of_the_run(data_dir, tmp_path):
  # A run of its own, as a user starts it: a native crash in the profiler fails this test
  # instead of ending the whole test session.
  workdir = str(tmp_path / "run")
  # Steps 0-3 run; the window asks for steps 2-6, so the end of the run has to close it.
  result = run_ok(["ecdit_jax.main", "--config=configs/default.py", f"--workdir={workdir}",
                   *tiny_train_flags(**{"data.data_dir": data_dir, "num_train_steps": 4,
                                        "profile.num_steps": 5, "profile.skip_steps": 2})])
  assert "profiled steps 2-3 " in result.stdout + result.stderr
  traces = glob.glob(os.path.join(workdir, "profile", "plugins", "profile", "*", "*"))
  names = {os.path.basename(path) for path in traces}
  # Both files are written when the trace stops.
  assert any(name.endswith(".xplane.pb") for name in names), names
  assert "perfetto_trace.json.gz" in names
  # XLA's work is traced, jax's Python tracer is off (its events are named "$file:line name").
  perfetto = next(path for path in traces if path.endswith("perfetto_trace.json.gz"))
  with gzip.open(perfetto) as f:
    events = [e.get("name", "") for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
  assert any("train_step" in name for name in events), events[:20]
  assert not [name for name in events if name.startswith("$")]


def test_a_window_opened_by_a_later_call_reports_the_steps_it_traced(tmp_path, capsys):
  # Calls of two steps start at 0, 2, 4, 6: a window asked for steps 3-6 opens at step 4.
  window = ProfileWindow(str(tmp_path), first=3, num_steps=4)
  state = jnp.zeros(())
  for start in range(0, 10, 2):
    window.before_step(start)
    assert window.active == (4 <= start < 8)
    state = state + 1
    window.after_step(start + 2, state)
  assert "profiled steps 4-7 " in capsys.readouterr().out
  assert not window.active
