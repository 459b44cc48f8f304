#!/usr/bin/env bash
# Trains ecdit_jax on a SLURM GPU cluster, one process per GPU. Submit from the repository root:
#
#   WORKDIR=/shared/runs/xl32e sbatch --nodes=4 launch/gpu_slurm.sh \
#       --config=configs/ecdit.py:XL-32E --config.mesh.expert=8
#
# Arguments: --config=PATH[:ARG] and --workdir=DIR set the run (or the CONFIG and WORKDIR
# environment variables); --dry-run prints the srun command instead of running it; --explicit
# passes the coordinator flags instead of letting JAX read SLURM's variables; every other
# argument (e.g. --config.num_train_steps=1000) goes to ecdit_jax.main as it is.
# Environment: CONFIG (default configs/default.py), WORKDIR (required: a filesystem every node
# shares, or gs://), VENV (a virtualenv to activate), PYTHON (default python),
# COORDINATOR_PORT (default: derived from the job id, as JAX does), SRUN_ARGS (extra srun
# options), DRY_RUN=1, EXPLICIT=1.
#
# Set --ntasks-per-node and --gres to the GPUs per node (sbatch options on the command line
# override these headers). Every task sees all of its node's GPUs and JAX gives task
# SLURM_LOCALID the GPU of that index, so do not bind GPUs per task (--gpus-per-task).
#SBATCH --job-name=ecdit
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=ecdit-%j.out
# SIGTERM 5 minutes before the time limit: training saves a checkpoint and exits; submitting
# the same command again resumes from it.
#SBATCH --signal=TERM@300
set -euo pipefail

CONFIG="${CONFIG:-configs/default.py}"
WORKDIR="${WORKDIR:-}"
DRY_RUN="${DRY_RUN:-0}"
EXPLICIT="${EXPLICIT:-0}"
PYTHON="${PYTHON:-python}"
PASSTHROUGH=()
for arg in "$@"; do
  case "$arg" in
    --config=*) CONFIG="${arg#*=}" ;;
    --workdir=*) WORKDIR="${arg#*=}" ;;
    --dry-run) DRY_RUN=1 ;;
    --explicit) EXPLICIT=1 ;;
    *) PASSTHROUGH+=("$arg") ;;
  esac
done
die() { echo "gpu_slurm.sh: $*" >&2; exit 2; }
[[ -n "$WORKDIR" ]] || die "set WORKDIR=DIR or pass --workdir=DIR (shared by all nodes)"
((DRY_RUN)) || [[ -n "${SLURM_JOB_ID:-}" ]] || die "not in a SLURM job: submit it with sbatch"

# sbatch runs a copy of this script, so the checkout is where the job was submitted from.
cd "${SLURM_SUBMIT_DIR:-.}"
if [[ -n "${VENV:-}" ]]; then
  # shellcheck disable=SC1091  # the virtualenv is the user's
  source "$VENV/bin/activate"
fi

SRUN=(srun --kill-on-bad-exit=1)  # one failed process ends the job instead of hanging the rest
if [[ -n "${SRUN_ARGS:-}" ]]; then
  read -ra extra <<<"$SRUN_ARGS"
  SRUN+=("${extra[@]}")
fi
TRAIN=("$PYTHON" -m ecdit_jax.main --config="$CONFIG" --workdir="$WORKDIR" "${PASSTHROUGH[@]}")

# JAX's own choice when it reads SLURM's variables: a port in 61440-65535 from the job id.
PORT="${COORDINATOR_PORT:-$((${SLURM_JOB_ID:-0} % 4096 + 61440))}"
SHOWN_ENV=""  # what --dry-run prints before the command
if ((EXPLICIT)); then
  # The same values JAX would detect, spelled out: the job's first host coordinates,
  # SLURM_NTASKS processes, each task's SLURM_PROCID as its id (expanded inside the task).
  if [[ -n "${SLURM_JOB_NODELIST:-}" ]] && command -v scontrol >/dev/null; then
    mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")  # no SIGPIPE, unlike head
    HEAD_NODE="${HOSTS[0]}"
  elif [[ -n "${SLURM_JOB_ID:-}" ]]; then
    HEAD_NODE="$(hostname)"  # the batch script runs on the allocation's first node
  else
    HEAD_NODE="FIRST_NODE"  # --dry-run outside a job: a placeholder
  fi
  # shellcheck disable=SC2016  # $SLURM_PROCID is expanded by each task, not here
  CMD=("${SRUN[@]}" bash -c 'exec "$@" --process_id="$SLURM_PROCID"' bash "${TRAIN[@]}"
       --coordinator_address="$HEAD_NODE:$PORT" --num_processes="${SLURM_NTASKS:-NTASKS}")
else
  # ecdit_jax.main calls jax.distributed.initialize(), which reads SLURM_* in every task.
  export JAX_COORDINATOR_PORT="$PORT"
  SHOWN_ENV=" JAX_COORDINATOR_PORT=$PORT"
  CMD=("${SRUN[@]}" "${TRAIN[@]}")
fi

# Quotes one argument for bash only where needed, so the printed command stays readable.
q() {
  if [[ "$1" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

if ((DRY_RUN)); then
  printf '+%s' "$SHOWN_ENV"
  for arg in "${CMD[@]}"; do printf ' %s' "$(q "$arg")"; done
  printf '\n'
else
  echo "job ${SLURM_JOB_ID:-?}: ${SLURM_NTASKS:-?} processes on ${SLURM_JOB_NODELIST:-?}"
  exec "${CMD[@]}"
fi
