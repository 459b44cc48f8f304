"""The training loop: ``train_and_evaluate(config, workdir)``.

Resumes from the latest checkpoint in ``workdir`` if there is one (model, optimizer, RNG; the
data position is the step), so a restarted or extended run (``--config.num_train_steps=N``)
continues exactly where it stopped, on any number of processes. A SIGTERM or Ctrl-C in any
process saves a checkpoint of one agreed step in every process and returns (``train/stop.py``).
"""

from __future__ import annotations

import time

import jax

from ecdit_jax import config as config_lib
from ecdit_jax.train import setup
from ecdit_jax.train.metrics import log_line
from ecdit_jax.train.state import TrainState
from ecdit_jax.train.stop import StopSignal


def train_and_evaluate(config, workdir: str) -> TrainState:
  """Trains the run of ``config`` (a ConfigDict or TrainConfig) in ``workdir``."""
  cfg = config_lib.load(config, jax.device_count(), jax.process_count())
  run = setup.build(cfg, workdir)
  try:
    return train_loop(run)
  finally:
    run.close()


def train_loop(run: setup.Run) -> TrainState:
  cfg, state = run.config, run.state
  step, total = int(state.step), cfg.num_train_steps
  if step >= total:
    log_line(f"step {step} >= config.num_train_steps={total}: nothing to train")
    return state
  log_line(f"step {step}: compiling the train step (minutes for large models)")
  first_call = time.perf_counter()
  with StopSignal(step, jax.process_count()) as stop:
    while step < total:
      run.profile.before_step(step)
      count = setup.steps_in_call(cfg, step)
      state, metrics = run.calls(state, step, run.next_batches(count))
      step += count
      if first_call is not None:  # the first call compiled; rates count from here
        log_line(f"compiled in {time.perf_counter() - first_call:.1f} s; training")
        run.log.restart_clock(step)
        first_call = None
      run.log.after_call(step, count, metrics)
      run.profile.after_step(step, state)
      for action in run.actions:  # sample grids, evaluation
        action(step, state)
      stopping = stop.agreed(step)
      if stopping or step % cfg.checkpoint_every_steps == 0 or step == total:
        run.save(step, state)
      if stopping:  # every process says where it stopped (each worker of a pod has its log)
        print(f"stop requested: saved step {step}; run the same command to resume", flush=True)
        break
  run.profile.stop(step, state)  # a window cut short by the end of the run or a stop
  if step >= total:
    log_line(f"finished: step {step} of {total}; checkpoints in {run.checkpointer.directory}")
  return state
