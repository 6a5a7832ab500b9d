"""Profile of one XFT MoE layer (forward + backward) on one GPU: what the layer time is made
of beyond the expert GEMMs.

    python benchmarks/profile_moe.py [--tokens 8192] [--variant xft/grouped]
Prints wall time per iteration, GPU-busy time, the top CUDA kernels and top CPU-side ops
(host time shows synchronizations and launch overhead), and the GPU time by category of work
(benchmarks/profile_breakdown.py).
"""

import argparse
import time

import torch
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from torch.profiler import ProfilerActivity, profile

from benchmarks import profile_breakdown as breakdown
from benchmarks.moe_step import MOE, VARIANTS
from xft_megatron.config import load_config
from xft_megatron.model.builder import transformer_config
from xft_megatron.model.spec import moe_mlp_spec
from xft_megatron.runtime import parallel


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--variant", default="xft/grouped", choices=sorted(VARIANTS))
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(None, ["model.preset=deepseek-coder-1.3b", "precision.dtype=bf16"]
                      + MOE + VARIANTS[args.variant] + args.overrides)
    parallel.initialize(cfg.parallel, seed=1)
    layer = moe_mlp_spec(cfg.moe)(config=transformer_config(cfg), layer_number=1)
    layer.train()
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1, device="cuda"))
    x = torch.randn(args.tokens, 1, cfg.model.hidden_size, device="cuda",
                    dtype=torch.bfloat16, requires_grad=True)

    def step():
        out, _ = layer(x)
        out.float().square().mean().backward()

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / 10
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    busy = sum(e.self_device_time_total for e in prof.key_averages()
               if e.device_type.name == "CUDA") / 3 / 1e3
    print(f"{args.variant} {args.overrides}: wall {wall * 1e3:.2f} ms/iter, GPU busy "
          f"{busy:.2f} ms/iter")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.rows,
                                    max_name_column_width=60))
    print(breakdown.table({args.variant: breakdown.breakdown(prof, 3)}, {args.variant: wall * 1e3}))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15,
                                    max_name_column_width=60))


if __name__ == "__main__":
    main()
