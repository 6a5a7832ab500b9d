"""The configuration's schema: small dataclasses per concern and their validation.

Every dataclass validates itself in `__post_init__`; checks that span concerns (heads vs tensor
parallel, layers vs pipeline parallel) live in `Config.__post_init__`. Messages say what is
wrong and how to fix it, and all of this runs before any model is built. Reading YAML and
key=value overrides is load.py's.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from xft_megatron.arch import counts, families
from xft_megatron.errors import ConfigError

# the fields of a training record (data/records.py reads records by these names), those
# data.columns may map a column to
FIELDS = ("instruction", "response", "output", "input", "problem", "solution", "messages",
          "text", "input_ids")


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


LAYER_SPECS = ("local", "te")  # model.spec: the layer modules (model/spec.py)
EXPERTS_IMPLS = ("grouped", "sequential", "te_grouped")  # moe.experts_impl
FP8_FORMATS = ("none", "hybrid", "e4m3")  # precision.fp8
FP8_RECIPES = ("tensorwise", "blockwise", "mxfp8")  # precision.fp8_recipe
MAX_LAYERS = 10_000  # far above any real model; beyond it a value is a typo, not a model


@dataclass
class ModelConfig:
    """Decoder architecture of one of the model families (`xft_megatron/arch/families/`).
    `preset` fills the fields not given explicitly; so does `family` for the attention
    features it fixes (qkv_bias, qk_norm)."""

    preset: Optional[str] = None
    # llama | mistral | qwen2 | qwen3. None: the family of the attention features (qwen2 with
    # qkv_bias, qwen3 with qk_norm, llama with neither)
    family: Optional[str] = None
    num_layers: int = 4
    hidden_size: int = 64
    ffn_hidden_size: int = 176
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # GQA groups; None means = num_attention_heads
    head_dim: Optional[int] = None  # width of one head; None means hidden / attention heads
    vocab_size: int = 512
    max_position_embeddings: int = 256
    rope_theta: float = 10000.0
    rope_scaling_factor: float = 1.0  # linear RoPE scaling (positions / factor); 1 = off
    norm_eps: float = 1e-5
    qkv_bias: bool = False  # biases on the q, k and v projections (Qwen2)
    qk_norm: bool = False  # RMSNorm over each head's q and k, before RoPE (Qwen3)
    tie_embeddings: bool = False
    init_std: float = 0.02
    # the layer modules: local (Megatron-Core's and this project's) | te (Transformer Engine's
    # linears, fused norms and attention where it is installed; model/spec.py). How a run
    # computes, not what its checkpoint holds: checkpoints are named alike under both, and a
    # loaded checkpoint's stored value is not inherited
    spec: str = "local"  # one of LAYER_SPECS

    def __post_init__(self):
        _require(self.spec in LAYER_SPECS,
                 f"model.spec={self.spec!r} must be local or te (Transformer Engine)")
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "num_query_groups", "vocab_size", "max_position_embeddings"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value > 0,
                     f"model.{name}={value!r} must be a positive integer")
        _require(self.num_layers <= MAX_LAYERS,
                 f"model.num_layers={self.num_layers} exceeds {MAX_LAYERS}; check the value")
        if self.head_dim is None:
            _require(self.hidden_size % self.num_attention_heads == 0,
                     f"model.hidden_size={self.hidden_size} is not divisible by "
                     f"model.num_attention_heads={self.num_attention_heads} (or give "
                     "model.head_dim)")
            self.head_dim = self.hidden_size // self.num_attention_heads
        _require(isinstance(self.head_dim, int) and self.head_dim > 0 and self.head_dim % 2 == 0,
                 f"model.head_dim={self.head_dim!r} must be a positive even integer (RoPE "
                 "rotates pairs of channels)")
        _require(self.num_attention_heads % self.num_query_groups == 0,
                 f"model.num_attention_heads={self.num_attention_heads} is not divisible by "
                 f"model.num_query_groups={self.num_query_groups} (GQA needs whole groups)")
        _require(self.rope_theta > 0, f"model.rope_theta={self.rope_theta} must be > 0")
        _require(self.rope_scaling_factor >= 1.0,
                 f"model.rope_scaling_factor={self.rope_scaling_factor} must be >= 1 "
                 "(1 disables linear RoPE scaling)")
        _require(0 < self.norm_eps < 1, f"model.norm_eps={self.norm_eps} must be in (0, 1)")
        _require(self.init_std > 0, f"model.init_std={self.init_std} must be > 0")
        family = families.get(self.family) if self.family is not None else \
            families.for_features(self.qkv_bias, self.qk_norm)
        family.check(self)
        self.family = family.name

    def num_parameters(self) -> int:
        """Exact parameter count of the dense model (embeddings included)."""
        return counts.dense_parameters(self)

    def embedding_parameters(self) -> int:
        """The input embedding and the output layer (one matrix when tied)."""
        return counts.embedding_parameters(self)


@dataclass
class MoEConfig:
    """XFT mixture-of-experts (../XFT_SPEC.md sections 1-3). `num_experts=0` is a dense model.

    Expert 0 is the shared expert in modes `xft` and `none`; counts include it."""

    num_experts: int = 0  # total experts per MoE layer, shared included; 0 = dense FFN
    topk: int = 6  # experts per token, shared included
    mode: str = "xft"  # xft | none (shared weight 1, raw top-k probs) | vanilla (no shared)
    router_gate: str = "mlp"  # mlp: W2 tanh(W1 x) | linear: W x
    router_noise: bool = True  # noisy gating in training (learned noise scale); off in eval
    renorm: str = "probs"  # routed weights: probs (softmax of selected probs) | linear
    balance_loss: str = "cv"  # cv: CV^2(importance)+CV^2(load) | aux: Megatron switch | none
    balance_coeff: float = 0.01
    z_loss_coeff: float = 0.0  # router z-loss (0 = off)
    capacity_factor: Optional[float] = None  # None = dropless; else routed-expert capacity
    layer_freq: int = 1  # every layer_freq-th layer (0, f, 2f, ...) is MoE, others dense
    dispatcher: str = "alltoall"  # alltoall | allgather
    # grouped (ours: one grouped GEMM) | sequential (Megatron's SequentialMLP: one MLP per
    # expert, stored per expert) | te_grouped (Transformer Engine's grouped linears, FP8 with
    # precision.fp8; model.spec=te; stored as grouped, which is what a checkpoint records)
    experts_impl: str = "grouped"
    # where the shared expert runs: pool = expert 0 of the routed pool, every token dispatched
    # to it | dense = a tensor-parallel FFN on each rank's own tokens, off the dispatch path
    # (EP must divide the routed experts; needs expert_tensor = tensor). Checkpoints are the
    # same either way (the shared expert is stored as expert 0).
    shared_expert_impl: str = "pool"
    router_init_std: float = 0.02
    # noisy gating's schedule: 0 = constant noise; N > 0 = the noise scale is multiplied by
    # max(0, 1 - step / N), reaching zero (clean routing) at step N (router_noise=false: none)
    router_noise_anneal_steps: int = 0
    # per-layer routing diagnostics every step (clean-logit spread against the noise scale,
    # routed sets that survive the noise, clean routing entropy): moe.routing.DIAGNOSTICS
    diagnostics: bool = True
    merge_shared_weight: float = 0.75  # lambda: the shared expert's fixed merge coefficient in
    # the merge stage (train.stage=merge)

    def __post_init__(self):
        _require(isinstance(self.num_experts, int) and self.num_experts >= 0,
                 f"moe.num_experts={self.num_experts!r} must be an integer >= 0 (0 = dense)")
        _require(self.mode in ("xft", "none", "vanilla"),
                 f"moe.mode={self.mode!r} must be xft, none or vanilla")
        _require(self.router_gate in ("mlp", "linear"),
                 f"moe.router_gate={self.router_gate!r} must be mlp or linear")
        _require(self.renorm in ("probs", "linear"),
                 f"moe.renorm={self.renorm!r} must be probs or linear")
        _require(self.balance_loss in ("cv", "aux", "none"),
                 f"moe.balance_loss={self.balance_loss!r} must be cv, aux or none")
        _require(self.dispatcher in ("alltoall", "allgather"),
                 f"moe.dispatcher={self.dispatcher!r} must be alltoall or allgather")
        _require(self.experts_impl in EXPERTS_IMPLS,
                 f"moe.experts_impl={self.experts_impl!r} must be one of "
                 f"{', '.join(EXPERTS_IMPLS)}")
        _require(self.shared_expert_impl in ("pool", "dense"),
                 f"moe.shared_expert_impl={self.shared_expert_impl!r} must be pool or dense")
        _require(self.balance_coeff >= 0, f"moe.balance_coeff={self.balance_coeff} must be >= 0")
        _require(self.z_loss_coeff >= 0, f"moe.z_loss_coeff={self.z_loss_coeff} must be >= 0")
        _require(self.router_init_std > 0,
                 f"moe.router_init_std={self.router_init_std} must be > 0")
        _require(isinstance(self.router_noise_anneal_steps, int) and
                 self.router_noise_anneal_steps >= 0,
                 f"moe.router_noise_anneal_steps={self.router_noise_anneal_steps!r} must be an "
                 "integer >= 0 (0 = constant noise)")
        _require(isinstance(self.layer_freq, int) and self.layer_freq >= 1,
                 f"moe.layer_freq={self.layer_freq!r} must be an integer >= 1")
        _require(0.0 <= self.merge_shared_weight <= 1.0,
                 f"moe.merge_shared_weight={self.merge_shared_weight} must be in [0, 1]")
        _require(self.capacity_factor is None or self.capacity_factor > 0,
                 f"moe.capacity_factor={self.capacity_factor} must be > 0 (or null: dropless)")
        if not self.enabled:
            return
        _require(isinstance(self.topk, int) and self.topk >= 1,
                 f"moe.topk={self.topk!r} must be a positive integer")
        _require(self.topk <= self.num_experts,
                 f"moe.topk={self.topk} exceeds moe.num_experts={self.num_experts}")
        if self.has_shared_expert:
            _require(self.num_experts >= 2,
                     f"moe.mode={self.mode} needs moe.num_experts >= 2 (a shared expert plus at "
                     f"least one routed expert); got {self.num_experts}")
            _require(self.topk >= 2,
                     f"moe.mode={self.mode} needs moe.topk >= 2 (the shared expert plus at least "
                     f"one routed expert); got {self.topk}")
        if self.shared_expert_impl == "dense":
            _require(self.has_shared_expert,
                     f"moe.shared_expert_impl=dense needs a shared expert (moe.mode xft or none); "
                     f"moe.mode={self.mode} has none: leave moe.shared_expert_impl=pool")
            _require(self.experts_impl == "grouped",
                     "moe.shared_expert_impl=dense needs moe.experts_impl=grouped (the routed "
                     "experts stored after the shared one)")
        _require(self.topk >= 2, f"moe.topk={self.topk} is not supported: Megatron-Core's MoE "
                 "layer refuses top-1 routing over softmax scores; use moe.topk >= 2")

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0

    @property
    def has_shared_expert(self) -> bool:
        return self.mode in ("xft", "none")

    @property
    def num_routed(self) -> int:
        """Experts the router scores."""
        return self.num_experts - 1 if self.has_shared_expert else self.num_experts

    @property
    def routed_topk(self) -> int:
        """Routed experts selected per token."""
        return self.topk - 1 if self.has_shared_expert else self.topk

    @property
    def dispatched_experts(self) -> int:
        """Experts Megatron's dispatcher sends tokens to: all of them, or the routed ones when
        the shared expert runs off the dispatch path (shared_expert_impl=dense)."""
        return self.num_routed if self.shared_expert_impl == "dense" else self.num_experts

    @property
    def dispatched_topk(self) -> int:
        """Experts each token is dispatched to (see `dispatched_experts`)."""
        return self.routed_topk if self.shared_expert_impl == "dense" else self.topk

    def noise_multiplier(self, step: int) -> float:
        """The factor on the router's noise scale at (0-based) optimizer step `step`."""
        if not self.router_noise:
            return 0.0
        if not self.router_noise_anneal_steps:
            return 1.0
        return max(0.0, 1.0 - step / self.router_noise_anneal_steps)

    def is_moe_layer(self, layer_index: int) -> bool:
        """Whether global layer `layer_index` (0-based) is an MoE layer."""
        return self.enabled and layer_index % self.layer_freq == 0


@dataclass
class ParallelConfig:
    """Parallel layout. Data parallel is what remains of the world size."""

    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: Optional[int] = None  # interleaved schedule: model chunks per stage
    expert: int = 1
    expert_tensor: Optional[int] = None  # None means = tensor
    sequence_parallel: bool = False

    def __post_init__(self):
        if self.expert_tensor is None:
            self.expert_tensor = self.tensor
        for name in ("tensor", "pipeline", "expert", "expert_tensor"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 1,
                     f"parallel.{name}={value!r} must be an integer >= 1")
        if self.virtual_pipeline is not None:
            _require(self.pipeline > 1 and self.virtual_pipeline >= 2,
                     f"parallel.virtual_pipeline={self.virtual_pipeline} needs "
                     "parallel.pipeline > 1 and at least 2 chunks per stage")
        _require(not (self.sequence_parallel and self.tensor == 1),
                 "parallel.sequence_parallel=true needs parallel.tensor > 1 "
                 "(sequence parallelism splits activations over the tensor-parallel group)")

    @property
    def model_parallel_size(self) -> int:
        return self.tensor * self.pipeline

    def data_parallel_size(self, world_size: int) -> int:
        """DP size for a world size; raises ConfigError if the layout does not fit."""
        mp = self.model_parallel_size
        _require(world_size % mp == 0,
                 f"world size {world_size} is not divisible by parallel.tensor * "
                 f"parallel.pipeline = {self.tensor} * {self.pipeline} = {mp}; launch a "
                 f"multiple of {mp} processes or change the layout")
        dp = world_size // mp
        expert_mp = self.expert * self.expert_tensor * self.pipeline
        _require(world_size % expert_mp == 0,
                 f"world size {world_size} is not divisible by parallel.expert * "
                 f"parallel.expert_tensor * parallel.pipeline = {expert_mp}")
        return dp


@dataclass
class PrecisionConfig:
    """Numeric formats. bf16/fp16 keep fp32 master weights in the optimizer, unless
    master_weights=none (pure bf16: the optimizer updates the bf16 weights themselves)."""

    dtype: str = "fp32"  # fp32 | bf16 | fp16
    grad_reduce_in_fp32: bool = True
    # fp32: the optimizer steps an fp32 copy of bf16/fp16 weights (Megatron's mixed precision).
    # none: no copy; each update is computed in fp32 from the bf16 weight (optimizer state in
    # fp32) and written back into it (pure bf16, as the XFT reference trains). Needs
    # dtype=bf16 and train.distributed_optimizer=false
    master_weights: str = "fp32"  # fp32 | none
    # how master_weights=none writes an fp32 update result into a bf16 weight: nearest
    # (round to nearest even) | stochastic (unbiased: rounds up with probability equal to the
    # remainder's share of a bf16 ulp, random bits reproducible from train.seed)
    rounding: str = "nearest"  # nearest | stochastic
    # the weight gradients of the linear layers and experts go straight into DDP's gradient
    # buffer, one GEMM per weight accumulating in the buffer's dtype (fp32 with
    # grad_reduce_in_fp32), instead of a bf16 gradient added to it by a second kernel
    # (Megatron's gradient_accumulation_fusion; apex's kernel when installed, else ours;
    # Transformer Engine's own with model.spec=te). null (default): on with model.spec=te,
    # off otherwise (on an H100 it was no faster through the compiled layers: RESULTS.md)
    grad_accum_fusion: Optional[bool] = None
    # FP8 GEMMs in Transformer Engine's linears (model.spec=te, a GPU that has them): none |
    # hybrid (E4M3 activations and weights, E5M2 gradients) | e4m3 (E4M3 throughout). The
    # weights, their gradients and the optimizer keep `dtype`; the MoE router, this project's
    # experts (TE's with moe.experts_impl=te_grouped compute in FP8) and the output layer stay
    # bf16
    fp8: str = "none"
    # how FP8 values are scaled, all without state (nothing FP8 is stored in checkpoints):
    # tensorwise (one scale per tensor from its current values; Hopper, Ada) | blockwise
    # (one per 128-wide block; Hopper, CUDA >= 12.9) | mxfp8 (one per 32 values; Blackwell).
    # Delayed scaling is not offered: TE checkpoints its amax history as a Python pickle
    fp8_recipe: str = "tensorwise"

    def fuses_weight_gradients(self, te: bool) -> bool:
        """Whether weight gradients go straight into the buffer: grad_accum_fusion, or when it
        is null, whether the layers are Transformer Engine's (`te`)."""
        return te if self.grad_accum_fusion is None else self.grad_accum_fusion

    def __post_init__(self):
        _require(self.dtype in ("fp32", "bf16", "fp16"),
                 f"precision.dtype={self.dtype!r} must be one of fp32, bf16, fp16")
        _require(self.master_weights in ("fp32", "none"),
                 f"precision.master_weights={self.master_weights!r} must be fp32 or none")
        _require(self.rounding in ("nearest", "stochastic"),
                 f"precision.rounding={self.rounding!r} must be nearest or stochastic")
        if self.master_weights == "none":
            _require(self.dtype == "bf16",
                     f"precision.master_weights=none trains the weights in place and needs "
                     f"precision.dtype=bf16 (got {self.dtype}); use master_weights=fp32 for "
                     "fp32 or fp16 weights")
            _require(self.grad_reduce_in_fp32,
                     "precision.master_weights=none computes updates from fp32 gradients; set "
                     "precision.grad_reduce_in_fp32=true")
        _require(self.fp8 in FP8_FORMATS,
                 f"precision.fp8={self.fp8!r} must be one of {', '.join(FP8_FORMATS)}")
        _require(self.fp8_recipe in FP8_RECIPES,
                 f"precision.fp8_recipe={self.fp8_recipe!r} must be one of "
                 f"{', '.join(FP8_RECIPES)}"
                 + ("; delayed scaling stores its amax history in checkpoints as a Python "
                    "pickle, which is not loaded here: tensorwise scales from the current "
                    "values and stores nothing" if self.fp8_recipe == "delayed" else ""))
        _require(self.fp8 == "none" or self.dtype == "bf16",
                 f"precision.fp8={self.fp8} runs FP8 GEMMs between bf16 layers and needs "
                 f"precision.dtype=bf16 (got {self.dtype})")
        _require(self.rounding == "nearest" or self.master_weights == "none",
                 "precision.rounding=stochastic applies to precision.master_weights=none only "
                 "(with fp32 master weights the update is never rounded to bf16); set "
                 "precision.master_weights=none or precision.rounding=nearest")

    @property
    def width(self) -> int:
        """Bytes per value in this dtype."""
        return 4 if self.dtype == "fp32" else 2

    @property
    def torch_dtype(self):
        import torch

        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.dtype]


@dataclass
class TrainConfig:
    """Optimization and schedule."""

    seq_length: int = 128
    micro_batch_size: int = 4
    global_batch_size: int = 8
    train_steps: int = 20
    lr: float = 3e-4
    min_lr: float = 0.0
    lr_warmup_steps: int = 0
    lr_decay_style: str = "cosine"  # constant | linear | cosine
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    seed: int = 1234
    log_interval: int = 1
    # torch.compile each decoder layer, fusing RoPE, norms, residual adds and SwiGLU around
    # the GEMM/attention kernels. None = on with a GPU, off on the CPU.
    compile_layers: Optional[bool] = None
    # pretrain (plain LM) | sft (dense, instruction data) | moe (XFT MoE, from an upcycled
    # checkpoint) | merge (learnable merge: the MoE layers become the merged FFN of frozen
    # experts, only the merge coefficients train). None = from the model: moe for an MoE,
    # pretrain for a dense one. The one stage key (configs that carry the former moe.stage
    # still load: `upgrade_legacy_keys`)
    stage: Optional[str] = None
    # train.train_steps counts optimizer steps; with epochs set, train_steps is derived from the
    # dataset size (epochs * samples / global_batch_size) and any given value is ignored
    epochs: Optional[float] = None
    on_nan: str = "stop"  # stop | skip: a non-finite loss or gradient stops the run or skips it
    # adam (AdamW; adam_* keys) | adafactor (Shazeer & Stern 2018 as the XFT reference runs
    # it: no momentum, factored second moment, update clipping, lr from the schedule)
    optimizer: str = "adam"
    # Megatron's distributed optimizer (optimizer state sharded over data parallel). false:
    # every data-parallel rank holds the whole state; needed by optimizer=adafactor (its
    # factored statistics need whole matrices) and precision.master_weights=none
    distributed_optimizer: bool = True
    # learning-rate multiplier of the MoE router parameters (schedule included)
    router_lr_mult: float = 1.0
    adafactor_eps1: float = 1e-30  # added to the squared gradient
    adafactor_eps2: float = 1e-3  # floor of the parameter scale (adafactor_scale_parameter)
    adafactor_clip_threshold: float = 1.0  # update RMS clipping, per matrix
    adafactor_decay_rate: float = -0.8  # second-moment decay 1 - step**decay_rate
    adafactor_scale_parameter: bool = False  # lr * max(eps2, RMS(weight)); the reference: off

    def __post_init__(self):
        _require(self.optimizer in ("adam", "adafactor"),
                 f"train.optimizer={self.optimizer!r} must be adam or adafactor")
        _require(self.optimizer != "adafactor" or not self.distributed_optimizer,
                 "train.optimizer=adafactor needs whole weight matrices (its factored second "
                 "moment), which the distributed optimizer shards; set "
                 "train.distributed_optimizer=false")
        _require(self.router_lr_mult >= 0,
                 f"train.router_lr_mult={self.router_lr_mult} must be >= 0")
        _require(self.adafactor_eps1 > 0 and self.adafactor_eps2 > 0,
                 f"train.adafactor_eps1={self.adafactor_eps1} and train.adafactor_eps2="
                 f"{self.adafactor_eps2} must be > 0")
        _require(self.adafactor_clip_threshold > 0,
                 f"train.adafactor_clip_threshold={self.adafactor_clip_threshold} must be > 0")
        _require(self.adafactor_decay_rate < 0,
                 f"train.adafactor_decay_rate={self.adafactor_decay_rate} must be < 0 (the "
                 "second-moment decay 1 - step**decay_rate rises towards 1)")
        _require(self.stage is None or self.stage in STAGES, f"train.stage={self.stage!r} must be one of "
                 f"{', '.join(STAGES)}")
        _require(self.on_nan in ("stop", "skip"),
                 f"train.on_nan={self.on_nan!r} must be stop or skip")
        _require(self.epochs is None or self.epochs > 0,
                 f"train.epochs={self.epochs} must be > 0 (or null: use train.train_steps)")
        for name in ("seq_length", "micro_batch_size", "global_batch_size", "train_steps",
                     "log_interval"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value > 0,
                     f"train.{name}={value!r} must be a positive integer")
        _require(self.lr > 0, f"train.lr={self.lr} must be > 0")
        _require(0 <= self.min_lr <= self.lr,
                 f"train.min_lr={self.min_lr} must be in [0, train.lr={self.lr}]")
        _require(self.lr_decay_style in ("constant", "linear", "cosine"),
                 f"train.lr_decay_style={self.lr_decay_style!r} must be constant, linear "
                 "or cosine")
        # with epochs, the step count is known once the data is read (`check_warmup` then)
        _require(self.lr_warmup_steps >= 0,
                 f"train.lr_warmup_steps={self.lr_warmup_steps} must be >= 0")
        if self.epochs is None:
            self.check_warmup(self.train_steps)
        _require(self.clip_grad >= 0, f"train.clip_grad={self.clip_grad} must be >= 0")
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            _require(0 <= value < 1, f"train.{name}={value} must be in [0, 1)")
        _require(self.adam_eps > 0, f"train.adam_eps={self.adam_eps} must be > 0")
        _require(self.weight_decay >= 0,
                 f"train.weight_decay={self.weight_decay} must be >= 0")
        _require(isinstance(self.seed, int) and 0 <= self.seed < 2 ** 32,
                 f"train.seed={self.seed!r} must be an integer in [0, 2**32)")

    def check_warmup(self, steps: int) -> None:
        """Megatron's scheduler needs the warmup to end before the last step."""
        _require(self.lr_warmup_steps < steps,
                 f"train.lr_warmup_steps={self.lr_warmup_steps} must be 0 or less than the "
                 f"number of steps ({steps}" + (f", from train.epochs={self.epochs})"
                                                if self.epochs else ", train.train_steps)"))

    def num_microbatches(self, data_parallel_size: int) -> int:
        per_step = self.micro_batch_size * data_parallel_size
        _require(self.global_batch_size % per_step == 0,
                 f"train.global_batch_size={self.global_batch_size} is not divisible by "
                 f"train.micro_batch_size * data_parallel = {self.micro_batch_size} * "
                 f"{data_parallel_size} = {per_step}")
        return self.global_batch_size // per_step


STAGES = ("pretrain", "sft", "moe", "merge")


@dataclass
class DataConfig:
    """Training data. Record formats (auto-detected per record unless `format` is given):
    `instruction`/`response` (Magicoder / Evol-Instruct), `messages` (chat), `text` (plain LM),
    `input_ids` (pre-tokenized). Sources: files, Hugging Face datasets (`hf:NAME`, save_to_disk
    folders, Hub-layout folders; xft_megatron/data/hf_source.py) or builtin:stdlib."""

    path: Optional[str] = None  # comma-separated: JSON / JSONL / Parquet files, hf:NAME (a Hub
    # dataset), dataset folders (save_to_disk or Hub layout), builtin:stdlib
    split: str = "train"  # the split read from Hugging Face datasets
    subset: Optional[str] = None  # configuration (subset) of a Hub dataset / Hub-layout folder
    revision: Optional[str] = None  # branch, tag or commit of hf: datasets (default: main)
    columns: Dict[str, str] = field(default_factory=dict)  # {field: column} read `column` as
    # `field`, e.g. columns.instruction=problem columns.response=solution
    format: str = "auto"  # auto | instruction | chat | text | tokens
    tokenizer: Optional[str] = None  # HF tokenizer dir or sentencepiece .model; None = the
    # tokenizer stored with checkpoint.load (or bytes for builtin:stdlib)
    template: str = "magicoder"  # prompt template for instruction records: magicoder | chat | plain
    on_error: str = "fail"  # bad records: fail (report and stop) | skip (report and drop)
    packing: bool = True  # pack samples into full sequences (attention isolated per sample)
    cache_dir: Optional[str] = None  # tokenized-data cache; None = <checkpoint.save>/data_cache

    def __post_init__(self):
        _require(self.format in ("auto", "instruction", "chat", "text", "tokens"),
                 f"data.format={self.format!r} must be auto, instruction, chat, text or tokens")
        _require(self.template in ("magicoder", "chat", "plain"),
                 f"data.template={self.template!r} must be magicoder, chat or plain")
        _require(self.on_error in ("fail", "skip"),
                 f"data.on_error={self.on_error!r} must be fail or skip")
        _require(isinstance(self.split, str) and self.split.strip() != "",
                 f"data.split={self.split!r} must name a split, e.g. train")
        _require(isinstance(self.columns, dict),
                 f"data.columns={self.columns!r} must map record fields to column names, e.g. "
                 "data.columns.instruction=problem")
        for key, column in self.columns.items():
            _require(key in FIELDS, f"data.columns.{key}: unknown record field; the fields "
                     f"are {', '.join(FIELDS)}")
            _require(isinstance(column, str) and column != "",
                     f"data.columns.{key}={column!r} must be a column name (a string)")
        _require(len(set(self.columns.values())) == len(self.columns),
                 f"data.columns maps one column to several fields: {self.columns}")
        if self.revision is not None:
            _require(any(p.startswith("hf:") for p in self.paths),
                     f"data.revision={self.revision!r} applies to Hub datasets (data.path "
                     "entries hf:NAME), and data.path has none")

    @property
    def paths(self) -> List[str]:
        return [p.strip() for p in (self.path or "").split(",") if p.strip()]


@dataclass
class CheckpointConfig:
    """Where a run starts from and saves to."""

    load: Optional[str] = None  # initial weights (root or iter_* folder); the model and moe
    # sections default to the ones stored with it
    save: Optional[str] = None  # checkpoint root of this run (iter_*/ + latest)
    save_interval: int = 0  # save every N steps (0 = final save only)
    keep: int = 2  # complete checkpoints kept in `save` (older ones removed); 0 = keep all
    final: bool = True  # save at the end of the run (off: benchmarks that only need metrics)
    final_optimizer: bool = True  # the final save holds the optimizer state too (off: weights,
    # scheduler and step only, a quarter of the size in bf16; a --resume from it restarts the
    # optimizer moments, with a notice). Interval and signal saves always hold it: they exist
    # to resume from
    overwrite: bool = False  # start a new run from step 0 in a `save` that holds one already
    # (without it, and without --resume, such a run is refused)

    def __post_init__(self):
        _require(isinstance(self.save_interval, int) and self.save_interval >= 0,
                 f"checkpoint.save_interval={self.save_interval!r} must be an integer >= 0")
        _require(isinstance(self.keep, int) and self.keep >= 0,
                 f"checkpoint.keep={self.keep!r} must be an integer >= 0")


@dataclass
class Config:
    """The root: one field per concern."""

    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self):
        m, p, t = self.model, self.parallel, self.train
        _require(m.num_attention_heads % p.tensor == 0,
                 f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
                 f"parallel.tensor={p.tensor}")
        _require(m.num_query_groups % p.tensor == 0,
                 f"model.num_query_groups={m.num_query_groups} is not divisible by "
                 f"parallel.tensor={p.tensor}")
        _require(m.ffn_hidden_size % p.tensor == 0,
                 f"model.ffn_hidden_size={m.ffn_hidden_size} is not divisible by "
                 f"parallel.tensor={p.tensor}")
        _require(m.vocab_size % p.tensor == 0,
                 f"model.vocab_size={m.vocab_size} is not divisible by parallel.tensor="
                 f"{p.tensor}; pick a tensor-parallel size that divides the vocabulary")
        chunks = p.pipeline * (p.virtual_pipeline or 1)
        _require(m.num_layers % chunks == 0,
                 f"model.num_layers={m.num_layers} is not divisible by parallel.pipeline"
                 + (f" * parallel.virtual_pipeline = {chunks}" if p.virtual_pipeline else
                    f"={p.pipeline}"))
        _require(t.seq_length <= m.max_position_embeddings,
                 f"train.seq_length={t.seq_length} exceeds model.max_position_embeddings="
                 f"{m.max_position_embeddings}")
        self._check_moe()
        self._check_stage()
        self._check_optimizer()
        if p.sequence_parallel:
            _require(t.seq_length % p.tensor == 0,
                     f"train.seq_length={t.seq_length} is not divisible by parallel.tensor="
                     f"{p.tensor}, which sequence parallelism needs")
        self._check_fp8()
        if self.moe.enabled and self.moe.experts_impl == "te_grouped":
            _require(m.spec == "te", "moe.experts_impl=te_grouped takes Transformer Engine's "
                     "grouped linears; set model.spec=te (or moe.experts_impl=grouped)")
            _require(t.optimizer != "adafactor",
                     "train.optimizer=adafactor factors each expert's gate and up halves apart, "
                     "which TE's per-expert [2F, H] weights do not mark; use "
                     "moe.experts_impl=grouped with adafactor")

    def _check_moe(self):
        e, p = self.moe, self.parallel
        if not e.enabled:
            _require(p.expert == 1 and p.expert_tensor == p.tensor,
                     "parallel.expert and parallel.expert_tensor apply to MoE models only; "
                     "set moe.num_experts (or leave parallel.expert=1 and "
                     "parallel.expert_tensor unset)")
            return
        if e.shared_expert_impl == "dense" and self.stage != "merge":  # (the merge stage
            # runs its merged FFN, whatever the MoE stage did)
            _require(e.num_routed % p.expert == 0,
                     f"moe.shared_expert_impl=dense: the {e.num_routed} routed experts are not "
                     f"divisible by parallel.expert={p.expert}; each expert-parallel rank must "
                     f"hold the same number of routed experts (e.g. moe.num_experts="
                     f"{1 + p.expert * -(-e.num_routed // p.expert)}, or "
                     "moe.shared_expert_impl=pool)")
            _require(p.expert_tensor == p.tensor,
                     f"moe.shared_expert_impl=dense needs parallel.expert_tensor = "
                     f"parallel.tensor (got {p.expert_tensor} and {p.tensor}): the shared "
                     "expert is split like the dense FFN and stored with the routed experts, "
                     "whose stored chunks must all be the same shape; or use "
                     "moe.shared_expert_impl=pool")
        else:
            _require(e.num_experts % p.expert == 0,
                     f"moe.num_experts={e.num_experts} is not divisible by parallel.expert="
                     f"{p.expert}; each expert-parallel rank must hold the same number of "
                     "experts")
        _require(self.model.ffn_hidden_size % p.expert_tensor == 0,
                 f"model.ffn_hidden_size={self.model.ffn_hidden_size} is not divisible by "
                 f"parallel.expert_tensor={p.expert_tensor}")
        _require(p.tensor == 1 or p.sequence_parallel,
                 "MoE with parallel.tensor > 1 needs parallel.sequence_parallel=true "
                 "(Megatron-Core routes tokens per sequence-parallel shard)")

    def _check_fp8(self):
        """FP8 runs in TE's linears, whose GEMMs take widths that are multiples of 16 and
        token counts that are multiples of 16 (TE: 8 forward, 16 for the weight gradient)."""
        m, p, fp8 = self.model, self.parallel, self.precision.fp8
        if fp8 == "none":
            return
        _require(m.spec == "te", f"precision.fp8={fp8} runs in Transformer Engine's linears; "
                 "set model.spec=te (or precision.fp8=none)")
        tokens = self.train.seq_length // (p.tensor if p.sequence_parallel else 1)
        _require(tokens % 16 == 0,
                 f"precision.fp8={fp8}: each sequence gives TE's linears {tokens} tokens per "
                 f"rank (train.seq_length={self.train.seq_length}"
                 + (f" / parallel.tensor={p.tensor}" if p.sequence_parallel else "")
                 + "), and FP8 GEMMs need a multiple of 16; pick a train.seq_length that gives "
                 "one")
        head_dim = m.head_dim or m.hidden_size // m.num_attention_heads
        widths = {"model.hidden_size": m.hidden_size,
                  "the attention width per tensor-parallel rank": head_dim
                  * m.num_attention_heads // p.tensor,
                  "the key/value width per tensor-parallel rank": head_dim
                  * m.num_query_groups // p.tensor,
                  "model.ffn_hidden_size per tensor-parallel rank": m.ffn_hidden_size
                  // p.tensor}
        for name, width in widths.items():
            _require(width % 16 == 0, f"precision.fp8={fp8}: {name} is {width}, and FP8 GEMMs "
                     "need widths that are multiples of 16; use precision.fp8=none for this "
                     "model")

    def _check_optimizer(self):
        t, p = self.train, self.parallel
        _require(self.precision.master_weights != "none" or not t.distributed_optimizer,
                 "precision.master_weights=none updates each replica's bf16 weights in place, "
                 "which the distributed optimizer (sharded fp32 master weights) does not do; "
                 "set train.distributed_optimizer=false")
        _require(t.optimizer != "adafactor" or (p.tensor == 1 and p.expert_tensor == 1),
                 f"train.optimizer=adafactor with parallel.tensor={p.tensor}, "
                 f"parallel.expert_tensor={p.expert_tensor}: its row/column statistics would be "
                 "taken per tensor-parallel shard and differ from one process; use "
                 "parallel.tensor=1 and parallel.expert_tensor=1 (data, expert and pipeline "
                 "parallelism are fine)")

    @property
    def stage(self) -> str:
        """The training stage: train.stage, or the one the model implies when not given."""
        if self.train.stage is not None:
            return self.train.stage
        return "moe" if self.moe.enabled else "pretrain"

    def _check_stage(self):
        e, stage = self.moe, self.stage
        if stage in ("pretrain", "sft"):
            _require(not e.enabled, f"train.stage={stage} trains a dense model; set "
                     "moe.num_experts=0, or train.stage=moe for an XFT MoE")
        elif stage == "moe":
            _require(e.enabled,
                     "train.stage=moe needs an MoE model: load an upcycled checkpoint "
                     "(checkpoint.load, see `xft upcycle`) or set moe.num_experts")
        else:
            _require(e.enabled and e.has_shared_expert,
                     "train.stage=merge needs an XFT MoE with a shared expert: load an MoE "
                     "checkpoint (checkpoint.load) trained with moe.mode xft or none")

    # ---------------------------------------------------------------- building
    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "Config":
        data = upgrade_legacy_keys(dict(data or {}))
        _check_keys(data, cls, "")
        kwargs = {}
        for f in dataclasses.fields(cls):
            section = data.get(f.name)
            section = {} if section is None else section
            _require(isinstance(section, dict),
                     f"config section '{f.name}' must be a mapping, got {type(section).__name__}")
            sub_cls = _SECTIONS[f.name]
            _check_keys(section, sub_cls, f.name + ".")
            if sub_cls is ModelConfig:
                kwargs[f.name] = model_config_from_dict(section)
            else:
                kwargs[f.name] = _construct(sub_cls, section, f.name)
        return cls(**kwargs)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **sections) -> "Config":
        """A copy with whole sections replaced (re-validated). Replacing `moe` without
        `train` by a dense model for an MoE or the other way round lets the stage follow the
        new model (upcycle: dense -> moe; fold: -> pretrain); MoE settings replaced by other
        MoE settings keep it (a merge stage stays one)."""
        moe = sections.get("moe")
        if moe is not None and "train" not in sections and moe.enabled != self.moe.enabled:
            sections["train"] = dataclasses.replace(self.train, stage=None)
        return dataclasses.replace(self, **sections)


_SECTIONS = {"model": ModelConfig, "moe": MoEConfig, "parallel": ParallelConfig,
             "precision": PrecisionConfig, "train": TrainConfig, "data": DataConfig,
             "checkpoint": CheckpointConfig}


def upgrade_legacy_keys(data: Dict[str, Any]) -> Dict[str, Any]:
    """A config mapping in today's keys. Configs written before the stage had one key carry
    `moe.stage` (moe | merge) next to train.stage; every xft_config.yaml saved with a
    checkpoint then does. It is read as train.stage, with a one-line notice (FutureWarning):
    moe.stage=merge of an MoE is train.stage=merge unless train.stage is given (the given one
    wins, as it did); moe.stage=moe was the default and says nothing train.stage does not.
    `data` itself is not changed."""
    moe = data.get("moe")
    if not isinstance(moe, dict) or "stage" not in moe:
        return data
    moe = dict(moe)
    old = moe.pop("stage")
    data = {**data, "moe": moe}
    train = data.get("train")
    train = {} if train is None else train
    given = train.get("stage") if isinstance(train, dict) else None
    experts = moe.get("num_experts", 0)
    is_moe = isinstance(experts, int) and not isinstance(experts, bool) and experts > 0
    if old not in ("moe", "merge"):
        raise ConfigError(f"moe.stage={old!r}: moe.stage is no longer a config key; the stage "
                          f"is train.stage, one of {', '.join(STAGES)}")
    if given is not None:
        what = f"moe.stage={old} dropped, train.stage={given} is given"
    elif not is_moe:
        what = f"moe.stage={old} dropped, the model is dense"
    elif old == "moe" or not isinstance(train, dict):
        what = f"moe.stage={old} dropped, train.stage defaults to moe for an MoE"
    else:
        data["train"] = {**train, "stage": "merge"}
        what = "moe.stage=merge read as train.stage=merge"
    warnings.warn(f"config key moe.stage is now train.stage: {what}", FutureWarning,
                  stacklevel=3)
    return data


def _check_keys(data: Dict[str, Any], cls, prefix: str) -> None:
    known = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else \
                f"; valid keys: {', '.join(prefix + k for k in known)}"
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")


def _construct(cls, values: Dict[str, Any], section: str):
    values = _numbers_for_float_fields(cls, values)
    _check_types(cls, values, section)
    try:
        return cls(**values)
    except TypeError as e:  # wrong argument shape: report in config terms
        raise ConfigError(f"invalid '{section}' section: {e}") from None


@functools.lru_cache(maxsize=None)
def _field_types(cls) -> Dict[str, Optional[type]]:
    """Field -> the one builtin type (bool, int, float, str) its annotation names, Optional
    unwrapped; None for other annotations (mappings, unions of several types), not checked."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        if typing.get_origin(hint) is typing.Union:
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            hint = args[0] if len(args) == 1 else None
        out[name] = hint if hint in (bool, int, float, str) else None
    return out


def _numbers_for_float_fields(cls, values: Dict[str, Any]) -> Dict[str, Any]:
    """YAML 1.1 reads '1e-3' as a string; for a float field a number is what anyone writing it
    means. Other fields keep their strings ('20241201' stays a path)."""
    types = _field_types(cls)
    return {k: _as_float(v) if isinstance(v, str) and types.get(k) is float else v
            for k, v in values.items()}


def _check_types(cls, values: Dict[str, Any], section: str) -> None:
    """Each given value must have the type its field is annotated with (ints accepted as
    floats); a new field is checked by its annotation alone."""
    types = _field_types(cls)
    for name, value in values.items():
        expected = types.get(name)
        if value is None or expected is None:
            continue
        if expected is bool:
            ok = isinstance(value, bool)
        elif expected is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif expected is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            _require(not ok or math.isfinite(value),
                     f"{section}.{name}={value!r} must be a finite number")
        else:
            ok = isinstance(value, str)
        hint = (f" (quote it for a text value: {section}.{name}='{value}')"
                if expected is str and isinstance(value, (int, float)) else "")
        _require(ok, f"{section}.{name}={value!r} has type {type(value).__name__}, "
                     f"expected {expected.__name__}{hint}")


def model_config_from_dict(values: Dict[str, Any]) -> ModelConfig:
    """A ModelConfig from a mapping; a `preset` key fills the fields not given, and a `family`
    key the attention features that family fixes."""
    values = _numbers_for_float_fields(ModelConfig, values)
    _check_types(ModelConfig, values, "model")  # names must be strings to look them up
    preset, family = values.get("preset"), values.get("family")
    # given values over the family's features over the preset's values
    merged = {**(families.preset_values(preset) if preset else {}),
              **(families.get(family).features() if family is not None else {}), **values}
    return _construct(ModelConfig, merged, "model")


def _as_float(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def config_keys() -> List[str]:
    return [f"{s}.{f.name}" for s, cls in _SECTIONS.items() for f in dataclasses.fields(cls)]
