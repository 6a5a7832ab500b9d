"""XFT MoE on one GPU (bf16): one MoE layer, and full training steps, side by side.

    python benchmarks/moe_step.py --layers 12 --points 2048:4

1. One MoE layer (forward + backward) at the paper shape (hidden 2048, FFN 5504, 8 experts,
   top-6): XFT vs `vanilla` top-k (same number of active experts), grouped GEMM vs Megatron's
   SequentialMLP. Median of `--reps` after warmup, CUDA events.
2. Full training steps of deepseek-coder-1.3b upcycled to 8 experts / top-6 (layers reduced
   to `--layers` to fit one card with Adam state): tokens/s and MFU counting ACTIVE parameters
   (xft_megatron/training/flops.py), for xft/grouped, vanilla/grouped, xft/sequential.
All variants run in this one process, alternating, so ratios compare like with like.
"""

import argparse
import json
import statistics
import sys
import time

import torch
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

from benchmarks.dense_step import matmul_ceiling, run_point
from xft_megatron.config import load_config
from xft_megatron.model.builder import transformer_config
from xft_megatron.model.spec import moe_mlp_spec
from xft_megatron.runtime import parallel

MOE = ["moe.num_experts=8", "moe.topk=6"]
VARIANTS = {
    "xft/grouped": ["moe.mode=xft", "moe.experts_impl=grouped"],
    "vanilla/grouped": ["moe.mode=vanilla", "moe.experts_impl=grouped"],
    "xft/sequential": ["moe.mode=xft", "moe.experts_impl=sequential"],
    "vanilla/sequential": ["moe.mode=vanilla", "moe.experts_impl=sequential"],
}


def layer_point(variant, tokens, reps, warmup):
    cfg = load_config(None, ["model.preset=deepseek-coder-1.3b", "precision.dtype=bf16",
                             "moe.balance_loss=cv"] + MOE + VARIANTS[variant])
    parallel.initialize(cfg.parallel, seed=1)
    tc = transformer_config(cfg)
    layer = moe_mlp_spec(cfg.moe)(config=tc, layer_number=1).cuda().bfloat16()
    layer.train()
    # what the training schedules do before each backward (router losses count once)
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1, device="cuda"))
    x = torch.randn(tokens, 1, cfg.model.hidden_size, device="cuda", dtype=torch.bfloat16,
                    requires_grad=True)
    times = []
    for i in range(warmup + reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        out, _ = layer(x)
        out.float().square().mean().backward()
        e.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(s.elapsed_time(e) / 1e3)
    h, f, k = cfg.model.hidden_size, cfg.model.ffn_hidden_size, cfg.moe.topk
    flops = 6 * tokens * k * 3 * h * f  # expert GEMMs, forward + backward
    t = statistics.median(times)
    del layer, x
    torch.cuda.empty_cache()
    return dict(variant=variant, tokens=tokens, ms=t * 1e3, expert_tflops=flops / t / 1e12)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--points", nargs="+", default=["2048:4"], help="SEQ:MICRO_BATCH")
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--json", default=None)
    ap.add_argument("overrides", nargs="*", help="config overrides for the training steps")
    args = ap.parse_args()
    env = dict(torch=torch.__version__, cuda=torch.version.cuda,
               device=torch.cuda.get_device_name(), matmul_tflops=matmul_ceiling() / 1e12,
               date=time.strftime("%Y-%m-%d"), command=" ".join(sys.argv))
    layer_rows = []
    for _ in range(2):  # two alternating rounds
        for v in VARIANTS:
            layer_rows.append(layer_point(v, args.tokens, args.reps, 5))
            r = layer_rows[-1]
            print(f"[layer] {v:20s} {r['ms']:.2f} ms  experts {r['expert_tflops']:.0f} TFLOP/s",
                  flush=True)
    step_rows = []
    for point in args.points:
        seq, mbs = (int(x) for x in point.split(":"))
        # a 5th run does not fit: memory of earlier runs is not all released (RESULTS.md)
        for v in ("xft/grouped", "vanilla/grouped", "xft/sequential", "xft/grouped"):
            extra = MOE + VARIANTS[v] + [f"model.num_layers={args.layers}"] + args.overrides
            r = run_point("deepseek-coder-1.3b", seq, mbs, args.accum, args.steps,
                          args.warmup, extra)
            r["variant"] = v
            step_rows.append(r)
            print(f"[step] {v:18s} seq={seq} mbs={mbs}: {r['step_s'] * 1e3:.0f} ms/step, "
                  f"{r['tokens_per_s']:.0f} tok/s, MFU(active) {r['mfu']:.1%}, "
                  f"params {r['params'] / 1e9:.2f}B, mem {r['peak_mem_gib']:.1f} GiB, "
                  f"loss {r['loss_first']:.3f}->{r['loss_last']:.3f}", flush=True)
    print(f"env: {env}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "layer": layer_rows, "step": step_rows}, f, indent=1)


if __name__ == "__main__":
    main()
