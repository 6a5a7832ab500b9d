"""Summarize the XFT-vs-SFT study from a real base (`BENCH=real-study scripts/gpu.sh`).

    python3 benchmarks/real_study.py STUDY_DIR [--out FILE.md]

STUDY_DIR holds one `xft quickstart --base ...` run per seed (`seed*/`). Printed as markdown:
per seed and mean +- sd (sample sd over seeds) of the held-out loss and HumanEval pass@1 of
every model; stage times; the command of each run; and whether the MoE's experts moved apart
in training: per MoE layer, the relative distance of each routed expert from the shared one
(||E_i - E_0|| / ||E_0|| over fc1 and fc2; 0 right after upcycling, where all are copies) and
the entropy of the routed-expert load in the last training step (metrics.jsonl; its maximum,
ln(N-1), means uniform routing).
"""

import argparse
import glob
import json
import math
import os
import statistics
from typing import Dict, List


def _mean_sd(values: List[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.4f}" if values else "-"
    return f"{statistics.mean(values):.4f} +- {statistics.stdev(values):.4f}"


def expert_distance(ckpt_dir: str) -> Dict[int, float]:
    """Layer -> mean over routed experts of ||E_i - E_0|| / ||E_0|| (fc1 and fc2 together)."""
    import torch

    from xft_megatron.checkpoint import dist as ckpt
    from xft_megatron.checkpoint import stream

    cfg = ckpt.load_config(ckpt_dir, parallel={})
    stream.initialize_single_rank_layout()
    layout = stream.layout_of(cfg)
    reader = stream.Reader(ckpt_dir, layout)
    names = layout.groups()
    out = {}
    for layer in range(cfg.model.num_layers):
        if not cfg.moe.is_moe_layer(layer):
            continue
        group = reader.read(names[layer])
        fc1 = next(v for k, v in group.items() if k.endswith("mlp.experts.fc1_weight"))
        fc2 = next(v for k, v in group.items() if k.endswith("mlp.experts.fc2_weight"))
        w = torch.cat([fc1.flatten(1), fc2.flatten(1)], 1).double()  # [N, params]
        shared = w[0]
        out[layer] = ((w[1:] - shared).norm(dim=1) / shared.norm()).mean().item()
    return out


def load_entropy(stage_dir: str, shared: bool = True) -> float:
    """Mean over MoE layers of the entropy (nats) of the routed-expert load, last step
    (`shared`: expert 0 is the shared expert, left out)."""
    path = os.path.join(stage_dir, "metrics.jsonl")
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    loads = rows[-1].get("expert_load") or []
    ents = []
    for row in loads:
        routed = [v for v in (row[1:] if shared else row) if v > 0]
        total = sum(routed)
        if total:  # dense layers report no load
            ents.append(-sum(v / total * math.log(v / total) for v in routed))
    return statistics.mean(ents) if ents else float("nan")


def summarize(study: str, divergence: bool = True) -> str:
    runs = {}
    for path in sorted(glob.glob(os.path.join(study, "seed*", "summary.json"))):
        with open(path) as f:
            runs[os.path.basename(os.path.dirname(path))] = json.load(f)
    if not runs:
        raise SystemExit(f"no seed*/summary.json under {study}")
    models = list(next(iter(runs.values()))["heldout_loss"])
    lines = ["| model | " + " | ".join(f"{s} loss" for s in runs) + " | mean +- sd loss | " +
             " | ".join(f"{s} pass@1" for s in runs) + " | mean +- sd pass@1 |",
             "|---" * (2 * len(runs) + 3) + "|"]
    for m in models:
        losses = [r["heldout_loss"][m] for r in runs.values()]
        scores = [r.get("humaneval_pass@1", {}).get(m) for r in runs.values()]
        scores = [s for s in scores if s is not None]
        lines.append(f"| {m} | " + " | ".join(f"{v:.4f}" for v in losses) +
                     f" | {_mean_sd(losses)} | " + " | ".join(f"{v:.4f}" for v in scores) +
                     f" | {_mean_sd(scores)} |")
    out = ["Held-out loss and HumanEval pass@1 (greedy, magicoder protocol) per seed:", "",
           *lines, ""]
    for seed, r in runs.items():
        out.append(f"- {seed}: `{r['command']}`; stage seconds " +
                   ", ".join(f"{k} {v:.0f}" for k, v in r["stage_seconds"].items()) +
                   f"; total {r['seconds']:.0f} s; {r['data']['train_records']} train / "
                   f"{r['data']['heldout_records']} held-out records")
    if divergence:
        out += ["", "Expert divergence after MoE tuning (mean relative distance of the routed "
                "experts from the shared one, per MoE layer; load entropy of the last step):", ""]
        for seed in runs:
            for stage in ("xft_moe", "vanilla_moe"):
                d = os.path.join(study, seed, stage)
                if not os.path.isdir(d):
                    continue
                dist = expert_distance(d)
                vals = list(dist.values())
                out.append(f"- {seed} {stage}: distance mean {statistics.mean(vals):.2e}, "
                           f"max {max(vals):.2e} (layer {max(dist, key=dist.get)}); load "
                           f"entropy {load_entropy(d, shared=stage != 'vanilla_moe'):.4f}")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("study")
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-divergence", action="store_true")
    args = ap.parse_args()
    text = summarize(args.study, divergence=not args.no_divergence)
    print(text, end="")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
