"""The learnable merge stage (../XFT_SPEC.md section 4): a dense-shaped SwiGLU FFN whose weights
are the merge of an MoE layer's frozen experts,

    W = lambda * W_0 + (1 - lambda) * sum_i softmax(alpha)_i * W_i      (gate, up, down each)

with alpha [N-1] the only trainable tensor and lambda fixed. The experts keep the MoE layer's
storage and sharding (`GroupedExperts`: EP over experts, expert-TP over the FFN width, which
the merge stage requires equal to TP), so it loads straight from an MoE checkpoint. Each rank
sums its local experts; the sum is completed over the expert-parallel group.
"""

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

from xft_megatron.errors import UsageError
from xft_megatron.model.moe.experts import GroupedExperts, into_ffn_region, out_of_ffn_region


def merge_coefficients(alpha: torch.Tensor, shared_weight: float = 0.75) -> torch.Tensor:
    """alpha [N-1] (logits over the routed experts) -> c [N]: c_0 = lambda,
    c_i = (1 - lambda) * softmax(alpha)_i. Computed in float64."""
    if not 0.0 <= shared_weight <= 1.0:
        raise UsageError(f"shared weight (lambda) must be in [0, 1], got {shared_weight}")
    routed = (1.0 - shared_weight) * torch.softmax(alpha.double(), dim=-1)
    return torch.cat([routed.new_tensor([shared_weight]), routed])


class _SumOverExperts(torch.autograd.Function):
    """All-reduce (sum) whose backward is also an all-reduce: every expert-parallel rank's
    loss depends on every rank's part of the merged weight."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        torch.distributed.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


class MergeMLP(MegatronModule):
    """Drop-in for an MoE layer's FFN in the merge stage (`train.stage=merge`)."""

    def __init__(self, *, config, pg_collection, is_mtp_layer: bool = False, name=None,
                 num_experts: int, shared_weight: float):
        """Built the way Megatron's TransformerLayer builds its FFN (`MlpBuilder`: `config`,
        `pg_collection`, `is_mtp_layer`, `name`); the layer spec binds `num_experts` and
        `shared_weight`."""
        super().__init__(config)
        if is_mtp_layer:
            raise UsageError("the merge stage does not merge multi-token-prediction layers")
        pg = pg_collection or get_default_pg_collection()
        self.ep_group, self.tp_group = pg.ep, pg.tp
        if pg.expt_tp.size() != pg.tp.size():
            raise UsageError("the merge stage needs parallel.expert_tensor == parallel.tensor")
        self.num_experts = num_experts
        self.shared_weight = shared_weight
        local = num_experts // self.ep_group.size()
        self.local_offset = self.ep_group.rank() * local
        self.experts = GroupedExperts(local, config, pg_collection=pg,
                                      name=None if name is None else name + ".experts")
        for p in self.experts.parameters():
            p.requires_grad_(False)  # frozen: only alpha trains
        # uniform alpha: c_i = (1 - lambda) / (N - 1); replicated on every rank
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.alpha = torch.nn.Parameter(torch.zeros(num_experts - 1, dtype=torch.float32,
                                                    device=device))
        # each tensor-parallel rank sees a different weight shard (and, with sequence
        # parallelism, different tokens): finalize_model_grads sums alpha's gradient over TP
        self.alpha.sequence_parallel = True
        self.sequence_parallel = config.sequence_parallel

    def set_layer_number(self, layer_number: int) -> None:
        self.layer_number = layer_number

    def coefficients(self) -> torch.Tensor:
        """c [N] (float64, differentiable in alpha): the spec's merge coefficients."""
        return merge_coefficients(self.alpha, self.shared_weight)

    def merged_weights(self):
        """This rank's shard of the merged fc1 [2F/tp, H] and fc2 [H, F/tp]."""
        c = self.coefficients()
        fc1, fc2 = self.experts.fc1_weight, self.experts.fc2_weight
        local = c[self.local_offset:self.local_offset + fc1.shape[0]].to(fc1.dtype)
        w1 = torch.einsum("e,ekfh->kfh", local, fc1)
        w2 = torch.einsum("e,ehf->hf", local, fc2)
        if self.ep_group.size() > 1:
            w1 = _SumOverExperts.apply(w1, self.ep_group)
            w2 = _SumOverExperts.apply(w2, self.ep_group)
        return w1.reshape(-1, w1.shape[-1]), w2

    def forward(self, hidden_states, padding_mask=None):
        """[s(/tp), b, h] -> ([s(/tp), b, h], None), the dense FFN with merged weights."""
        w1, w2 = self.merged_weights()
        x = into_ffn_region(hidden_states, self.tp_group, self.sequence_parallel)
        gate, up = F.linear(x, w1).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2)
        return out_of_ffn_region(y, self.tp_group, self.sequence_parallel), None


def gather_coefficients(chunks) -> dict:
    """{global layer: coefficients [N] float64 on CPU} of every merge-stage layer, from all
    pipeline stages, on every rank."""
    mine = {}
    for c in chunks:
        while hasattr(c, "module"):
            c = c.module
        for layer in c.decoder.layers:
            if isinstance(layer.mlp, MergeMLP):
                mine[layer.layer_number - 1] = layer.mlp.coefficients().detach().cpu()
    everyone = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, mine)
    return {k: v for d in everyone for k, v in d.items()}
