"""`xft quickstart`: the dense model end to end on the CPU with built-in data.

Builds the `tiny` preset, pretrains it on the Python standard library's source (byte tokens),
saves a distributed checkpoint, reloads it into a fresh model and reports held-out loss before
and after training. (The full XFT pipeline is layered on top of this run.)
"""

import os
import time

from xft_megatron.config import CheckpointConfig, load_config
from xft_megatron.data.code_corpus import WindowBatches, byte_tokens, python_files, \
    split_by_file, stdlib_dir

DEFAULTS = ["model.preset=tiny", "train.seq_length=128", "train.micro_batch_size=8",
            "train.global_batch_size=16", "train.train_steps=60", "train.lr=3e-3",
            "train.min_lr=3e-4"]


def say(*args):
    """Print once per job (rank 0), however many processes run it."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)


def run(out_dir: str, steps: int = 60, max_files: int = 400, overrides=()) -> dict:
    from xft_megatron.eval.loss import mean_loss as evaluate
    from xft_megatron.training.loop import train

    warmup = f"train.lr_warmup_steps={max(1, steps // 10)}"  # 10% of the steps
    cfg = load_config(None, DEFAULTS + [f"train.train_steps={steps}", warmup] + list(overrides))
    t0 = time.perf_counter()
    files = python_files(stdlib_dir(), limit=max_files)
    train_files, held_files = split_by_file(files)
    train_data = WindowBatches(byte_tokens(train_files), cfg.train.seq_length,
                               cfg.train.global_batch_size, cfg.train.seed)
    held = WindowBatches(byte_tokens(held_files), cfg.train.seq_length,
                         cfg.train.global_batch_size, cfg.train.seed + 1)
    held_batches = [held[i] for i in range(4)]
    say(f"corpus: {len(train_files)} train files, {len(held_files)} held-out files "
          f"(python stdlib, {stdlib_dir()})")

    # the untrained model, for reference: save step 0, evaluate it
    init_ckpt = os.path.join(out_dir, "init")
    from xft_megatron import parallel
    from xft_megatron.checkpoint import dist as ckpt
    from xft_megatron.model.builder import build_model

    parallel.initialize(cfg.parallel, seed=cfg.train.seed)
    ckpt.save(build_model(cfg), init_ckpt, 0, cfg)
    loss_init = evaluate(cfg, init_ckpt, held_batches)

    cfg = cfg.replace(checkpoint=CheckpointConfig(load=init_ckpt,
                                                  save=os.path.join(out_dir, "pretrain")))
    result = train(cfg, train_data)
    loss_reloaded = evaluate(cfg, result.checkpoint, held_batches)
    summary = {
        "parameters": cfg.model.num_parameters(),
        "steps": steps,
        "train_loss_first": result.losses[0],
        "train_loss_last": result.losses[-1],
        "heldout_loss_init": loss_init,
        "heldout_loss_trained": loss_reloaded,
        "tokens_per_s": result.tokens_per_s,
        "checkpoint": result.checkpoint,
        "seconds": time.perf_counter() - t0,
    }
    say(f"\nmodel: tiny preset, {summary['parameters']:,} parameters")
    say(f"train loss      {summary['train_loss_first']:.4f} -> {summary['train_loss_last']:.4f}"
          f"  ({steps} steps, {summary['tokens_per_s']:.0f} tokens/s)")
    say(f"held-out loss   {loss_init:.4f} (init) -> {loss_reloaded:.4f} "
          f"(trained, reloaded from {result.checkpoint})")
    say(f"total {summary['seconds']:.1f}s")
    return summary

