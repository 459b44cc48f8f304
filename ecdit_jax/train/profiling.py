"""A jax.profiler trace of a window of training steps (``config.profile``).

The window starts ``skip_steps`` after the run's first step, so that compilation and warm-up stay
out of it, and holds ``num_steps`` steps. Before the trace stops, the loop's state is waited on,
so the device work of every step in the window is in the trace. The trace (an XSpace for
TensorBoard's profile plugin, and ``perfetto_trace.json.gz`` for ui.perfetto.dev) goes under
``workdir/profile``; ``bench/trace_summary.py`` splits it into time by kind of op and device
idle time.
"""

from __future__ import annotations

import time

import jax
from etils import epath

from ecdit_jax.train.metrics import log_line


def profile_options() -> jax.profiler.ProfileOptions:
  """The tracers of every trace the project takes: the devices' ops and XLA's host activity.
  jax's Python tracer stays off. It records every Python call of every thread (the data
  loader's, the checkpointer's, the metric writer's), which no summary here reads, and it is the
  part of the profiler that hooks into those threads; with it on, a training run's stop_trace
  ended in a segmentation fault."""
  options = jax.profiler.ProfileOptions()
  options.python_tracer_level = 0
  return options


class ProfileWindow:
  """Starts a trace before step ``first`` and stops it after step ``first + num_steps - 1``."""

  def __init__(self, workdir: str, first: int, num_steps: int):
    self.directory = epath.Path(workdir) / "profile"
    self.first, self.last = first, first + num_steps  # steps [first, last) are traced
    self._enabled = num_steps > 0
    self._started_at = None
    self._started_step = None  # the first traced step: ``first``, or the first call after it

  @property
  def active(self) -> bool:
    return self._started_at is not None

  def before_step(self, step: int) -> None:
    # Calls of several steps (config.steps_per_call) may start past ``first``.
    if self._enabled and step >= self.first and not self.active:
      self.directory.mkdir(parents=True, exist_ok=True)
      jax.profiler.start_trace(str(self.directory), create_perfetto_trace=True,
                               profiler_options=profile_options())
      self._started_at, self._started_step = time.perf_counter(), step

  def after_step(self, done: int, state) -> None:
    if self.active and done >= self.last:
      self.stop(done, state)

  def stop(self, done: int, state) -> None:
    """Ends the trace (after the device finished the window's steps); no-op when inactive."""
    if not self.active:
      return
    jax.block_until_ready(state)
    seconds = time.perf_counter() - self._started_at
    jax.profiler.stop_trace()
    self._started_at, self._enabled = None, False
    steps = done - self._started_step
    log_line(f"profiled steps {self._started_step}-{done - 1} ({1e3 * seconds / max(steps, 1):.2f} "
             f"ms a step, tracing included) into {self.directory}")
