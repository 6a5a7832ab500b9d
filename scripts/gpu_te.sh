#!/usr/bin/env bash
# On the GPU machine, from the repo root: Transformer Engine from the pieces that
# scripts/prepare_te.sh laid out, over back-to-back runs (the machine keeps /tmp while calls
# follow one another):
#   scripts/gpu_te.sh part N        carry .carry/te_coreN: part N of the core wheel to /tmp/te
#   scripts/gpu_te.sh build         carry .carry/te: join and check the core wheel, install it
#                                   and transformer_engine into /tmp/te_site, start building
#                                   the PyTorch extension detached (pip wheel, sm_90 only)
#   scripts/gpu_te.sh wait SECONDS  follow the build; when it is done, check that
#                                   transformer_engine.pytorch imports, and put the built wheel
#                                   in 15 MiB parts under $OUT/te_built (keep them in
#                                   .carry/te_built here) with the build log's tail
#   scripts/gpu_te.sh reuse         carry .carry/te and .carry/te_built (and the core parts
#                                   before): install everything without building
# Afterwards PYTHONPATH=/tmp/te_site:... sees transformer_engine.
set -uo pipefail
cd "$(dirname "$0")/.."
TE=/tmp/te SITE=/tmp/te_site
OUT="${OUT:-runs/gpu}"
mkdir -p "$TE" "$OUT"
core_name() { cut -d' ' -f1 .carry/te/CORE; }
install_core() {
  local name sums
  name=$(core_name) sums="$PWD/.carry/te/SHA256SUMS"
  local core="$TE/$name"
  cat "$TE"/core.part* > "$core" || return 1
  (cd "$TE" && grep -F "$name" "$sums" | sha256sum -c -) || {
    echo "the core wheel's parts do not add up (missing a 'part N' run?)"; return 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$core" \
    .carry/te/transformer_engine-*.whl
}
case "${1:-}" in
  part)
    cp ".carry/te_core${2:?part number}"/core.part* "$TE/" && ls -la "$TE"
    ;;
  build)
    install_core || exit 1
    nvcc --version | tail -n 2 | tee "$OUT/te_nvcc.txt"
    setsid nohup env PYTHONPATH="$SITE" NVTE_FRAMEWORK=pytorch NVTE_CUDA_ARCHS=90 \
      MAX_JOBS="$(nproc)" python3 -m pip wheel -v --no-deps --no-build-isolation \
      -w "$TE/built" .carry/te/transformer_engine_torch-*.tar.gz > "$TE/build.log" 2>&1 &
    echo "building (log $TE/build.log)"
    ;;
  wait)
    end=$((SECONDS + ${2:-500}))
    building() { pgrep -f "pip wheel.*transformer_engine_torch" >/dev/null; }
    while [ $SECONDS -lt $end ] && building; do sleep 10; done
    tail -n 60 "$TE/build.log" > "$OUT/te_build_tail.log"
    if building; then echo "still building"; tail -n 3 "$TE/build.log"; exit 0; fi
    wheel=$(ls "$TE"/built/transformer_engine_torch-*.whl 2>/dev/null | head -n 1)
    if [ -z "$wheel" ]; then echo "the build failed: $OUT/te_build_tail.log"; exit 1; fi
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$wheel"
    mkdir -p "$OUT/te_built"
    (cd "$OUT/te_built" && split -b 15m -d "$wheel" ext.part && sha256sum "$wheel" \
      | sed "s#  .*/#  #" > SHA256SUMS && basename "$wheel" > NAME)
    PYTHONPATH="$SITE" python3 -c "import transformer_engine.pytorch as te, torch; \
print('transformer_engine', te.__version__ if hasattr(te, '__version__') else '?', \
'torch', torch.__version__)" 2>&1 | tail -n 5 | tee "$OUT/te_import.txt"
    ;;
  reuse)
    install_core || exit 1
    name=$(cat .carry/te_built/NAME)
    cat .carry/te_built/ext.part* > "$TE/$name"
    sums="$PWD/.carry/te_built/SHA256SUMS"
    (cd "$TE" && sha256sum -c "$sums") || exit 1
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$TE/$name"
    PYTHONPATH="$SITE" python3 -c "import transformer_engine.pytorch" && echo "TE ready"
    ;;
  *)
    sed -n 2,18p "$0"; exit 2
    ;;
esac
