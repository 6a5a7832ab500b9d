"""The XFT router: a Megatron-Core MoE router module (returns `(probs, routing_map)` over all
experts of the layer, the shared one included) built on the pure math in `routing.py`.

Settings come from `RouterSettings` (bound into the layer spec), not from global state. The
gate runs in fp32 whatever the model dtype, so routing decisions do not depend on it.
"""

from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    apply_router_token_dropping,
)

from xft_megatron.model.moe import routing


@dataclass(frozen=True)
class RouterSettings:
    num_routed: int  # experts the router scores (N-1 with a shared expert, else N)
    routed_topk: int  # routed experts per token (K-1 with a shared expert, else K)
    mode: str = "xft"
    gate: str = "mlp"
    noise: bool = True
    renorm: str = "probs"
    balance_loss: str = "cv"
    balance_coeff: float = 0.01
    z_loss_coeff: float = 0.0
    capacity_factor: Optional[float] = None
    init_std: float = 0.02
    diagnostics: bool = True  # per-layer routing diagnostics (routing.DIAGNOSTICS) per step

    @classmethod
    def from_config(cls, moe) -> "RouterSettings":
        return cls(num_routed=moe.num_routed, routed_topk=moe.routed_topk, mode=moe.mode,
                   gate=moe.router_gate, noise=moe.router_noise, renorm=moe.renorm,
                   balance_loss=moe.balance_loss, balance_coeff=moe.balance_coeff,
                   z_loss_coeff=moe.z_loss_coeff, capacity_factor=moe.capacity_factor,
                   init_std=moe.router_init_std, diagnostics=moe.diagnostics)


class _SumOverGroup(torch.autograd.Function):
    """All-reduce (sum) of per-shard statistics; the gradient passes through unchanged, so
    each shard's tokens receive the gradient of the loss of the whole group."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        torch.distributed.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class XFTRouter(MegatronModule):
    """Scores the routed experts, picks the top-k, and weights every expert per token.

    Parameters (replicated over tensor/expert parallel ranks, like Megatron's router):
      gate `linear`: weight [R, H];  gate `mlp`: weight1 [R, H], weight2 [R, R] (no biases)
      noise (optional): noise_weight [R, H]
    """

    def __init__(self, config, pg_collection=None, is_mtp_layer: bool = False, *,
                 settings: RouterSettings):
        """Megatron's MoELayer passes `config`, `pg_collection` and `is_mtp_layer`; the layer
        spec binds `settings`. Multi-token-prediction layers are not built here."""
        super().__init__(config)
        if is_mtp_layer:
            raise ValueError("the XFT router does not route multi-token-prediction layers")
        self.settings = s = settings
        self.layer_number = None
        self.sequence_parallel = config.sequence_parallel
        self.tp_group = pg_collection.tp if pg_collection is not None else None
        h, r = config.hidden_size, s.num_routed
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()

        def param(*shape):
            return torch.nn.Parameter(torch.empty(*shape, dtype=config.params_dtype,
                                                  device=device))

        if s.gate == "linear":
            self.weight = param(r, h)
        elif s.gate == "mlp":
            self.weight1, self.weight2 = param(r, h), param(r, r)
        else:
            raise ValueError(f"router gate must be linear or mlp, got {s.gate!r}")
        if s.noise:
            self.noise_weight = param(r, h)
        for p in self.parameters():
            torch.nn.init.normal_(p, mean=0.0, std=s.init_std)
            # with sequence parallelism each TP rank routes different tokens: finalize_model_grads
            # all-reduces parameters carrying this flag over the TP group
            setattr(p, "sequence_parallel", config.sequence_parallel)
        # set by the training step (`moe.losses.set_step_settings`): the factor on the noise
        # scale (the annealing schedule) and the factor on the router losses' gradient
        self.noise_multiplier = 1.0
        self.aux_loss_scale = 1.0
        self.reset_loss_stats()

    # ------------------------------------------------------------------ Megatron interface
    def set_layer_number(self, layer_number: int) -> None:
        self.layer_number = layer_number

    def forward(self, hidden_states: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """hidden_states [s, b, h] -> (probs [s*b, E] fp32, routing_map [s*b, E] bool)."""
        if padding_mask is not None:
            raise ValueError("the XFT router does not take padding masks; mask the loss instead")
        s = self.settings
        x = hidden_states.reshape(-1, hidden_states.shape[-1]).float()  # [T, h]
        logits = self.gate_logits(x)  # [T, R]
        noisy, noise_std = logits, None
        if s.noise and self.training and self.noise_multiplier > 0:
            noise_std = routing.noise_std(x, self.noise_weight) * self.noise_multiplier
            noisy = logits + self._standard_normal(logits) * noise_std
        probs = torch.softmax(noisy, dim=-1)  # [T, R] fp32
        weights, selected = routing.expert_weights(probs, s.routed_topk, s.mode, s.renorm)
        routed = selected[:, self._routed_offset():]  # [T, R], before any capacity drop
        if s.capacity_factor is not None:
            weights, selected = self._drop_over_capacity(weights, selected)
        if self.training and torch.is_grad_enabled():
            weights = self._attach_losses(weights, logits, noisy, noise_std, probs, selected)
            self._count_routing(weights, selected, logits, noise_std, routed)
        return weights, selected

    # ------------------------------------------------------------------ pieces
    def gate_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Router logits h [T, R] in fp32 (before noise)."""
        names = ("weight",) if self.settings.gate == "linear" else ("weight1", "weight2")
        return routing.gate_logits(x, {n: getattr(self, n) for n in names})

    def _standard_normal(self, like: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:  # different tokens per TP rank: independent noise streams
            with get_cuda_rng_tracker().fork():
                return torch.randn_like(like)
        return torch.randn_like(like)  # same tokens on every TP rank: identical noise

    @property
    def num_experts(self) -> int:
        """N, the experts of the layer this router weighs (the shared one included)."""
        return self.settings.num_routed + self._routed_offset()

    def _routed_offset(self) -> int:
        return 1 if self.settings.mode in ("xft", "none") else 0

    def _drop_over_capacity(self, weights, selected):
        """Capacity applies to routed experts only: the shared expert takes every token."""
        o = self._routed_offset()
        w, m = apply_router_token_dropping(weights[:, o:], selected[:, o:],
                                           router_topk=self.settings.routed_topk,
                                           capacity_factor=self.settings.capacity_factor)
        return torch.cat([weights[:, :o], w], dim=1), torch.cat([selected[:, :o], m], dim=1)

    def _group_sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel and self.tp_group is not None and self.tp_group.size() > 1:
            return _SumOverGroup.apply(x, self.tp_group)
        return x

    def _attach_losses(self, weights, logits, noisy, noise_std, probs, selected):
        """Balance and z losses of this micro-batch, over all its tokens (summed across
        sequence-parallel shards), attached to the backward of `weights`."""
        s = self.settings
        routed_sel = selected[:, self._routed_offset():]
        # sequence parallelism splits every micro-batch evenly over the TP group
        shards = self.tp_group.size() if self.sequence_parallel and self.tp_group else 1
        n_total = float(probs.shape[0] * shards)
        total = probs.new_zeros(())
        if s.balance_loss != "none" and s.balance_coeff > 0:
            if s.balance_loss == "cv":
                imp = self._group_sum(routing.importance(probs, routed_sel))
                if noise_std is not None and s.routed_topk < s.num_routed:
                    load = routing.smooth_load(logits, noisy, noise_std, s.routed_topk)
                else:
                    load = routed_sel.float().sum(dim=0)
                load = self._group_sum(load)
                balance = routing.cv_balance_loss(imp, load)
            else:
                p_sum = self._group_sum(probs.sum(dim=0))
                counts = self._group_sum(routed_sel.float().sum(dim=0)).detach()
                balance = routing.switch_balance_loss(p_sum, counts, s.routed_topk, n_total)
            total = total + s.balance_coeff * balance
        if s.z_loss_coeff > 0:
            lse2 = self._group_sum(torch.logsumexp(noisy, dim=-1).square().sum())
            total = total + s.z_loss_coeff * lse2 / n_total
        if total.requires_grad:
            value = total.detach().double()
            self.loss_sum = value if self.loss_sum is None else self.loss_sum + value
            self.loss_count += 1
            # The reference adds coefficient x loss once per forward, whatever the loss mask.
            # Megatron divides every gradient by the global loss-token count, so the training
            # step sets aux_loss_scale = loss tokens / forwards of the global batch: the
            # gradient is then that of the mean over forwards of `total`, the value logged.
            weights = MoEAuxLossAutoScaler.apply(weights, total * self.aux_loss_scale)
        return weights

    def _count_routing(self, weights, selected, logits, noise_std, routed) -> None:
        """Tokens per expert, the summed shared-expert weight g_0, the token count and (with
        `diagnostics`) the sums of `routing.DIAGNOSTICS` (device tensors, no host sync);
        this rank's tokens only (`moe.losses` sums them over the layout)."""
        with torch.no_grad():
            counts = selected.sum(dim=0, dtype=torch.float64)  # [E]
            g0 = weights[:, 0].detach().double().sum() if self._routed_offset() else \
                counts.new_zeros(())
            if self.settings.diagnostics:  # a leading 1 says they were computed
                diag = torch.cat([counts.new_ones(1), routing.diagnostic_sums(
                    logits, noise_std, routed, self.settings.routed_topk)])
            else:
                diag = counts.new_zeros(1 + len(routing.DIAGNOSTICS))
            stats = torch.cat([counts, g0.reshape(1), counts.new_full((1,), selected.shape[0]),
                               diag])
            self.routing_stats = stats if self.routing_stats is None else \
                self.routing_stats + stats

    # ------------------------------------------------------------------ reporting
    def reset_loss_stats(self) -> None:
        """Losses and routing counts accumulate over training micro-batches until read
        (`moe.losses`)."""
        self.loss_sum = None  # float64 on the model's device
        self.loss_count = 0
        # [E + 3 + D]: tokens per expert, sum of g_0, tokens, micro-batches with diagnostics,
        # sums of routing.DIAGNOSTICS
        self.routing_stats = None
