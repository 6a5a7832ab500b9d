"""Per-layer router losses of the last step, reduced over the whole layout.

Each XFT router accumulates its (balance + z) loss over the training micro-batches it ran;
`collect` averages them per layer over micro-batches and data-parallel ranks, gathers the
layers from every pipeline stage, and resets the accumulators.
"""

from typing import List

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from xft_megatron import platform
from xft_megatron.moe.router import XFTRouter


def routers(chunks: List):
    for c in chunks:
        for m in c.modules():
            if isinstance(m, XFTRouter):
                yield m


def collect(chunks: List, num_layers: int) -> torch.Tensor:
    """[num_layers] float64 on CPU, identical on every rank: each MoE layer's router loss
    averaged over this step's micro-batches (0 for dense layers and when no loss is on)."""
    per_layer = torch.zeros(num_layers, dtype=torch.float64, device=platform.device())
    for r in routers(chunks):
        if r.loss_count:
            per_layer[r.layer_number - 1] = r.loss_sum / r.loss_count
        r.reset_loss_stats()
    # every rank of a tensor-parallel group holds the same value: reduce over DP and PP only
    dist.all_reduce(per_layer, group=ps.get_data_parallel_group())
    per_layer /= ps.get_data_parallel_world_size()
    dist.all_reduce(per_layer, group=ps.get_pipeline_model_parallel_group())
    return per_layer.cpu()
