#!/usr/bin/env bash
# The test suite: CPU unit tests and multi-process gloo tests; GPU tests skip without CUDA.
#   ./scripts/test.sh [pytest args]     everything under tests/ (what CI runs)
#   ./scripts/test.sh unit [args]       one folder only: unit (one process, under a minute),
#                                       multiprocess (gloo ranks), e2e (commands, pipelines,
#                                       kills, Slurm), gpu
source "$(dirname "$0")/_venv.sh" "test"
cd "$ROOT"
SUBSET=()
case "${1:-}" in
  unit|multiprocess|e2e|gpu) SUBSET=("tests/$1"); shift ;;
esac
# tests/e2e/test_slurm.py runs a local two-node Slurm cluster: install Slurm when it is missing
# and we may (root or passwordless sudo); otherwise that test skips and says why.
if { [ ${#SUBSET[@]} = 0 ] || [ "${SUBSET[0]}" = tests/e2e ]; } &&
    ! { command -v slurmctld || [ -x /usr/sbin/slurmctld ]; } >/dev/null &&
    { [ "$(id -u)" = 0 ] || sudo -n true 2>/dev/null; }; then
  if [ "$(id -u)" = 0 ]; then SUDO=(); else SUDO=(sudo -n); fi
  echo "test.sh: installing slurm-wlm and munge with apt-get (for tests/e2e/test_slurm.py)"
  if ! out=$({ "${SUDO[@]}" apt-get update -qq && DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" \
      apt-get install -y -qq --no-install-recommends slurm-wlm munge; } 2>&1); then
    echo "$out" | tail -n 20
    echo "test.sh: installing Slurm failed; tests/e2e/test_slurm.py will try again or skip"
  fi
fi
# Two workers (the CI machine's two cores), whole files per worker so a module's fixtures are
# built once; XFT_TEST_WORKERS=0 runs in this process.
exec python -m pytest -n "${XFT_TEST_WORKERS:-2}" --dist loadfile --durations=25 "$@" \
  ${SUBSET[@]+"${SUBSET[@]}"}
