"""Megatron's MoE layer with the XFT shared expert off the dispatch path
(`moe.shared_expert_impl=dense`).

The XFT router weighs every expert of the layer, the shared one (column 0, g_0 = 1 - s_max
in mode xft) included. Here Megatron's dispatcher sees the routed experts only (columns
1..N-1, `num_moe_experts` = N-1, `moe_router_topk` = K-1) and the shared expert runs as a
dense FFN on this rank's tokens, weighted by g_0, through Megatron's shared-expert hooks:
`shared_experts_compute` (before routing) hands the layer's input on, `route` keeps g_0
aside, and `postprocess` runs the FFN weighted by g_0 and adds it to the combined routed
output. No rank receives every token for the shared expert, and no token is permuted for
it.

The numbers are those of the layout with the shared expert in the routed pool (expert 0):
the same router, the same weights on disk (the shared expert is stored as expert 0), the
same sum.
"""

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

from xft_megatron.model.moe.experts import GroupedExperts, SharedExpert


class SharedExpertMoELayer(MoELayer):
    """`MoELayer` whose experts module holds the routed experts (stored after the shared
    one) and whose `shared_expert` module is the shared expert, on every rank."""

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None,
                 is_mtp_layer: bool = False, name=None, *, num_experts: int):
        """Built as Megatron's TransformerLayer builds its MLP; the spec binds `submodules`
        (experts: `GroupedExperts` with `shared_slots=1`) and `num_experts` (N, the shared
        expert included)."""
        if pg_collection is None:  # as Megatron's MoELayer does (e.g. a layer built alone)
            pg_collection = get_default_pg_collection()
        super().__init__(config, submodules, layer_number, pg_collection, is_mtp_layer, name)
        if not isinstance(self.experts, GroupedExperts) or self.experts.first_expert < 1:
            raise ValueError("the shared expert off the dispatch path needs the grouped "
                             "experts stored after it (GroupedExperts with shared_slots=1)")
        self.shared_expert = SharedExpert(config, pg_collection=pg_collection,
                                          num_experts=num_experts)
        self._shared_weight = None

    def shared_experts_compute(self, hidden_states: torch.Tensor):
        """The unweighted shared FFN is not kept: g_0 is known only after routing, so the
        FFN runs in `postprocess` (weighted inside its SwiGLU, as in the routed pool)."""
        return hidden_states

    def route(self, hidden_states: torch.Tensor, padding_mask=None):
        weights, selected = super().route(hidden_states, padding_mask)
        self._shared_weight = weights[:, 0]
        return weights[:, 1:], selected[:, 1:]

    def postprocess(self, output: torch.Tensor, shared_expert_output):
        """`shared_expert_output` is the layer's input (from `shared_experts_compute`)."""
        weight, self._shared_weight = self._shared_weight, None
        shared = self.shared_expert(shared_expert_output, weight)
        return super().postprocess(output, shared)
