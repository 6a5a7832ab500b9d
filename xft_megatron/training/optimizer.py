"""Megatron-Core DDP, optimizer and LR schedule from our config.

Two ways to build the optimizer (`build_optimizer`):
  * Megatron's own (`get_megatron_optimizer`): AdamW with fp32 master weights, sharded over
    data parallel (train.distributed_optimizer=true, the default) or not.
  * Our torch optimizers (train.optimizer=adafactor, or precision.master_weights=none) inside
    Megatron's non-distributed wrappers, built the way `get_megatron_optimizer` builds them
    (its parameter groups, one optimizer for the dense and one for the expert-parallel
    parameters, `Float16OptimizerWithFloat16Params` for fp32 master weights, `FP32Optimizer`
    for fp32 weights or none): gradient norm, clipping, the finiteness guard of
    `optimizer_step`, the LR schedule and DDP's grad buffers work as with Adam.
    Adafactor's factored statistics do not have the parameter's shape; `_FactoredStateMixin`
    saves each as a tensor sharded like the parameter with the reduced axis of size 1.

train.router_lr_mult scales the router parameters' max_lr/min_lr (Megatron's scheduler
reads those per group; warmup starts at 0 or at lr): the router's lr is lr_mult times the
others' at every step.
"""

import math
from dataclasses import replace
from typing import Dict, List, Optional, Tuple

import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
from megatron.core.dist_checkpointing.optimizer import get_param_id_to_sharded_param_map
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import (ChainedOptimizer, DistributedOptimizer,
                                     Float16OptimizerWithFloat16Params, FP32Optimizer,
                                     OptimizerConfig, _get_param_groups, get_megatron_optimizer,
                                     get_standard_config_overrides)
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.optimizer.grad_scaler import DynamicGradScaler
from megatron.core.optimizer.optimizer_config import ParamKey
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.transformer_config import TransformerConfig

from xft_megatron.arch import names
from xft_megatron.config import PrecisionConfig, TrainConfig
from xft_megatron.runtime.compat.patches import optimizer_calls
from xft_megatron.training.adafactor import Adafactor
from xft_megatron.training.rounding import AdamW, mix_seed


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
                                disable_bucketing=i > 0,
                                full_param_layout=_param_layout(chunk, ddp_config))
        for i, chunk in enumerate(chunks)
    ]
    tconfig.no_sync_func = [m.no_sync for m in wrapped]
    if len(wrapped) == 1:
        tconfig.no_sync_func = tconfig.no_sync_func[0]
    tconfig.finalize_model_grads_func = finalize_model_grads
    te = any(hasattr(m, "fuse_wgrad_accumulation") for c in chunks for m in c.modules())
    if precision.fuses_weight_gradients(te):  # te: Transformer Engine's linears are built
        fuse_weight_gradients(wrapped)
    return wrapped


def fuse_weight_gradients(chunks: List) -> None:
    """Switch on `gradient_accumulation_fusion` in every Megatron linear layer and experts
    module (`fuse_wgrad_accumulation` in Transformer Engine's modules) whose weight DDP gave
    a `main_grad` (trainable weights; a frozen one takes Megatron's frozen-weight path
    anyway), so their weight gradients are accumulated into DDP's buffer by the GEMM itself.
    Only here, after DDP: outside DDP there is no buffer. Modules inside a torch.compile'd
    region (train.compile_layers) stay as they are: the fused backward writes into a buffer
    from outside the graph, which splits the compiled graph at every linear layer (slower
    than the separate addition it saves)."""
    compiled = {id(sub) for chunk in chunks for m in chunk.modules()
                if getattr(m, "_compiled_call_impl", None) is not None for sub in m.modules()}
    for chunk in chunks:
        for module in chunk.modules():
            # Megatron's own linears and our experts, or Transformer Engine's (model.spec=te)
            flag = next((f for f in ("gradient_accumulation_fusion", "fuse_wgrad_accumulation")
                         if hasattr(module, f)), None)
            if flag is None or id(module) in compiled:
                continue
            weights = [p for p in module.parameters(recurse=False)
                       if p.dim() >= 2 and p.requires_grad]
            shared = getattr(module, "weight", False) is None  # tied output layer
            if (weights and all(hasattr(p, "main_grad") for p in weights)) or shared:
                setattr(module, flag, True)


def _param_layout(chunk, ddp_config: DistributedDataParallelConfig):
    """With the distributed optimizer, how DDP's buffers place the parameters (shard
    boundaries), computed as Megatron asks its callers to: `overlap_grad_reduce` is off, so
    one bucket per buffer. None without the distributed optimizer (DDP needs none)."""
    if not ddp_config.use_distributed_optimizer:
        return None
    params = [p for _, p in chunk.named_parameters() if p.requires_grad]
    return DistributedOptimizer.compute_full_param_layout(
        params, None, parallel_state.get_data_parallel_world_size(with_context_parallel=True),
        ddp_config,
        expert_data_parallel_world_size=parallel_state.get_expert_data_parallel_world_size())


def build_optimizer(chunks: List, train: TrainConfig, precision: PrecisionConfig):
    """The optimizer of `train.optimizer` over the DDP-wrapped `chunks`: Megatron's AdamW with
    fp32 master weights (distributed per train.distributed_optimizer), or ours in Megatron's
    non-distributed wrappers (adafactor, or precision.master_weights=none). The trainer wraps
    `chunks` with `wrap_ddp(..., train.distributed_optimizer)` to match."""
    master = precision.master_weights == "fp32"
    cfg = OptimizerConfig(
        optimizer="adam",
        lr=train.lr,
        min_lr=train.min_lr,
        weight_decay=train.weight_decay,
        adam_beta1=train.adam_beta1,
        adam_beta2=train.adam_beta2,
        adam_eps=train.adam_eps,
        clip_grad=train.clip_grad,
        bf16=precision.dtype == "bf16" and master,
        fp16=precision.dtype == "fp16",
        params_dtype=precision.torch_dtype,
        use_distributed_optimizer=train.distributed_optimizer,
    )
    overrides = _router_overrides(cfg, train)
    with optimizer_calls():
        if train.optimizer == "adam" and master:
            return get_megatron_optimizer(cfg, chunks, config_overrides=overrides)
        return _local_optimizer(cfg, overrides, chunks, train, precision)


def _router_overrides(cfg: OptimizerConfig, train: TrainConfig) -> Optional[Dict]:
    """Megatron's parameter-group overrides: its standard ones (no weight decay on biases and
    vectors) plus, with train.router_lr_mult != 1, the router parameters' scaled schedule.
    None (Megatron's default, the same standard groups) without a multiplier."""
    if train.router_lr_mult == 1.0:
        return None
    overrides = get_standard_config_overrides(cfg)
    mult = train.router_lr_mult
    overrides[ParamKey(name=f"*.{names.ROUTER}*")] = {
        "max_lr": cfg.lr * mult, "min_lr": cfg.min_lr * mult, "lr_mult": mult}
    return overrides


def _local_optimizer(cfg: OptimizerConfig, overrides, chunks: List, train: TrainConfig,
                     precision: PrecisionConfig) -> ChainedOptimizer:
    """Our torch optimizer in Megatron's non-distributed wrappers, one for the dense and one
    for the expert-parallel parameter groups (as `get_megatron_optimizer` splits them)."""
    groups = _get_param_groups(chunks, cfg, overrides)
    pgs = ProcessGroupCollection.setup_process_groups_for_optimizer(None, chunks, True)
    ps = parallel_state
    parts = [  # (expert?, group for grad statistics, seed of the rounding: one per replica set)
        (False, pgs["mp_group"], mix_seed(train.seed, 0, ps.get_tensor_model_parallel_rank(),
                                          ps.get_pipeline_model_parallel_rank())),
        (True, pgs["expt_tp_pp_group"],
         mix_seed(train.seed, 1, ps.get_expert_tensor_parallel_rank(),
                  ps.get_expert_model_parallel_rank(), ps.get_pipeline_model_parallel_rank())),
    ]
    optimizers = []
    for expert, stats_group, seed in parts:
        part = [g for g in groups if g["is_expert_parallel"] == expert]
        if expert and not part:
            continue
        inner = _torch_optimizer(part, train, precision, seed) if part else None
        if precision.master_weights == "fp32" and precision.dtype != "fp32":
            scaler = None if not cfg.fp16 else DynamicGradScaler(
                initial_scale=cfg.initial_loss_scale, min_scale=cfg.min_loss_scale,
                growth_factor=2.0, backoff_factor=0.5, growth_interval=cfg.loss_scale_window,
                hysteresis=cfg.hysteresis)
            opt = _Float16Optimizer(inner, cfg, scaler, _init_state)
        else:
            opt = _FP32Optimizer(inner, cfg, _init_state)
        # as get_megatron_optimizer sets them: the norm counts a parameter replicated over
        # tensor-parallel ranks once, over the expert-TP group for expert (allreduce=False) ones
        opt.grad_stats_parallel_group = stats_group
        opt.tp_group = ps.get_tensor_model_parallel_group()
        opt.expert_tp_group = ps.get_expert_tensor_parallel_group()
        optimizers.append(opt)
    if train.optimizer == "adafactor":
        _factor_fc1_by_halves(chunks, optimizers)
    return ChainedOptimizer(optimizers)


def _torch_optimizer(groups: List[Dict], train: TrainConfig, precision: PrecisionConfig,
                     seed: int) -> torch.optim.Optimizer:
    rounding = dict(rounding=precision.rounding, seed=seed)
    if train.optimizer == "adafactor":
        return Adafactor(groups, lr=train.lr, eps=(train.adafactor_eps1, train.adafactor_eps2),
                         clip_threshold=train.adafactor_clip_threshold,
                         decay_rate=train.adafactor_decay_rate,
                         weight_decay=train.weight_decay,
                         scale_parameter=train.adafactor_scale_parameter, **rounding)
    return AdamW(groups, lr=train.lr, betas=(train.adam_beta1, train.adam_beta2),
                 eps=train.adam_eps, weight_decay=train.weight_decay, **rounding)


def _factor_fc1_by_halves(chunks: List, optimizers: List) -> None:
    """Factor each dense SwiGLU fc1 [2F, H] as [2, F, H]: gate and up apart, as the
    reference's separate gate_proj/up_proj. (The fused qkv stays one matrix: its row
    statistics equal those of separate q/k/v, its column statistics average over all of
    q, k and v rows.)"""
    for chunk in chunks:
        if not getattr(chunk.config, "gated_linear_unit", False):
            continue
        for name, p in chunk.named_parameters():
            if not name.endswith(names.FC1):
                continue
            target = getattr(p, "main_param", p)  # the fp32 master copy, when there is one
            for opt in optimizers:
                inner = opt.optimizer
                if inner is not None and any(target is q for g in inner.param_groups
                                             for q in g["params"]):
                    inner.set_row_groups(target, 2)


def _init_state(optimizer, config=None) -> None:
    """Megatron's `init_state_fn` for our optimizers (before a checkpoint loads into them)."""
    optimizer.init_state()


class _FactoredStateMixin:
    """`sharded_state_dict` for optimizers whose state holds factored statistics (Adafactor):
    Megatron's version gives every state tensor the parameter's sharding and asserts the
    parameter's shape. The factored entries are taken out of the state while Megatron
    builds the rest, then added as tensors sharded like the parameter with the reduced axis
    of size 1 (views of the state: loading restores it in place). The keys are Megatron's:
    `optimizer.state.<name>.<parameter key>`."""

    def sharded_state_dict(self, model_sharded_state_dict, is_loading: bool = False,
                           metadata: Optional[dict] = None):
        inner = self.optimizer
        if inner is None or not hasattr(inner, "checkpoint_views"):
            return super().sharded_state_dict(model_sharded_state_dict, is_loading, metadata)
        if is_loading:
            self.init_state_fn(inner, self.config)
        params = [p for g in inner.param_groups for p in g["params"]]
        views, held = {}, {}
        for i, p in enumerate(params):
            v = inner.checkpoint_views(p)
            if v:
                views[i] = v
                held[p] = {k: inner.state[p].pop(k) for k in v}
        try:
            state = super().sharded_state_dict(model_sharded_state_dict, is_loading, metadata)
        finally:
            for p, entries in held.items():
                inner.state[p].update(entries)
        optimizer_state = state["optimizer"] if "fp32_from_fp16_params" in state else state
        id_map = get_param_id_to_sharded_param_map(model_sharded_state_dict,
                                                   self._model_params(params))
        for i, entries in views.items():
            for key, view in entries.items():
                optimizer_state["state"][i][key] = _reduced_sharded_tensor(
                    id_map[i], view, f"optimizer.state.{key}")
        return state

    def _model_params(self, params: List) -> List:
        return params


class _FP32Optimizer(_FactoredStateMixin, FP32Optimizer):
    """Megatron's FP32Optimizer (fp32 weights, or bf16 weights without master copies). Its
    `prepare_grads` hands each parameter DDP's fp32 gradient buffer as `.grad`; a bf16
    parameter accepts it once its `grad_dtype` is None (any dtype)."""

    def __init__(self, optimizer, config, init_state_fn):
        super().__init__(optimizer, config, init_state_fn)
        for p in self.get_parameters():
            if p.dtype != torch.float32:
                if not hasattr(p, "grad_dtype"):
                    raise RuntimeError(
                        "precision.master_weights=none needs torch with Tensor.grad_dtype "
                        f"(torch {torch.__version__} has none); use master_weights=fp32")
                p.grad_dtype = None


class _Float16Optimizer(_FactoredStateMixin, Float16OptimizerWithFloat16Params):
    """Megatron's optimizer over fp32 master copies of bf16/fp16 weights."""

    def _model_params(self, params: List) -> List:
        model_of = {id(main): model for models, mains in
                    zip(self.float16_groups, self.fp32_from_float16_groups)
                    for model, main in zip(models, mains)}
        return [model_of.get(id(p), p) for p in params]


def _reduced_sharded_tensor(model, data: torch.Tensor, prefix: str):
    """`data` (the parameter's local shape with some axes reduced to size 1) sharded like the
    parameter's ShardedTensor (or factory, e.g. SwiGLU's gate/up split) `model`."""
    if isinstance(model, ShardedTensorFactory):
        return replace(model, key=f"{prefix}.{model.key}", data=data)
    pre = model.prepend_axis_num
    shape, offset = list(model.global_shape[:pre]), list(model.global_offset[:pre])
    for i, n in enumerate(data.shape):
        axis, local = pre + i, model.local_shape[i]
        if n == local:
            shape.append(model.global_shape[axis])
            offset.append(model.global_offset[axis])
        else:  # reduced: as many fragments as the parameter's axis, each of n
            shape.append(n * (model.global_shape[axis] // local))
            offset.append(n * (model.global_offset[axis] // local))
    out = replace(model, key=f"{prefix}.{model.key}", data=data, dtype=data.dtype,
                  local_shape=tuple(data.shape), global_shape=tuple(shape),
                  global_offset=tuple(offset))
    out.validate_metadata_integrity()
    return out


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
        # on resume the schedule follows this run's settings (a run extended with a larger
        # train.train_steps decays over the new length); only the step count is restored
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
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
    """Create the optimizer state (zero moments, step 0) for every parameter that has none
    yet, as loading a checkpoint into a fresh optimizer needs (torch's Adam creates it lazily
    on the first step, and Megatron's state_dict expects it to exist)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        if inner is None:
            continue
        if hasattr(inner, "init_state"):  # ours (rounding.Fp32UpdateOptimizer)
            inner.init_state()
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state[p]:
                    inner.state[p] = {"step": torch.tensor(0.0),
                                      "exp_avg": torch.zeros_like(p.data),
                                      "exp_avg_sq": torch.zeros_like(p.data)}


def set_step_counters(optimizer, updates: int) -> None:
    """After loading a checkpoint into the distributed optimizer, set Adam's update counter
    (its bias correction) to `updates`, one tensor per parameter. Megatron's loader (0.19.2),
    without TE/apex, leaves every parameter sharing ONE `step` tensor (which torch's Adam then
    increments once per parameter) holding a value that is not the saved one; the trainer
    knows the true count: its step minus the skipped steps."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if opt.optimizer is None:
            continue
        for state in opt.optimizer.state.values():
            if "step" in state:
                state["step"] = torch.tensor(float(updates))
