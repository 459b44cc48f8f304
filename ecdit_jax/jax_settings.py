"""The JAX settings every tool of the project runs with, applied as a process starts
(``cli.start_processes`` for the command-line tools; ``bench/step.py`` and ``bench/sample.py``
for the benchmarks).

- ``jax_threefry_gpu_kernel_lowering``: on GPUs each ``threefry2x32`` (the hash behind every
  ``jax.random`` draw) lowers to one CUDA kernel instead of a long chain of XLA integer ops. It
  is the same primitive, so the same bits; what changes is compile time. Initialising a train
  state draws hundreds of random arrays in one jitted program (about 580 threefry expansions for
  EC-XL-8E), whose compile this shortens several-fold (measured in
  bench/records/2026-12-05_h100_threefry-init-and-sampling). The kernel writes each draw's bits
  to memory before they are transformed, a transient of the size of the largest array drawn
  (per device); the XL-32E recipe's peak did not change (one H200). It does nothing on CPUs and
  TPUs.

A setting named in the environment (e.g. ``JAX_THREEFRY_GPU_KERNEL_LOWERING=0``) is left as the
environment sets it.
"""

from __future__ import annotations

import os

import jax

DEFAULTS = {"jax_threefry_gpu_kernel_lowering": True}


def apply() -> None:
  """Sets each of ``DEFAULTS`` that the environment does not set."""
  for name, value in DEFAULTS.items():
    if name.upper() in os.environ:
      continue
    try:
      jax.config.update(name, value)
    except AttributeError:  # a jax without this option: nothing to set
      pass
