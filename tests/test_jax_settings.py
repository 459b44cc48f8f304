"""The JAX settings the command-line tools start with (``ecdit_jax.jax_settings``)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests import commands

# What a tool does first (cli.start_processes), then a random draw lowered for a CUDA GPU
# (lowering needs no GPU): does its threefry become the one-kernel custom call?
PROGRAM = """
import jax
from absl import flags
from ecdit_jax import cli
flags.FLAGS(["tool"])
cli.start_processes()
draw = jax.jit(lambda key: jax.random.normal(key, (64, 64)))
text = draw.trace(jax.random.key(0)).lower(lowering_platforms=("cuda",)).as_text()
print(jax.config.jax_threefry_gpu_kernel_lowering, "threefry2x32_ffi" in text)
"""


@pytest.mark.parametrize("environment,expected", [(None, "True True"), ("0", "False False")],
                         ids=["default", "environment_off"])
def test_tools_lower_threefry_to_one_gpu_kernel_unless_the_environment_says_no(environment,
                                                                               expected):
  env = {k: v for k, v in os.environ.items() if k != "JAX_THREEFRY_GPU_KERNEL_LOWERING"}
  env["JAX_PLATFORMS"] = "cpu"
  if environment is not None:
    env["JAX_THREEFRY_GPU_KERNEL_LOWERING"] = environment
  result = subprocess.run([sys.executable, "-c", PROGRAM], cwd=commands.ROOT, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split("\n")[-2] == expected, result.stdout
