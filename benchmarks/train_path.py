"""Forward + backward throughput of the training path against the model alone and an HF
reference, side by side in one process on one GPU (bf16).

    python benchmarks/train_path.py --json out.json                  # MoE, paper shape
    python benchmarks/train_path.py --dense --json out.json          # dense 1.3B

Shape: deepseek-coder-1.3b (24 layers), upcycled to 8 experts / top-6 (`--dense`: as is),
seq `--seq`, micro-batches `--mbs`. One forward + backward of the LM loss (and the router's
balance loss) per repetition, no optimizer step; median of `--reps` after `--warmup`, CUDA
synchronized wall time. Variants, alternated per point so ratios compare like with like:

    model        the Megatron model called directly, bf16 parameter gradients (no DDP)
    path         what training runs: Megatron DDP (fp32 main_grad buffer) and the schedule,
                 precision.grad_accum_fusion=false (the bf16 weight gradient is added to the
                 buffer by DDP's hook)
    path_fused   the same with precision.grad_accum_fusion=true (the GEMM accumulates into the
                 buffer)
    path_dense, path_fused_dense
                 path and path_fused with moe.shared_expert_impl=dense: the shared expert
                 a dense FFN on every token, off the dispatch path (MoE only)
    path_te      the training path with model.spec=te (Transformer Engine's fused norm+qkv,
                 attention, projection and dense FFN linears; its weight gradients into the
                 buffer); needs transformer-engine (scripts/gpu_te.sh)
    path_te_fp8  path_te with precision.fp8=hybrid (tensorwise scaling): FP8 GEMMs in TE's
                 linears (the experts stay bf16)
    path_te_experts, path_te_experts_fp8
                 path_te and path_te_fp8 with moe.experts_impl=te_grouped: the experts as
                 TE's grouped linears too (in FP8 with _fp8)
    reference    transformers with fp32 weights under torch.autocast(bf16), SDPA attention;
                 the MoE is this project's HF export model (xft_megatron/hf/remote), whose
                 experts run as the XFT reference's do: a loop over experts gathering their
                 tokens and scattering back with index_add (no balance loss)

MFU counts active parameters and full-square attention (xft_megatron/training/flops.py)
against the H200 bf16 dense peak (989 TFLOP/s; the H100 SXM's is the same).

`--profile` adds, per variant, a torch.profiler run of 3 more repetitions: GPU time per step
by category of work and the top operators (benchmarks/profile_breakdown.py), into the JSON and, side by
side for all variants of a micro-batch size, into the log:

    python benchmarks/train_path.py --layers 12 --variants model path reference --profile
"""

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time

import torch

from xft_megatron.config import load_config
from xft_megatron.runtime import parallel
from xft_megatron.training.flops import H200_BF16_DENSE_PEAK, flops_per_token
from xft_megatron.training.step import make_batch

MOE = ["moe.num_experts=8", "moe.topk=6"]
VARIANTS = ("model", "path", "path_fused", "path_dense", "path_fused_dense", "path_te",
            "path_te_fp8", "path_te_experts", "path_te_experts_fp8", "reference")
# the settings of the training-path variants: (grad_accum_fusion, shared_expert_impl, spec);
# grad_accum_fusion null: the spec's default (on for te)
PATHS = {"path": ("false", "pool", "local"), "path_fused": ("true", "pool", "local"),
         "path_dense": ("false", "dense", "local"),
         "path_fused_dense": ("true", "dense", "local"), "path_te": ("null", "pool", "te"),
         "path_te_fp8": ("null", "pool", "te"), "path_te_experts": ("null", "pool", "te"),
         "path_te_experts_fp8": ("null", "pool", "te")}
# and their further overrides (the experts' only for the MoE)
FP8, TE_EXPERTS = ["precision.fp8=hybrid"], ["moe.experts_impl=te_grouped"]
EXTRA = {"path_te_fp8": (FP8, []), "path_te_experts": ([], TE_EXPERTS),
         "path_te_experts_fp8": (FP8, TE_EXPERTS)}


def _config(args, mbs, variant):
    extra = [] if args.dense else list(MOE)
    if variant in PATHS:
        fuse, shared, spec = PATHS[variant]
        extra += [f"precision.grad_accum_fusion={fuse}", f"model.spec={spec}"]
        every, moe_only = EXTRA.get(variant, ([], []))
        extra += every
        if not args.dense:
            extra += moe_only + [f"moe.shared_expert_impl={shared}"]
    return load_config(None, [f"model.preset={args.preset}", "precision.dtype=bf16",
                              f"model.num_layers={args.layers}", f"train.seq_length={args.seq}",
                              f"train.micro_batch_size={mbs}", f"train.global_batch_size={mbs}",
                              "train.train_steps=100"] + extra + args.overrides)


def _timed(fn, warmup, reps):
    times = []
    for i in range(warmup + reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def _megatron(cfg, variant, batch):
    """A closure running one forward + backward of `variant` (model or one of PATHS)."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from xft_megatron.model.builder import build_model, transformer_config
    from xft_megatron.training.optimizer import wrap_ddp
    from xft_megatron.training.step import forward_backward

    parallel.initialize(cfg.parallel, seed=1)
    tc = transformer_config(cfg)
    chunks = build_model(cfg, tc)
    if variant == "model":
        model = chunks[0]
        MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1, device="cuda"))
        dev = {k: v.cuda() for k, v in batch.items()}

        def step():
            model.zero_grad(set_to_none=True)
            loss = model(dev["tokens"], dev["position_ids"], None, labels=dev["labels"])
            loss.float().mean().backward()
        return chunks, step
    chunks = wrap_ddp(chunks, tc, cfg.precision, distributed_optimizer=False)

    def step():
        for c in chunks:
            c.zero_grad_buffer()
        forward_backward(chunks, [batch], cfg.train.seq_length)
    return chunks, step


def _reference(cfg, batch, device="cuda"):
    import transformers

    from xft_megatron.arch import families
    from xft_megatron.hf import moe as hf_moe
    from xft_megatron.hf.remote import modeling_xft_moe

    m = cfg.model
    if cfg.moe.enabled:
        arch, config_class, _ = families.of(m).moe_classes()
        config = getattr(modeling_xft_moe, config_class)(**hf_moe.moe_hf_config_dict(m, cfg.moe))
        build = getattr(modeling_xft_moe, arch)
    else:
        config = transformers.AutoConfig.for_model(**families.of(m).hf_config(m))
        build = transformers.AutoModelForCausalLM.from_config
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = build(config).float().train()
    ids, labels = batch["tokens"].to(device), batch["labels"].to(device)

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16):
            logits = model(ids).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
    return [model], step


PROFILED_STEPS = 3


def run(args, mbs, variant):
    cfg = _config(args, mbs, variant)
    g = torch.Generator().manual_seed(0)
    batch = make_batch(torch.randint(0, cfg.model.vocab_size, (mbs, args.seq + 1), generator=g))
    torch.cuda.reset_peak_memory_stats()
    row = dict(variant=variant, micro_batch=mbs, seq=args.seq)
    try:
        holder, step = _reference(cfg, batch) if variant == "reference" else \
            _megatron(cfg, variant, batch)
        times = _timed(step, args.warmup, args.reps)
        if args.profile:
            from benchmarks import profile_breakdown as breakdown

            row["profile"] = breakdown.profile_steps(step, PROFILED_STEPS)
    except torch.OutOfMemoryError:
        row["error"] = "out of memory"
        holder = step = None
    else:
        t = statistics.median(times)
        tps = mbs * args.seq / t
        achieved = flops_per_token(cfg.model, args.seq, cfg.moe) * tps
        row.update(ms=t * 1e3, spread_ms=(min(times) * 1e3, max(times) * 1e3),
                   tokens_per_s=tps, mfu=achieved / H200_BF16_DENSE_PEAK,
                   peak_mem_gib=torch.cuda.max_memory_allocated() / 2 ** 30)
    del holder, step
    torch._dynamo.reset()  # compiled regions keep references to the model's modules
    gc.collect()
    torch.cuda.empty_cache()
    return row


def profile_report(rows, label: str, mbs: int) -> str:
    """The profiled variants of micro-batch size `mbs` side by side (GPU time per step by
    category of work, wall and idle time), then each one's top operators."""
    from benchmarks import profile_breakdown as breakdown

    done = [r for r in rows if r["micro_batch"] == mbs and "profile" in r]
    lines = [f"{label} GPU time by category of work", breakdown.table(
        {r["variant"]: r["profile"] for r in done}, {r["variant"]: r["ms"] for r in done})]
    for r in done:
        lines.append(f"{label} {r['variant']} top operators (ms per step, calls): " + "; ".join(
            f"{op} {ms:.1f} ({calls:g})" for op, ms, calls in r["profile"]["ops"]))
    return "\n".join(lines)


def _child(args, mbs, variant):
    """`run` in a fresh process (memory of one 7B-parameter variant is not all released in
    process, so the next would not fit)."""
    argv = ["--preset", args.preset, "--layers", str(args.layers), "--seq", str(args.seq),
            "--warmup", str(args.warmup), "--reps", str(args.reps), "--mbs", str(mbs),
            "--one", variant] + (["--dense"] if args.dense else []) + \
        (["--profile"] if args.profile else []) + args.overrides
    proc = subprocess.run([sys.executable, "-W", "ignore", __file__, *argv],
                          capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("ROW "):
            return json.loads(line[4:])
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
    return dict(variant=variant, micro_batch=mbs,
                error=f"exit {proc.returncode}: " + " | ".join(tail))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="deepseek-coder-1.3b")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--dense", action="store_true", help="the dense model (no upcycling)")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--mbs", type=int, nargs="+", default=[4])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", action="store_true",
                    help="also profile each variant: GPU time by category of work")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child: one variant
    ap.add_argument("overrides", nargs="*", help="config overrides for the Megatron variants")
    args = ap.parse_args()
    if args.one:  # run in a child process of its own: nothing of a variant outlives it
        print("ROW " + json.dumps(run(args, args.mbs[0], args.one)), flush=True)
        return
    env = dict(torch=torch.__version__, cuda=torch.version.cuda,
               device=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d"),
               command=" ".join(sys.argv), kind="dense" if args.dense else "moe")
    rows = []
    for mbs in args.mbs:
        for variant in args.variants:
            rows.append(_child(args, mbs, variant))
            r = rows[-1]
            print(f"[{env['kind']} mbs={mbs}] {variant:16s} " + (
                r["error"] if "error" in r else
                f"{r['ms']:.0f} ms, {r['tokens_per_s']:,.0f} tok/s, MFU {r['mfu']:.1%}, "
                f"peak {r['peak_mem_gib']:.1f} GiB"), flush=True)
    by = {(r["micro_batch"], r["variant"]): r for r in rows if "error" not in r}
    for mbs in args.mbs:
        ref = by.get((mbs, "reference"))
        for v in ("model", *PATHS):
            r = by.get((mbs, v))
            if r and ref:
                r["vs_reference"] = r["tokens_per_s"] / ref["tokens_per_s"]
            if r and (mbs, "model") in by:
                r["vs_model"] = r["tokens_per_s"] / by[(mbs, "model")]["tokens_per_s"]
    for r in rows:
        if "vs_reference" in r or "vs_model" in r:
            print(f"[{env['kind']} mbs={r['micro_batch']}] {r['variant']:16s} "
                  f"x{r.get('vs_reference', float('nan')):.2f} the reference, "
                  f"x{r.get('vs_model', float('nan')):.3f} the model alone")
    if args.profile:
        for mbs in args.mbs:
            print(profile_report(rows, f"[{env['kind']} mbs={mbs}]", mbs))
    print(f"env: {env}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
