#!/usr/bin/env bash
# Fetch the wheels the GPU machine lacks (Python 3.12, x86_64) into .whl/ (git-ignored).
# There, scripts/gpu.sh installs them. megatron-core is the only one missing there.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl megatron-core==0.16.1
ls -la .whl
