"""The routed pool's experts as Transformer Engine's grouped linears (`moe.experts_impl=
te_grouped`, with model.spec=te): Megatron-Core's TEGroupedMLP (TE's GroupedLinear for fc1
and fc2, one GEMM per expert inside one call, FP8 where precision.fp8 asks for it), stored
in this project's grouped layout.

TE holds each local expert's weights as parameters of their own, `linear_fc1.weight{i}`
[2F, H] ([gate; up] of this rank's FFN shard) and `linear_fc2.weight{i}` [H, F]. Checkpoints
store them as expert `first + i` of the layer's `fc1_weight` [E, 2, F, H] and `fc2_weight`
[E, H, F] (arch.names.EXPERT_FC1 / EXPERT_FC2), split over the FFN axis like
`experts.GroupedExperts` writes them, so a checkpoint saved under either loads under the other
and upcycle, merge, export and the streaming tools see the grouped layout. TE's per-GEMM
`_extra_state` is not stored (the FP8 recipes offered keep no state; `checkpoint.dist.load`
lets it be missing).
"""

from functools import partial

from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.transformer.moe.experts import TEGroupedMLP


class TEGroupedExperts(TEGroupedMLP):
    """Megatron's TEGroupedMLP (routing weights applied after the SwiGLU, as in
    `experts.GroupedExperts`) with the checkpoint layout of this project's grouped experts."""

    def __init__(self, num_local_experts, config, /, *, submodules, pg_collection, name=None):
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection,
                         name=name)
        self.first_expert = pg_collection.ep.rank() * num_local_experts
        self.num_experts = pg_collection.ep.size() * num_local_experts
        self.ffn_group = pg_collection.expt_tp
        self.replica_id = (0, 0, pg_collection.expt_dp.rank())
        for linear in (self.linear_fc1, self.linear_fc2):
            if any(getattr(linear, f"weight{i}", None) is None for i in range(num_local_experts)):
                raise ValueError("moe.experts_impl=te_grouped needs Transformer Engine's "
                                 "GroupedLinear with a weight per expert (weight0, weight1, "
                                 "...); this TE version holds them otherwise")

    def local_expert_weights(self, i: int):
        """Expert i's fc1 [2, F, H] and fc2 [H, F] (views of TE's parameters)."""
        fc1 = getattr(self.linear_fc1, f"weight{i}")
        return fc1.view(2, fc1.shape[0] // 2, fc1.shape[1]), getattr(self.linear_fc2,
                                                                       f"weight{i}")

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        out = {}
        for module, stored in (("linear_fc1", "fc1_weight"), ("linear_fc2", "fc2_weight")):
            linear = getattr(self, module)
            for i in range(self.num_local_experts):
                weight = getattr(linear, f"weight{i}")
                build = partial(self._expert_chunk, sharded_offsets, self.first_expert + i,
                                stored == "fc1_weight")
                out[f"{prefix}{module}.weight{i}"] = ShardedTensorFactory(
                    prefix + stored, weight, build, partial(_unstack, tuple(weight.shape)),
                    self.replica_id)
        return out

    def _expert_chunk(self, sharded_offsets, expert, fc1, key, data, replica_id,
                      flattened_range):
        """TE's [2F, H] (fc1) or [H, F] (fc2) weight, or an optimizer statistic shaped like it,
        as expert `expert` of the stored [E, 2, F, H] / [E, H, F] tensor, this rank's part of
        the FFN axis (axis 2 in both)."""
        if flattened_range is not None:
            raise ValueError("moe.experts_impl=te_grouped stores each expert as a chunk of its "
                             "own, which flattened optimizer state does not support; the "
                             "checkpoints here store it dp_reshardable")
        view = data.view(1, 2, data.shape[0] // 2, data.shape[1]) if fc1 else data.unsqueeze(0)
        pre = len(sharded_offsets)
        return ShardedTensor.from_rank_offsets(
            key, view, *sharded_offsets, (pre + 0, expert, self.num_experts),
            (pre + 2, self.ffn_group.rank(), self.ffn_group.size()),
            replica_id=replica_id, prepend_axis_num=pre)


def _unstack(shape, loaded):
    """The loaded [1, 2, F, H] / [1, H, F] chunk back in TE's shape."""
    return loaded.reshape(shape)
