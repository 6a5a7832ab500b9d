"""Kernel-level profile of dense training steps on one GPU (what the step time is made of).

    python benchmarks/profile_step.py --seq 2048 --mbs 4 --accum 2
Prints the top CUDA kernels by total time and the GPU time per step by category of work
(benchmarks/profile_breakdown.py).
"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import profile_breakdown as breakdown
from benchmarks.dense_step import build_point_for_profile


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="deepseek-coder-1.3b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--mbs", type=int, default=4)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--rows", type=int, default=30)
    args = ap.parse_args()
    step = build_point_for_profile(args.preset, args.seq, args.mbs, args.accum)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.rows,
                                    max_name_column_width=70))
    print(breakdown.table({args.preset: breakdown.breakdown(prof, 2)}))


if __name__ == "__main__":
    main()
