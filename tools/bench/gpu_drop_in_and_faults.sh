#!/usr/bin/env bash
# The GPU measurements of the drop-in and fault work, one after the other, each in its own process, on the lent GPU
# machine once the carried wheels are on it (tools/bench/gpu_env.sh). Writes logs and JSON rows under $1.
#   bash tools/bench/gpu_drop_in_and_faults.sh "$OUT" [subset]
set -u
out=${1:?output folder}
mkdir -p "$out"
source tools/bench/gpu_env.sh
export RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 MASTER_ADDR=127.0.0.1
step() {  # name, command...: one measurement, its log and exit code kept
    local name=$1
    shift
    echo "[$(date -u +%T)] $name: $*" | tee -a "$out/progress.txt"
    MASTER_PORT=$((29500 + RANDOM % 1000)) timeout "${STEP_TIMEOUT:-900}" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "[$(date -u +%T)] $name: exit $rc" | tee -a "$out/progress.txt"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.txt" 2>&1
python3 -c "import torch, vllm, trl, transformers, peft; print(torch.__version__, vllm.__version__, trl.__version__, transformers.__version__, peft.__version__)" >"$out/versions.txt" 2>&1
only=${2:-all}  # "all", or a space-separated subset of: standby_tests trainer_tests oom_retry grpo
want() { [[ $only == all || " $only " == *" $1 "* ]]; }
want standby_tests && step standby_gpu_tests python3 -m pytest packages/vllm_standby/tests -m gpu -q -p no:cacheprovider
want trainer_tests && step trainer_gpu_tests python3 -m pytest tests/test_grpo_vllm_standby.py \
    tests/test_grpo_vllm_shared.py -m gpu -q -p no:cacheprovider
want oom_retry && step oom_retry python3 tools/bench/oom_retry_gpu.py --out "$out/oom_retry_h200.json"
# GRPO_TRAINERS / GRPO_STEPS narrow the colocated rows when device time is short
want grpo && for trainer in ${GRPO_TRAINERS:-trl ours-trl-config ours}; do
    step "grpo_$trainer" python3 tools/bench/colocate.py grpo --trainer "$trainer" --length 4096 --steps "${GRPO_STEPS:-4}"
done
echo "[$(date -u +%T)] done" | tee -a "$out/progress.txt"
