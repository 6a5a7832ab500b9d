#!/usr/bin/env bash
# Here (no GPU): what scripts/gpu_stack_compare.sh carries to the GPU machine (carry .whl and
# .carry/old): the 0.19.2 wheels (prepare_gpu_wheels.sh), megatron-core 0.16.1 for Python
# 3.12 and the last tree that ran on it (OLD_COMMIT, default the first parent of the merge
# that moved to 0.19.2) as a `git archive`.
set -euo pipefail
cd "$(dirname "$0")/.."
OLD_COMMIT="${OLD_COMMIT:-697b358^1}"
ls .whl/megatron_core-0.19.2-*.whl \
  >/dev/null 2>&1 || scripts/prepare_gpu_wheels.sh
rm -rf .carry/old && mkdir -p .carry/old
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .carry/old megatron-core==0.16.1
git rev-parse "$OLD_COMMIT" > /tmp/OLD_COMMIT
git archive --format=tar -o .carry/old/tree.tar "$OLD_COMMIT" -- xft_megatron benchmarks
tar -rf .carry/old/tree.tar -C /tmp OLD_COMMIT
git rev-parse HEAD > .carry/old/NEW_COMMIT
ls -la .carry/old
