"""Grouped SwiGLU experts: all local experts in one grouped GEMM per projection.

Weights of the E local experts (F = this rank's slice of the FFN width under expert tensor
parallelism):
    fc1_weight [E, 2, F, H]   gate (index 0) and up (index 1) projections
    fc2_weight [E, H, F]      down projection
so each expert is exactly a dense SwiGLU FFN (upcycling copies the dense weights in, the merge
averages them out). The GEMMs run through `torch.nn.functional.grouped_mm` on CUDA in bf16
(Hopper and newer); elsewhere (CPU, fp32, fp16, unaligned shapes) a per-expert loop computes
the same thing. Outputs are partial sums under expert tensor parallelism; Megatron's token
dispatcher reduces them, as for its own expert modules.
"""

from functools import partial

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.tensor_parallel import get_cuda_rng_tracker, get_expert_parallel_rng_tracker_name
from megatron.core.transformer.module import MegatronModule

from xft_megatron.runtime.compat import kernels

_ALIGN_BYTES = 16  # grouped GEMM kernels need 16-byte aligned strides


def grouped_gemm_supported(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether `F.grouped_mm` can run these operands (else the per-expert loop is used)."""
    if not (hasattr(F, "grouped_mm") and x.is_cuda and x.dtype == torch.bfloat16):
        return False
    if torch.cuda.get_device_capability(x.device) < (9, 0):
        return False
    sizes = [x.shape[-1]] + [d for w in weights for d in w.shape[-2:]]
    return all((d * x.element_size()) % _ALIGN_BYTES == 0 for d in sizes)


def _swiglu_forward(h: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """h [n, 2F] = [gate | up] -> SiLU(gate) * up * probs [n, F] in h's dtype (fp32 math)."""
    gate, up = h.to(_math_dtype(h)).chunk(2, dim=-1)
    return (F.silu(gate) * up * probs.unsqueeze(-1)).to(h.dtype)


def _math_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)  # bf16/fp16 -> fp32, fp64 stays


def _swiglu_backward(h: torch.Tensor, probs: torch.Tensor, grad: torch.Tensor):
    """Gradients of `_swiglu_forward` w.r.t. h ([n, 2F], h's dtype) and probs ([n]), written
    functionally for torch.compile (CUDA), which fuses it into one kernel: out-of-place ops
    and a cat, no views written into (`_swiglu_backward_eager` computes the same in place)."""
    gate, up = h.to(_math_dtype(h)).chunk(2, dim=-1)
    grad = grad.to(gate.dtype)
    sig = torch.sigmoid(gate)
    silu = gate * sig
    p = probs.to(gate.dtype).unsqueeze(-1)
    d_gate = grad * up * p * sig * (1.0 + gate * (1.0 - sig))
    d_up = grad * silu * p
    d_probs = (grad * silu * up).sum(dim=-1)
    return torch.cat([d_gate, d_up], dim=-1).to(h.dtype), d_probs.to(probs.dtype)


def _swiglu_backward_eager(h: torch.Tensor, probs: torch.Tensor, grad: torch.Tensor):
    """`_swiglu_backward` for eager execution (the CPU), in few passes over memory: shared
    products, in-place updates, the two halves written straight into the output."""
    gate, up = h.to(_math_dtype(h)).chunk(2, dim=-1)
    grad = grad.to(gate.dtype)
    p = probs.to(gate.dtype).unsqueeze(-1)
    sig = torch.sigmoid(gate)
    silu = gate * sig
    grad_up = grad * up
    d_probs = torch.linalg.vecdot(grad_up, silu, dim=-1)
    out = torch.empty(h.shape, dtype=gate.dtype, device=h.device)
    d_gate, d_up = out.chunk(2, dim=-1)
    dsilu = torch.rsub(sig, 1.0).mul_(gate).add_(1.0).mul_(sig)  # sig * (1 + gate (1 - sig))
    torch.mul(grad_up, p, out=d_gate).mul_(dsilu)
    torch.mul(grad, p, out=d_up).mul_(silu)
    return out.to(h.dtype), d_probs.to(probs.dtype)


_compiled = {}


def _kernel(fn, on_cuda: bool):
    """`fn` fused into one kernel by torch.compile on CUDA; plain eager elsewhere. Only the
    token dimension is dynamic (marked per call): static feature sizes keep the generated
    kernel vectorized, and varying token counts do not recompile."""
    if not on_cuda:
        return fn
    if fn not in _compiled:
        compiled = torch.compile(fn, dynamic=False)

        def call(*tensors):
            for t in tensors:
                torch._dynamo.maybe_mark_dynamic(t, 0)
            return compiled(*tensors)

        _compiled[fn] = call
    return _compiled[fn]


class _WeightedSwiGLU(torch.autograd.Function):
    """SiLU(gate) * up * probs with a hand-written backward: one fused kernel each way."""

    @staticmethod
    def forward(ctx, h, probs):
        ctx.save_for_backward(h, probs)
        return _kernel(_swiglu_forward, h.is_cuda)(h, probs)

    @staticmethod
    def backward(ctx, grad):
        h, probs = ctx.saved_tensors
        if h.is_cuda:
            return _kernel(_swiglu_backward, True)(h, probs, grad.contiguous())
        return _swiglu_backward_eager(h, probs, grad.contiguous())


def weighted_swiglu(h: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """h [n, 2F] = [gate | up], probs [n] -> SiLU(gate) * up * probs [n, F]."""
    return _WeightedSwiGLU.apply(h, probs)


def swiglu_experts(x, tokens_per_expert, probs, fc1, fc2, use_grouped: bool,
                   into_main_grad: bool = False):
    """x [n, H] grouped by expert (counts in tokens_per_expert [E]); probs [n] weights.
    fc1 [E, 2F, H] (or the experts' [E, 2, F, H] parameter), fc2 [E, H, F]. Returns [n, H] =
    sum-weighted expert outputs per token. `into_main_grad`: fc1 and fc2 are parameters under
    Megatron DDP, whose weight gradients go straight into `main_grad`."""
    # the grouped GEMM needs no counts on the host; the loop and the weight gradients do
    counts = tokens_per_expert.tolist() if into_main_grad or not use_grouped else None
    offs = (torch.cumsum(tokens_per_expert.to(x.device), 0, dtype=torch.int32)
            if use_grouped else None)
    mm = _ExpertLinearIntoMainGrad.apply if into_main_grad else _expert_mm
    act = weighted_swiglu(mm(x, fc1, counts, offs), probs)  # [n, 2F] -> [n, F]
    return mm(act, fc2, counts, offs)  # [n, H]


def _expert_mm(x, w, counts, offs):
    """x [n, in] grouped by expert, w [E, out, in] (or [E, ..., in]) -> [n, out]: x_e @ w[e]^T.
    `offs` (cumulative counts on x's device) selects the grouped GEMM, else a loop over the
    host `counts`."""
    w = w.view(w.shape[0], -1, w.shape[-1])
    if offs is not None:
        return F.grouped_mm(x, w.transpose(-2, -1), offs=offs)
    outs = [F.linear(xe, w[e]) for e, xe in enumerate(x.split(counts))]
    if len(outs) == 1:  # one expert (the shared one off the dispatch path): no copy
        return outs[0]
    return torch.cat(outs, dim=0) if outs else x.new_zeros(0, w.shape[1])


class _ExpertLinearIntoMainGrad(torch.autograd.Function):
    """`_expert_mm` with the weight gradient accumulated straight into the parameter's
    `main_grad` (Megatron DDP's buffer), one GEMM per expert accumulating in the buffer's
    dtype (`compat.kernels.accumulate_wgrad`), as Megatron's linear layers do under
    `gradient_accumulation_fusion`: the parameter is marked `grad_added_to_main_grad` and
    autograd gets a placeholder gradient, which DDP's hook then drops."""

    @staticmethod
    def forward(ctx, x, param, counts, offs):
        ctx.save_for_backward(x, param)
        ctx.counts, ctx.offs = counts, offs
        return _expert_mm(x, param, counts, offs)

    @staticmethod
    def backward(ctx, grad):
        x, param = ctx.saved_tensors
        w = param.view(param.shape[0], -1, param.shape[-1])  # [E, out, in]
        grad = grad.contiguous()
        dx = _expert_mm(grad, w.transpose(-2, -1), ctx.counts, ctx.offs)
        main = param.main_grad.view(w.shape)
        for e, (xe, ge) in enumerate(zip(x.split(ctx.counts), grad.split(ctx.counts))):
            if xe.shape[0]:
                kernels.accumulate_wgrad(main[e], ge, xe)
        param.grad_added_to_main_grad = True
        placeholder = torch.empty(param.shape, dtype=param.dtype, device=param.device)
        return dx, placeholder, None, None


def into_ffn_region(x: torch.Tensor, group, sequence_parallel: bool) -> torch.Tensor:
    """Tokens [n, ...] of this rank -> the tokens an FFN split over `group` (by its width)
    computes on: gathered over the sequence-parallel shards, else the same tokens. Backward:
    the partial input gradients of the width shards are summed (reduce-scattered or
    all-reduced)."""
    if group.size() == 1:
        return x
    if sequence_parallel:
        return tensor_parallel.gather_from_sequence_parallel_region(x, group=group)
    return tensor_parallel.copy_to_tensor_model_parallel_region(x, group=group)


def out_of_ffn_region(y: torch.Tensor, group, sequence_parallel: bool) -> torch.Tensor:
    """The FFN's partial sums over its width shards -> this rank's tokens' output: summed and
    scattered back over the sequence-parallel shards, else summed."""
    if group.size() == 1:
        return y
    if sequence_parallel:
        return tensor_parallel.reduce_scatter_to_sequence_parallel_region(y, group=group)
    return tensor_parallel.reduce_from_tensor_model_parallel_region(y, group=group)


class _ExpertWeights(MegatronModule):
    """fc1/fc2 of `num_local` SwiGLU experts, each a shard of the FFN width over `ffn_group`,
    stored as experts `first` .. `first + num_local - 1` of the layer's [num_experts, ...]
    tensors (arch.names.EXPERT_FC1 / EXPERT_FC2) and replicated as `replica_id` says.

    `state_of`: None, or (first, count) for a layer whose shared expert is a separate module
    (`SharedExpert`). Then each expert is a chunk of its own in checkpoints (as Megatron's
    SequentialMLP writes them): torch_dist wants every chunk of a tensor the same shape, and
    the shared expert is one expert. And the optimizer state is stored apart: Megatron chains
    one optimizer for dense and one for expert-parallel parameters, each storing its state
    under keys of its own, and the shared expert's parameters are dense ones (their gradients
    reduce over the whole data-parallel group). Each entry names, as `optimizer_entry`, the
    tensor its state is stored as: these experts as experts first .. first + n - 1 of `count`
    (the routed experts, or the shared one alone), under this module's own name."""

    def __init__(self, num_local, config, *, ffn_group, first, num_experts, replica_id,
                 state_of=None, rng_name=None):
        super().__init__(config)
        self.num_local_experts = e = num_local
        self.ffn_group = ffn_group
        self.first_expert, self.num_experts = first, num_experts
        self.replica_id = replica_id
        self.state_of = state_of
        tp = ffn_group.size()
        ffn = config.moe_ffn_hidden_size
        if ffn % tp:
            raise ValueError(f"FFN width {ffn} is not divisible by the {tp} ranks that split it")
        f, h = ffn // tp, config.hidden_size
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.fc1_weight = torch.nn.Parameter(
            torch.empty(e, 2, f, h, dtype=config.params_dtype, device=device))
        self.fc2_weight = torch.nn.Parameter(
            torch.empty(e, h, f, dtype=config.params_dtype, device=device))
        if config.perform_initialization:
            tracker = get_cuda_rng_tracker()
            with tracker.fork() if rng_name is None else tracker.fork(rng_name):
                config.init_method(self.fc1_weight)
                config.output_layer_init_method(self.fc2_weight)
        # weight gradients straight into DDP's main_grad (training.optimizer.wrap_ddp sets
        # it, as for Megatron's linear layers)
        self.gradient_accumulation_fusion = False
        for p in (self.fc1_weight, self.fc2_weight):
            p.tensor_model_parallel = True
            p.partition_dim = p.dim() - 2 if p is self.fc1_weight else p.dim() - 1
            p.partition_stride = 1

    def _fuse_wgrad(self) -> bool:
        return self.gradient_accumulation_fusion and torch.is_grad_enabled() and \
            self.fc1_weight.requires_grad

    def _storage_prefix(self, prefix: str) -> str:
        """The checkpoint key prefix of these weights, given the module's own prefix."""
        return prefix

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Global tensors [num_experts, ...] split over experts (axis 0) and over the FFN
        axis (`ffn_group`), replicated as `replica_id` says."""
        out = {}
        for name in ("fc1_weight", "fc2_weight"):
            key = self._storage_prefix(prefix) + name
            param = getattr(self, name)
            if self.state_of is None:
                out[prefix + name] = self._chunk(key, param, sharded_offsets, self.first_expert,
                                                 self.num_experts, self.replica_id)
                continue
            entry = ShardedTensorFactory(key, param, partial(self._expert_chunks, sharded_offsets),
                                         _stack_expert_chunks, self.replica_id)
            entry.optimizer_entry = self._chunk(prefix + name, param, sharded_offsets,
                                                *self.state_of, self.replica_id)
            out[prefix + name] = entry
        return out

    def _chunk(self, key, data, sharded_offsets, first, count, replica_id) -> ShardedTensor:
        """`data` [n, 2, F, H] or [n, H, F] (or the same with axes reduced to 1: optimizer
        statistics) as experts first .. first + n - 1 of a tensor of `count` experts."""
        pre = len(sharded_offsets)
        n = data.shape[0]
        if first % n or count % n:
            raise ValueError(f"experts {first}..{first + n - 1} of {count} are not one chunk "
                             "of equal ones; use per-expert chunks")
        return ShardedTensor.from_rank_offsets(
            key, data, *sharded_offsets, (pre + 0, first // n, count // n),
            (pre + 2, self.ffn_group.rank(), self.ffn_group.size()),
            replica_id=replica_id, prepend_axis_num=pre)

    def _expert_chunks(self, sharded_offsets, key, data, replica_id, flattened_range):
        if flattened_range is not None:
            raise ValueError("per-expert checkpoint chunks do not support flattened optimizer "
                             "state; the checkpoints here store it dp_reshardable")
        return {str(e): self._chunk(key, data[e:e + 1], sharded_offsets, self.first_expert + e,
                                    self.num_experts, replica_id)
                for e in range(data.shape[0])}


def _stack_expert_chunks(parts: dict) -> torch.Tensor:
    return torch.cat([parts[str(e)] for e in range(len(parts))], dim=0)


class GroupedExperts(_ExpertWeights):
    """Megatron-Core experts module (`forward(tokens, tokens_per_expert, probs)`), built the
    way Megatron's MoELayer builds its experts (`moe_layer.ExpertsBuilder`): `name` is the
    module's path in the model, which Megatron passes along and nothing here needs.
    `shared_slots`: stored experts before the routed ones that this module does not hold
    (1 when the shared expert is a separate module, `SharedExpert`; 0 when it is expert 0 of
    the routed pool)."""

    def __init__(self, num_local_experts, config, /, *, pg_collection, name=None,
                 shared_slots: int = 0):
        ep_rank, ep_size = pg_collection.ep.rank(), pg_collection.ep.size()
        super().__init__(
            num_local_experts, config, ffn_group=pg_collection.expt_tp,
            first=shared_slots + ep_rank * num_local_experts,
            num_experts=shared_slots + ep_size * num_local_experts,
            replica_id=(0, 0, pg_collection.expt_dp.rank()),
            state_of=(ep_rank * num_local_experts, ep_size * num_local_experts)
            if shared_slots else None,
            rng_name=get_expert_parallel_rng_tracker_name())
        for p in (self.fc1_weight, self.fc2_weight):
            # gradients reduce over the expert-data-parallel group (ranks holding this shard)
            p.allreduce = False

    def forward(self, tokens, tokens_per_expert, probs):
        """tokens [n, H] sorted by local expert -> ([n, H] partial under ETP, None)."""
        e, _, f, h = self.fc1_weight.shape
        fc1 = self.fc1_weight.view(e, 2 * f, h)
        use_grouped = grouped_gemm_supported(tokens, fc1, self.fc2_weight)
        out = swiglu_experts(tokens, tokens_per_expert, probs, self.fc1_weight, self.fc2_weight,
                             use_grouped, into_main_grad=self._fuse_wgrad())
        return out, None

    def backward_dw(self):
        """Weight gradients are not deferred here (Megatron calls this in overlap modes)."""


class SharedExpert(_ExpertWeights):
    """The shared expert as a dense FFN on every token of this rank, off the dispatch path
    (`moe.shared_expert_impl=dense`): `forward(hidden_states, weight)` -> weight * FFN(x).

    Split over the tensor-parallel group like the dense FFN (the input gathered over the
    sequence-parallel shards, the output reduce-scattered back), replicated over the expert
    and expert-data-parallel ranks, whose gradients it reduces with the dense weights. Stored
    as expert 0 of the layer's experts tensors, so checkpoints are those of the layout with
    the shared expert in the routed pool. Needs expert tensor parallel = tensor parallel
    (every chunk of a stored tensor must have the same shape)."""

    _SUFFIX = "shared_expert."

    def __init__(self, config, *, pg_collection, num_experts: int):
        if pg_collection.expt_tp.size() != pg_collection.tp.size():
            raise ValueError("the shared expert off the dispatch path needs expert tensor "
                             "parallel = tensor parallel")
        super().__init__(
            1, config, ffn_group=pg_collection.tp, first=0, num_experts=num_experts,
            # replicas: the ranks of one data-parallel group, i.e. every (EP rank, expert
            # DP rank) pair when ETP = TP
            replica_id=(0, pg_collection.ep.rank(), pg_collection.expt_dp.rank()),
            state_of=(0, 1), rng_name=None)  # the tensor-parallel stream
        self.sequence_parallel = config.sequence_parallel

    def _storage_prefix(self, prefix: str) -> str:
        if not prefix.endswith(self._SUFFIX):
            raise ValueError(f"the shared expert must be the module `{self._SUFFIX[:-1]}` of its "
                             f"MoE layer; got the prefix {prefix!r}")
        return prefix[:-len(self._SUFFIX)] + "experts."

    def forward(self, hidden_states: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """hidden_states [s, b, H] (this rank's sequence shard under sequence parallelism),
        weight [s*b] (g_0 per token, fp32) -> weight * SwiGLU FFN [s, b, H]."""
        shape = hidden_states.shape
        region = self.ffn_group, self.sequence_parallel
        x = into_ffn_region(hidden_states.reshape(-1, shape[-1]), *region)
        w = into_ffn_region(weight.reshape(-1), *region)
        counts = torch.tensor([x.shape[0]])
        out = swiglu_experts(x, counts, w, self.fc1_weight, self.fc2_weight, False,
                             into_main_grad=self._fuse_wgrad())  # [n, H] partial sums
        return out_of_ffn_region(out, *region).view(shape)
