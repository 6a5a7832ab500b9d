# Sourced by the scripts: create/reuse .venv and install the package with what it needs.
# CPU torch comes from the machine's local wheel (pip install torch==2.13.0) when no torch is
# installed yet, so no multi-GB CUDA build is pulled in.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${XFT_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
fi
STAMP="$VENV/.xft-installed"
if [ ! -f "$STAMP" ] || [ "$ROOT/setup.py" -nt "$STAMP" ]; then
  if [ -n "${1:-}" ]; then TARGET="$ROOT[$1]"; else TARGET="$ROOT"; fi
  "$VENV/bin/python" -m pip install -q -e "$TARGET"
  touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
