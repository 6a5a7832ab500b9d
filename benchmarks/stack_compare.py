"""The table of scripts/gpu_stack_compare.sh: the MoE and dense training steps of the tree on
megatron-core 0.16.1 against this tree on 0.19.2, measured in one GPU run.

    python benchmarks/stack_compare.py OUT_DIR   (reads moe_old/new.json, dense_old/new.json)
"""

import json
import os
import statistics
import sys
from collections import defaultdict
from typing import Dict, List


def _load(folder: str, name: str) -> Dict:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _median_by(rows: List[Dict], key: str, value: str) -> Dict[str, float]:
    """{row[key]: median of row[value]} (a variant measured twice counts once)."""
    groups = defaultdict(list)
    for r in rows:
        groups[r[key]].append(r[value])
    return {k: statistics.median(v) for k, v in groups.items()}


def table(folder: str) -> str:
    moe = {side: _load(folder, f"moe_{side}.json") for side in ("old", "new")}
    dense = {side: _load(folder, f"dense_{side}.json") for side in ("old", "new")}
    env = (moe["new"] or dense["new"]).get("env", {})
    lines = [f"device {env.get('device')}, torch {env.get('torch')}, CUDA {env.get('cuda')}, "
             f"{env.get('date')}", "",
             "| measurement | megatron-core 0.16.1 | 0.19.2 | new / old |", "|---|---|---|---|"]

    def row(name, old, new, unit, higher_is_better=True):
        if old is None or new is None:
            lines.append(f"| {name} | {old if old is not None else 'missing'} | "
                         f"{new if new is not None else 'missing'} | |")
            return
        ratio = new / old if old else float("nan")
        lines.append(f"| {name} | {old:,.1f} {unit} | {new:,.1f} {unit} | {ratio:.3f}"
                     f"{'' if higher_is_better else ' (lower is better)'} |")

    steps = {s: _median_by(moe[s].get("step", []), "variant", "tokens_per_s") for s in moe}
    command = (moe["new"] or moe["old"]).get("env", {}).get("command", "").split()
    n_layers = command[command.index("--layers") + 1] if "--layers" in command[:-1] else "8"
    for variant in sorted(set(steps["old"]) | set(steps["new"])):
        row(f"MoE step {variant} ({n_layers} layers, seq 2048, mbs 4), tok/s",
            steps["old"].get(variant),
            steps["new"].get(variant), "")
    layers = {s: _median_by(moe[s].get("layer", []), "variant", "ms") for s in moe}
    for variant in sorted(set(layers["old"]) | set(layers["new"])):
        row(f"MoE layer {variant}, fwd+bwd ms", layers["old"].get(variant),
            layers["new"].get(variant), "ms", higher_is_better=False)
    for key, name, unit in (("tokens_per_s", "dense 1.3B step (seq 2048, mbs 4), tok/s", ""),
                            ("mfu", "dense 1.3B step, MFU %", "%"),
                            ("peak_mem_gib", "dense 1.3B step, peak GiB", "GiB")):
        old = [r[key] for r in dense["old"].get("rows", [])]
        new = [r[key] for r in dense["new"].get("rows", [])]
        scale = 100.0 if key == "mfu" else 1.0
        row(name, old[0] * scale if old else None, new[0] * scale if new else None, unit,
            higher_is_better=key != "peak_mem_gib")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(table(sys.argv[1]), end="")
