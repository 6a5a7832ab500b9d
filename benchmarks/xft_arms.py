"""The XFT variants study from a real base (SmolLM2-135M-Instruct): which arm, if any, beats
dense SFT, and what the routing diagnostics say about each.

Every arm is one `xft quickstart --base` run (dense SFT and the XFT chain from the same base,
data, batches and step budget) with the arm's own flags and config overrides; `gpu.sh`
(BENCH=arms ARMS="..." SEEDS="...") runs the given arms side by side on one GPU:

    python3 benchmarks/xft_arms.py flags ARM         # the arm's extra quickstart arguments
    python3 benchmarks/xft_arms.py summarize DIR [--out FILE.md]
    python3 benchmarks/xft_arms.py curves DIR ARM_A ARM_B [--out FILE.md] [--plots DIR]

DIR holds `ARM_seedN/` run folders (their summary.json, xft_moe/summary.json). The summary
is a markdown table per arm and seed: held-out loss of the dense SFT model, the XFT MoE and
the merged model (and HumanEval pass@1 where run), then per arm the routing figures of the
MoE stage (means over MoE layers and the last 10 steps) and the verdict of `pipeline/report.py`.
`curves` compares two arms' training-loss curves step by step (e.g. `te` and `te_fp8`: bf16
against FP8 GEMMs from the same base, data and batches).
"""

import argparse
import glob
import json
import os
import statistics
import sys
from typing import Dict, List

# arm -> extra `xft quickstart` arguments (flags, then key=value overrides of every stage)
ARMS: Dict[str, List[str]] = {
    # the paper's XFT (noisy mlp gate, constant noise) next to dense SFT, both AdamW + fp32
    # master weights
    "paper": [],
    # the router's noise scale annealed linearly to zero over the first half of the tuning
    "anneal": ["moe.router_noise_anneal_steps=HALF"],
    # noise on the first step only (anneal over 1 step): clean routing from step 1 on
    "nonoise": ["moe.router_noise_anneal_steps=1"],
    # Drop-Upcycling: half of every routed expert's FFN neurons re-initialized
    "drop50": ["--drop-ratio", "0.5"],
    # the router trained 10x faster than the rest
    "routerlr10": ["train.router_lr_mult=10"],
    # both: a router that learns, without noise drowning what it learned (unit A1 showed the
    # router's clean logits barely move at the common learning rate, noise or not)
    "routerlr10_nonoise": ["train.router_lr_mult=10", "moe.router_noise_anneal_steps=1"],
    # the router drawn 15x wider (std 0.3 instead of 0.02): routing depends on the token from
    # step 1 (benchmarks/router_scale.py on SmolLM2: clean logits spread 0.47 instead of
    # 0.004, clean entropy 0.94 of the maximum), so each routed expert sees a consistent
    # share of the tokens from the start instead of a random one; with the paper's noise
    # (whose weights are drawn at the same scale: noise 0.92, 21% of routed sets kept) ...
    "wide": ["moe.router_init_std=0.3"],
    # ... and with the noise off after the first step: the routed set is the token's own
    "wide_nonoise": ["moe.router_init_std=0.3", "moe.router_noise_anneal_steps=1"],
    # the paper's XFT with Transformer Engine's layers and experts (model.spec=te,
    # moe.experts_impl=te_grouped), in bf16 and with FP8 GEMMs in all of TE's linears
    # (gpu.sh TE_SITE=/tmp/te_site, scripts/gpu_te.sh): the loss curves of bf16 and FP8
    # training from a real base side by side
    "te": ["model.spec=te", "moe.experts_impl=te_grouped"],
    "te_fp8": ["model.spec=te", "moe.experts_impl=te_grouped", "precision.fp8=hybrid"],
    # the reference's numerics for SFT and XFT alike: Adafactor, pure bf16 (no fp32 master
    # weights, round-to-nearest)
    "refnum": ["train.optimizer=adafactor", "train.distributed_optimizer=false",
               "precision.master_weights=none", "train.clip_grad=0"],
}


def flags(arm: str, steps: int) -> List[str]:
    if arm not in ARMS:
        raise SystemExit(f"unknown arm {arm!r}; arms: {', '.join(ARMS)}")
    return [a.replace("HALF", str(max(1, steps // 2))) for a in ARMS[arm]]


def _read(path: str):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _mean_sd(values: List[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} +- {statistics.stdev(values):.4f}"


def _heldout(folder: str):
    """{model: held-out loss} of a run: its summary.json, or for a run stopped after its
    evaluation step (before the report) that step's marker, eval/DONE.json."""
    s = _read(os.path.join(folder, "summary.json"))
    if s:
        return s["heldout_loss"]
    marker = _read(os.path.join(folder, "eval", "DONE.json")) or {}
    result = marker.get("result")
    return {k: v["loss"] for k, v in result.items()} if isinstance(result, dict) else None


def summarize(study: str) -> str:
    from xft_megatron.pipeline import report

    runs = {}
    for folder in sorted(glob.glob(os.path.join(study, "*_seed*"))):
        if _heldout(folder) is None:
            continue
        arm, seed = os.path.basename(folder).rsplit("_seed", 1)
        runs.setdefault(arm, {})[seed] = folder
    if not runs:
        raise SystemExit(f"no ARM_seedN/summary.json (or eval/DONE.json) under {study}")
    models = ("sft (dense)", "xft moe", "xft merged (dense)")
    lines = ["| arm | seeds | " + " | ".join(f"{m} loss" for m in models) +
             " | merged - sft | HumanEval pass@1 (sft / merged) |", "|---" * 7 + "|"]
    notes = []
    for arm, seeds in runs.items():
        per_model = {m: [] for m in models}
        deltas, he = [], []
        for seed, folder in sorted(seeds.items()):
            s = _read(os.path.join(folder, "summary.json")) or {}
            loss = _heldout(folder)
            for m in models:
                if m in loss:
                    per_model[m].append(loss[m])
            if "sft (dense)" in loss and "xft merged (dense)" in loss:
                deltas.append(loss["xft merged (dense)"] - loss["sft (dense)"])
            p = s.get("humaneval_pass@1") or {}
            if p:
                he.append(f"{p.get('sft (dense)', float('nan')):.3f} / "
                          f"{p.get('xft merged (dense)', float('nan')):.3f}")
            moe = _read(os.path.join(folder, "xft_moe", "summary.json")) or {}
            fig = report.routing_figures(moe)
            if fig:
                g0 = fig.get("shared_weight")
                notes.append(f"- {arm} seed {seed}: {report.routing_verdict(fig)}" +
                             (f" (g0 {g0:.3f})" if g0 is not None else ""))
        lines.append(f"| {arm} | {','.join(sorted(seeds))} | " +
                     " | ".join(_mean_sd(per_model[m]) for m in models) +
                     f" | {_mean_sd(deltas)} | {'; '.join(he) or '-'} |")
    return "\n".join(lines) + "\n\nRouting of each XFT MoE stage:\n\n" + "\n".join(notes) + "\n"


# the trained stages of a quickstart run: (name, folder)
STAGES = (("sft (dense)", "sft"), ("xft moe", "xft_moe"), ("xft merge", "xft_merged"))


def curves(study: str, a: str, b: str, plot_dir: str = "") -> str:
    """The training-loss curves of arms `a` and `b` over the seeds both ran (same data, batches
    and order, e.g. `te` against `te_fp8`): per stage and seed, the steps both logged, the mean
    and largest |a - b| of the LM loss at a step, the mean of a - b over the last 10 of them
    (a drift shows there), and each arm's last loss. With `plot_dir`, one PNG per stage and seed
    of both curves."""
    from xft_megatron.pipeline import report

    seeds = sorted({os.path.basename(f).rsplit("_seed", 1)[1]
                    for f in glob.glob(os.path.join(study, f"{a}_seed*"))} &
                   {os.path.basename(f).rsplit("_seed", 1)[1]
                    for f in glob.glob(os.path.join(study, f"{b}_seed*"))})
    if not seeds:
        raise SystemExit(f"no seed ran both {a} and {b} under {study} ({a}_seedN, {b}_seedN)")
    lines = [f"| stage | seed | steps | mean abs {a} - {b} | max abs | mean {a} - {b}, last 10 "
             f"| last loss {a} | last loss {b} |", "|---" * 8 + "|"]
    for name, folder in STAGES:
        for seed in seeds:
            runs = [{r["step"]: r["lm_loss"] for r in report.read_metrics(
                os.path.join(study, f"{arm}_seed{seed}", folder)) if "lm_loss" in r}
                for arm in (a, b)]
            steps = sorted(set(runs[0]) & set(runs[1]))
            if not steps:
                continue
            diff = [runs[0][t] - runs[1][t] for t in steps]
            tail = diff[-10:]
            lines.append(f"| {name} | {seed} | {len(steps)} | "
                         f"{statistics.mean(abs(d) for d in diff):.4f} | "
                         f"{max(abs(d) for d in diff):.4f} | {statistics.mean(tail):+.4f} | "
                         f"{runs[0][steps[-1]]:.4f} | {runs[1][steps[-1]]:.4f} |")
            if plot_dir:
                os.makedirs(plot_dir, exist_ok=True)
                report.plot_losses(
                    {arm: [{"step": t, "lm_loss": run[t]} for t in steps]
                     for arm, run in zip((a, b), runs)},
                    os.path.join(plot_dir, f"{a}_vs_{b}_{folder}_seed{seed}.png"))
    if len(lines) == 2:
        raise SystemExit(f"{a} and {b} logged no training step in common under {study}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("flags")
    f.add_argument("arm")
    f.add_argument("--steps", type=int, default=80)
    s = sub.add_parser("summarize")
    s.add_argument("dir")
    s.add_argument("--out")
    c = sub.add_parser("curves")
    c.add_argument("dir")
    c.add_argument("a")
    c.add_argument("b")
    c.add_argument("--out")
    c.add_argument("--plots", default="", help="folder for one PNG per stage and seed")
    args = ap.parse_args(argv)
    if args.cmd == "flags":
        print(" ".join(flags(args.arm, args.steps)))
        return 0
    text = curves(args.dir, args.a, args.b, args.plots) if args.cmd == "curves" \
        else summarize(args.dir)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
