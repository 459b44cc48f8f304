# What the benchmark scripts share; sourced from the repository root as `. bench/lib.sh OUT_DIR`.
# Sets OUT (default bench/out), PYTHON (default python3), EXTRA (EXTRA_ARGS as words, added to
# every benchmark), FAILED and the memory fraction (default 0.95: the 32-expert train state
# alone is about 80 GiB); defines run and finish.
OUT="${1:-bench/out}"
PYTHON="${PYTHON:-python3}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"
mkdir -p "$OUT" || exit 2
FAILED=()

# run NAME SCRIPT ARGS...: one benchmark writing OUT/NAME.json, its output shown and kept in
# OUT/NAME.log; a failure (out of memory, say) is recorded in FAILED and the caller goes on.
run() {
  local name="$1"
  shift
  echo "== $name: $PYTHON $* ${EXTRA[*]}"
  if ! "$PYTHON" "$@" "${EXTRA[@]}" --out="$OUT/$name.json" 2>&1 | tee "$OUT/$name.log"; then
    echo "== $name FAILED (see $OUT/$name.log)"
    FAILED+=("$name")
  fi
}

# finish: the summary tables of OUT's records; exit status 1 if any benchmark failed.
finish() {
  echo
  "$PYTHON" bench/common.py "$OUT"
  if ((${#FAILED[@]})); then
    echo "failed: ${FAILED[*]}"
    exit 1
  fi
  exit 0
}
