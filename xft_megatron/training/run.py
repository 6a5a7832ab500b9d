"""`xft train CONFIG.yaml [key=value ...] [--resume] [--dry-run]`: one entry for every stage.

The config is built by `config.load_config` with the checkpoint reader (as `xft config`
builds it): with `checkpoint.load`, the stored model and moe sections are the defaults, so a
stage never repeats the architecture; `train.stage=merge` turns the loaded MoE into the
learnable merge (a merge-stage checkpoint loaded without train.stage continues as one). Then
the data:
tokenizer (data.tokenizer, else the one stored with checkpoint.load, else bytes), the cached
tokenized dataset (built once, by rank 0), packed batches; `train.epochs` sets the step count
from the dataset size.
"""

import math
import os
import sys
from dataclasses import replace
from typing import Optional, Sequence, Tuple

import torch.distributed as dist

from xft_megatron.checkpoint import dist as ckpt
from xft_megatron.checkpoint import lock, space
from xft_megatron.config import Config, ConfigError, load_config, require_runnable
from xft_megatron.data.dataset import build_dataset, check_sources
from xft_megatron.data.packing import PackedBatches
from xft_megatron.data.records import DataError
from xft_megatron.data.tokenizer import Tokenizer, tokenizer_for_model
from xft_megatron.errors import UserError
from xft_megatron.hf import convert
from xft_megatron.model.builder import check_runnable
from xft_megatron.runtime import parallel
from xft_megatron.runtime.hub import HubSettings
from xft_megatron.training import disk, memory
from xft_megatron.training.signals import StopOnSignal


def tokenizer_for(cfg: Config) -> Tuple[Tokenizer, Optional[str]]:
    """data.tokenizer, else the tokenizer stored with checkpoint.load, else bytes."""
    stored = ckpt.resolve(cfg.checkpoint.load) if cfg.checkpoint.load else None
    try:
        return tokenizer_for_model(cfg.data.tokenizer, stored, cfg.model.vocab_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def tokenizer_files(source: str):
    """name -> path of the tokenizer files to store with every checkpoint."""
    if os.path.isfile(source):  # a sentencepiece model
        return {"tokenizer.model": source}
    return convert.tokenizer_files(source)


def build_batches(cfg: Config, tok: Tokenizer, rank: int, hub: Optional[HubSettings] = None):
    """(PackedBatches, DataReport); rank 0 tokenizes, the others read its cache."""
    cache = cfg.data.cache_dir or os.path.join(cfg.checkpoint.save, "data_cache")
    vocab = cfg.model.vocab_size  # bounds input_ids records
    built, error = None, None
    if rank == 0:
        try:
            built = build_dataset(cfg.data, tok, cfg.train.seq_length, cache, vocab, hub)
        except Exception as e:  # reported below, after telling the other ranks
            error = e
    if dist.is_initialized() and dist.get_world_size() > 1:
        # rank 0 failing stops everyone cleanly: a user error (bad records, a missing file)
        # as one, with rank 0's message above, anything else as the bug it is
        failure = [None if error is None else isinstance(error, UserError)]
        dist.broadcast_object_list(failure, src=0)
        if failure[0] is not None and rank != 0:
            said = "rank 0 could not build the dataset; its message is above"
            raise UserError(said) if failure[0] else RuntimeError(said)
    if error is not None:
        raise error
    if built is None:
        built = build_dataset(cfg.data, tok, cfg.train.seq_length, cache, vocab, hub)
    dataset, report = built
    t = cfg.train
    batches = PackedBatches(dataset, t.seq_length, t.global_batch_size, t.seed,
                            packing=cfg.data.packing, pad_id=tok.pad_id)
    return batches, report


def dry_run(cfg: Config, world_size: int) -> str:
    p = cfg.parallel
    dp = p.data_parallel_size(world_size)
    counts = memory.parameter_counts(cfg.model, cfg.moe)
    est = memory.estimate(cfg, world_size)
    gib = 2 ** 30
    lines = [
        f"stage        {cfg.stage}",
        f"layout       world {world_size} = TP {p.tensor} x PP {p.pipeline} x DP {dp}"
        f"{f' (VPP {p.virtual_pipeline})' if p.virtual_pipeline else ''}; EP {p.expert}, "
        f"ETP {p.expert_tensor}, SP {'on' if p.sequence_parallel else 'off'}",
        f"modules      {_spec_text(cfg)}",
        f"batch        global {cfg.train.global_batch_size} = micro {cfg.train.micro_batch_size}"
        f" x DP {dp} x {cfg.train.num_microbatches(dp)} micro-batches; seq {cfg.train.seq_length}",
        f"parameters   total {counts['total']:,}  active {counts['active']:,}"
        + (f"  (experts {counts['expert']:,})" if counts["expert"] else ""),
        *([_experts_line(cfg)] if cfg.moe.enabled and cfg.stage != "merge" else []),
        f"memory/rank  ~{est.total / gib:.1f} GiB: weights {est.weights / gib:.1f}, "
        f"grads {est.gradients / gib:.1f}, optimizer {est.optimizer / gib:.1f}, "
        f"activations {est.activations / gib:.1f} (estimate, no recomputation)",
    ]
    return "\n".join(lines)


def _spec_text(cfg: Config) -> str:
    """Which layer modules the run builds (model.spec) and where weight gradients go."""
    te = cfg.model.spec == "te"
    te_experts = cfg.moe.enabled and cfg.moe.experts_impl == "te_grouped"
    modules = ("te: Transformer Engine's norm+qkv, attention, projection and dense FFN linears "
               + ("and grouped experts (router: this project's)" if te_experts else
                  "(experts and router: this project's)") if te else
               "local: Megatron-Core's modules and this project's (no Transformer Engine)")
    prec = cfg.precision
    grads = ("accumulated into the fp32 buffer by the GEMM"
             if prec.fuses_weight_gradients(te) else "added to the fp32 buffer apart")
    fp8 = (f"; FP8 GEMMs in TE's linears ({prec.fp8}, {prec.fp8_recipe} scaling)"
           if prec.fp8 != "none" else "")
    return f"{modules}; weight gradients {grads}{fp8}"


def _experts_line(cfg: Config) -> str:
    """How an MoE layer's experts are laid out: the shared expert's place and what each
    expert-parallel rank holds."""
    e, ep = cfg.moe, cfg.parallel.expert
    if not e.has_shared_expert:
        return (f"experts      {e.num_experts} routed, top-{e.topk}; {e.num_experts // ep} per "
                f"EP rank")
    where = ("off the dispatch path (moe.shared_expert_impl=dense): a tensor-parallel FFN "
             "on every rank's own tokens" if e.shared_expert_impl == "dense" else
             "expert 0 of the dispatched pool (moe.shared_expert_impl=pool)" +
             (": its EP rank also runs it for every token of its EP group" if ep > 1 else ""))
    per_rank = e.dispatched_experts // ep
    return (f"experts      1 shared + {e.num_routed} routed, top-{e.topk} ({e.routed_topk} "
            f"routed per token); {per_rank} dispatched per EP rank; shared expert {where}")


def check_save_dir(cfg: Config, resume: bool) -> None:
    """A run without --resume never silently restarts one already in checkpoint.save (it
    would move `latest` back and later overwrite the newer iterations)."""
    save = cfg.checkpoint.save
    if resume or cfg.checkpoint.overwrite or not os.path.isdir(save):
        return
    held = sorted(n for n in os.listdir(save) if n.startswith("iter_"))
    if held or os.path.isfile(os.path.join(save, ckpt.LATEST_FILE)):
        newest = held[-1] if held else ckpt.LATEST_FILE
        raise ConfigError(f"checkpoint.save='{save}' already holds a run (newest: {newest}); "
                          "continue it with --resume, choose a new checkpoint.save, or set "
                          "checkpoint.overwrite=true to start again from step 0")


def main(config_path: Optional[str], overrides: Sequence[str], resume: bool = False,
         dry: bool = False, world_size: Optional[int] = None, progress: bool = True,
         stop: Optional[StopOnSignal] = None):
    cfg = require_runnable(load_config(config_path, overrides, read_stored=ckpt.read_config))
    if dry:
        world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
        print(dry_run(cfg, world))
        return None
    check_runnable(cfg)  # the layer modules (model.spec=te: TE and a GPU) and FP8 run here
    if cfg.model.spec == "te" and os.environ.get("RANK", "0") == "0":
        fp8 = " and precision.fp8 against bf16" if cfg.precision.fp8 != "none" else ""
        print(f"notice: model.spec=te is new: its GPU tests against model.spec=local{fp8} "
              "(tests/gpu/test_te_spec.py) have not run on a GPU yet; compare a few steps "
              "with model.spec=local before a long run", file=sys.stderr)
    world = parallel.rank_info_from_env().world_size  # torchrun or srun, as initialize reads it
    local = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE", "")
    memory.check_fits(cfg, world, memory.machine_memory(int(local) if local.isdigit() else world))
    notice = disk.check_room(cfg, space.free_bytes(cfg.checkpoint.save))
    if notice and os.environ.get("RANK", "0") == "0":
        print(notice, file=sys.stderr)
    hub = HubSettings.from_env()
    check_sources(cfg.data, hub)  # a missing file or dataset stops here, before any model
    own_stop = stop is None
    stop = stop or StopOnSignal()
    try:
        info = parallel.initialize(cfg.parallel, seed=cfg.train.seed)
        with lock.hold(cfg.checkpoint.save):  # a second run into checkpoint.save is refused
            check_save_dir(cfg, resume)
            return _prepare_and_train(cfg, info, resume, progress, stop, hub)
    finally:
        if own_stop:
            stop.release()


def _prepare_and_train(cfg: Config, info, resume: bool, progress: bool, stop,
                       hub: HubSettings):
    from xft_megatron.training.loop import train

    tok, source = tokenizer_for(cfg)
    batches, report = build_batches(cfg, tok, info.rank, hub)
    if report.targets == 0:
        raise DataError(f"data.path={cfg.data.path}: {report.summary()}, but no target tokens: "
                        "every loss mask is 0, so there is nothing to learn from. Instruction "
                        "records need a non-empty response (check data.columns and "
                        "data.format), chat records an assistant turn")
    if cfg.train.epochs:
        steps = max(1, math.ceil(cfg.train.epochs * len(batches)))
        cfg.train.check_warmup(steps)  # before any model is built
        cfg = cfg.replace(train=replace(cfg.train, train_steps=steps))
    if info.rank == 0:
        print(report.table())
        print(f"data: {len(batches.rows)} rows of {cfg.train.seq_length + 1} tokens "
              f"({batches.fill:.0%} filled), {len(batches)} global batches per epoch; "
              f"training {cfg.train.train_steps} steps")
        print(dry_run(cfg, info.world_size))
    files = tokenizer_files(source) if source else None
    return train(cfg, batches, progress=progress, resume=resume, should_stop=stop,
                 extra_files=files)
