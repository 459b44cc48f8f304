#!/usr/bin/env bash
# The benchmark suite in one command: training-step throughput of EC-XL-8E (tokens dispatched
# by gather, by one-hot einsums, and by the hybrid of the two) and of the dense XL model on one
# device, the hybrid EC and dense steps again with the momentum trace in bfloat16, the hybrid
# EC step with blocks recomputed, unrolled and as a scan over layers (compile time), sampling
# EC-XL-8E (each dispatch method) against its FLOP-matched dense model on one device, the
# scanned EC step with adaLN's norm by XLA and by the fused Pallas kernels, the hybrid EC step
# with XLA's attention instead of cuDNN's flash kernels, the hybrid EC step with the qk-norm and
# its bias in the fused Pallas kernels (model/fused_qk_norm.py), with 16 heads of 72 and with the
# XL presets' 18 heads of 64 (with and without the kernels), the dense step with them, those kernels and adaLN's alone
# against XLA (bench/fused_kernels.py, the qk-norm's GPU layouts swept), the paper's recipe
# lever by lever (bench/recipe.sh: remat, micro-batch, scan or unrolled, host offload), and,
# where at least 2 devices are visible, EC-XL with 32 experts on 2 devices (experts split over
# an expert axis, then parameters over an fsdp axis, then the experts over the expert axis with
# the dense weights split over it too, then fsdp with 4 micro-batches, the weights gathered where
# XLA puts it or in every micro-batch). Run from anywhere:
#
#   bash bench/run_all.sh [OUT_DIR]   # default bench/out; a relative OUT_DIR is from the repo root
#   EXTRA_ARGS=--smoke bash bench/run_all.sh bench/out_smoke   # tiny models, e.g. on a CPU
#
# Each benchmark writes OUT_DIR/<name>.json and OUT_DIR/<name>.log; a failing one (e.g. out of
# memory) is reported and the suite goes on; the exit status is 1 if any failed. The summary
# tables are printed at the end (python bench/common.py OUT_DIR prints them again).
#
# Environment: PYTHON (default python3), EXTRA_ARGS (added to every benchmark), BATCH (training
# global batch, default 64), SAMPLE_BATCH (default 64), SAMPLE_STEPS (ODE steps, default 25),
# BATCH_2 (global batch of the 2-device runs, default 32: the 32-expert train state alone,
# parameters + EMA + two optimizer moments in float32, is about 86 GB, so 40 to 45 GiB a device),
# MESHES_2 (the 2-device meshes, default "fsdp=1,expert=2 fsdp=2,expert=1"),
# XLA_PYTHON_CLIENT_MEM_FRACTION (default here 0.95, for the same reason), and PROFILE (set:
# the one-device step and sampling benchmarks also trace into OUT_DIR/profile_<name> and print
# where the time went).
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
. bench/lib.sh "${1:-}"
BATCH="${BATCH:-64}"
SAMPLE_BATCH="${SAMPLE_BATCH:-64}"
SAMPLE_STEPS="${SAMPLE_STEPS:-25}"
BATCH_2="${BATCH_2:-32}"
MESHES_2="${MESHES_2:-fsdp=1,expert=2 fsdp=2,expert=1}"

DEVICES="$("$PYTHON" -c 'import jax; print(jax.device_count())')" || exit 2
echo "== $DEVICES device(s) visible"

ONE=(--num_devices=1 --mesh=data=1)
# profile NAME: the --profile_dir flag for NAME when PROFILE is set, else nothing.
profile() { [ -n "${PROFILE:-}" ] && echo "--profile_dir=$OUT/profile_$1"; }
for name in step_ec_xl_8e step_ec_xl_8e_einsum step_ec_xl_8e_hybrid step_dense_xl \
    step_ec_xl_8e_hybrid_bf16m step_dense_xl_bf16m step_ec_xl_8e_hybrid_bf16m_block \
    step_ec_xl_8e_hybrid_bf16m_block_scan step_ec_xl_8e_hybrid_bf16m_scan \
    step_ec_xl_8e_hybrid_bf16m_scan_pallasnorm step_ec_xl_8e_hybrid_bf16m_xla_attention \
    step_ec_xl_8e_hybrid_bf16m_pallas_qknorm step_ec_xl_8e_hybrid_bf16m_heads18 \
    step_ec_xl_8e_hybrid_bf16m_heads18_pallas_qknorm step_dense_xl_bf16m_pallas_qknorm; do
  case "$name" in
    step_ec_xl_8e) flags=(--model=ec) ;;
    step_ec_xl_8e_einsum) flags=(--model=ec --moe_dispatch=einsum) ;;
    step_ec_xl_8e_hybrid) flags=(--model=ec --moe_dispatch=hybrid) ;;
    step_ec_xl_8e_hybrid_bf16m) flags=(--model=ec --moe_dispatch=hybrid --momentum_dtype=bfloat16) ;;
    step_dense_xl_bf16m) flags=(--model=dense --momentum_dtype=bfloat16) ;;
    step_dense_xl_bf16m_pallas_qknorm) flags=(--model=dense --momentum_dtype=bfloat16
        --qk_norm_impl=pallas) ;;
    step_ec_xl_8e_hybrid_bf16m_block) flags=(--model=ec --moe_dispatch=hybrid
        --momentum_dtype=bfloat16 --remat=block) ;;
    step_ec_xl_8e_hybrid_bf16m_block_scan) flags=(--model=ec --moe_dispatch=hybrid
        --momentum_dtype=bfloat16 --remat=block --scan_layers=true) ;;
    step_ec_xl_8e_hybrid_bf16m_scan) flags=(--model=ec --moe_dispatch=hybrid
        --momentum_dtype=bfloat16 --scan_layers=true) ;;
    step_ec_xl_8e_hybrid_bf16m_scan_pallasnorm) flags=(--model=ec --moe_dispatch=hybrid
        --momentum_dtype=bfloat16 --scan_layers=true --norm_impl=pallas) ;;
    step_ec_xl_8e_hybrid_bf16m_xla_attention) flags=(--model=ec --moe_dispatch=hybrid
        --momentum_dtype=bfloat16 --attention_impl=xla) ;;
    step_ec_xl_8e_hybrid_bf16m_pallas_qknorm) flags=(--model=ec --moe_dispatch=hybrid
        --momentum_dtype=bfloat16 --qk_norm_impl=pallas) ;;
    step_ec_xl_8e_hybrid_bf16m_heads18) flags=(--model=ec --moe_dispatch=hybrid
        --momentum_dtype=bfloat16 --num_heads=18 --num_kv_heads=18) ;;
    step_ec_xl_8e_hybrid_bf16m_heads18_pallas_qknorm) flags=(--model=ec --moe_dispatch=hybrid
        --momentum_dtype=bfloat16 --num_heads=18 --num_kv_heads=18 --qk_norm_impl=pallas) ;;
    *) flags=(--model=dense) ;;
  esac
  # shellcheck disable=SC2046  # profile prints one flag or nothing
  run "$name" bench/step.py "${flags[@]}" "${ONE[@]}" --batch_size="$BATCH" $(profile "$name")
done
# The fused kernels alone against XLA at an XL layer's shapes: the qk-norm with the benchmark's
# heads and with the presets' (and its GPU layouts swept there), adaLN's norm + modulate.
run kernels_qk_norm_heads16 bench/fused_kernels.py --heads=16 --head_dim=72
run kernels_qk_norm_heads18 bench/fused_kernels.py --heads=18 --head_dim=64 --sweep
run kernels_adaln bench/fused_kernels.py --kernel=adaln --width=1152
# shellcheck disable=SC2046
run sample_ec_xl_8e_vs_dense bench/sample.py --model=ec --batch_size="$SAMPLE_BATCH" \
  --num_steps="$SAMPLE_STEPS" $(profile sample_ec_xl_8e_vs_dense)
for dispatch in einsum hybrid; do
  name="sample_ec_xl_8e_${dispatch}_vs_dense"
  # shellcheck disable=SC2046
  run "$name" bench/sample.py --model=ec --moe_dispatch="$dispatch" \
    --batch_size="$SAMPLE_BATCH" --num_steps="$SAMPLE_STEPS" $(profile "$name")
done

# The paper's recipe (EC-XL-32E, mask 0.5, batch 4096 accumulated) by remat and micro-batch.
if ! EXTRA_ARGS="${EXTRA_ARGS:-}" PYTHON="$PYTHON" bash bench/recipe.sh "$OUT"; then
  FAILED+=(recipe)
fi

if ((DEVICES >= 2)); then
  for mesh in $MESHES_2; do
    tag="${mesh//=/}"
    run "step_ec_xl_32e_2dev_${tag//,/_}" bench/step.py --model=ec --num_experts=32 \
      --num_devices=2 --mesh="$mesh" --batch_size="$BATCH_2"
  done
  # The dense weights split over the expert axis too (config.mesh.dense_over_expert).
  run step_ec_xl_32e_2dev_expert2_dense_over_expert bench/step.py --model=ec --num_experts=32 \
    --num_devices=2 --mesh=fsdp=1,expert=2 --dense_over_expert --batch_size="$BATCH_2"
  # FSDP with 4 micro-batches: the weights where XLA gathers them, then gathered in every
  # micro-batch (config.gather_weights_per_micro_batch).
  for gather in xla per_micro_batch; do
    flags=()
    [ "$gather" = per_micro_batch ] && flags=(--gather_weights_per_micro_batch)
    run "step_ec_xl_32e_2dev_fsdp2_accum4_gather_$gather" bench/step.py --model=ec \
      --num_experts=32 --num_devices=2 --mesh=fsdp=2,expert=1 --batch_size="$BATCH_2" \
      --grad_accum_steps=4 "${flags[@]}"
  done
else
  echo "== fewer than 2 devices: the 2-device 32-expert benchmarks are skipped"
fi

finish
