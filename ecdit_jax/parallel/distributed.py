"""Joining JAX's multi-process runtime: explicit flags, a TPU host, or a detected cluster.

* Explicit ``--coordinator_address --num_processes --process_id`` (any cluster; several
  processes on one machine in the tests).
* On a Cloud TPU host: always. JAX then reads the slice from the environment itself: the TPU
  VM metadata server (``gcloud compute tpus tpu-vm`` slices and queued resources), GKE's
  variables, multislice's ``MEGASCALE_*``. A single-host slice becomes a one-process runtime,
  which also gives the run JAX's preemption notice (``train/stop.py``).
* A SLURM job of several tasks, or ``JAX_COORDINATOR_ADDRESS`` set: JAX reads the rest.
* Anything else (a laptop, one GPU host) runs as a single process.
"""

from __future__ import annotations

import glob
import importlib.util
import os

import jax

from ecdit_jax.errors import ConfigError


def on_cloud_tpu() -> bool:
  """Whether this host has TPU chips and the TPU runtime, decided without starting JAX's
  backends (the runtime must be joined before they start)."""
  if importlib.util.find_spec("libtpu") is None and not os.environ.get("TPU_LIBRARY_PATH"):
    return False
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def _cluster_from_environment() -> str | None:
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
    return "SLURM"
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return "JAX_COORDINATOR_ADDRESS"
  return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, on_tpu: bool | None = None) -> str:
  """Joins the other processes of the job; returns how (for the log). ``on_tpu``: whether
  this is a TPU host (None: ``on_cloud_tpu()``)."""
  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise ConfigError("give all of --coordinator_address, --num_processes and --process_id, "
                        "or none of them")
    if not 0 <= process_id < num_processes:
      raise ConfigError(f"--process_id={process_id} must be in [0, --num_processes="
                        f"{num_processes})")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    return f"process {process_id} of {num_processes} (coordinator {coordinator_address})"
  cluster = "Cloud TPU" if (on_cloud_tpu() if on_tpu is None else on_tpu) else None
  cluster = cluster or _cluster_from_environment()
  if cluster is None:
    return "single process"
  jax.distributed.initialize()
  return f"{cluster}: process {jax.process_index()} of {jax.process_count()}"
