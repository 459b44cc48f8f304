#!/usr/bin/env bash
# The paper's training recipe on one device, lever by lever: EC-XL-32E as preset (half the
# tokens masked), global batch 4096 accumulated over micro-batches, hybrid dispatch, momentum in
# bfloat16, with each remat policy and micro-batch size. Run from anywhere:
#
#   bash bench/recipe.sh [OUT_DIR]            # default bench/out; every lever below
#   RUNS="block_mb512 block_mb1024_unrolled" bash bench/recipe.sh OUT   # only these
#   EXTRA_ARGS=--smoke bash bench/recipe.sh bench/out_smoke  # tiny model, e.g. on a CPU
#
# A run is REMAT_mbMICRO[_TAG...]: REMAT is the model's remat policy (block: every block
# recomputed in the backward pass; dots: matmul outputs without batch dimensions kept, the rest
# recomputed; matmuls: every matmul output kept, the experts' too; none: everything kept) and
# MICRO the micro-batch (grad_accum_steps = 4096 / MICRO). Layers run as a scan over the stacked
# blocks (a short compile) unless a tag says otherwise. Tags: unrolled (the layers one after
# the other: a longer compile, a faster step), offload (EMA and optimizer moments in host memory
# between steps, config.host_offload=ema,optimizer), offloadema (the EMA alone), castinloop
# (config.cast_weights_once=False: every micro-batch casts the weights itself), qkpallas (the
# qk-norm by the fused kernels, as configs/t2i_256.py's qk_norm_impl=auto on GPUs). Each run
# writes OUT_DIR/recipe_<run>.json and .log; one that fails (out of memory, say) is reported
# and the rest go on; the exit status is 1 if any failed.
#
# Environment: PYTHON (default python3), EXTRA_ARGS (added to every run), RUNS, BATCH (global
# batch, default 4096), PROFILE (set: each run also traces one step into OUT_DIR/profile_<name>
# and prints where the time went), XLA_PYTHON_CLIENT_MEM_FRACTION (default here 0.95: the
# 32-expert state alone is about 80 GiB).
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
. bench/lib.sh "${1:-}"
BATCH="${BATCH:-4096}"
# Every micro-batch passes over all the weights (their gradients summed, their slices copied out
# of the stacks), so the fewest, largest micro-batches that fit win: on one H200 block remat with
# unrolled layers at 1024 and 512 images, then the scan at 512 (records/
# 2026-12-05_h200_recipe-micro-batch-and-unrolled); the qk-norm kernels added 4.1% at 1024
# (records/2026-12-06_h200_recipe-and-dense-with-qk-kernels). The winners come first, then the
# other levers.
RUNS="${RUNS:-block_mb1024_unrolled_qkpallas block_mb1024_unrolled block_mb512_unrolled
  block_mb512 block_mb256 block_mb64 block_mb64_castinloop matmuls_mb64 dots_mb128
  block_mb1024_offloadema dots_mb256_offload none_mb64_offload none_mb64_unrolled_offload}"

for run in $RUNS; do
  remat="${run%%_*}"
  IFS=_ read -r -a tags <<< "${run#*_mb}"
  micro="${tags[0]}"
  scan=true
  offload=
  cast_once=true
  qk_norm=xla
  for tag in "${tags[@]:1}"; do
    case "$tag" in
      unrolled) scan=false ;;
      castinloop) cast_once=false ;;
      offload) offload=ema,optimizer ;;
      offloadema) offload=ema ;;
      qkpallas) qk_norm=pallas ;;
      *) micro=bad ;;
    esac
  done
  if ! [[ "$micro" =~ ^[0-9]+$ ]] || ((micro <= 0 || BATCH % micro)); then
    echo "== $run: not REMAT_mbMICRO[_TAG...] with a micro-batch that divides BATCH=$BATCH" >&2
    FAILED+=("$run")
    continue
  fi
  name="recipe_$run"
  args=(bench/step.py --preset=XL-32E --num_devices=1 --mesh=data=1 --batch_size="$BATCH"
        --grad_accum_steps=$((BATCH / micro)) --scan_layers="$scan" --remat="$remat"
        --moe_dispatch=hybrid --momentum_dtype=bfloat16 --host_offload="$offload"
        --cast_weights_once="$cast_once" --qk_norm_impl="$qk_norm" --steps=1
        --windows=2 --warmup=1)
  [ -n "${PROFILE:-}" ] && args+=(--profile_dir="$OUT/profile_$name")
  run "$name" "${args[@]}"
done

finish
