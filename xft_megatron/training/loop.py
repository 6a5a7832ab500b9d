"""A plain LM training run: build, train N steps, save. The entry point stays short; the
pieces live in builder, optimizer, step and checkpoint."""

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
from tqdm import tqdm

from xft_megatron import parallel
from xft_megatron.checkpoint import dist as ckpt
from xft_megatron.config import Config
from xft_megatron.model.builder import build_model, count_parameters, transformer_config
from xft_megatron.training.optimizer import build_optimizer, build_scheduler, wrap_ddp
from xft_megatron.moe.merge_mlp import gather_coefficients
from xft_megatron.training.step import forward_backward, make_batch, split_global_batch, \
    train_step


@dataclass
class RunResult:
    losses: List[float] = field(default_factory=list)
    checkpoint: Optional[str] = None
    tokens_per_s: float = 0.0
    parameters: int = 0
    moe_losses: List[float] = field(default_factory=list)  # router losses per step (MoE)
    merge_coefficients: Dict[int, List[float]] = field(default_factory=dict)  # merge stage


def train(cfg: Config, batches: Callable[[int], torch.Tensor], save_dir: Optional[str] = None,
          load_dir: Optional[str] = None, progress: bool = True) -> RunResult:
    """Train `cfg.train.train_steps` steps on `batches(step) -> [global_batch, seq+1]`."""
    info = parallel.initialize(cfg.parallel, seed=cfg.train.seed)
    tc = transformer_config(cfg)
    chunks = build_model(cfg, tc)
    if load_dir:  # the merge stage starts from an MoE checkpoint: alphas start uniform
        ckpt.load(chunks, load_dir, may_lack=("mlp.alpha",) if cfg.moe.stage == "merge" else ())
    result = RunResult(parameters=count_parameters(chunks))
    chunks = wrap_ddp(chunks, tc, cfg.precision)
    optimizer = build_optimizer(chunks, cfg.train, cfg.precision)
    scheduler = build_scheduler(optimizer, cfg.train)
    t = cfg.train
    bar = tqdm(range(t.train_steps), desc="train", disable=not progress or info.rank != 0)
    start = time.perf_counter()
    for step in bar:
        mbs = split_global_batch(make_batch(batches(step)), t.micro_batch_size)
        stats = train_step(chunks, optimizer, scheduler, mbs, t.seq_length)
        result.losses.append(stats["loss"])
        shown = {"loss": f"{stats['loss']:.4f}", "lr": f"{stats['lr']:.2e}"}
        if cfg.moe.enabled and cfg.moe.stage == "moe":
            result.moe_losses.append(stats["moe_loss"])
            shown["moe_loss"] = f"{stats['moe_loss']:.4f}"
        if cfg.moe.enabled and cfg.moe.stage == "merge":
            result.merge_coefficients = {
                layer: c.tolist() for layer, c in gather_coefficients(chunks).items()}
            top = max(max(c[1:]) for c in result.merge_coefficients.values())
            shown["max_routed_coeff"] = f"{top:.3f}"
        bar.set_postfix(**shown)
    elapsed = time.perf_counter() - start
    result.tokens_per_s = t.train_steps * t.global_batch_size * t.seq_length / elapsed
    if save_dir:
        result.checkpoint = ckpt.save(chunks, save_dir, t.train_steps, cfg)
    return result


def evaluate(cfg: Config, checkpoint: str, batches: List[torch.Tensor]) -> float:
    """Per-token loss of a checkpoint on fixed global batches (forward only)."""
    parallel.initialize(cfg.parallel, seed=cfg.train.seed)
    chunks = build_model(cfg)
    ckpt.load(chunks, checkpoint)
    for c in chunks:
        c.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for b in batches:
            mbs = split_global_batch(make_batch(b), cfg.train.micro_batch_size)
            total += forward_backward(chunks, mbs, cfg.train.seq_length, forward_only=True)
            n += 1
    return total / max(n, 1)
