"""Megatron-Core DDP, distributed optimizer and LR schedule from our config."""

import math
from typing import List, Tuple

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.transformer_config import TransformerConfig

from xft_megatron.compat.patches import optimizer_calls
from xft_megatron.config import PrecisionConfig, TrainConfig


def wrap_ddp(chunks: List, tconfig: TransformerConfig, precision: PrecisionConfig,
             distributed_optimizer: bool = True) -> List:
    """Wrap each model chunk in Megatron's DDP (contiguous grad buffers) and register the
    grad-sync hooks the schedules call. With the distributed optimizer, gradients are
    reduce-scattered (each data-parallel rank keeps its shard); without, all-reduced."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=precision.grad_reduce_in_fp32,
        overlap_grad_reduce=False,
        use_distributed_optimizer=distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    wrapped = [
        DistributedDataParallel(config=tconfig, ddp_config=ddp_config, module=chunk,
                                disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]
    tconfig.no_sync_func = [m.no_sync for m in wrapped]
    if len(wrapped) == 1:
        tconfig.no_sync_func = tconfig.no_sync_func[0]
    tconfig.finalize_model_grads_func = finalize_model_grads
    return wrapped


def build_optimizer(chunks: List, train: TrainConfig, precision: PrecisionConfig):
    """AdamW with fp32 master weights (bf16/fp16 params), sharded over data parallel."""
    cfg = OptimizerConfig(
        optimizer="adam",
        lr=train.lr,
        min_lr=train.min_lr,
        weight_decay=train.weight_decay,
        adam_beta1=train.adam_beta1,
        adam_beta2=train.adam_beta2,
        adam_eps=train.adam_eps,
        clip_grad=train.clip_grad,
        bf16=precision.dtype == "bf16",
        fp16=precision.dtype == "fp16",
        params_dtype=precision.torch_dtype,
        use_distributed_optimizer=True,
    )
    with optimizer_calls():
        return get_megatron_optimizer(cfg, chunks)


def build_scheduler(optimizer, train: TrainConfig) -> OptimizerParamScheduler:
    """LR schedule counted in optimizer steps: warmup, then constant/linear/cosine decay."""
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if train.lr_warmup_steps else train.lr,
        max_lr=train.lr,
        min_lr=train.min_lr,
        lr_warmup_steps=train.lr_warmup_steps,
        lr_decay_steps=train.train_steps,
        lr_decay_style=train.lr_decay_style,
        start_wd=train.weight_decay,
        end_wd=train.weight_decay,
        wd_incr_steps=train.train_steps,
        wd_incr_style="constant",
    )


def optimizer_step(optimizer, clip_grad: float, loss: float) -> Tuple[bool, float]:
    """Megatron's optimizer step with a finiteness guard: the gradient norm is computed first
    (identical on every rank), and a non-finite loss or norm skips the update entirely, so
    the weights and optimizer state stay those of the last good step. Returns (stepped,
    grad_norm)."""
    with optimizer_calls():
        found_inf = optimizer.prepare_grads()  # fp16: the loss scaler's overflow check
        grad_norm = float(optimizer.get_grad_norm())
        if found_inf or not (math.isfinite(grad_norm) and math.isfinite(loss)):
            return False, grad_norm
        if clip_grad > 0:
            for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
                params = opt.get_parameters()
                if params:
                    clip_grad_by_total_norm_fp32(params, max_norm=clip_grad,
                                                 total_norm=grad_norm)
        return optimizer.step_with_ready_grads(), grad_norm


def init_optimizer_state(optimizer) -> None:
    """Create Adam's state (zero moments, step 0) for every parameter that has none yet, as
    loading a checkpoint into a fresh optimizer needs (torch's Adam creates it lazily on the
    first step, and Megatron's state_dict expects it to exist)."""
    import torch

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state[p]:
                    inner.state[p] = {"step": torch.tensor(0.0),
                                      "exp_avg": torch.zeros_like(p.data),
                                      "exp_avg_sq": torch.zeros_like(p.data)}


def set_step_counters(optimizer, updates: int) -> None:
    """After loading a checkpoint into the distributed optimizer, set Adam's update counter
    (its bias correction) to `updates`, one tensor per parameter. Megatron 0.16's loader,
    without TE/apex, leaves every parameter sharing ONE `step` tensor (which torch's Adam then
    increments once per parameter) holding a value that is not the saved one; the trainer
    knows the true count: its step minus the skipped steps."""
    import torch

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in opt.optimizer.state.values():
            if "step" in state:
                state["step"] = torch.tensor(float(updates))
