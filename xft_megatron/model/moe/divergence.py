"""How far the experts of each MoE layer have moved apart: the relative distance of every
routed expert to the shared one, and between routed experts.

Right after upcycling every expert is a copy of the dense FFN (all distances 0). An expert's
weights are its fc1 and fc2 tensors as one vector w_j; distances are Frobenius norms
relative to the shared expert's norm ||w_0|| (in mode `vanilla`, with no shared expert, to
the mean norm). The model's own parameters are read (bf16 when it trains in bf16, so
distances below the bf16 resolution, ~4e-3 per element, are coarse there).

Under expert parallelism each rank holds some experts, under expert tensor parallelism a
shard of each: the local vectors are gathered over the expert-parallel group and the squared
distances summed over the expert-tensor-parallel group; pipeline stages contribute their
own layers. A shared expert off the dispatch path (`moe/layer.py`) is on every rank, split
over the tensor-parallel group, which is then the expert-tensor-parallel one. Every rank
must call `expert_divergence` (it runs collectives).
"""

from typing import Dict, List

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from xft_megatron.model.moe.router import XFTRouter
from xft_megatron.runtime import compat


def _moe_layers(chunks: List):
    """(layer number, MoE layer) of every MoE layer held by this rank."""
    for c in chunks:
        for m in c.modules():
            router = getattr(m, "router", None)
            if isinstance(router, XFTRouter) and hasattr(m, "experts"):
                yield router.layer_number, m


def local_expert_vectors(experts) -> torch.Tensor:
    """[local experts, P] this rank's shard of each local expert's fc1 and fc2 weights."""
    if hasattr(experts, "fc1_weight"):  # our grouped experts: [E, 2, F, H] and [E, H, F]
        e = experts.fc1_weight.shape[0]
        return torch.cat([experts.fc1_weight.detach().reshape(e, -1),
                          experts.fc2_weight.detach().reshape(e, -1)], dim=1)
    if hasattr(experts, "local_expert_weights"):  # TE's grouped linears (te_experts.py)
        return torch.stack([torch.cat([w.detach().reshape(-1) for w in
                                       experts.local_expert_weights(i)])
                            for i in range(experts.num_local_experts)])
    return torch.stack([torch.cat([x.linear_fc1.weight.detach().reshape(-1),  # SequentialMLP
                                   x.linear_fc2.weight.detach().reshape(-1)])
                        for x in experts.local_experts])


def pairwise_squared(vectors: torch.Tensor) -> torch.Tensor:
    """vectors [E, P] -> (squared distances ||w_i - w_j||^2 [E, E], squared norms [E]),
    float64 sums of fp32 terms. The differences are taken directly, not through the
    cancellation-prone ||w_i||^2 + ||w_j||^2 - 2 w_i.w_j (distances start at 0)."""
    v = vectors.float()
    e = v.shape[0]
    d2 = torch.zeros(e, e, dtype=torch.float64, device=v.device)
    for i in range(e):
        d2[i] = (v - v[i]).square().sum(dim=1, dtype=torch.float64)
    return d2, v.square().sum(dim=1, dtype=torch.float64)


def expert_divergence(chunks: List, num_layers: int, num_experts: int,
                      shared: bool = True) -> Dict[str, Dict[str, List[float]]]:
    """Per MoE layer (keyed by 0-based layer index as a string), identical on every rank:
      to_shared       [E-1] ||w_i - w_0|| / ||w_0|| of each routed expert i (shared modes)
      between_routed  mean over pairs i < j of routed experts of ||w_i - w_j|| / reference
    where reference is ||w_0|| with a shared expert, else the mean expert norm."""
    d2 = torch.zeros(num_layers, num_experts, num_experts, dtype=torch.float64,
                     device=compat.device())
    n2 = torch.zeros(num_layers, num_experts, dtype=torch.float64, device=compat.device())
    held = torch.zeros(num_layers, dtype=torch.float64, device=compat.device())
    ep_group = ps.get_expert_model_parallel_group()
    ep = dist.get_world_size(ep_group)
    for layer, mlp in _moe_layers(chunks):
        local = local_expert_vectors(mlp.experts).to(compat.device())
        parts = [torch.empty_like(local) for _ in range(ep)]
        dist.all_gather(parts, local.contiguous(), group=ep_group)
        off_pool = getattr(mlp, "shared_expert", None)  # off the dispatch path: on every
        if off_pool is not None:  # rank, split like the routed experts (ETP = TP)
            parts.insert(0, local_expert_vectors(off_pool).to(compat.device()))
        d2[layer - 1], n2[layer - 1] = pairwise_squared(torch.cat(parts))  # experts in order
        held[layer - 1] = 1
    # shards of each expert: their squared distances add up
    dist.all_reduce(d2, group=ps.get_expert_tensor_parallel_group())
    dist.all_reduce(n2, group=ps.get_expert_tensor_parallel_group())
    # every layer lives on one pipeline stage; the other stages hold zeros for it
    for t in (d2, n2, held):
        dist.all_reduce(t, group=ps.get_pipeline_model_parallel_group())
    d2, n2, held = d2.cpu(), n2.cpu(), held.cpu()
    out = {}
    first = 1 if shared else 0
    for layer in range(num_layers):
        if not held[layer]:
            continue
        ref = n2[layer, 0].sqrt() if shared else n2[layer].sqrt().mean()
        ref = ref.clamp(min=1e-30)
        dist_rel = d2[layer].clamp(min=0).sqrt() / ref
        pairs = [dist_rel[i, j].item() for i in range(first, num_experts)
                 for j in range(i + 1, num_experts)]
        row = {"between_routed": sum(pairs) / len(pairs) if pairs else 0.0}
        if shared:
            row["to_shared"] = dist_rel[0, 1:].tolist()
        out[str(layer)] = row
    return out
