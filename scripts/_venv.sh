# Sourced by the scripts: create/reuse .venv (Python 3.12) and install the package with what it
# needs. Python 3.12 is $PYTHON when set, else `python3.12` on PATH, else pyenv's newest 3.12.
# torch 2.13.0 comes from the CPU-only wheel index when it is reachable, else the standard build
# from the package index (about 2.6 GB with its CUDA libraries; it runs on CPU as well).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${XFT_VENV:-$ROOT/.venv}"
WANT_PY="3.12"
TORCH="torch==2.13.0"
CPU_INDEX="https://download.pytorch.org/whl/cpu"

_xft_py_version() {  # "3.12" for a working interpreter, nothing otherwise
  "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true
}

_xft_find_python() {  # prints the interpreter to build the venv with, or explains and fails
  local cand
  if [ -n "${PYTHON:-}" ]; then
    if [ "$(_xft_py_version "$PYTHON")" = "$WANT_PY" ]; then echo "$PYTHON"; return; fi
    echo "_venv.sh: PYTHON=$PYTHON is not a working Python $WANT_PY" >&2
    return 1
  fi
  if command -v "python$WANT_PY" >/dev/null &&
      [ "$(_xft_py_version "python$WANT_PY")" = "$WANT_PY" ]; then
    echo "python$WANT_PY"; return
  fi
  local root="${PYENV_ROOT:-$HOME/.pyenv}"
  if command -v pyenv >/dev/null; then root="$(pyenv root)"; fi
  for cand in $(ls -d "$root"/versions/"$WANT_PY"*/bin/"python$WANT_PY" 2>/dev/null |
      sort -V -r); do
    if [ "$(_xft_py_version "$cand")" = "$WANT_PY" ]; then echo "$cand"; return; fi
  done
  cat >&2 <<EOF
_venv.sh: Python $WANT_PY is needed (megatron-core 0.19.2 requires Python >= 3.12) and none was
found: not python$WANT_PY on PATH, not in pyenv ($root/versions/$WANT_PY*). Install it, e.g.
  pyenv install $WANT_PY                                  (pyenv)
  sudo apt-get install python$WANT_PY python$WANT_PY-venv   (Debian/Ubuntu with python$WANT_PY packages)
or point PYTHON at one: PYTHON=/path/to/python$WANT_PY $0
EOF
  return 1
}

if [ -x "$VENV/bin/python" ]; then
  HAVE_PY="$(_xft_py_version "$VENV/bin/python")"
  if [ "$HAVE_PY" != "$WANT_PY" ]; then  # e.g. a .venv made with Python 3.11
    echo "_venv.sh: $VENV has Python ${HAVE_PY:-that does not run}, this project needs" \
      "$WANT_PY: creating it again" >&2
    PY="$(_xft_find_python)" || exit 1
    "$PY" -m venv --clear "$VENV"
  fi
else
  PY="$(_xft_find_python)" || exit 1
  "$PY" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  if "$VENV/bin/python" -c "import urllib.request as u; u.urlopen('$CPU_INDEX/torch/', timeout=5)" \
      2>/dev/null; then
    "$VENV/bin/python" -m pip install -q --index-url "$CPU_INDEX" "$TORCH"
  else
    echo "_venv.sh: the CPU-only torch index is not reachable: installing the standard" \
      "$TORCH build from the package index (about 2.6 GB; it runs on CPU)" >&2
    "$VENV/bin/python" -m pip install -q "$TORCH"
  fi
fi
# The stamp lists the extras installed (one per line); a script asking for an extra the stamp
# lacks installs again with the union, so the scripts work in any order. A venv built again
# above has no stamp any more, so everything is installed anew.
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
