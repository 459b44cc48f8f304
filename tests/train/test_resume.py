"""Resumed training equals uninterrupted training, bit for bit on CPU, data order included."""

import json
import os

import jax
import numpy as np
import pytest

from ecdit_jax.model import ConfigError
from ecdit_jax.train.checkpoint import Checkpointer
from ecdit_jax.train.inference import load_run
from ecdit_jax.train.loop import train_and_evaluate

from train_testing import tiny_train_config


def read_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {row["step"]: row["loss"] for row in map(json.loads, f)}


# The data position is checkpointed either way: the grain pipeline's or the in-memory cache's;
# and the stacked parameters of a scan over layers are too.
@pytest.mark.parametrize("cache_in_memory,scan_layers", [(False, False), (True, True)])
def test_resume_matches_uninterrupted_run(data_dir, tmp_path, cache_in_memory, scan_layers):
  def config(**overrides):
    return tiny_train_config(data_dir, **{"data.cache_in_memory": cache_in_memory,
                                          "model.scan_layers": scan_layers,
                                          **overrides})

  straight = str(tmp_path / "straight")
  final_straight = train_and_evaluate(config(), straight)

  resumed = str(tmp_path / "resumed")
  # Stop after 3 steps (a checkpoint is written there), then start again with the full length.
  train_and_evaluate(config(num_train_steps=3), resumed)
  assert Checkpointer(resumed).all_steps() == [3]
  final_resumed = train_and_evaluate(config(), resumed)

  losses_straight, losses_resumed = read_losses(straight), read_losses(resumed)
  assert sorted(losses_resumed) == list(range(1, 7))
  for step in range(1, 7):
    assert losses_resumed[step] == losses_straight[step], step  # exact, not approximate
  for a, b in zip(jax.tree.leaves(final_straight), jax.tree.leaves(final_resumed)):
    np.testing.assert_array_equal(a, b)
  assert ("stacked_blocks" in final_resumed.params["dit"]) == scan_layers
  # A finished run asked for the same length again does nothing and keeps its checkpoints.
  again = train_and_evaluate(config(), resumed)
  assert int(again.step) == 6
  assert Checkpointer(resumed).all_steps() == [3, 6]


def test_resume_refuses_a_different_model(data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  train_and_evaluate(tiny_train_config(data_dir, num_train_steps=3), workdir)
  with pytest.raises(ConfigError, match=r"config\.model\.hidden_size"):
    train_and_evaluate(tiny_train_config(data_dir, **{"model.hidden_size": 64}), workdir)
  assert Checkpointer(workdir).all_steps() == [3]  # nothing saved was touched


def test_nonfinite_loss_stops_naming_the_step_and_keeps_checkpoints(data_dir, tmp_path):
  workdir = str(tmp_path / "nan")
  # No clipping and an absurd learning rate: the weights overflow within a few steps.
  config = tiny_train_config(data_dir, learning_rate=1e30, grad_clip_norm=0.0, warmup_steps=0,
                             checkpoint_every_steps=1, num_train_steps=20)
  with pytest.raises(FloatingPointError, match=r"at step \d+"):
    train_and_evaluate(config, workdir)
  steps = Checkpointer(workdir).all_steps()
  assert steps, "the steps before the blow-up were checkpointed"
  params = load_run(workdir, use_ema=False).params
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_nonfinite_updates_can_be_skipped(data_dir, tmp_path):
  workdir = str(tmp_path / "skip")
  config = tiny_train_config(data_dir, learning_rate=1e30, grad_clip_norm=0.0, warmup_steps=0,
                             nonfinite_loss="skip", num_train_steps=8)
  state = train_and_evaluate(config, workdir)
  assert int(state.step) == 8
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    last = [json.loads(line) for line in f][-1]
  assert last["skipped_updates"] > 0
