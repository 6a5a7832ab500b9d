"""Parameter counts and a per-rank memory estimate for `xft train --dry-run`.

Parameter counts are `arch/counts.py`'s (exact for the architecture: embeddings included;
MoE layers: every expert plus the router). The memory estimate is a planning figure, per GPU,
for the most loaded pipeline stage, without activation recomputation:
  weights        params_on_rank * bytes(dtype)
  gradients      params_on_rank * 4        (fp32 gradient buffers, precision.grad_reduce_in_fp32)
  optimizer      params_on_rank * (8 + 4 if dtype != fp32 else 8) / data-parallel shards
                 (Adam moments + fp32 master weights, distributed optimizer)
  activations    per token and layer: bytes(dtype) * (16 h + k (h + 3 F))  (attention block with
                 SDPA, FFN of the k experts a token uses; with expert parallelism and a
                 shared expert, the k of the rank holding it, which serves every token of
                 its group; 1 in the merge stage), / TP with sequence parallelism,
                 times the micro-batches in flight (1F1B: up to the pipeline size), plus the
                 fp32 logits and their gradient.
"""

from dataclasses import dataclass
from xft_megatron.arch.counts import parameter_counts
from xft_megatron.config import Config
from xft_megatron.errors import ConfigError


@dataclass
class MemoryEstimate:
    weights: float
    gradients: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations


def _expert_copies_per_token(moe, ep: int, stage: str) -> float:
    """FFN activations per token of the busiest rank, in dense-FFN units. The merge stage
    runs one merged FFN; MoE layers run top-k experts, and under expert parallelism the
    rank holding the shared expert (expert 0) gets every token of its expert-parallel group
    once for it, plus its share of routed copies."""
    if not moe.enabled or stage == "merge":
        return 1.0
    if not moe.has_shared_expert or ep == 1 or moe.shared_expert_impl == "dense":
        return float(moe.topk)  # dense: the shared FFN on each rank's own tokens
    routed_here = moe.num_experts // ep - 1  # the shared expert's rank holds fewer routed
    shared_rank = ep * (1 + routed_here * (moe.topk - 1) / (moe.num_experts - 1))
    return max(float(moe.topk), shared_rank)


def estimate(cfg: Config, world_size: int) -> MemoryEstimate:
    """Bytes per rank (see the module docstring for the formula)."""
    m, moe, p, t = cfg.model, cfg.moe, cfg.parallel, cfg.train
    counts = parameter_counts(m, moe)
    dp = p.data_parallel_size(world_size)
    expert_dp = world_size // (p.expert * p.expert_tensor * p.pipeline)
    dense_params = (counts["total"] - counts["expert"]) / (p.tensor * p.pipeline)
    expert_params = counts["expert"] / (p.expert * p.expert_tensor * p.pipeline)
    if cfg.stage == "merge":  # experts frozen: weights only
        trained_dense, trained_expert = 0.0, 0.0
    else:
        trained_dense, trained_expert = dense_params, expert_params
    width = cfg.precision.width
    state = 8 + (4 if cfg.precision.dtype != "fp32" else 0)
    weights = (dense_params + expert_params) * width
    grads = (trained_dense + trained_expert) * 4
    optim = state * (trained_dense / dp + trained_expert / expert_dp)
    h, f = m.hidden_size, m.ffn_hidden_size
    k = _expert_copies_per_token(moe, p.expert, cfg.stage)
    per_token_layer = width * (16 * h + k * (h + 3 * f))
    tokens = t.micro_batch_size * t.seq_length
    layers = m.num_layers / p.pipeline
    split = p.tensor if p.sequence_parallel else 1
    in_flight = min(p.pipeline, t.num_microbatches(dp))
    acts = per_token_layer * tokens * layers / split * in_flight
    acts += 2 * 4 * tokens * m.vocab_size / p.tensor  # fp32 logits and their gradient
    return MemoryEstimate(weights, grads, optim, acts)


def machine_memory(local_ranks: int) -> float:
    """Bytes one rank may use: its GPU's memory, or the host's memory shared by the ranks on it."""
    import os

    import torch

    if torch.cuda.is_available():
        return float(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return host / max(1, local_ranks)


# the estimate is a planning figure: a run is refused only when it is clearly over
ESTIMATE_SLACK = 1.25


def check_fits(cfg: Config, world_size: int, available: float) -> None:
    """Refuse, naming the keys, a configuration that cannot fit `available` bytes per rank:
    its weights, gradients and optimizer state alone exceed them, or everything with the
    activations exceeds them by more than ESTIMATE_SLACK. Before Megatron allocates anything."""
    est = estimate(cfg, world_size)
    fixed = est.weights + est.gradients + est.optimizer
    if fixed <= available and est.total <= ESTIMATE_SLACK * available:
        return
    m, t, gib = cfg.model, cfg.train, 2 ** 30
    if fixed > available:
        embedding = m.embedding_parameters()
        biggest = ("model.vocab_size" if embedding > m.num_parameters() - embedding
                   else "model.num_layers")
        need = f"weights, gradients and optimizer state need ~{fixed / gib:,.1f} GiB per rank"
        fix = (f"{biggest} dominates). Check {biggest}, or spread the model over more GPUs "
               "(parallel.tensor, parallel.pipeline, parallel.expert)")
    else:
        need = (f"weights, gradients, optimizer state and activations need ~"
                f"{est.total / gib:,.1f} GiB per rank ({est.activations / gib:,.1f} of them "
                f"activations)")
        fix = ("activations dominate). Lower train.micro_batch_size, train.seq_length or "
               "model.num_layers, or use more GPUs")
    raise ConfigError(
        f"the model does not fit: {need}, this machine has {available / gib:,.1f} GiB per rank "
        f"(model.num_layers={m.num_layers}, model.hidden_size={m.hidden_size}, "
        f"model.vocab_size={m.vocab_size}, train.micro_batch_size={t.micro_batch_size}, "
        f"train.seq_length={t.seq_length}; {fix}")
