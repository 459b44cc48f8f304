"""Starting JAX's multi-process runtime: explicit coordinator flags, or a detected cluster.

A TPU pod slice and a SLURM job with several tasks describe themselves through the environment,
so ``jax.distributed.initialize()`` needs no arguments there; anywhere else (several processes
on hand-picked hosts, or a test on one machine) the coordinator address, the process count and
this process's index are given explicitly. A single process on a laptop needs nothing.
"""

from __future__ import annotations

import os

import jax


def _detected_cluster() -> str | None:
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
    return "SLURM"
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if len([h for h in hosts.split(",") if h]) > 1 or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ:
    return "TPU pod"
  return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> str:
  """Joins the other processes of a multi-process job; returns how (for the log)."""
  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise ValueError("give all of --coordinator_address, --num_processes and --process_id, "
                       "or none of them")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id} must be in [0, --num_processes="
                       f"{num_processes})")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    return f"process {process_id} of {num_processes} (coordinator {coordinator_address})"
  cluster = _detected_cluster()
  if cluster is None:
    return "single process"
  jax.distributed.initialize()
  return f"{cluster}: process {jax.process_index()} of {jax.process_count()}"
