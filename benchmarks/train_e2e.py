"""The XFT MoE stage end to end through `xft train` (real loop, real data pipeline) on GPUs.

    torchrun --nproc-per-node N benchmarks/train_e2e.py --out DIR [--layers 12] [--steps 12]
        [key=value ...]

deepseek-coder-1.3b shape upcycled to 8 experts / top-6 (random weights: throughput does not
depend on them), bf16, seq 1024, Magicoder-style instruction records (synthetic, written here:
instructions and responses cut from the Python standard library's source), packed. Reports
the median over the steps after `--warmup`: tokens/s/GPU, MFU (active parameters), step time,
the share of the step spent fetching and packing the batch, and peak memory.
"""

import argparse
import json
import os
import random
import statistics
import sys
import sysconfig

import torch.distributed as dist


def write_records(path: str, n: int, seed: int = 0) -> None:
    root = os.path.join(sysconfig.get_paths()["stdlib"])
    files = sorted(f for f in os.listdir(root) if f.endswith(".py"))[:200]
    text = "".join(open(os.path.join(root, f), encoding="utf-8", errors="replace").read()
                   for f in files)
    rng = random.Random(seed)
    with open(path + ".tmp", "w") as f:
        for _ in range(n):
            a = rng.randrange(0, len(text) - 4000)
            instr = text[a:a + rng.randint(100, 300)]
            b = rng.randrange(0, len(text) - 4000)
            resp = text[b:b + rng.randint(200, 500)]
            f.write(json.dumps({"instruction": instr, "response": resp}) + "\n")
    os.replace(path + ".tmp", path)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--records", type=int, default=20000)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    from xft_megatron.training import run

    rank = int(os.environ.get("RANK", "0"))
    data = os.path.join(args.out, "records.jsonl")
    if rank == 0 and not os.path.exists(data):
        os.makedirs(args.out, exist_ok=True)
        write_records(data, args.records)
    overrides = ["model.preset=deepseek-coder-1.3b", f"model.num_layers={args.layers}",
                 "moe.num_experts=8", "moe.topk=6", "train.stage=moe",
                 "precision.dtype=bf16", "train.seq_length=1024", "train.micro_batch_size=4",
                 "train.global_batch_size=64", f"train.train_steps={args.steps}",
                 "train.lr=5e-5", "train.lr_warmup_steps=1", "moe.balance_coeff=0.01",
                 f"data.path={data}", f"checkpoint.save={args.out}/ckpt",
                 "data.template=magicoder", "checkpoint.final=false"] + args.overrides
    result = run.main(None, overrides, progress=False)
    if dist.get_rank() != 0:
        return
    world = dist.get_world_size()
    rows = [json.loads(x) for x in open(os.path.join(args.out, "ckpt", "metrics.jsonl"))]
    rows = rows[args.warmup:]
    med = lambda k: statistics.median(r[k] for r in rows)  # noqa: E731
    report = {
        "world_size": world, "layers": args.layers, "overrides": args.overrides,
        "tokens_per_s_per_gpu": med("tokens_per_s") / world, "mfu": med("mfu"),
        "step_s": med("step_s"), "data_fraction": med("data_s") / med("step_s"),
        "peak_memory_gib": max(r["memory_gib"] for r in rows),
        "final_loss": result.losses[-1], "steps_measured": len(rows),
    }
    print(json.dumps(report, indent=1))
    with open(os.path.join(args.out, "train_e2e.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
