"""config.steps_per_call: several steps in one jitted call train like one step a call."""

import json
import os

import jax
import numpy as np
import pytest

from ecdit_jax.checkpoint import Checkpointer
from ecdit_jax.config import DiffusionConfig, TrainConfig
from ecdit_jax.data.batch import CONTEXT_RANKS
from ecdit_jax.parallel import mesh as mesh_lib
from ecdit_jax.train import sharding
from ecdit_jax.train.loop import train_and_evaluate
from ecdit_jax.train.setup import steps_in_call
from tests.tiny import tiny_train_config

pytestmark = pytest.mark.slow  # trains, or runs the tools: CI runs it, the fast lane skips it


def logged(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {row["step"]: row for row in map(json.loads, f)}


def test_several_steps_a_call_match_one_step_a_call_across_a_resume(data_dir, tmp_path):
  def config(**overrides):
    # The last step is unmasked, so the switch falls inside a call of two and splits it.
    return tiny_train_config(data_dir, log_every_steps=2, checkpoint_every_steps=2,
                             **{"diffusion.unmasked_final_steps": 1, **overrides})

  one = str(tmp_path / "one")
  final_one = train_and_evaluate(config(), one)

  two = str(tmp_path / "two")
  train_and_evaluate(config(steps_per_call=2, num_train_steps=3), two)  # calls [0, 2), [2, 3)
  assert Checkpointer(two).all_steps() == [2, 3]
  # Resumed off a multiple of 2: calls [3, 4), [4, 5), then [5, 6) unmasked.
  final_two = train_and_evaluate(config(steps_per_call=2), two)

  rows_one, rows_two = logged(one), logged(two)
  assert sorted(rows_two) == [2, 3, 4, 6]
  for step in (2, 4, 6):
    for key in ("grad_norm", "learning_rate"):  # the values of the logged step
      np.testing.assert_allclose(rows_two[step][key], rows_one[step][key], rtol=1e-5,
                                 err_msg=f"{key} at step {step}")
  # A logged loss is the mean since the last log; the first run of `two` also logged step 3.
  expected = {2: rows_one[2]["loss"], 6: rows_one[6]["loss"]}
  found = {2: rows_two[2]["loss"], 6: rows_two[6]["loss"]}
  expected[4], found[4] = rows_one[4]["loss"], (rows_two[3]["loss"] + rows_two[4]["loss"]) / 2
  for step in expected:
    np.testing.assert_allclose(found[step], expected[step], rtol=1e-5, err_msg=f"loss {step}")
  assert int(final_two.step) == int(final_one.step) == 6
  for a, b in zip(jax.tree.leaves(final_one.params), jax.tree.leaves(final_two.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_steps_in_call_stop_at_multiples_the_end_and_the_unmasked_switch():
  def steps(step, total, per_call, unmasked_from):
    cfg = TrainConfig(num_train_steps=total, steps_per_call=per_call, log_every_steps=per_call,
                      checkpoint_every_steps=per_call, sample_every_steps=0,
                      eval_every_steps=0, diffusion=DiffusionConfig(
                          mask_ratio=0.5, unmasked_final_steps=total - unmasked_from))
    return steps_in_call(cfg, step)

  assert steps(0, 10, 4, 10) == 4
  assert steps(8, 10, 4, 10) == 2  # the end
  assert steps(3, 10, 4, 10) == 1  # resumed off a multiple: realign
  assert steps(4, 10, 4, 6) == 2  # the switch to unmasked steps
  assert steps(6, 10, 4, 6) == 2  # after the switch: realign to 8
  assert steps(5, 9, 1, 7) == 1


def test_encoded_context_batches_stack_split_over_the_batch_axes():
  # Batches of frozen-encoder context, as the loop stacks them: on a data x fsdp mesh of the
  # 8 devices, the stack keeps each batch's rows where they were and adds a whole steps axis.
  mesh = mesh_lib.create_mesh(mesh_lib.MeshConfig(data=4, fsdp=2))
  rng = np.random.default_rng(0)
  host = [{"image": rng.standard_normal((16, 4, 4, 3), np.float32),
           "context": rng.standard_normal((16, 5, 8), np.float32),
           "context_lengths": rng.integers(1, 6, 16).astype(np.int32)} for _ in range(3)]
  stacked = sharding.make_batch_stacker(mesh, CONTEXT_RANKS)(
      [sharding.global_batch(batch, mesh) for batch in host])
  for key, rank in CONTEXT_RANKS.items():
    np.testing.assert_array_equal(stacked[key], np.stack([batch[key] for batch in host]))
    assert stacked[key].sharding.spec == sharding.stacked_batch_sharding(mesh, rank + 1).spec
    assert stacked[key].sharding.spec[0] is None
    # Each device holds its rows of all three steps: 16 rows over 8 devices.
    assert stacked[key].addressable_shards[0].data.shape[:2] == (3, 2)
