#!/usr/bin/env bash
# XFT on deepseek-coder-1.3b-base, end to end, and the SFT baseline (see README.md here).
#
#   run.sh [--plan] [--only all|xft|sft] [--heldout FILE] HF_MODEL [DATA] OUT_DIR LAYOUT
#
# HF_MODEL is an HF directory or a Hub id; DATA a file, a dataset folder or hf:NAME, by default
# the paper's hf:ise-uiuc/Magicoder-Evol-Instruct-110K (through the Hugging Face cache).
# LAYOUT is NODESxGPUS (1x8, 2x8, 4x8: layouts/<LAYOUT>.yaml). Every step writes one folder
# under OUT_DIR and is skipped when that folder is complete, so rerunning the same command
# continues where a previous run stopped (training steps resume from their newest
# checkpoint). Before anything runs, every training stage is validated and its layout,
# parameter counts and per-GPU memory estimate are printed (`xft train --dry-run`).
# --plan does only that and lists the commands, marking the steps already done.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${XFT_PYTHON:-python}"        # the environment with xft_megatron installed
TORCHRUN="${XFT_TORCHRUN:-torchrun}"

DEFAULT_DATA=hf:ise-uiuc/Magicoder-Evol-Instruct-110K  # the paper's instruction data

usage() {
  cat <<'EOF'
usage: run.sh [--plan] [--only all|xft|sft] [--heldout FILE] HF_MODEL [DATA] OUT_DIR LAYOUT

  HF_MODEL      deepseek-coder-1.3b-base as a Hugging Face directory (config.json,
                safetensors or .bin weights, tokenizer files) or its Hub id
                deepseek-ai/deepseek-coder-1.3b-base[@revision] (Hugging Face cache;
                downloaded when online, cache only with HF_HUB_OFFLINE=1)
  DATA          the instruction data (instruction / response records): hf:NAME (a Hub
                dataset, through the cache as above), a datasets folder or a .jsonl /
                .json / .parquet file; default hf:ise-uiuc/Magicoder-Evol-Instruct-110K
  OUT_DIR       where every step writes its folder (created; reruns continue here)
  LAYOUT        NODESxGPUS: 1x8 (this node), 2x8 or 4x8 (inside a Slurm allocation of that
                many nodes; see slurm/README.md and slurm/xft.sbatch)

  --plan        validate the stage configs, print their dry-runs and the commands; run nothing
  --heldout FILE  held-out instruction data (.jsonl/.json/.parquet, hf:NAME, a dataset
                folder): every model's loss on it, in the report (OUT_DIR/report)
  --only WHAT   all (default: XFT, the SFT baseline and the base model's HumanEval),
                xft (XFT only) or sft (SFT baseline only)

environment: XFT_PYTHON (python), XFT_TORCHRUN (torchrun); multi-node: XFT_MASTER_ADDR
(the first node's NodeAddr), XFT_MASTER_PORT (20000 + job id mod 10000)
EOF
}

die() { echo "run.sh: error: $*" >&2; exit 2; }

# ------------------------------------------------------------------------------ arguments
PLAN=0
ONLY=all
HELDOUT=""
ARGS=()
while (($#)); do
  case "$1" in
    --plan) PLAN=1 ;;
    --only) [[ $# -ge 2 ]] || die "--only needs a value: all, xft or sft"; ONLY="$2"; shift ;;
    --only=*) ONLY="${1#--only=}" ;;
    --heldout) [[ $# -ge 2 ]] || die "--heldout needs a file"; HELDOUT="$2"; shift ;;
    --heldout=*) HELDOUT="${1#--heldout=}" ;;
    -h|--help) usage; exit 0 ;;
    -*) usage >&2; die "unknown option '$1'" ;;
    *) ARGS+=("$1") ;;
  esac
  shift
done
((${#ARGS[@]} == 3)) && ARGS=("${ARGS[0]}" "$DEFAULT_DATA" "${ARGS[1]}" "${ARGS[2]}")
[[ ${#ARGS[@]} -eq 4 ]] || { usage >&2; die "expected 4 arguments (3 with the default" \
  "DATA), got ${#ARGS[@]}"; }
absolute() { if [[ "$1" == /* || "$1" == hf:* ]]; then echo "$1"; else echo "$PWD/$1"; fi; }
HF_ARG="${ARGS[0]%/}"
HF_DIR="$(absolute "$HF_ARG")"
DATA="$(absolute "${ARGS[1]}")"
OUT="$(absolute "${ARGS[2]%/}")"
LAYOUT="${ARGS[3]}"
case "$ONLY" in all|xft|sft) ;; *) die "--only must be all, xft or sft, not '$ONLY'" ;; esac

[[ "$LAYOUT" =~ ^([1-9][0-9]*)x([1-9][0-9]*)$ ]] ||
  die "layout '$LAYOUT' must look like NODESxGPUS, e.g. 1x8"
LAYOUT_FILE="$HERE/layouts/$LAYOUT.yaml"
if [[ ! -f "$LAYOUT_FILE" ]]; then
  known="$(cd "$HERE/layouts" && ls -- *.yaml | sed 's/\.yaml$//' | tr '\n' ' ')"
  die "no layout file layouts/$LAYOUT.yaml; available: ${known% }. A new layout is a copy of" \
      "one of them with parallel.* and train.micro_batch_size adjusted (see README.md)"
fi
NODES="${BASH_REMATCH[1]}"
GPUS="${BASH_REMATCH[2]}"
WORLD=$((NODES * GPUS))

command -v "$PYTHON" >/dev/null || die "'$PYTHON' not found; activate the environment that has" \
  "xft-megatron installed (or set XFT_PYTHON)"
"$PYTHON" -c "import xft_megatron" 2>/dev/null || die "'$PYTHON' cannot import xft_megatron;" \
  "activate its environment (e.g. source .venv/bin/activate) or set XFT_PYTHON"

# A Hub id (not a local directory) -> its snapshot folder in the Hugging Face cache
if [[ ! -d "$HF_ARG" && "$HF_ARG" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+(@[A-Za-z0-9_./-]+)?$ ]]
then
  HF_DIR="$("$PYTHON" - "$HF_ARG" <<'EOF'
import sys
from xft_megatron.runtime.hub import HubError, resolve_model_dir
try:
    print(resolve_model_dir(sys.argv[1], flag="HF_MODEL"))
except HubError as e:
    sys.exit(f"run.sh: error: {e}")
EOF
)" || exit 2
fi

# layouts/<LAYOUT>.yaml -> the overrides of one stage (one per line), after checking that the
# file describes the layout its name promises
layout_overrides() {
  "$PYTHON" - "$LAYOUT_FILE" "$NODES" "$GPUS" "$1" <<'EOF'
import sys, yaml
path, nodes, gpus, stage = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
try:
    spec = yaml.safe_load(open(path, encoding="utf-8"))
except yaml.YAMLError as e:
    sys.exit(f"run.sh: error: {path} is not valid YAML: {e}")
if not isinstance(spec, dict) or not isinstance(spec.get("stages"), dict):
    sys.exit(f"run.sh: error: {path} needs 'nodes', 'gpus_per_node' and a 'stages' mapping")
if (spec.get("nodes"), spec.get("gpus_per_node")) != (nodes, gpus):
    sys.exit(f"run.sh: error: {path} says nodes={spec.get('nodes')} gpus_per_node="
             f"{spec.get('gpus_per_node')}, but its name says {nodes}x{gpus}")
items = spec["stages"].get(stage)
if not isinstance(items, list) or not items or \
        not all(isinstance(i, str) and "=" in i for i in items):
    sys.exit(f"run.sh: error: {path}: stages.{stage} must be a non-empty list of key=value "
             "overrides (at least train.micro_batch_size)")
print("\n".join(items))
EOF
}
lines="$(layout_overrides sft)" || exit 2
mapfile -t SFT_LAYOUT <<<"$lines"
lines="$(layout_overrides moe)" || exit 2
mapfile -t MOE_LAYOUT <<<"$lines"
lines="$(layout_overrides merge)" || exit 2
mapfile -t MERGE_LAYOUT <<<"$lines"

# ------------------------------------------------------------------------------ inputs
problems=()
[[ -f "$HF_DIR/config.json" ]] || die "'$HF_DIR' is not a Hugging Face model directory (no" \
  "config.json); download deepseek-ai/deepseek-coder-1.3b-base there"
compgen -G "$HF_DIR/*.safetensors" >/dev/null || compgen -G "$HF_DIR/pytorch_model*.bin" \
  >/dev/null || problems+=("'$HF_DIR' has no weights (*.safetensors or pytorch_model*.bin)")
compgen -G "$HF_DIR/tokenizer*" >/dev/null ||
  problems+=("'$HF_DIR' has no tokenizer files (tokenizer.json / tokenizer_config.json)")
if [[ "$DATA" == hf:* || -d "$DATA" ]]; then  # a Hugging Face dataset: cached or downloadable
  data_problem="$("$PYTHON" - "$DATA" <<'EOF'
import sys
from xft_megatron.config import DataConfig
from xft_megatron.data.dataset import check_sources
from xft_megatron.runtime.hub import HubSettings
try:
    check_sources(DataConfig(path=sys.argv[1]), HubSettings.from_env())
except (OSError, ValueError) as e:
    print(e)
EOF
)"
  [[ -z "$data_problem" ]] || problems+=("$data_problem")
else
  [[ -f "$DATA" && -s "$DATA" ]] || problems+=("data file '$DATA' does not exist or is empty")
fi
if ((${#problems[@]})); then
  for p in "${problems[@]}"; do
    if ((PLAN)); then echo "run.sh: warning: $p" >&2; else echo "run.sh: error: $p" >&2; fi
  done
  ((PLAN)) || exit 2
fi

# ------------------------------------------------------------------------------ launchers
# One-process steps (convert, upcycle, fold, export, evaluate) and distributed training.
if ((NODES == 1)); then
  ONE=("$PYTHON" -m xft_megatron.cli)
  DIST=("$TORCHRUN" --standalone --nnodes 1 --nproc-per-node "$GPUS" -m xft_megatron.cli)
  if ((!PLAN)); then
    command -v "$TORCHRUN" >/dev/null || die "'$TORCHRUN' not found (set XFT_TORCHRUN)"
    found="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
    ((found >= GPUS)) || die "layout $LAYOUT needs $GPUS GPUs on this node; nvidia-smi lists" \
      "${found:-0}. Run on a node with $GPUS GPUs or pick a layout that fits"
  fi
else
  # Multi-node: inside a Slurm allocation of NODES nodes (one task per node); each training
  # step is one srun over all nodes starting torchrun, which rendezvouses on the first node.
  # slurm/xft.sbatch and slurm/README.md describe the cluster launcher for single commands.
  if [[ -n "${SLURM_JOB_ID:-}" ]]; then
    have="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-0}}"
    [[ "$have" -eq "$NODES" ]] || die "layout $LAYOUT needs $NODES nodes; this Slurm job" \
      "has $have (sbatch/salloc --nodes $NODES --gpus-per-node $GPUS --ntasks-per-node 1)"
    for tool in srun scontrol "$TORCHRUN"; do
      command -v "$tool" >/dev/null || die "'$tool' not found on this node"
    done
    # rendezvous on the first node, at the address Slurm knows it by (as slurm/xft.sbatch)
    first="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
    HEAD="${XFT_MASTER_ADDR:-$(scontrol show node "$first" |
      sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')}"
    [[ -n "$HEAD" ]] || die "could not read the address of node '$first'; set XFT_MASTER_ADDR"
    PORT="${XFT_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 10000))}"
    JOB="$SLURM_JOB_ID"
  elif ((PLAN)); then
    HEAD="<first-node>"
    PORT="${XFT_MASTER_PORT:-<port>}"
    JOB="<job-id>"
  else
    die "layout $LAYOUT spans $NODES nodes: run this script inside a Slurm allocation of" \
      "$NODES nodes x $GPUS GPUs, e.g. sbatch --nodes $NODES --gpus-per-node $GPUS" \
      "--ntasks-per-node 1 --wrap \"$0 $HF_DIR $DATA $OUT $LAYOUT\" (slurm/README.md and" \
      "slurm/xft.sbatch describe the cluster launcher)"
  fi
  ONE=(srun --nodes 1 --ntasks 1 "$PYTHON" -m xft_megatron.cli)
  DIST=(srun --nodes "$NODES" --ntasks-per-node 1 --kill-on-bad-exit=1
        "$TORCHRUN" --nnodes "$NODES" --nproc-per-node "$GPUS" --rdzv-backend c10d
        --rdzv-endpoint "$HEAD:$PORT" --rdzv-id "$JOB" -m xft_megatron.cli)
fi

# ------------------------------------------------------------------------------ steps
# The steps, their folders, commands and completion are the XFT pipeline's
# (xft_megatron/pipeline: xft.py the stage list, recipe.py this recipe's settings,
# completion.py the skip-if-done scheme); this script passes it the inputs, the layout's
# overrides and the launchers above.
PIPELINE=("$PYTHON" -m xft_megatron.pipeline recipe --hf "$HF_DIR" --data "$DATA" --out "$OUT"
          --configs "$HERE" --only "$ONLY" --world "$WORLD" --one "${ONE[*]@Q}"
          --dist "${DIST[*]@Q}")
[[ -z "$HELDOUT" ]] || PIPELINE+=(--heldout "$(absolute "$HELDOUT")")
for o in "${SFT_LAYOUT[@]}"; do PIPELINE+=(--layout sft "$o"); done
for o in "${MOE_LAYOUT[@]}"; do PIPELINE+=(--layout moe "$o"); done
for o in "${MERGE_LAYOUT[@]}"; do PIPELINE+=(--layout merge "$o"); done

echo "== XFT recipe: deepseek-coder-1.3b, layout $LAYOUT ($NODES node(s) x $GPUS GPUs," \
     "world $WORLD), out $OUT"
# Preflight: every training step through `xft train --dry-run` at this layout's world size,
# before any step runs; an input checkpoint not written yet is checked against a stand-in
# holding only the config it will have (the model section from HF_MODEL/config.json, the
# moe section of the upcycling). The dry-run reads nothing else from a checkpoint.
# Then what the steps not done yet will write under OUT; a run (not --plan) stops here when
# OUT's disk has less free.
echo "== dry-run of every training stage (per-GPU memory estimate; H200: ~140 GiB)"
if ((PLAN)); then CHECK=(); else CHECK=(--check-disk); fi
"${PIPELINE[@]}" preflight "${CHECK[@]}" || exit 2

echo "== steps"
if ((PLAN)); then
  "${PIPELINE[@]}" plan --commands
  exit 0
fi
"${PIPELINE[@]}" plan

mkdir -p "$OUT/logs" 2>/dev/null && [[ -w "$OUT" ]] || die "cannot write to '$OUT'"
"${PIPELINE[@]}" run || exit 1
echo "== finished: HumanEval results under $OUT/eval/*/humaneval.json"
