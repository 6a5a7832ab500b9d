"""Per-layer router statistics of the last step, reduced over the whole layout.

Each XFT router accumulates its (balance + z) loss and its routing counts over the training
micro-batches it ran; `collect` averages the losses per layer over micro-batches and
data-parallel ranks, and `collect_routing` sums the counts over every rank that routed
different tokens; both gather the layers from every pipeline stage. `collect_routing` must be
called before `collect`, which resets the accumulators.
"""

from typing import Dict, List

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from xft_megatron.model.moe import routing
from xft_megatron.model.moe.router import XFTRouter
from xft_megatron.runtime import compat


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


def set_step_settings(chunks: List, noise_multiplier: float = None,
                      aux_loss_scale: float = None) -> None:
    """Per-step router settings: the factor on the noise scale (`MoEConfig.noise_multiplier`)
    and the factor on the router losses' gradient (`training.step.forward_backward`)."""
    for r in routers(chunks):
        if noise_multiplier is not None:
            r.noise_multiplier = float(noise_multiplier)
        if aux_loss_scale is not None:
            r.aux_loss_scale = float(aux_loss_scale)


def has_routers(chunks: List) -> bool:
    return next(routers(chunks), None) is not None


def _experts_per_layer(chunks: List) -> int:
    """N, the experts an MoE layer's router weighs (the shared one included), agreed over
    the pipeline stages (a stage may hold no MoE layer)."""
    n = torch.tensor([max((r.num_experts for r in routers(chunks)), default=0)],
                     device=compat.device())
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(n, op=dist.ReduceOp.MAX, group=ps.get_pipeline_model_parallel_group())
    return int(n.item())


def collect_routing(chunks: List, num_layers: int) -> Dict[str, List]:
    """Per-layer routing of the step's tokens, identical on every rank, zeros for dense
    layers: `expert_load` [num_layers][N], the fraction of tokens sent to each of the N
    experts of an MoE layer (the shared expert: 1); `shared_weight` [num_layers], the mean
    shared-expert weight g_0; and, when the routers compute them (`moe.diagnostics`), each of
    `routing.DIAGNOSTICS` [num_layers] as a mean over tokens."""
    num_experts = _experts_per_layer(chunks)
    width = num_experts + 3 + len(routing.DIAGNOSTICS)
    stats = torch.zeros(num_layers, width, dtype=torch.float64, device=compat.device())
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
    tokens = stats[:, num_experts + 1:num_experts + 2].clamp(min=1)  # [layers, 1]
    out = {"expert_load": (stats[:, :num_experts] / tokens).tolist(),
           "shared_weight": (stats[:, num_experts] / tokens[:, 0]).tolist()}
    if stats[:, num_experts + 2].any():  # the routers computed diagnostics (moe.diagnostics)
        for j, name in enumerate(routing.DIAGNOSTICS):
            out[name] = (stats[:, num_experts + 3 + j] / tokens[:, 0]).tolist()
    return out
