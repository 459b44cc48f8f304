"""A run's checkpoints: Orbax steps under ``WORKDIR/checkpoints/<step>/``.

Each step directory holds three items:
  state       the TrainState (params, EMA, optimizer state, step, RNG), saved asynchronously;
  config      the run's full config as JSON;
  data_order  what fixes the order of the training data (dataset, its record count, global
              batch, seed): the data position itself is the step (``data.pipeline``), so a run
              resumes on any number of hosts, but only on the same order.
Orbax writes a step into a temporary directory and renames it only when complete, so a save
interrupted by a kill leaves the previous checkpoints intact and is ignored on restart.
Inference restores the parameters alone (``restore_params``), straight into their shards.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from ecdit_jax.errors import ConfigError
from ecdit_jax.fileio import absolute
from ecdit_jax.model.config import COMPUTE_ONLY_KEYS, SCRATCH_TEXT_KEYS, ModelConfig

CHECKPOINTS = "checkpoints"
DAMAGED = "checkpoints_damaged"  # steps that could not be read, moved aside by a resuming run


def checkpoint_dir(workdir: str) -> epath.Path:
  # Local paths are made absolute (Orbax requires it); gs:// and other URLs stay as they are.
  root = absolute(workdir)
  return epath.Path(root) / CHECKPOINTS


class Checkpointer:
  """Saves and restores a run's steps. ``read_only``: never creates anything (inference); a
  workdir without checkpoints is then an error naming it."""

  def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    self.directory = checkpoint_dir(workdir)
    if read_only and not self.directory.exists():
      raise ConfigError(f"no checkpoints in {workdir} ({self.directory} does not exist): is "
                        "it a training workdir?")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else max_to_keep, create=not read_only,
        enable_async_checkpointing=async_save and not read_only)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler(),
                       "data_order": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def check_step(self, step: int) -> int:
    """``step`` if it was saved, else a ConfigError listing the steps there are."""
    steps = self.all_steps()
    if step not in steps:
      raise ConfigError(f"no checkpoint of step {step} in {self.directory}; saved steps: "
                        f"{', '.join(map(str, steps)) or 'none'}")
    return step

  def read_newest(self, read: Callable[[int], Any], report: Callable[[str], None], *,
                  set_aside: bool = False):
    """(step, ``read(step)``) for the newest step that ``read`` succeeds on; None when there is
    no step.

    A ``ConfigError`` from ``read`` (a mismatch the user must fix) is raised as it is. Any other
    failure means the step is damaged (a truncated or missing file, a save cut short by a
    failing disk): it is reported and the next older step is tried. Nothing is deleted; with
    ``set_aside`` (a run that will save again) the damaged steps are moved to
    WORKDIR/checkpoints_damaged/, where they no longer block new saves of the same steps. With
    several processes, a step counts as read only when every process read it.
    """
    steps = sorted(self.all_steps(), reverse=True)
    damaged = []
    for number, step in enumerate(steps):
      value, problem = None, None
      try:
        value = read(step)
      except ConfigError:
        raise
      except Exception as error:  # noqa: BLE001 - whatever a damaged file raises
        problem = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
      if _every_process(problem is None):
        if set_aside and damaged:
          self._set_aside(damaged, report)
        return step, value
      damaged.append(step)
      fallback = (f"trying step {steps[number + 1]}" if number + 1 < len(steps)
                  else "no older step is left")
      report(f"the checkpoint of step {step} cannot be read ({problem or 'in another process'}):"
             f" {fallback}")
    if steps:
      raise ConfigError(f"no checkpoint in {self.directory} can be read (steps "
                        f"{', '.join(map(str, steps))}); move that directory aside to start "
                        "afresh")
    return None

  def _set_aside(self, steps: list[int], report: Callable[[str], None]) -> None:
    aside = self.directory.parent / DAMAGED
    if jax.process_index() == 0:
      aside.mkdir(parents=True, exist_ok=True)
      for step in steps:
        target = aside / str(step)
        if target.exists():
          target = aside / f"{step}.{len(list(aside.iterdir()))}"
        (self.directory / str(step)).rename(target)
        report(f"moved the damaged checkpoint of step {step} to {target}; remove it once you no "
               "longer need it")
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("ecdit_jax: damaged checkpoints set aside")
    self.manager.reload()

  def save(self, step: int, state: Any, config: dict, data_order: dict) -> bool:
    items = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config),
             "data_order": ocp.args.JsonSave(data_order)}
    return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore_config(self, step: int) -> dict:
    return self.manager.restore(
        step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

  def restore_data_order(self, step: int) -> dict | None:
    """The data order saved with ``step``; None for checkpoints of versions that kept a
    per-process data position instead."""
    if not (self.directory / str(step) / "data_order").exists():
      return None
    return self.manager.restore(
        step, args=ocp.args.Composite(data_order=ocp.args.JsonRestore()))["data_order"]

  def restore(self, step: int, abstract_state: Any) -> Any:
    """The whole train state, laid out as ``abstract_state``'s shardings say."""
    return self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))["state"]

  def restore_params(self, step: int, target: Any, *, use_ema: bool = True) -> Any:
    """Only the EMA (or raw) parameters of ``step``, read straight into ``target``'s shardings
    (ShapeDtypeStructs); the optimizer state is never read."""
    key = "ema_params" if use_ema else "params"
    item = {key: target}
    reader = ocp.CheckpointManager(self.directory,
                                   options=ocp.CheckpointManagerOptions(create=False),
                                   item_handlers={"state": ocp.PyTreeCheckpointHandler()})
    try:
      restored = reader.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
          partial_restore=True)))
    finally:
      reader.close()
    return restored["state"][key]

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _every_process(ok: bool) -> bool:
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def check_same_model(saved: dict, current: dict) -> list[str]:
  """A workdir's checkpoints belong to one model; refuse to resume with a different one.

  ``saved`` and ``current`` are full config dicts (``config.upgrade`` fills old ones). Keys of
  ``COMPUTE_ONLY_KEYS`` (remat, dispatch, attention kernel, inference capacity) may differ:
  returns one line per such change, for the log. Any other difference raises ``ConfigError``
  naming those other keys.
  """
  saved_model, current_model = saved["model"], current["model"]
  keys = {f.name for f in dataclasses.fields(ModelConfig)}
  if "scratch" not in (saved_model.get("text_encoder"), current_model.get("text_encoder")):
    keys -= set(SCRATCH_TEXT_KEYS)  # no scratch text encoder on either side: unused
  changed = sorted(k for k in keys if saved_model.get(k) != current_model.get(k))

  def describe(key):
    return f"config.model.{key}: saved {saved_model.get(key)!r} vs now {current_model.get(key)!r}"

  refused = [k for k in changed if k not in COMPUTE_ONLY_KEYS]
  if refused:
    raise ConfigError(f"the checkpoints in this workdir were made with a different model "
                      f"({', '.join(map(describe, refused))}); use a new --workdir or the "
                      f"saved values")
  return [describe(k) for k in changed]


def check_same_data_order(saved: dict | None, current: dict) -> None:
  """Refuses to resume on another data order (``saved`` None: a checkpoint of an older version,
  which did not record it); the error names what differs."""
  if saved is None:
    return
  differ = [f"{key}: saved {saved.get(key)!r} vs now {current[key]!r}"
            for key in current if saved.get(key) != current[key]]
  if differ:
    raise ConfigError("the checkpoints in this workdir continue another order of the training "
                      f"data ({'; '.join(differ)}); a run resumes only with the same dataset, "
                      "global batch (config.batch_size) and seed. Use a new --workdir")
