"""Resumed training equals uninterrupted training, bit for bit on CPU, data order included."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from ecdit_jax.model import ConfigError, ModelConfig
from ecdit_jax.model.config import COMPUTE_ONLY_KEYS
from ecdit_jax.checkpoint import Checkpointer, check_same_model
from ecdit_jax.inference.run import load_run
from ecdit_jax.train.loop import train_and_evaluate
from ecdit_jax.model.params import build_model, to_pure_dict

from tests.tiny import tiny_train_config

pytestmark = pytest.mark.slow  # trains, or runs the tools: CI runs it, the fast lane skips it


def read_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {row["step"]: row["loss"] for row in map(json.loads, f)}


# The data position is checkpointed either way: the grain pipeline's or the in-memory cache's;
# and the stacked parameters of a scan over layers are too. The EMA and optimizer state saved
# from host memory (config.host_offload) resume onto the devices, and the other way round.
@pytest.mark.parametrize("cache_in_memory,scan_layers,offload", [
    (False, False, ("ema,optimizer", "")), (True, True, ("", "ema,optimizer"))])
def test_resume_matches_uninterrupted_run(data_dir, tmp_path, cache_in_memory, scan_layers,
                                          offload):
  def config(**overrides):
    return tiny_train_config(data_dir, **{"data.cache_in_memory": cache_in_memory,
                                          "model.scan_layers": scan_layers,
                                          **overrides})

  straight = str(tmp_path / "straight")
  final_straight = train_and_evaluate(config(), straight)

  resumed = str(tmp_path / "resumed")
  # Stop after 3 steps (a checkpoint is written there), then start again with the full length.
  train_and_evaluate(config(num_train_steps=3, host_offload=offload[0]), resumed)
  assert Checkpointer(resumed).all_steps() == [3]
  final_resumed = train_and_evaluate(config(host_offload=offload[1]), resumed)
  assert ({leaf.sharding.memory_kind for leaf in jax.tree.leaves(final_resumed.opt_state)}
          == {"pinned_host" if offload[1] else "device"})

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


def test_resume_refuses_a_different_model_but_takes_new_compute_settings(data_dir, tmp_path,
                                                                        capsys):
  workdir = str(tmp_path / "run")
  train_and_evaluate(tiny_train_config(data_dir, num_train_steps=3), workdir)
  with pytest.raises(ConfigError, match=r"config\.model\.hidden_size") as refused:
    train_and_evaluate(tiny_train_config(data_dir, **{"model.hidden_size": 64,
                                                      "model.remat": "block"}), workdir)
  assert "remat" not in str(refused.value)  # only the keys that block the resume are named
  assert Checkpointer(workdir).all_steps() == [3]  # nothing saved was touched
  # Block remat changes how the same parameters are used: the run goes on, and says so.
  state = train_and_evaluate(
      tiny_train_config(data_dir, num_train_steps=4, **{"model.remat": "block"}), workdir)
  assert int(state.step) == 4
  assert "resuming with config.model.remat: saved 'none' vs now 'block'" in capsys.readouterr().out


@pytest.mark.parametrize("key, values", [("remat", ("none", "block", "dots", "matmuls")),
                                         ("moe_dispatch", ("gather", "einsum", "hybrid")),
                                         ("attention_impl", ("auto", "xla")),
                                         ("norm_impl", ("xla", "pallas")),
                                         ("eval_capacity_factor", (2.0, 1.0))])
def test_compute_only_keys_leave_the_parameters_as_they_are(key, values):
  assert key in COMPUTE_ONLY_KEYS
  config = dict(hidden_size=32, num_layers=2, num_heads=2, num_experts=4, text_hidden_size=16,
                text_num_layers=1, text_num_heads=2, text_max_len=8, text_vocab_size=64)

  def parameter_shapes(value):
    model_config = ModelConfig.from_mapping({**config, key: value})
    state = nnx.state(nnx.eval_shape(lambda: build_model(model_config, 0)))
    return jax.tree_util.tree_flatten_with_path(
        jax.tree.map(lambda x: (x.shape, x.dtype), to_pure_dict(state)))

  first = parameter_shapes(values[0])
  for value in values[1:]:
    assert parameter_shapes(value) == first, (key, value)
  lines = check_same_model({"model": {key: values[0]}}, {"model": {key: values[1]}})
  assert lines == [f"config.model.{key}: saved {values[0]!r} vs now {values[1]!r}"]
  assert check_same_model({"model": config}, {"model": config}) == []


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(data_dir, tmp_path, capsys):
  workdir = str(tmp_path / "damaged")
  train_and_evaluate(tiny_train_config(data_dir), workdir)  # checkpoints at steps 3 and 6
  first_run = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  os.remove(os.path.join(workdir, "checkpoints", "6", "state", "_METADATA"))
  capsys.readouterr()
  # Inference takes the newest step that reads, and says which it passed over.
  assert load_run(workdir).step == 3
  assert "the checkpoint of step 6 cannot be read" in capsys.readouterr().err
  # Training resumes from step 3, sets step 6 aside (nothing is deleted) and saves it anew.
  state = train_and_evaluate(tiny_train_config(data_dir), workdir)
  out = capsys.readouterr().out
  assert "the checkpoint of step 6 cannot be read" in out and "resumed from step 3" in out
  assert os.path.exists(os.path.join(workdir, "checkpoints_damaged", "6", "state"))
  assert int(state.step) == 6 and Checkpointer(workdir).all_steps() == [3, 6]
  second_run = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  again = {r["step"]: r["loss"] for r in second_run[len(first_run):]}
  assert again == {r["step"]: r["loss"] for r in first_run if r["step"] > 3}  # exact resume


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
