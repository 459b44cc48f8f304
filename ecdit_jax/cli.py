"""What every command-line tool shares: joining the job's other processes, one-line errors.

``run(main)`` wraps ``absl.app.run``: a ``ConfigError`` (a setting, flag or input that cannot
work) prints as ``error: MESSAGE`` on stderr and exits with status 2 (a usage error), without
a traceback.
Every tool takes ``--coordinator_address --num_processes --process_id`` and joins the job
(``parallel.distributed``) before JAX starts, so each runs on a pod's or cluster's devices,
with the project's JAX settings (``jax_settings``).
"""

from __future__ import annotations

import ast
import re
import sys

from absl import app, flags, logging

from ecdit_jax import jax_settings
from ecdit_jax.errors import ConfigError
from ecdit_jax.parallel import distributed

FLAGS = flags.FLAGS
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-process runs "
                    "outside a TPU pod or SLURM job, which are detected).")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")


def start_processes() -> str:
  """Applies the project's JAX settings (``jax_settings``) and joins the job's other processes
  (see ``parallel.distributed``); returns how it joined."""
  jax_settings.apply()
  how = distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                               FLAGS.process_id)
  if how != "single process":
    print(f"multi-process: {how}", flush=True)
  return how


def _one_line(text: str) -> str:
  """An exception's message on one line (ml_collections repr()s its KeyErrors and puts whole
  tracebacks of a failing config file into its messages: their last line is the error)."""
  text = str(text)
  if "Traceback (most recent call last)" in text:
    head = text.split("Traceback (most recent call last)")[0].rstrip(": \n")
    text = f"{head}: {text.strip().splitlines()[-1]}"
  if len(text) > 1 and text[0] == text[-1] == "'":
    try:
      text = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      pass
  return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _flag_error(error: Exception, argv: list[str]) -> str:
  """The message for a flag that could not be parsed, naming the flag where it can."""
  text = _one_line(error)
  if isinstance(error, OSError):
    given = [a for a in argv if a.startswith("--config=")]
    problem = "no such config file" if "No such file" in text else text
    return f"{given[0] if given else '--config'}: {problem}"
  key = re.search(r"'([^']+)'", text)
  for arg in argv:
    name = arg.split("=", 1)[0]
    if key and name.startswith("--config.") and key.group(1) in name.split("."):
      return f"{name}: no such config key; {text.split(' ', 1)[-1] if ' ' in text else text}"
  return text


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every failure as one line naming the flag."""
  try:
    remaining = FLAGS(argv)
    if "config" in FLAGS:  # a config file that failed to load fails here, not later
      FLAGS.config.keys  # pylint: disable=pointless-statement
    return remaining
  except flags.Error as error:
    message = _one_line(error)
  except (AttributeError, KeyError, OSError, TypeError, ValueError) as error:
    message = _flag_error(error, argv)
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


def run(main, *, positional: bool = False) -> None:
  """``absl.app.run(main)``, with ConfigErrors as one line on stderr and exit status 2.
  Without ``positional``, arguments other than flags are a usage error."""

  def wrapped(argv):
    if len(argv) > 1 and not positional:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}", exitcode=2)
    # The tools print what a user needs to see; libraries' notices (TFDS, OpenCV) stay quiet.
    logging.set_verbosity(logging.ERROR)
    try:
      return main(argv)
    except ConfigError as error:
      print(f"error: {error}", file=sys.stderr, flush=True)
      sys.exit(2)

  app.run(wrapped, flags_parser=_parse_flags)
