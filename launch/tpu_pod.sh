#!/usr/bin/env bash
# Trains ecdit_jax on Cloud TPU slices: builds and uploads what the workers install, creates the
# slices (reservations, Spot, queued resources, several slices), installs, trains on every
# worker, watches them all and recreates preempted slices until the run's last step. The
# launcher is launch/tpu_pod.py (standard-library Python 3.9+); this finds an interpreter for
# it. Usage: launch/tpu_pod.sh --help; launch/README.md documents every flag.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
for python in python3 python; do
  if command -v "$python" >/dev/null 2>&1 &&
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 9))' 2>/dev/null; then
    exec "$python" "$here/tpu_pod.py" "$@"
  fi
done
echo "tpu_pod.sh: needs Python 3.9 or newer (python3) on PATH" >&2
exit 1
