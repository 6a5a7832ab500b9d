"""One point of a scaling study, run under torchrun by `benchmarks/scaling.py`:

    torchrun --nproc-per-node N -m benchmarks.scaling_point --point POINT.json --out RESULT.json

POINT.json holds `config` (a config in the `xft train` schema, already validated by the
driver) and `warmup`, `steps`, `breakdown_steps`, `data_files`. The model is built and trained
exactly as `xft train` does it (Megatron DDP, distributed optimizer, the same `train_step`),
on real text: the UTF-8 bytes of the first `data_files` standard-library files, cut into
windows (`WindowBatches`; the batch of each step is prepared before its timer starts). Three phases:
  warm-up      `warmup` steps, not timed (compilation, allocator, communicator set-up)
  timed        `steps` steps, each between two device synchronizations, nothing else
               instrumented: the step times, tokens/s and MFU come from these
  breakdown    `breakdown_steps` steps with the part timers of `benchmarks/step_timers.py`
               installed (CUDA events, read after each step); their mean per part and the
               mean of their step time are reported apart from the timed steps
Rank 0 writes RESULT.json; peak memory is the largest over the ranks (GPU: bytes allocated by
torch; CPU: peak resident set of the process).
"""

import argparse
import json
import os
import resource
import statistics
import sys
import time
from typing import Iterator, List

import torch
import torch.distributed as dist

from benchmarks.step_timers import StepTimers, synchronize
from xft_megatron.config import Config
from xft_megatron.data.code_corpus import python_files, read_regular, stdlib_dir
from xft_megatron.errors import UsageError
from xft_megatron.model.builder import build_model, transformer_config
from xft_megatron.runtime import compat, parallel
from xft_megatron.training.optimizer import build_optimizer, build_scheduler, wrap_ddp
from xft_megatron.training.step import make_batch, split_global_batch, train_step


def byte_tokens(files: List[str]) -> torch.Tensor:
    """Concatenated UTF-8 bytes of `files` as int64 token ids (files joined by a newline;
    ids 0..255, which any vocabulary of >= 256 entries covers)."""
    chunks = []
    for path in files:
        chunks.append(read_regular(path) + b"\n")
    data = b"".join(chunks)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)


class WindowBatches:
    """Global batches of `batch` windows of `seq + 1` tokens from a token stream, in an order
    fixed by `seed`; step `i` always yields the same batch (resumable, layout-independent)."""

    def __init__(self, tokens: torch.Tensor, seq: int, batch: int, seed: int):
        if tokens.numel() < seq + 2:
            raise UsageError(f"corpus has {tokens.numel()} tokens, fewer than one window of "
                             f"{seq + 1}")
        self.tokens, self.seq, self.batch, self.seed = tokens, seq, batch, seed
        self.num_windows = (tokens.numel() - 1) // seq

    def __getitem__(self, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, self.num_windows, (self.batch,), generator=g) * self.seq
        return torch.stack([self.tokens[s:s + self.seq + 1] for s in starts.tolist()])

    def __iter__(self) -> Iterator[torch.Tensor]:
        step = 0
        while True:
            yield self[step]
            step += 1


def build(cfg: Config):
    """(chunks, optimizer, scheduler) as the training loop builds them."""
    tc = transformer_config(cfg)
    chunks = wrap_ddp(build_model(cfg, tc), tc, cfg.precision)
    optimizer = build_optimizer(chunks, cfg.train, cfg.precision)
    return chunks, optimizer, build_scheduler(optimizer, cfg.train)


def text_batches(cfg: Config, files: int) -> WindowBatches:
    tokens = byte_tokens(python_files(stdlib_dir(), limit=files))
    t = cfg.train
    return WindowBatches(tokens, t.seq_length, t.global_batch_size, t.seed)


def cpu_matmul_peak(n: int = 1024, reps: int = 5) -> float:
    """FLOP/s of an fp32 n x n matmul in this process (its threads), best of `reps`."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def largest_over_ranks(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=compat.device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


class Trainer:
    """The model, optimizer and data of the point; `step(i)` runs training step i."""

    def __init__(self, cfg: Config, files: int):
        self.cfg = cfg
        self.chunks, self.optimizer, self.scheduler = build(cfg)
        self.data = text_batches(cfg, files)

    def step(self, i: int, timers: StepTimers = None) -> dict:
        t = self.cfg.train
        micro = split_global_batch(make_batch(self.data[i]), t.micro_batch_size)
        if timers is not None:
            timers.reset()
        synchronize()
        start = time.perf_counter()
        stats = train_step(self.chunks, self.optimizer, self.scheduler, micro, t.seq_length,
                           t.clip_grad)
        synchronize()
        stats["step_s"] = time.perf_counter() - start
        if timers is not None:
            stats["parts"] = timers.totals_s()
        return stats


def run(spec: dict) -> dict:
    cfg = Config.from_dict(spec["config"])
    parallel.initialize(cfg.parallel, seed=cfg.train.seed)
    dist.barrier()
    cpu_peak = None if compat.has_cuda() else cpu_matmul_peak()  # all ranks at once
    trainer = Trainer(cfg, spec["data_files"])
    warmup, steps, extra = spec["warmup"], spec["steps"], spec["breakdown_steps"]
    losses, times = [], []
    for i in range(warmup + steps):
        stats = trainer.step(i)
        losses.append(stats["loss"])
        if i >= warmup:
            times.append(stats["step_s"])
    parts, breakdown_times = [], []
    with StepTimers(trainer.chunks, trainer.optimizer) as timers:
        for i in range(warmup + steps, warmup + steps + extra):
            stats = trainer.step(i, timers)
            losses.append(stats["loss"])
            parts.append(stats["parts"])
            breakdown_times.append(stats["step_s"])
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return {
        "step_s": statistics.median(times), "step_s_min": min(times),
        "step_s_max": max(times), "steps_timed": len(times),
        "breakdown_step_s": mean(breakdown_times), "breakdown_steps": len(breakdown_times),
        **{f"{k}_s": mean([p[k] for p in parts]) for k in (parts[0] if parts else {})},
        "loss_first": losses[0], "loss_last": losses[-1],
        "peak_mem_gib": largest_over_ranks(peak_memory_gib()),
        "device": torch.cuda.get_device_name() if compat.has_cuda() else "cpu",
        "cpu_matmul_flops": cpu_peak, "world_size": dist.get_world_size(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--point", required=True, help="point JSON written by benchmarks/scaling.py")
    p.add_argument("--out", required=True, help="result JSON (written by rank 0)")
    args = p.parse_args(argv)
    with open(args.point) as f:
        spec = json.load(f)
    result = run(spec)
    if dist.get_rank() == 0:
        with open(args.out + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(args.out + ".tmp", args.out)
    parallel.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
