"""Expert GEMMs on one GPU: F.grouped_mm with two weight layouts vs a per-expert loop.

    python benchmarks/expert_gemm.py
Paper shape (hidden 2048, FFN 5504, 8 experts, 8192 tokens x top-6 = 49152 rows, roughly
uniform over experts), bf16. For the fc1 projection [n, H] -> [n, 2F]: forward alone and
forward + backward, median of 20 after 5 warm-up, CUDA events. Layouts of the stacked
weights: `ENK` = [E, 2F, H] passed transposed (what GroupedExperts stores), `EKN` =
[E, H, 2F] row-major.
"""

import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def timed(fn, reps=20, warmup=5):
    times = []
    for i in range(warmup + reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(s.elapsed_time(e))
    return statistics.median(times)


def main():
    e, h, f2, n = 8, 2048, 2 * 5504, 8192 * 6
    g = torch.Generator(device="cuda").manual_seed(0)
    counts = torch.full((e,), n // e, dtype=torch.int64)
    offs = torch.cumsum(counts, 0).to(torch.int32).cuda()
    x = torch.randn(n, h, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    w_enk = (torch.randn(e, f2, h, device="cuda", generator=g) * 0.02).bfloat16()
    w_ekn = w_enk.transpose(1, 2).contiguous()
    gout = torch.randn(n, f2, device="cuda", dtype=torch.bfloat16, generator=g)
    flops = 2 * n * h * f2
    rows = {}
    variants = {
        "grouped ENK": (w_enk, lambda w: F.grouped_mm(x, w.transpose(-2, -1), offs=offs)),
        "grouped EKN": (w_ekn, lambda w: F.grouped_mm(x, w, offs=offs)),
        "loop": (w_enk, lambda w: torch.cat([F.linear(xe, w[i]) for i, xe in
                                             enumerate(x.split(counts.tolist()))])),
    }
    for name, (w0, fn) in variants.items():
        w = w0.clone().requires_grad_()
        fwd = timed(lambda: fn(w))

        def fwd_bwd():
            fn(w).backward(gout)

        fb = timed(fwd_bwd)
        rows[name] = dict(fwd_ms=fwd, fwd_tflops=flops / fwd / 1e9, fwd_bwd_ms=fb,
                          fwd_bwd_tflops=3 * flops / fb / 1e9)
        r = rows[name]
        print(f"{name:12s} fwd {fwd:.2f} ms ({r['fwd_tflops']:.0f} TFLOP/s)  fwd+bwd {fb:.2f} "
              f"ms ({r['fwd_bwd_tflops']:.0f} TFLOP/s)", flush=True)
    env = dict(torch=torch.__version__, device=torch.cuda.get_device_name(),
               date=time.strftime("%Y-%m-%d"), command=" ".join(sys.argv))
    print("env:", env)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as fh:
            json.dump({"env": env, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
