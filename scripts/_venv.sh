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
# The stamp lists the extras installed (one per line); a script asking for an extra the stamp
# lacks installs again with the union, so the scripts work in any order.
STAMP="$VENV/.xft-installed"
WANT="${1:-}"
if [ ! -f "$STAMP" ] || [ "$ROOT/setup.py" -nt "$STAMP" ] ||
    { [ -n "$WANT" ] && ! grep -qx "$WANT" "$STAMP"; }; then
  EXTRAS=$({ if [ -f "$STAMP" ]; then cat "$STAMP"; fi; echo "$WANT"; } | sed '/^$/d' |
    sort -u | paste -sd, -)
  if [ -n "$EXTRAS" ]; then TARGET="$ROOT[$EXTRAS]"; else TARGET="$ROOT"; fi
  "$VENV/bin/python" -m pip install -q -e "$TARGET"
  printf '%s\n' ${EXTRAS//,/ } > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
