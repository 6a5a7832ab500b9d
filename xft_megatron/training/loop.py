"""The training loop shared by every stage (pretrain, sft, moe, merge): build, start from
weights or resume, step through Megatron's schedules, report, checkpoint.

Resume (`resume=True`) continues from the newest training checkpoint under
`checkpoint.save`: weights, optimizer and LR-scheduler state, the step (which fixes the data
position: batch i is a pure function of i), and every rank's RNG streams. On the same layout
the resumed run repeats the uninterrupted one exactly. Under another layout the weights,
optimizer state (stored in model space) and schedule carry over; the RNG streams restart from
the seed (they are per rank), which only matters for noisy gating and dropout.
"""

import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from xft_megatron.arch import names
from xft_megatron.checkpoint import dist as ckpt
from xft_megatron.checkpoint import lock
from xft_megatron.config import Config
from xft_megatron.errors import UserError
from xft_megatron.model.builder import build_model, count_parameters, transformer_config
from xft_megatron.model.moe import divergence, routing
from xft_megatron.model.moe import losses as moe_losses
from xft_megatron.model.moe.merge_mlp import gather_coefficients
from xft_megatron.runtime import compat, parallel
from xft_megatron.training import flops, rng
from xft_megatron.training.metrics import Metrics, peak_memory_gib
from xft_megatron.training.optimizer import build_optimizer, build_scheduler, \
    init_optimizer_state, set_step_counters, wrap_ddp
from xft_megatron.training.step import EmptyBatch, make_batch, split_global_batch, \
    train_step


class NonFiniteLoss(UserError, RuntimeError):
    """The loss or gradient became NaN/inf and train.on_nan=stop."""

    exit_code = 3


@dataclass
class RunResult:
    losses: List[float] = field(default_factory=list)  # per step run in this call
    checkpoint: Optional[str] = None
    tokens_per_s: float = 0.0
    parameters: int = 0
    start_step: int = 0
    steps_done: int = 0  # the step count reached (the run's total unless stopped early)
    skipped_steps: List[int] = field(default_factory=list)
    stopped_early: bool = False
    moe_losses: List[float] = field(default_factory=list)  # router losses per step (MoE)
    merge_coefficients: Dict[int, List[float]] = field(default_factory=dict)  # merge stage
    expert_divergence: Dict = field(default_factory=dict)  # MoE stage: at the last save/end
    summary: Dict = field(default_factory=dict)


ROUTING_WINDOW = 10  # the summary's routing figures are means over the last steps


def routing_means(rows: List[Dict]) -> Dict[str, List[float]]:
    """Per-layer means over `rows` (step stats) of g_0 and the routing diagnostics."""
    keys = ("shared_weight",) + routing.DIAGNOSTICS
    out = {}
    for key in keys:
        series = [r[key] for r in rows if key in r]
        if series:
            out[key] = [sum(col) / len(series) for col in zip(*series)]
    return out


SCHEDULE_KEYS = ("lr", "min_lr", "lr_warmup_steps", "lr_decay_style", "train_steps")


def schedule_changes(stored: Dict, train) -> List[str]:
    """'train.KEY OLD -> NEW' for each LR-schedule setting that differs from a checkpoint's
    stored train section."""
    return [f"train.{k} {stored[k]} -> {getattr(train, k)}" for k in SCHEDULE_KEYS
            if k in stored and stored[k] != getattr(train, k)]


def _latest_training_checkpoint(root: Optional[str]) -> Optional[str]:
    try:
        return ckpt.resolve(root) if root and ckpt.is_training_checkpoint(root) else None
    except FileNotFoundError:
        return None


def _any_rank(flag: bool) -> bool:
    t = torch.tensor([int(flag)], device=compat.device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class _Prefetcher:
    """Prepares the micro-batches of step i+1 on a background thread while step i runs."""

    def __init__(self, data, micro_batch_size: int, total_steps: int):
        self.data, self.mbs, self.total = data, micro_batch_size, total_steps
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="xft-data")
        self.pending = None  # (step, future)

    def _prepare(self, step: int):
        return split_global_batch(make_batch(self.data[step]), self.mbs)

    def get(self, step: int):
        if self.pending is not None and self.pending[0] == step:
            batch = self.pending[1].result()
        else:
            batch = self._prepare(step)
        self.pending = (step + 1, self.pool.submit(self._prepare, step + 1)) \
            if step + 1 < self.total else None
        return batch

    def close(self):
        self.pool.shutdown(wait=True, cancel_futures=True)


def _finished_summary(folder: Optional[str], train_steps: int) -> Optional[Dict]:
    """summary.json of the run in `folder` if it finished at `train_steps`, else None."""
    path = os.path.join(folder or "", "summary.json")
    try:
        with open(path) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return None
    done = isinstance(summary, dict) and summary.get("steps_done") == train_steps
    return summary if done else None


def _last_good(checkpoint: Optional[str], load: Optional[str]) -> str:
    """Where a stopped run's last good weights are, for its error message."""
    if checkpoint:
        return f"The last good checkpoint is '{checkpoint}' (continue with --resume)"
    start = f"the weights it loaded ('{load}')" if load else "freshly initialized weights"
    return (f"No checkpoint of this run was written yet: it started from {start}, which "
            "are unchanged")


def train(cfg: Config, data, progress: bool = True, resume: bool = False,
          should_stop: Optional[Callable[[], bool]] = None, extra_files=None,
          loss_hook=None, log_dir: Optional[str] = None) -> RunResult:
    """Train to `cfg.train.train_steps` optimizer steps on `data[step]` (a [global_batch,
    seq+1] token tensor or a packed batch dict). `should_stop()` (polled every step, e.g. set
    by SIGTERM) ends the run early with a checkpoint. `extra_files` (name -> path) are copied
    into every checkpoint (tokenizer files). Holds the lock on `checkpoint.save` throughout
    (checkpoint/lock.py: a second run writing there is refused)."""
    info = parallel.initialize(cfg.parallel, seed=cfg.train.seed)
    with lock.hold(cfg.checkpoint.save):
        return _train(cfg, info, data, progress, resume, should_stop, extra_files, loss_hook,
                      log_dir)


def _train(cfg, info, data, progress, resume, should_stop, extra_files, loss_hook,
           log_dir) -> RunResult:
    t, c = cfg.train, cfg.checkpoint
    tc = transformer_config(cfg)
    chunks = build_model(cfg, tc)
    resume_from = _latest_training_checkpoint(c.save) if resume else None
    if resume_from is None and c.load:
        ckpt.load(chunks, c.load, may_lack=(names.ALPHA,) if cfg.stage == "merge" else ())
    result = RunResult(parameters=count_parameters(chunks))
    chunks = wrap_ddp(chunks, tc, cfg.precision, t.distributed_optimizer)
    optimizer = build_optimizer(chunks, t, cfg.precision)
    scheduler = build_scheduler(optimizer, t)
    start = 0
    if resume_from:
        saved_cfg = ckpt.read_config(resume_from)
        # the shared expert's place changes which parameters each rank holds, like a layout
        same_layout = saved_cfg["parallel"] == asdict(cfg.parallel) and \
            ckpt.saved_world_size(resume_from) == info.world_size and \
            (saved_cfg.get("moe") or {}).get("shared_expert_impl", "pool") == \
            cfg.moe.shared_expert_impl
        saved = ckpt.read_train_state(resume_from)
        with_optimizer = same_layout and saved.get("optimizer", True)
        if with_optimizer:
            init_optimizer_state(optimizer)
        ckpt.load(chunks, resume_from, optimizer=optimizer if with_optimizer else None,
                  scheduler=scheduler)
        start = int(saved["step"])
        result.skipped_steps = list(saved.get("skipped_steps", []))
        if with_optimizer:
            set_step_counters(optimizer, start - len(result.skipped_steps))
        if same_layout:
            rng.restore(ckpt.read_rank_state(resume_from)["rng"])
    result.start_step = result.steps_done = start
    finished_before = None  # the summary of a finished run resumed (below)
    metrics = Metrics(log_dir or c.save, info.rank == 0, start, t.train_steps, progress)
    if resume_from:
        metrics.message(f"resumed from {resume_from} at step {start}" + (
            ": the parallel layout changed, so weights, step and LR schedule carry over; "
            "optimizer moments and RNG streams start afresh" if not same_layout else
            ": it holds no optimizer state (a final save with checkpoint.final_optimizer="
            "false), so the optimizer moments start afresh" if not with_optimizer else ""))
        changed = schedule_changes(ckpt.read_config(resume_from).get("train") or {}, t)
        if changed:
            metrics.message("the LR schedule follows this run's settings, not the "
                            f"checkpoint's: {', '.join(changed)}")
        if start >= t.train_steps:
            metrics.message(f"the checkpoint is at step {start}, train.train_steps="
                            f"{t.train_steps}: nothing to train (raise train.train_steps to "
                            "train further)")
            # a finished run resumed (e.g. a pipeline killed right after the stage's last
            # save): its result is the finished run's, not that of a run of no steps
            finished_before = _finished_summary(log_dir or c.save, t.train_steps)
            result.checkpoint = resume_from
            if cfg.stage == "merge":
                result.merge_coefficients = {
                    layer: co.tolist() for layer, co in gather_coefficients(chunks).items()}

    def save(step: int, final: bool) -> str:
        with_state = not final or c.final_optimizer
        state = {"step": step, "consumed_samples": step * t.global_batch_size,
                 "skipped_steps": result.skipped_steps, "optimizer": with_state}
        training = ckpt.TrainingState(optimizer if with_state else None, scheduler, state,
                                      {"rng": rng.capture()})
        return ckpt.save(chunks, c.save, step, cfg, extra_files, training, keep=c.keep)

    tokens_per_step = t.global_batch_size * t.seq_length
    flops_per_token = flops.flops_per_token(cfg.model, t.seq_length, cfg.moe,
                                            merge=cfg.stage == "merge")
    world = info.world_size
    run_start, tokens_seen = time.perf_counter(), 0
    batches = _Prefetcher(data, t.micro_batch_size, t.train_steps)
    track_divergence = cfg.stage == "moe" and cfg.moe.diagnostics
    routing_window: List[Dict] = []  # the last steps' stats, for the summary's routing means
    try:
        for step in range(start, t.train_steps):
            step_start = time.perf_counter()
            mbs = batches.get(step)
            data_seconds = time.perf_counter() - step_start
            if cfg.moe.enabled:
                moe_losses.set_step_settings(chunks, cfg.moe.noise_multiplier(step))
            try:
                stats = train_step(chunks, optimizer, scheduler, mbs, t.seq_length,
                                   t.clip_grad, loss_hook=loss_hook)
            except EmptyBatch as e:
                raise EmptyBatch(f"step {step + 1}: {e}; nothing was updated") from None
            finite = math.isfinite(stats["loss"]) and (
                math.isfinite(stats["grad_norm"]) or cfg.precision.dtype == "fp16")
            if not finite:
                result.skipped_steps.append(step + 1)
                if t.on_nan == "stop":
                    raise NonFiniteLoss(
                        f"step {step + 1}: loss {stats['loss']} / grad norm {stats['grad_norm']}"
                        " is not finite; stopped without updating the weights. "
                        f"{_last_good(result.checkpoint or resume_from, c.load)}; lower "
                        "train.lr, check the data, or set train.on_nan=skip to skip such steps")
                metrics.message(f"step {step + 1}: non-finite loss/gradient, update skipped")
            elapsed = time.perf_counter() - step_start
            tokens_seen += tokens_per_step
            stats["tokens_per_s"] = tokens_per_step / elapsed
            stats["step_s"], stats["data_s"] = elapsed, data_seconds
            stats["mfu"] = flops_per_token * stats["tokens_per_s"] / world / \
                flops.H200_BF16_DENSE_PEAK if compat.has_cuda() else 0.0
            stats["memory_gib"] = peak_memory_gib()
            if cfg.stage == "merge":
                result.merge_coefficients = {
                    layer: co.tolist() for layer, co in gather_coefficients(chunks).items()}
                stats["merge_coefficients"] = result.merge_coefficients
            result.losses.append(stats["loss"])
            result.moe_losses.append(stats["moe_loss"])
            result.steps_done = step + 1
            if cfg.moe.enabled and cfg.moe.router_noise:
                stats["noise_multiplier"] = cfg.moe.noise_multiplier(step)
            routing_window = (routing_window + [stats])[-ROUTING_WINDOW:]
            stop = should_stop is not None and _any_rank(should_stop())
            last = step + 1 == t.train_steps
            periodic = c.save_interval and (step + 1) % c.save_interval == 0
            saving = c.save and (stop or (last and c.final) or periodic)
            if track_divergence and (saving or last or stop):  # the weights being saved
                result.expert_divergence = stats["expert_divergence"] = \
                    divergence.expert_divergence(chunks, cfg.model.num_layers,
                                                 cfg.moe.num_experts, cfg.moe.has_shared_expert)
            metrics.log(step + 1, stats)
            if saving and step + 1 == len(result.skipped_steps):
                raise NonFiniteLoss(  # nothing trained: no checkpoint that looks like one
                    f"every step so far (1-{step + 1}) had a non-finite loss or gradient and "
                    f"was skipped (train.on_nan=skip): the weights are those the run started "
                    f"from and no checkpoint is written; {_last_good(None, c.load)}. "
                    "Lower train.lr or check the data")
            if saving:
                result.checkpoint = save(step + 1, final=last)
            if stop:
                result.stopped_early = not last
                metrics.message(f"stopping at step {step + 1} (checkpoint {result.checkpoint})")
                break
    finally:
        batches.close()
        seconds = time.perf_counter() - run_start
        result.tokens_per_s = tokens_seen / seconds if seconds > 0 else 0.0
        result.summary = {
            "stage": cfg.stage, "start_step": start, "steps_done": result.steps_done,
            "train_steps": t.train_steps, "stopped_early": result.stopped_early,
            "final_loss": result.losses[-1] if result.losses else None,
            "skipped_steps": result.skipped_steps, "tokens_per_s": result.tokens_per_s,
            "tokens_per_s_per_rank": result.tokens_per_s / world,
            "parameters_this_rank": result.parameters,
            "active_matmul_params": flops.matmul_params(cfg.model, cfg.moe,
                                                        merge=cfg.stage == "merge"),
            "peak_memory_gib": peak_memory_gib(), "seconds": seconds,
            "checkpoint": result.checkpoint, "merge_coefficients": result.merge_coefficients,
        }
        if cfg.stage == "moe":
            result.summary["routing"] = routing_means(routing_window)
            result.summary["expert_divergence"] = result.expert_divergence
        if finished_before is not None:
            result.summary = finished_before
            result.expert_divergence = finished_before.get("expert_divergence")
        metrics.close(result.summary)
    return result

