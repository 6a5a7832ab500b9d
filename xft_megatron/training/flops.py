"""Model FLOPs per token, counted honestly, for MFU.

    flops/token = 6 * P_matmul + 6 * L * h * s
P_matmul: parameters used in matrix products (attention q/k/v/o, FFN, output layer); the input
embedding is a lookup and norms are elementwise, so neither counts. 6 = 2 (multiply-add) x 3
(forward + two backward products). Attention scores and the weighted sum cost 4*s*h per token
and layer in the forward pass over the full square; causal masking halves it (only the lower
triangle is needed), and x3 for forward + backward gives 6*L*h*s. Recomputation is not counted.

MoE layers count ACTIVE parameters: the FFN once per expert a token uses (moe.topk, the shared
expert included), plus the router's matmuls (gate, and the noise projection when on). The
merge stage (train.stage=merge: `merge=True`) runs one merged FFN per layer and no router, so
it counts as the dense model (the per-micro-batch weighted sum of the expert weights is not
per token and is left out).
"""

from typing import Optional

from xft_megatron.config import ModelConfig, MoEConfig

H200_BF16_DENSE_PEAK = 989e12  # FLOP/s, NVIDIA datasheet (dense, no sparsity)


def matmul_params(m: ModelConfig, moe: Optional[MoEConfig] = None, merge: bool = False) -> int:
    """Parameters in matrix products per token (active ones for MoE layers; `merge`: the
    merge stage of that MoE)."""
    h, kv = m.hidden_size, m.num_query_groups * m.head_dim
    attn = h * h + 2 * h * kv + h * h
    ffn = 3 * h * m.ffn_hidden_size
    total = m.num_layers * (attn + ffn) + m.vocab_size * h
    if moe is not None and moe.enabled and not merge:
        r = moe.num_routed
        router = r * h + (r * r if moe.router_gate == "mlp" else 0) + \
            (r * h if moe.router_noise else 0)
        n_moe = sum(moe.is_moe_layer(i) for i in range(m.num_layers))
        total += n_moe * ((moe.topk - 1) * ffn + router)
    return total


def flops_per_token(m: ModelConfig, seq_length: int, moe: Optional[MoEConfig] = None,
                    merge: bool = False) -> float:
    return 6.0 * matmul_params(m, moe, merge) + 6.0 * m.num_layers * m.hidden_size * seq_length


def mfu(m: ModelConfig, seq_length: int, tokens_per_s: float,
        moe: Optional[MoEConfig] = None, peak: float = H200_BF16_DENSE_PEAK,
        merge: bool = False) -> float:
    return flops_per_token(m, seq_length, moe, merge) * tokens_per_s / peak
