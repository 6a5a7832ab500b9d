"""Dense training-step throughput and MFU on one GPU (bf16, no transformer-engine).

    python benchmarks/dense_step.py --preset deepseek-coder-1.3b --points 2048:4 4096:2
Each point SEQ:MBS runs `--warmup` + `--steps` optimizer steps with `--accum` microbatches
each and reports the median step time, tokens/s and MFU (formula in xft_megatron/training/
flops.py). Also measures the bf16 matmul ceiling of the card in the same run.
"""

import argparse
import gc
import json
import statistics
import sys
import time

import torch

from xft_megatron.config import load_config
from xft_megatron.model.builder import build_model, count_parameters, transformer_config
from xft_megatron.runtime import parallel
from xft_megatron.training.flops import H200_BF16_DENSE_PEAK, flops_per_token
from xft_megatron.training.optimizer import build_optimizer, build_scheduler, wrap_ddp
from xft_megatron.training.step import make_batch, split_global_batch, train_step


def matmul_ceiling(n=8192, reps=20) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return 2 * n ** 3 / statistics.median(times)


def _setup(preset, seq, mbs, accum, steps, extra):
    cfg = load_config(None, [f"model.preset={preset}", "precision.dtype=bf16",
                             f"train.seq_length={seq}", f"train.micro_batch_size={mbs}",
                             f"train.global_batch_size={mbs * accum}",
                             f"train.train_steps={steps}", "train.lr=1e-4"] + extra)
    parallel.initialize(cfg.parallel, seed=1)
    tc = transformer_config(cfg)
    chunks = build_model(cfg, tc)
    params = count_parameters(chunks)
    chunks = wrap_ddp(chunks, tc, cfg.precision)
    opt = build_optimizer(chunks, cfg.train, cfg.precision)
    sched = build_scheduler(opt, cfg.train)
    return cfg, chunks, opt, sched, params


def build_point_for_profile(preset, seq, mbs, accum, extra=()):
    """A closure running one training step (for benchmarks/profile_step.py)."""
    cfg, chunks, opt, sched, _ = _setup(preset, seq, mbs, accum, 100, list(extra))
    toks = torch.randint(0, cfg.model.vocab_size, (mbs * accum, seq + 1))
    mb = split_global_batch(make_batch(toks), mbs)
    return lambda: train_step(chunks, opt, sched, mb, seq, cfg.train.clip_grad)


def run_point(preset, seq, mbs, accum, steps, warmup, extra):
    cfg, chunks, opt, sched, params = _setup(preset, seq, mbs, accum, steps + warmup, extra)
    g = torch.Generator().manual_seed(0)
    times, losses = [], []
    for step in range(warmup + steps):
        toks = torch.randint(0, cfg.model.vocab_size, (mbs * accum, seq + 1), generator=g)
        mb = split_global_batch(make_batch(toks), mbs)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        stats = train_step(chunks, opt, sched, mb, seq, cfg.train.clip_grad)
        torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
        losses.append(stats["loss"])
    step_s = statistics.median(times)
    tokens_per_s = mbs * accum * seq / step_s
    achieved = flops_per_token(cfg.model, seq, cfg.moe) * tokens_per_s
    result = dict(preset=preset, seq=seq, micro_batch=mbs, accum=accum, params=params,
                  step_s=step_s, step_s_spread=(min(times), max(times)),
                  tokens_per_s=tokens_per_s, tflops=achieved / 1e12,
                  mfu=achieved / H200_BF16_DENSE_PEAK,
                  peak_mem_gib=torch.cuda.max_memory_allocated() / 2 ** 30,
                  loss_first=losses[0], loss_last=losses[-1],
                  overrides=list(extra))
    del chunks, opt, sched
    torch._dynamo.reset()  # compiled regions keep references to the model's modules
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="deepseek-coder-1.3b")
    ap.add_argument("--points", nargs="+", default=["2048:4"], help="SEQ:MICRO_BATCH")
    ap.add_argument("--accum", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    ceiling = matmul_ceiling()
    env = dict(torch=torch.__version__, cuda=torch.version.cuda,
               device=torch.cuda.get_device_name(), matmul_tflops=ceiling / 1e12,
               date=time.strftime("%Y-%m-%d"), command=" ".join(sys.argv))
    rows = []
    for point in args.points:
        seq, mbs = (int(x) for x in point.split(":"))
        rows.append(run_point(args.preset, seq, mbs, args.accum, args.steps, args.warmup,
                              args.overrides))
        r = rows[-1]
        print(f"seq={seq} mbs={mbs} accum={args.accum}: {r['step_s'] * 1e3:.0f} ms/step, "
              f"{r['tokens_per_s']:.0f} tok/s, {r['tflops']:.0f} TFLOP/s, MFU {r['mfu']:.1%}, "
              f"mem {r['peak_mem_gib']:.1f} GiB, loss {r['loss_first']:.3f}->"
              f"{r['loss_last']:.3f}", flush=True)
    print(f"env: {env}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
