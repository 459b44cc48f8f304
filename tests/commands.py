"""Running the package's command-line tools as a user does: ``python -m ecdit_jax.TOOL``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
