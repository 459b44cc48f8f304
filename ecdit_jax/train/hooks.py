"""What the training loop does between calls: check and log metrics, sample grids, evaluate.

Metrics of a call are checked one call late (so that the device stays busy while the host
looks at them) and always before a checkpoint is written: a step with a non-finite loss or
gradient keeps the old parameters, and the run then stops (``nonfinite_loss="stop"``) or goes
on (``"skip"``).
"""

from __future__ import annotations

import jax
import numpy as np
from etils import epath

from ecdit_jax.config import TrainConfig
from ecdit_jax.data.tokenizer import prompt_warnings
from ecdit_jax.inference import geneval
from ecdit_jax.inference.images import png_bytes, sample_grid, to_uint8
from ecdit_jax.fileio import write_atomic
from ecdit_jax.train.metrics import MetricWriter, Progress, log_line, name_moe_layers

SAMPLES_DIR = "samples"


class MetricsLog:
  """Checks every step's metrics and writes their summary every ``log_every_steps`` steps."""

  def __init__(self, cfg: TrainConfig, writer: MetricWriter, start_step: int, latest_checkpoint):
    self._cfg, self._writer = cfg, writer
    self._latest_checkpoint = latest_checkpoint  # () -> the step of the latest checkpoint
    self._progress = Progress(start_step, cfg.num_train_steps, cfg.batch_size)
    self._pending = None  # (first step of the call, its metrics), not yet checked
    self._losses: list[float] = []
    self.skipped_records = 0
    self.skipped_updates = 0

  def _check(self, first_step: int, metrics) -> None:
    self._losses.extend(np.atleast_1d(np.asarray(metrics["loss"])).tolist())
    for index in np.flatnonzero(np.atleast_1d(np.asarray(metrics["nonfinite"]))):
      if self._cfg.nonfinite_loss == "stop":
        raise FloatingPointError(
            f"non-finite loss or gradient at step {first_step + index}; stopping "
            f"(config.nonfinite_loss='stop'). Checkpoints already saved are untouched; the "
            f"latest is step {self._latest_checkpoint()}.")
      self.skipped_updates += 1
      log_line(f"step {first_step + index}: non-finite loss or gradient, update skipped")

  def restart_clock(self, step: int) -> None:
    """Rates and the ETA count from ``step`` on (after compilation)."""
    self._progress = Progress(step, self._cfg.num_train_steps, self._cfg.batch_size)

  def flush(self) -> None:
    """Checks the metrics not yet checked."""
    if self._pending is not None:
      self._check(*self._pending)
      self._pending = None

  def after_call(self, done: int, count: int, metrics) -> None:
    """The metrics of the call that ended at step ``done`` after ``count`` steps."""
    self.flush()
    self._pending = (done - count + 1, metrics)
    if done % self._cfg.log_every_steps == 0 or done == self._cfg.num_train_steps:
      self.flush()
      self._write(done, metrics if count == 1 else jax.tree.map(lambda x: x[-1], metrics))

  def _write(self, step: int, metrics) -> None:
    """The logged scalars: the mean loss since the last log, the rest from the last step."""
    rates = self._progress.update(step)
    scalars = {"loss": float(np.mean(self._losses)), "aux_loss": float(metrics["aux_loss"]),
               "grad_norm": float(metrics["grad_norm"]),
               "learning_rate": float(metrics["learning_rate"]),
               "skipped_records": self.skipped_records,
               "skipped_updates": self.skipped_updates, **rates}
    scalars.update({f"routing/{k}": v for k, v in name_moe_layers(
        metrics["moe"], self._cfg.model.moe_layer_indices).items()})
    self._writer.write_scalars(step, scalars)
    log_line(Progress.line(step, self._cfg.num_train_steps, scalars["loss"], rates))
    self._losses.clear()


class SampleGrids:
  """Every ``sample_every_steps``: the EMA parameters' images of ``config.sample.prompts``, as
  a captioned grid in WORKDIR/samples/step_NNNNNNN.png (prompts beside it) and TensorBoard."""

  def __init__(self, cfg: TrainConfig, sampler, tokenizer, null_tokens, workdir: str,
               writer: MetricWriter, write_files: bool):
    self._cfg, self._sampler, self._null = cfg, sampler, null_tokens
    prompts, max_len = list(cfg.sample.prompts), cfg.model.text_max_len
    for line in prompt_warnings(tokenizer, prompts, max_len):
      log_line(f"config.sample.prompts: {line}")
    self._tokens = tokenizer.encode_batch(prompts, max_len)
    self._dir = epath.Path(workdir) / SAMPLES_DIR
    self._writer, self._write_files = writer, write_files

  def __call__(self, step: int, state) -> None:
    if not self._cfg.sample_every_steps or step % self._cfg.sample_every_steps:
      return
    images = to_uint8(self._sampler(state.ema_params, self._tokens, self._null, self._cfg.seed))
    # Small images are enlarged to cells of at least 128 pixels; decoded latents keep their size.
    prompts = list(self._cfg.sample.prompts)
    grid = sample_grid(images, prompts, scale=max(1, 128 // images.shape[2]))
    if self._write_files:
      path = self._dir / f"step_{step:07d}.png"
      write_atomic(path, png_bytes(grid))
      write_atomic(self._dir / f"step_{step:07d}.txt", "\n".join(prompts) + "\n")
      self._writer.write_image(step, "samples", grid)
      log_line(f"step {step}: sample grid {path}")


class Evaluation:
  """Every ``eval_every_steps``: the GenEval-Shapes score of the EMA parameters."""

  def __init__(self, cfg: TrainConfig, sampler, tokenizer, null_tokens, writer: MetricWriter):
    self._cfg, self._sampler, self._tokenizer, self._null = cfg, sampler, tokenizer, null_tokens
    self._writer = writer

  def __call__(self, step: int, state) -> None:
    cfg = self._cfg
    if not cfg.eval_every_steps or step % cfg.eval_every_steps:
      return
    result = geneval.geneval_shapes_score(
        self._sampler, state.ema_params, self._tokenizer, self._null, cfg.model.text_max_len,
        num_per_category=cfg.eval.num_per_category, seed=cfg.seed,
        batch_size=cfg.eval.batch_size)
    self._writer.write_scalars(step, geneval.as_scalars(result))
    log_line(f"step {step}: GenEval-Shapes {result['overall']:.3f} (EMA, "
             f"{cfg.eval.num_per_category} prompts a category)")
