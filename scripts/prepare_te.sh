#!/usr/bin/env bash
# Here (no GPU): Transformer Engine for the GPU runs, in pieces a run can carry (64 MiB each).
#   .carry/te/         transformer_engine (the Python package, 1.2 MB), the source package of
#                      transformer_engine_torch (its PyTorch extension, built on the GPU
#                      machine by scripts/gpu_te.sh) and SHA256SUMS
#   .carry/te_coreN/   part N of the core library wheel, transformer_engine_cu13 (~276 MB:
#                      five parts of 60 MB)
# Then, on the GPU machine, back-to-back runs (scripts/gpu_te.sh): `part N` carrying
# .carry/te_coreN for each N, then `build` carrying .carry/te. A built extension comes back in
# parts; keep it under .carry/te_built/ for later runs (`gpu_te.sh reuse`).
set -euo pipefail
cd "$(dirname "$0")/.."
TE_VERSION="${TE_VERSION:-2.20.2}"
PART_MB="${PART_MB:-60}"
rm -rf .carry/te .carry/te_core* && mkdir -p .carry/te /tmp/te_dl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 -d /tmp/te_dl \
  "transformer-engine==$TE_VERSION" "transformer-engine-cu13==$TE_VERSION"
cp /tmp/te_dl/transformer_engine-"$TE_VERSION"-*.whl .carry/te/
# the extension's source package: downloaded as a file (pip download would try to build it)
python3 - "$TE_VERSION" <<'EOF'
import json, sys, urllib.request
version = sys.argv[1]
req = urllib.request.Request("https://pypi.org/simple/transformer-engine-torch/",
                             headers={"Accept": "application/vnd.pypi.simple.v1+json"})
files = json.loads(urllib.request.urlopen(req, timeout=60).read())["files"]
name = f"transformer_engine_torch-{version}.tar.gz"
match = [f for f in files if f["filename"] == name]
if not match:
    sys.exit(f"{name} is not on the package index")
urllib.request.urlretrieve(match[0]["url"], f".carry/te/{name}")
EOF
core=$(ls /tmp/te_dl/transformer_engine_cu13-"$TE_VERSION"-*.whl)
(cd /tmp/te_dl && rm -f core.part* && split -b "${PART_MB}m" -d "$core" core.part)
n=0
for p in /tmp/te_dl/core.part*; do
  n=$((n + 1)); mkdir -p ".carry/te_core$n"; mv "$p" ".carry/te_core$n/"
done
(cd .carry/te && sha256sum ./*.whl ./*.tar.gz > SHA256SUMS)
(cd /tmp/te_dl && sha256sum "$(basename "$core")") >> .carry/te/SHA256SUMS
echo "$(basename "$core") $n" > .carry/te/CORE
du -sh .carry/te .carry/te_core*
echo "GPU runs: 'scripts/gpu_te.sh part N' carrying .carry/te_coreN for N in 1..$n, then"
echo "'scripts/gpu_te.sh build' carrying .carry/te"
