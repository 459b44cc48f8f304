#!/usr/bin/env bash
# Expert parallelism on 2 GPUs against 1 GPU, through the training CLI on GenEval-Shapes:
#   a) 1 GPU, global batch 64;  b) 2 GPUs, mesh expert=2, global batch 64 (same data: the loss
#   curves must agree);  c) 2 GPUs, expert=2, global batch 128 (weak scaling: images/s vs 2x a).
# Usage (from the repository root):
#   bash bench/ep_scaling.sh [OUTDIR] [PRESET] [STEPS] [WORKERS] [--config.key=value ...]
# WORKERS data-loading processes per run (default 8) keep the input pipeline off the timings;
# any further arguments are config overrides given to all three runs, e.g.
# --config.model.dtype=float32 (with JAX_DEFAULT_MATMUL_PRECISION=highest in the environment)
# so that the 1-GPU and 2-GPU loss curves can be compared step for step.
set -euo pipefail
out=${1:-bench/out/ep_scaling}
preset=${2:-B-16E}
steps=${3:-300}
workers=${4:-8}
extra=("${@:5}")
mkdir -p "$out"
common=(--config="configs/ecdit.py:$preset" --config.num_train_steps="$steps"
        --config.warmup_steps=50 --config.log_every_steps=25 --config.sample_every_steps=0
        --config.checkpoint_every_steps=100000 --config.data.data_dir="$out/tfds"
        --config.data.worker_count="$workers" "${extra[@]}")
run() {  # name, visible GPUs, extra flags...
  local name=$1 gpus=$2
  shift 2
  rm -rf "${out:?}/$name"
  CUDA_VISIBLE_DEVICES=$gpus python3 -m ecdit_jax.main "${common[@]}" --workdir="$out/$name" \
    "$@" > "$out/$name.log" 2>&1
  tail -n 2 "$out/$name.log"
}
run one_gpu_b64 0 --config.batch_size=64
run two_gpu_expert2_b64 0,1 --config.batch_size=64 --config.mesh.data=1 --config.mesh.expert=2
run two_gpu_expert2_b128 0,1 --config.batch_size=128 --config.mesh.data=1 --config.mesh.expert=2
python3 bench/ep_scaling_report.py "$out" one_gpu_b64 two_gpu_expert2_b64 two_gpu_expert2_b128
