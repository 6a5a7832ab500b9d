#!/usr/bin/env bash
# Here (no GPU, but nvcc at /usr/local/cuda): Transformer Engine installed next to this
# project, with torch 2.11.0 (the GPU machines' release, so the extension built here loads
# there too). Needs scripts/prepare_te.sh first.
#   scripts/te_here.sh build          venv $TE_VENV (default /tmp/te_venv): torch 2.11.0, this
#                                     project's dependencies, the TE core and Python wheels,
#                                     and TE's PyTorch extension built here for sm_90 (about 8
#                                     minutes on 2 cores); the built wheel also goes to
#                                     .carry/te_built (NAME, SHA256SUMS, parts), which
#                                     `scripts/gpu_te.sh reuse` installs on a GPU machine
#   scripts/te_here.sh test [ARGS]    pytest ARGS (default: tests/unit tests/multiprocess) in
#                                     that venv, TE importable
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV="${TE_VENV:-/tmp/te_venv}"
TORCH="torch==2.11.0"
libs() {  # the CUDA libraries of the pip packages (TE's core library loads NCCL, cuDNN, ...)
  ls -d "$VENV"/lib/python3.12/site-packages/nvidia/*/lib | tr '\n' ':'
}
case "${1:-}" in
  build)
    [ -f .carry/te/CORE ] || { echo "run scripts/prepare_te.sh first"; exit 1; }
    py=""  # a working python3.12 on PATH (a pyenv shim may not be one), else pyenv's
    if python3.12 -c "" 2>/dev/null; then py=python3.12; else
      py=$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 2>/dev/null \
        | tail -n 1)
    fi
    [ -n "$py" ] || { echo "Python 3.12 is needed (python3.12 on PATH or pyenv's)"; exit 1; }
    [ -x "$VENV/bin/python" ] || "$py" -m venv "$VENV"
    echo "$TORCH" > "$VENV/constraints.txt"
    "$VENV/bin/pip" install -q -c "$VENV/constraints.txt" "$TORCH" -e . pybind11 wheel \
      setuptools ninja packaging importlib-metadata onnx onnxscript einops \
      nvidia-cudnn-frontend pytest pytest-timeout pytest-xdist hypothesis
    core=/tmp/te_core/$(cut -d' ' -f1 .carry/te/CORE)
    mkdir -p /tmp/te_core && cat .carry/te_core*/core.part* > "$core"
    (cd /tmp/te_core && grep -F "$(basename "$core")" "$ROOT/.carry/te/SHA256SUMS" | sha256sum -c -)
    "$VENV/bin/pip" install -q --no-deps "$core" .carry/te/transformer_engine-*.whl
    nv="$VENV/lib/python3.12/site-packages/nvidia"
    inc="$nv/cu13/include:$nv/nccl/include:$nv/cudnn/include"
    rm -rf /tmp/te_built_here
    env CUDA_HOME=/usr/local/cuda CPATH="$inc" CPLUS_INCLUDE_PATH="$inc" LIBRARY_PATH="$(libs)" \
      LD_LIBRARY_PATH="$(libs)" NVTE_FRAMEWORK=pytorch NVTE_CUDA_ARCHS=90 \
      MAX_JOBS="$(nproc)" PATH="$VENV/bin:/usr/local/cuda/bin:$PATH" \
      "$VENV/bin/pip" wheel -q --no-deps --no-build-isolation -w /tmp/te_built_here \
      .carry/te/transformer_engine_torch-*.tar.gz
    wheel=$(ls /tmp/te_built_here/transformer_engine_torch-*.whl)
    "$VENV/bin/pip" install -q --no-deps "$wheel"
    rm -rf .carry/te_built && mkdir -p .carry/te_built
    (cd .carry/te_built && split -b 15m -d "$wheel" ext.part && basename "$wheel" > NAME &&
      (cd /tmp/te_built_here && sha256sum "$(basename "$wheel")") > SHA256SUMS)
    LD_LIBRARY_PATH="$(libs)" "$VENV/bin/python" -c \
      "import transformer_engine.pytorch, torch; print('TE importable, torch', torch.__version__)"
    ;;
  test)
    shift
    [ -x "$VENV/bin/python" ] || { echo "no TE environment at $VENV: scripts/te_here.sh build"; exit 1; }
    [ $# -gt 0 ] || set -- tests/unit tests/multiprocess
    LD_LIBRARY_PATH="$(libs)" PYTHONPATH="$ROOT" exec "$VENV/bin/python" -m pytest \
      -p no:cacheprovider -n 2 --dist loadfile "$@"
    ;;
  *)
    sed -n 2,14p "$0"; exit 2
    ;;
esac
