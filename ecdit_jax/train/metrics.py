"""Metric sinks: TensorBoard event files (tensorboardX, no TensorFlow), metrics.jsonl, and a
progress line on stdout. Only process 0 writes."""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging
from etils import epath
from tensorboardX import SummaryWriter

from ecdit_jax.fileio import files_under


def name_moe_layers(moe_metrics: Mapping[str, Any], layer_indices) -> dict[str, Any]:
  """Splits stacked per-MoE-layer statistics into "block_XX/stat" scalars."""
  named = {}
  for stat, values in moe_metrics.items():
    values = np.asarray(values)
    for position, block in enumerate(layer_indices):
      named[f"block_{block:02d}/{stat}"] = float(values[position])
  return named


class MetricWriter:
  """Writes scalars to TensorBoard and metrics.jsonl, appending across restarts.

  Bucket workdirs (gs://...) cannot be appended to: the files are written in a local directory
  and copied whole to the workdir after every write (they are small).
  """

  def __init__(self, workdir: str, enabled: bool):
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    self._remote = None
    if self.enabled:
      local = workdir
      if "://" in str(workdir):
        self._remote = epath.Path(workdir)
        local = tempfile.mkdtemp(prefix="ecdit_metrics_")
        previous = self._remote / "metrics.jsonl"
        if previous.exists():  # a resumed run keeps appending to its history
          (epath.Path(local) / "metrics.jsonl").write_bytes(previous.read_bytes())
      self._local = local
      self._tb = SummaryWriter(os.path.join(local, "tensorboard"))
      self._jsonl = open(os.path.join(local, "metrics.jsonl"), "a", encoding="utf-8")

  def _sync(self) -> None:
    if self._remote is None:
      return
    self._tb.flush()
    for path in files_under(self._local):
      target = self._remote / path.relative_to(self._local)
      target.parent.mkdir(parents=True, exist_ok=True)
      path.copy(target, overwrite=True)

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    for name, value in scalars.items():
      self._tb.add_scalar(name, value, step)
    self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    self._jsonl.flush()
    self._sync()

  def write_image(self, step: int, name: str, image: np.ndarray) -> None:
    """image: (H, W, 3) uint8."""
    if self.enabled:
      self._tb.add_image(name, image, step, dataformats="HWC")

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()
      self._sync()


class Progress:
  """Throughput and ETA between log points."""

  def __init__(self, start_step: int, total_steps: int, batch_size: int):
    self.total_steps = total_steps
    self.batch_size = batch_size
    self._last_step = start_step
    self._last_time = time.perf_counter()

  def update(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    elapsed = max(now - self._last_time, 1e-9)
    steps_per_sec = (step - self._last_step) / elapsed
    self._last_step, self._last_time = step, now
    remaining = (self.total_steps - step) / steps_per_sec if steps_per_sec > 0 else float("inf")
    return {"steps_per_sec": steps_per_sec, "images_per_sec": steps_per_sec * self.batch_size,
            "eta_sec": remaining}

  @staticmethod
  def line(step: int, total: int, loss: float, rates: Mapping[str, float]) -> str:
    eta = rates["eta_sec"]
    eta_text = "?" if not np.isfinite(eta) else time.strftime("%H:%M:%S", time.gmtime(eta))
    return (f"step {step}/{total}  loss {loss:.4f}  {rates['images_per_sec']:.1f} img/s  "
            f"eta {eta_text}")


def log_line(text: str) -> None:
  if jax.process_index() == 0:
    logging.info(text)
    print(text, flush=True)
