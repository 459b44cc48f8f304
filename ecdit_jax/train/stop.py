"""Stopping together: a SIGTERM or Ctrl-C seen by any process stops every process at one step.

A preempted TPU VM or GPU node receives SIGTERM; ``launch/tpu_pod.sh --stop`` sends it too; a
user presses Ctrl-C (SIGINT). Each asks the run to save a checkpoint and exit with status 0.
Processes that stopped at different steps would wait forever in each other's collectives, so
the step is agreed on:

* with JAX's distributed runtime (every multi-process run, and every TPU VM), through its
  preemption sync point: the runtime catches SIGTERM in whichever process receives it and
  tells the others, and ``reached_preemption_sync_point`` answers True for all of them at the
  same step. Ctrl-C is forwarded to that mechanism as a SIGTERM to the process itself.
* in a lone process, through a flag the signal handlers set.

A second Ctrl-C stops at once (``KeyboardInterrupt``), without saving.
"""

from __future__ import annotations

import os
import signal
import threading

import jax
from jax.experimental import multihost_utils


def _probe_preemption_sync(first_step: int) -> bool | None:
  """None without JAX's preemption service; else whether ``first_step`` is already a sync
  point (a signal came before training started)."""
  if not jax.distributed.is_initialized():
    return None
  try:
    return multihost_utils.reached_preemption_sync_point(first_step)
  except RuntimeError:  # the runtime's preemption service is off
    return None


class StopSignal:
  """Use as a context around the training loop; ``agreed(step)`` after every call, with the
  same (increasing) steps in every process."""

  def __init__(self, first_step: int, process_count: int):
    probe = _probe_preemption_sync(first_step)
    self._sync = probe is not None
    if process_count > 1 and not self._sync:
      raise RuntimeError("several processes without JAX's preemption service cannot agree on "
                         "a step to stop at; start them with jax.distributed and keep "
                         "jax_enable_preemption_service on")
    self._stop = bool(probe)  # agreed (sync) or requested (a lone process)
    self._interrupted = False
    self._previous = {}

  def __enter__(self) -> StopSignal:
    if threading.current_thread() is threading.main_thread():
      self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_interrupt)
      if not self._sync:  # the runtime's own handler catches SIGTERM otherwise
        self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_terminate)
    return self

  def _on_terminate(self, signum, frame):
    del signum, frame
    self._stop = True

  def _on_interrupt(self, signum, frame):
    del signum, frame
    if self._interrupted:  # the second Ctrl-C
      raise KeyboardInterrupt
    self._interrupted = True
    print("Ctrl-C: saving a checkpoint and stopping (press again to stop without saving)",
          flush=True)
    if self._sync:
      os.kill(os.getpid(), signal.SIGTERM)
    else:
      self._stop = True

  def agreed(self, step: int) -> bool:
    """Whether every process stops after ``step``."""
    if self._sync and not self._stop:
      self._stop = multihost_utils.reached_preemption_sync_point(step)
    return self._stop

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
