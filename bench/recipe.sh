#!/usr/bin/env bash
# The paper's training recipe on one device, lever by lever: EC-XL-32E as preset (half the
# tokens masked), global batch 4096 accumulated over micro-batches, hybrid dispatch, momentum in
# bfloat16, with each remat policy and micro-batch size. Run from anywhere:
#
#   bash bench/recipe.sh [OUT_DIR]            # default bench/out; every lever below
#   RUNS="block_mb64 none_mb64" bash bench/recipe.sh OUT   # only these
#   EXTRA_ARGS=--smoke bash bench/recipe.sh bench/out_smoke  # tiny model, e.g. on a CPU
#
# A run is REMAT_mbMICRO: REMAT is the model's remat policy (block: every block recomputed in
# the backward pass; dots: matmul outputs without batch dimensions kept, the rest recomputed;
# matmuls: every matmul output kept, the experts' too; none: everything kept) and MICRO the
# micro-batch (grad_accum_steps = 4096 / MICRO). Layers run as a scan (compile time). Each
# writes OUT_DIR/recipe_<run>.json and .log; one that fails (out of memory, say) is reported
# and the rest go on; the exit status is 1 if any failed.
#
# Environment: PYTHON (default python3), EXTRA_ARGS (added to every run), RUNS, BATCH (global
# batch, default 4096), PROFILE (set: each run also traces one step into OUT_DIR/profile_<name>
# and prints where the time went), XLA_PYTHON_CLIENT_MEM_FRACTION (default here 0.95: the
# 32-expert state alone is about 80 GiB).
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
OUT="${1:-bench/out}"
PYTHON="${PYTHON:-python3}"
BATCH="${BATCH:-4096}"
RUNS="${RUNS:-block_mb64 none_mb64 dots_mb64 matmuls_mb64 dots_mb128 none_mb32 block_mb128}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"
mkdir -p "$OUT" || exit 2

FAILED=()
for run in $RUNS; do
  remat="${run%_mb*}"
  micro="${run#*_mb}"
  if ! [[ "$micro" =~ ^[0-9]+$ ]] || ((micro <= 0 || BATCH % micro)); then
    echo "== $run: the micro-batch must be a whole divisor of BATCH=$BATCH" >&2
    FAILED+=("$run")
    continue
  fi
  name="recipe_$run"
  args=(bench/step.py --preset=XL-32E --num_devices=1 --mesh=data=1 --batch_size="$BATCH"
        --grad_accum_steps=$((BATCH / micro)) --scan_layers=true --remat="$remat"
        --moe_dispatch=hybrid --momentum_dtype=bfloat16 --steps=1 --windows=2 --warmup=1
        "${EXTRA[@]}" --out="$OUT/$name.json")
  [ -n "${PROFILE:-}" ] && args+=(--profile_dir="$OUT/profile_$name")
  echo "== $name: $PYTHON ${args[*]}"
  if ! "$PYTHON" "${args[@]}" 2>&1 | tee "$OUT/$name.log"; then
    echo "== $name FAILED (see $OUT/$name.log)"
    FAILED+=("$run")
  fi
done

echo
"$PYTHON" bench/common.py "$OUT"
if ((${#FAILED[@]})); then
  echo "failed: ${FAILED[*]}"
  exit 1
fi
