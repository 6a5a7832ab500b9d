#!/usr/bin/env bash
# The test suite: CPU unit tests and multi-process gloo tests; GPU tests skip without CUDA.
source "$(dirname "$0")/_venv.sh" "test"
cd "$ROOT"
exec python -m pytest "$@"
