"""Per-layer router statistics of the last step, reduced over the whole layout.

Each XFT router accumulates its (balance + z) loss and its routing counts over the training
micro-batches it ran; `collect` averages the losses per layer over micro-batches and
data-parallel ranks, and `collect_routing` sums the counts over every rank that routed
different tokens; both gather the layers from every pipeline stage. `collect_routing` must be
called before `collect`, which resets the accumulators.
"""

from typing import List, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from xft_megatron import compat
from xft_megatron.moe.router import XFTRouter


def routers(chunks: List):
    for c in chunks:
        for m in c.modules():
            if isinstance(m, XFTRouter):
                yield m


def collect(chunks: List, num_layers: int) -> torch.Tensor:
    """[num_layers] float64 on CPU, identical on every rank: each MoE layer's router loss
    averaged over this step's micro-batches (0 for dense layers and when no loss is on)."""
    per_layer = torch.zeros(num_layers, dtype=torch.float64, device=compat.device())
    for r in routers(chunks):
        if r.loss_count:
            per_layer[r.layer_number - 1] = r.loss_sum / r.loss_count
        r.reset_loss_stats()
    # every rank of a tensor-parallel group holds the same value: reduce over DP and PP only
    dist.all_reduce(per_layer, group=ps.get_data_parallel_group())
    per_layer /= ps.get_data_parallel_world_size()
    dist.all_reduce(per_layer, group=ps.get_pipeline_model_parallel_group())
    return per_layer.cpu()


def collect_routing(chunks: List, num_layers: int, num_experts: int
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(load [num_layers, num_experts], g0 [num_layers]) float64 on CPU, identical on every
    rank: the fraction of the step's tokens sent to each expert (the shared expert: 1) and
    the mean shared-expert weight g_0 per MoE layer; zeros for dense layers."""
    stats = torch.zeros(num_layers, num_experts + 2, dtype=torch.float64,
                        device=compat.device())
    sequence_parallel = False
    for r in routers(chunks):
        if r.routing_stats is not None:
            stats[r.layer_number - 1] = r.routing_stats
        sequence_parallel = r.sequence_parallel
    if sequence_parallel:  # each tensor-parallel rank routed its own share of the tokens
        dist.all_reduce(stats, group=ps.get_tensor_model_parallel_group())
    dist.all_reduce(stats, group=ps.get_data_parallel_group())
    dist.all_reduce(stats, group=ps.get_pipeline_model_parallel_group())
    stats = stats.cpu()
    tokens = stats[:, -1:].clamp(min=1)
    return stats[:, :num_experts] / tokens, stats[:, num_experts] / tokens[:, 0]
