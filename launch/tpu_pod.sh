#!/usr/bin/env bash
# Trains ecdit_jax on a Cloud TPU VM slice (single host or pod): creates the slice if it does not
# exist, puts the code on every worker, installs it, starts one training process per worker and
# streams worker 0's log. Usage (all flags are documented in launch/README.md):
#
#   launch/tpu_pod.sh --name=NAME --zone=ZONE [--project=P] [--accelerator=v5p-64]
#       [--version=RUNTIME] [--queued] [--spot] [--repo=GIT_URL [--ref=REF]]
#       --workdir=gs://BUCKET/DIR [--config=configs/ecdit.py:XL-32E]
#       [--detach | --teardown] [--skip-setup] [--dry-run] [-- --config.KEY=VALUE ...]
#   launch/tpu_pod.sh --name=NAME --zone=ZONE --logs     # re-attach to worker 0's log
#   launch/tpu_pod.sh --name=NAME --zone=ZONE --stop     # SIGTERM: checkpoint, then exit
#   launch/tpu_pod.sh --name=NAME --zone=ZONE --delete [--queued]   # delete the slice now
#
# Every worker runs the same command; ecdit_jax.main detects the TPU pod and calls
# jax.distributed.initialize() itself, so no coordinator flags are needed here.
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
}
die() { echo "tpu_pod.sh: $*" >&2; exit 1; }

NAME="" ZONE="" PROJECT="" ACCELERATOR="v5p-8" VERSION="" REPO="" REF="" WORKDIR=""
CONFIG="configs/default.py" PYTHON_VERSION="3.12"
QUEUED=0 SPOT=0 DRY_RUN=0 DETACH=0 TEARDOWN=0 SKIP_SETUP=0 ALLOW_LOCAL_WORKDIR=0 ACTION="train"
OVERRIDES=()

while (($#)); do
  flag="$1" value="" has_value=0
  if [[ "$flag" == --*=* ]]; then value="${flag#*=}" flag="${flag%%=*}" has_value=1; fi
  var=""
  case "$flag" in
    --) shift; OVERRIDES=("$@"); break ;;
    --name) var=NAME ;;
    --zone) var=ZONE ;;
    --project) var=PROJECT ;;
    --accelerator) var=ACCELERATOR ;;
    --version) var=VERSION ;;
    --repo) var=REPO ;;
    --ref) var=REF ;;
    --workdir) var=WORKDIR ;;
    --config) var=CONFIG ;;
    --python) var=PYTHON_VERSION ;;
    --queued) QUEUED=1 ;;
    --spot) SPOT=1 ;;
    --dry-run) DRY_RUN=1 ;;
    --detach) DETACH=1 ;;
    --teardown) TEARDOWN=1 ;;
    --skip-setup) SKIP_SETUP=1 ;;
    --allow-local-workdir) ALLOW_LOCAL_WORKDIR=1 ;;
    --logs) ACTION=logs ;;
    --stop) ACTION=stop ;;
    --delete) ACTION=delete ;;
    -h|--help) usage ;;
    *) die "unknown argument '$1' (config overrides go after '--'; see --help)" ;;
  esac
  if [[ -n "$var" ]]; then
    if ((!has_value)); then
      (($# >= 2)) || die "$flag needs a value"
      value="$2"
      shift
    fi
    printf -v "$var" '%s' "$value"
  elif ((has_value)); then
    die "$flag takes no value"
  fi
  shift
done

[[ -n "$NAME" ]] || die "--name is required"
[[ -n "$ZONE" ]] || die "--zone is required"
if [[ "$ACTION" == train ]]; then
  [[ -n "$WORKDIR" ]] || die "--workdir is required (gs://BUCKET/DIR)"
  # Every worker writes its shard of each checkpoint: a worker's local disk would split them.
  if [[ "$WORKDIR" != gs://* ]] && ((!ALLOW_LOCAL_WORKDIR)); then
    die "--workdir=$WORKDIR must be gs://... that all workers share (or a shared mount, with" \
        "--allow-local-workdir)"
  fi
  if ((DETACH && TEARDOWN)); then die "--detach and --teardown exclude each other"; fi
fi

# The runtime image per TPU generation; any other --accelerator needs an explicit --version.
if [[ -z "$VERSION" ]]; then
  case "$ACCELERATOR" in
    v4-*) VERSION="tpu-ubuntu2204-base" ;;
    v5p-*) VERSION="v2-alpha-tpuv5" ;;
    v5litepod-*) VERSION="v2-alpha-tpuv5-lite" ;;
    v6e-*) VERSION="v2-alpha-tpuv6e" ;;
    *) [[ "$ACTION" != train ]] || die "no default --version for --accelerator=$ACCELERATOR" ;;
  esac
fi

LOC=(--zone="$ZONE")
if [[ -n "$PROJECT" ]]; then LOC+=(--project="$PROJECT"); fi
AGAIN="$0 --name=$NAME --zone=$ZONE${PROJECT:+ --project=$PROJECT}"  # for hints

# Quotes one argument for bash only where needed, so printed commands stay readable.
q() {
  if [[ "$1" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}
quote_all() {
  local out="" arg
  for arg in "$@"; do out+="${out:+ }$(q "$arg")"; done
  printf '%s' "$out"
}

# Runs a command, or with --dry-run prints it (copy-pasteable) instead.
run() {
  if ((DRY_RUN)); then
    echo "+ $(quote_all "$@")"
  else
    "$@"
  fi
}
# Sets the variable named $1 to the command's output; empty if it fails or under --dry-run.
capture() {
  local var="$1"
  shift
  if ((DRY_RUN)); then
    echo "+ $(quote_all "$@")"
    printf -v "$var" '%s' ""
  else
    printf -v "$var" '%s' "$("$@" 2>/dev/null || true)"
  fi
}
ssh_workers() {  # ssh_workers WORKER SCRIPT
  run gcloud compute tpus tpu-vm ssh "$NAME" "${LOC[@]}" --worker="$1" --command="$2"
}

# Files on every worker, under the remote user's home.
# shellcheck disable=SC2016  # single quotes: $HOME expands on the workers, not here
PIDFILE='$HOME/ecdit_train.pid' EXITFILE='$HOME/ecdit_train.exit' LOGFILE='$HOME/ecdit_train.log' \
  CODE='$HOME/ecdit_jax' VENV='$HOME/ecdit_venv'

delete_slice() {
  if ((QUEUED)); then
    run gcloud compute tpus queued-resources delete "$NAME" "${LOC[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$NAME" "${LOC[@]}" --quiet
  fi
}

slice_state() {  # sets $1 to the slice's state, empty if it does not exist
  if ((QUEUED)); then
    capture "$1" gcloud compute tpus queued-resources describe "$NAME" "${LOC[@]}" \
      --format='value(state.state)'
  else
    capture "$1" gcloud compute tpus tpu-vm describe "$NAME" "${LOC[@]}" --format='value(state)'
  fi
}

wait_until_ready() {
  local state=""
  while true; do
    slice_state state
    if ((DRY_RUN)); then return; fi
    case "$state" in
      READY | ACTIVE) return ;;
      "" | FAILED | SUSPENDED | PREEMPTED | TERMINATED | STOPPED | DELETING)
        die "$NAME is ${state:-gone}; run again to create it anew" ;;
    esac
    echo "$NAME is $state; checking again in 30 s"
    sleep 30
  done
}

create_slice() {
  local extra=()
  if ((SPOT)); then extra+=(--spot); fi
  if ((QUEUED)); then
    run gcloud compute tpus queued-resources create "$NAME" "${LOC[@]}" --node-id="$NAME" \
      --accelerator-type="$ACCELERATOR" --runtime-version="$VERSION" "${extra[@]}"
    wait_until_ready  # the request waits in a queue until capacity is free
  else
    run gcloud compute tpus tpu-vm create "$NAME" "${LOC[@]}" \
      --accelerator-type="$ACCELERATOR" --version="$VERSION" "${extra[@]}"
  fi
}

# Reuses a READY slice. A preempted or failed one holds nothing of value (the workdir is on GCS),
# so it is deleted and created again, and training resumes from the workdir's latest checkpoint.
ensure_slice() {
  local state=""
  slice_state state
  case "$state" in
    "") create_slice ;;
    READY | ACTIVE) echo "reusing $NAME ($state)" ;;
    PREEMPTED | FAILED | SUSPENDED | TERMINATED)
      echo "$NAME is $state: deleting and creating it again"
      delete_slice
      create_slice
      ;;
    CREATING | STARTING | RESTARTING | REPAIRING | ACCEPTED | PROVISIONING | WAITING_FOR_RESOURCES)
      wait_until_ready ;;
    *) die "$NAME is $state; wait for it, or delete it with --delete" ;;
  esac
}

existing_files() {  # drops tracked files deleted in the work tree from a NUL-separated list
  local file
  while IFS= read -r -d '' file; do
    if [[ -e "$1/$file" ]]; then printf '%s\0' "$file"; fi
  done
}

# Puts the code in $CODE on every worker: a clone of --repo, or this checkout (tracked and
# untracked files that git does not ignore, so uncommitted edits travel too).
push_code() {
  local fetch
  if [[ -n "$REPO" ]]; then
    fetch="rm -rf $CODE; git clone --quiet $(q "$REPO") $CODE"
    if [[ -n "$REF" ]]; then fetch+="; git -C $CODE checkout --quiet $(q "$REF")"; fi
  else
    local root tarball
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    tarball="${TMPDIR:-/tmp}/ecdit_jax_$NAME.tar.gz"
    if ((DRY_RUN)); then
      echo "+ git -C $(q "$root") ls-files -co --exclude-standard -z | tar -czf $(q "$tarball")" \
        "-C $(q "$root") --null -T -"
    else
      git -C "$root" rev-parse --git-dir >/dev/null 2>&1 \
        || die "$root is not a git checkout; pass --repo=GIT_URL"
      git -C "$root" ls-files -co --exclude-standard -z | existing_files "$root" \
        | tar -czf "$tarball" -C "$root" --null -T -
    fi
    run gcloud compute tpus tpu-vm scp "$tarball" "$NAME:ecdit_jax.tar.gz" "${LOC[@]}" --worker=all
    fetch="rm -rf $CODE; mkdir -p $CODE; tar -xzf \$HOME/ecdit_jax.tar.gz -C $CODE"
  fi
  ssh_workers all "set -euo pipefail; $fetch"
}

# The runtime images ship Python 3.10; ecdit_jax needs 3.11+, so uv provides the interpreter.
install() {
  ssh_workers all "set -euo pipefail; cd $CODE
export PATH=\$HOME/.local/bin:\$PATH
if ! command -v uv >/dev/null; then
  curl -LsSf https://astral.sh/uv/install.sh | UV_NO_MODIFY_PATH=1 sh -s -- --quiet
fi
[ -x $VENV/bin/python ] || uv venv --quiet --seed --python $(q "$PYTHON_VERSION") $VENV
$VENV/bin/pip install --quiet --upgrade pip
$VENV/bin/pip install --quiet -e '.[tpu]'"
}

start_training() {
  local train inner
  train="$VENV/bin/python $(quote_all -m ecdit_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
    "${OVERRIDES[@]}")"
  # The wrapper records python's pid (for --stop and --logs) and its exit status (--teardown).
  inner="$train & echo \$! > $PIDFILE; wait \$!; echo \$? > $EXITFILE"
  ssh_workers all "set -euo pipefail; cd $CODE
if [ -f $PIDFILE ] && kill -0 \"\$(cat $PIDFILE)\" 2>/dev/null; then
  echo \"training already runs on \$(hostname); stop it with --stop\" >&2; exit 1
fi
rm -f $PIDFILE $EXITFILE
nohup setsid bash -c $(q "$inner") > $LOGFILE 2>&1 < /dev/null &
echo \"started on \$(hostname); log: $LOGFILE\""
}

# Follows worker 0's log until its training process exits (tail --pid).
stream_logs() {
  ssh_workers 0 "for _ in \$(seq 60); do [ -s $PIDFILE ] && break; sleep 1; done
tail -n +1 --pid=\"\$(cat $PIDFILE)\" -F $LOGFILE"
}

exit_status() {  # sets $1 to worker 0's training exit status, empty while it runs
  capture "$1" gcloud compute tpus tpu-vm ssh "$NAME" "${LOC[@]}" --worker=0 \
    --command="cat $EXITFILE 2>/dev/null || true"
}

stream_until_done() {
  local status=""
  trap 'echo; echo "stopped following; training goes on. Re-attach: $AGAIN --logs"; exit 130' INT
  while true; do
    stream_logs || true
    exit_status status
    if ((DRY_RUN)); then status=0; fi
    if [[ -n "$status" ]]; then break; fi
    # A dropped connection must not tear down a run that is still going.
    echo "lost the log stream while training runs; re-attaching in 30 s"
    sleep 30
  done
  trap - INT
  echo "training on worker 0 exited with status $status"
  if ((TEARDOWN)); then
    # Workers finish their last checkpoint writes together; give stragglers up to 10 minutes.
    local finish="timeout 600 bash -c 'until [ -f $EXITFILE ]; do sleep 5; done' || true"
    if [[ "$WORKDIR" == gs://* ]]; then  # keep every worker's log: the disks go with the slice
      finish+="; gcloud storage cp $LOGFILE $(q "$WORKDIR")/logs/\$(hostname).log"
    fi
    ssh_workers all "$finish"
    delete_slice
  fi
  [[ "$status" == 0 ]]
}

case "$ACTION" in
  delete) delete_slice ;;
  logs) stream_logs ;;
  stop) ssh_workers all "[ -f $PIDFILE ] && kill -TERM \"\$(cat $PIDFILE)\" 2>/dev/null \
&& echo \"SIGTERM sent on \$(hostname)\" || echo \"no training runs on \$(hostname)\"" ;;
  train)
    ensure_slice
    if ((!SKIP_SETUP)); then
      push_code
      install
    fi
    start_training
    if ((DETACH)); then
      echo "training runs in the background; follow it with: $AGAIN --logs"
    else
      stream_until_done
    fi
    ;;
esac
