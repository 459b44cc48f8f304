"""Checkpoints through an Orbax CheckpointManager: train state, data iterator, config.

Each checkpoint is one step directory holding three items:
  state   the TrainState (params, EMA, optimizer state, step, RNG), saved asynchronously;
  data    the grain iterator position of each process (one small JSON per process);
  config  the run's full config as JSON.
Orbax writes a step into a temporary directory and renames it only when complete, so a save
interrupted by a kill leaves the previous checkpoints intact and is ignored on restart.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import grain
from etils import epath
import orbax.checkpoint as ocp

from ecdit_jax.model import ConfigError, ModelConfig
from ecdit_jax.model.config import COMPUTE_ONLY_KEYS


class Checkpointer:

  def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True):
    # Local paths are made absolute (Orbax requires it); gs:// and other URLs stay as they are.
    root = workdir if "://" in str(workdir) else os.path.abspath(workdir)
    self.directory = epath.Path(root) / "checkpoints"
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, data_iterator, config: dict, *,
           force: bool = False) -> bool:
    items = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore_config(self, step: int) -> dict:
    return self.manager.restore(
        step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

  def restore(self, step: int, abstract_state: Any, data_iterator=None) -> Any:
    """Restores the state (and, when given, the iterator's position in place)."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def check_same_model(saved: dict, current: dict) -> list[str]:
  """A workdir's checkpoints belong to one model; refuse to resume with a different one.

  Keys of ``COMPUTE_ONLY_KEYS`` (remat, dispatch, attention kernel, inference capacity) may
  differ: returns one line per such change, for the log. Any other difference raises
  ``ConfigError`` naming those other keys.
  """
  # A key added to ModelConfig after a run was saved holds its default there (for example
  # text_encoder="scratch"), so that older workdirs still resume.
  defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
  saved_model = {**defaults, **saved.get("model", {})}
  current_model = {**defaults, **current.get("model", {})}
  changed = sorted(k for k in set(saved_model) | set(current_model)
                   if saved_model.get(k) != current_model.get(k))

  def describe(key):
    return f"config.model.{key}: saved {saved_model.get(key)!r} vs now {current_model.get(key)!r}"

  refused = [k for k in changed if k not in COMPUTE_ONLY_KEYS]
  if refused:
    raise ConfigError(f"the checkpoints in this workdir were made with a different model "
                      f"({', '.join(map(describe, refused))}); use a new --workdir or the "
                      f"saved values")
  return [describe(k) for k in changed]
