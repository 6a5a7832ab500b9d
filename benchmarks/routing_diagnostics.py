"""The cost of the routing diagnostics (`moe.diagnostics`, on by default): the same XFT MoE
training run with them on and off, alternating in this one process, median step time; and
the time of one expert-divergence computation (run at every checkpoint and at the end).

    python benchmarks/routing_diagnostics.py                      # CPU: the tiny preset
    python benchmarks/routing_diagnostics.py --model model.preset=deepseek-coder-1.3b \
        model.num_layers=4 precision.dtype=bf16 --seq 1024 --mbs 4 --gbs 8   # one GPU
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

from xft_megatron.config import load_config
from xft_megatron.model.builder import build_model, transformer_config
from xft_megatron.model.moe.divergence import expert_divergence
from xft_megatron.runtime import parallel
from xft_megatron.training.loop import train


class RandomTokens:
    def __init__(self, cfg):
        self.cfg = cfg

    def __getitem__(self, step):
        t = self.cfg.train
        g = torch.Generator().manual_seed(step)
        return torch.randint(0, self.cfg.model.vocab_size, (t.global_batch_size,
                                                            t.seq_length + 1), generator=g)


def step_times(overrides, root):
    cfg = load_config(None, overrides + [f"checkpoint.save={root}", "checkpoint.final=false"])
    train(cfg, RandomTokens(cfg), progress=False, log_dir=root)
    with open(os.path.join(root, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r["step_s"] for r in rows[2:-1]]  # warm-up and the last (divergence) step out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", nargs="*", default=["model.preset=tiny"])
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--mbs", type=int, default=4)
    ap.add_argument("--gbs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    base = args.model + ["moe.num_experts=8", "moe.topk=6", f"train.seq_length={args.seq}",
                         f"train.micro_batch_size={args.mbs}",
                         f"train.global_batch_size={args.gbs}",
                         f"train.train_steps={args.steps}", "train.lr_decay_style=constant"]
    times = {"on": [], "off": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for mode in ("off", "on"):
                times[mode] += step_times(base + [f"moe.diagnostics={mode == 'on'}"],
                                          os.path.join(tmp, f"{mode}{r}"))
    cfg = load_config(None, base)
    parallel.initialize(cfg.parallel, seed=1)
    chunks = build_model(cfg, transformer_config(cfg))
    div = []
    for _ in range(3):
        t0 = time.perf_counter()
        expert_divergence(chunks, cfg.model.num_layers, cfg.moe.num_experts)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        div.append(time.perf_counter() - t0)
    on, off = statistics.median(times["on"]), statistics.median(times["off"])
    result = {"overrides": base, "device": torch.cuda.get_device_name()
              if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
              "step_s_off": off, "step_s_on": on, "overhead": on / off - 1,
              "steps_each": len(times["on"]), "divergence_s": statistics.median(div)}
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
