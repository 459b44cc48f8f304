"""config.profile: a trace of a window of training steps, stopped even when the run ends first."""

import glob
import os

import jax
import pytest

from ecdit_jax.model import ConfigError
from ecdit_jax.train.loop import train_and_evaluate, validate_config

from train_testing import tiny_train_config


def test_profile_window_cut_short_by_the_end_of_the_run(data_dir, tmp_path, capsys):
  workdir = str(tmp_path / "run")
  # Steps 0-3 run; the window asks for steps 2-6, so the end of the run has to close it.
  config = tiny_train_config(data_dir, num_train_steps=4, **{"profile.num_steps": 5,
                                                             "profile.skip_steps": 2})
  train_and_evaluate(config, workdir)
  assert "profiled steps 2-3 " in capsys.readouterr().out
  traces = glob.glob(os.path.join(workdir, "profile", "plugins", "profile", "*", "*"))
  names = {os.path.basename(path) for path in traces}
  assert any(name.endswith(".xplane.pb") for name in names), names
  assert "perfetto_trace.json.gz" in names
  # The trace was stopped: another one can start.
  jax.profiler.start_trace(str(tmp_path / "again"))
  jax.profiler.stop_trace()


@pytest.mark.parametrize("key,value", [("num_steps", -1), ("skip_steps", -3)])
def test_bad_profile_values_name_the_key(data_dir, key, value):
  config = tiny_train_config(data_dir, **{f"profile.{key}": value})
  with pytest.raises(ConfigError, match=f"config.profile.{key}"):
    validate_config(config)
