"""Running the package's command-line tools as a user does: ``python -m ecdit_jax.TOOL``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tests' programs are tiny and compiled once each: XLA's CPU backend compiles them without
# LLVM's optimisation passes, which takes about a third less time than optimising them.
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"


def xla_flags(devices: int = 1, base: str = "") -> str:
  """XLA_FLAGS for a test process of ``devices`` simulated CPU devices: ``base`` with its device
  count replaced, and the fast-compile flag."""
  kept = [f for f in base.split() if "xla_force_host_platform_device_count" not in f
          and "xla_backend_optimization_level" not in f]
  return " ".join([*kept, f"--xla_force_host_platform_device_count={devices}", FAST_COMPILE_FLAG])


def run(args, *, env=None, timeout=600) -> subprocess.CompletedProcess:
  """``python -m args...`` in the repository root; output captured as text."""
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout, check=False, env=env)


def run_ok(args, **kwargs) -> subprocess.CompletedProcess:
  result = run(args, **kwargs)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def start(args, *, env=None, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
          module: bool = True) -> subprocess.Popen:
  """``python -m args...`` (``module=False``: ``python args...``) started in the background."""
  command = [sys.executable, *(["-m"] if module else []), *args]
  return subprocess.Popen(command, cwd=ROOT, env=env, stdout=stdout, stderr=stderr, text=True)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_pod(args, processes: int, devices_each: int) -> list[subprocess.Popen]:
  """``python -m args...`` in ``processes`` processes of ``devices_each`` CPU devices, joined
  through a coordinator on 127.0.0.1: a pod's workers, on this machine."""
  port = free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=xla_flags(devices_each))
  return [start([*args, f"--coordinator_address=127.0.0.1:{port}",
                 f"--num_processes={processes}", f"--process_id={i}"], env=env)
          for i in range(processes)]


def finish(procs, timeout: float) -> list[str]:
  """Every process's stdout once all have exited 0 within ``timeout`` seconds (killed if not)."""
  deadline = time.time() + timeout
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=max(deadline - time.time(), 1)))
  finally:
    for proc in procs:  # a hang must not outlive the test
      if proc.poll() is None:
        proc.kill()
  for proc, (_, err) in zip(procs, outputs):
    assert proc.returncode == 0, err[-3000:]
  return [out for out, _ in outputs]
