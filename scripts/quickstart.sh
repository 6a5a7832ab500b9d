#!/usr/bin/env bash
# The quickstart: the built-in end-to-end run on this machine (CPU is enough).
source "$(dirname "$0")/_venv.sh" ""
cd "$ROOT"
exec xft quickstart "$@"
