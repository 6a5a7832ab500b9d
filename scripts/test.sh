#!/usr/bin/env bash
# The test suite: CPU unit tests and multi-process gloo tests; GPU tests skip without CUDA.
source "$(dirname "$0")/_venv.sh" "test"
cd "$ROOT"
# tests/test_slurm.py runs a local two-node Slurm cluster: install Slurm when it is missing
# and we may (root or passwordless sudo); otherwise that test skips and says why.
if ! { command -v slurmctld || [ -x /usr/sbin/slurmctld ]; } >/dev/null &&
    { [ "$(id -u)" = 0 ] || sudo -n true 2>/dev/null; }; then
  if [ "$(id -u)" = 0 ]; then SUDO=(); else SUDO=(sudo -n); fi
  echo "test.sh: installing slurm-wlm and munge with apt-get (for tests/test_slurm.py)"
  if ! out=$({ "${SUDO[@]}" apt-get update -qq && DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" \
      apt-get install -y -qq --no-install-recommends slurm-wlm munge; } 2>&1); then
    echo "$out" | tail -n 20
    echo "test.sh: installing Slurm failed; tests/test_slurm.py will try again or skip"
  fi
fi
# Two workers (the CI machine's two cores), whole files per worker so a module's fixtures are
# built once; XFT_TEST_WORKERS=0 runs in this process.
exec python -m pytest -n "${XFT_TEST_WORKERS:-2}" --dist loadfile --durations=25 "$@"
