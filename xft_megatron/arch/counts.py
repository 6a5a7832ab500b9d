"""Parameter and FLOP counts of the model, per layer and in total: the one place this
arithmetic lives. `ModelConfig.num_parameters`, the memory estimate (`training/memory.py`) and
MFU (`training/flops.py`) read it; tests/multiprocess/test_flops.py checks it against built models.

Per decoder layer, with h = hidden_size, q = heads * head_dim, kv = query groups * head_dim,
F = ffn_hidden_size and R = routed experts:
    attention   h q + 2 h kv + q h      (q, k, v, o)  + q + 2 kv (qkv_bias) + 2 head_dim (qk_norm)
    norms       2 h                     (before attention, before the FFN)
    FFN         3 h F                   (SwiGLU gate, up, down; the same per expert)
    router      R h + R R (gate mlp) + R h (noise)     (MoE layers; gate linear: R h)
Model: layers + embeddings (V h, twice when untied) + the final norm (h).

FLOPs per token (training, recomputation not counted):
    6 * P_matmul + 6 * L * q * s
P_matmul: parameters in matrix products (q/k/v/o, FFN, the output layer; the input embedding
is a lookup and norms and biases are elementwise). 6 = 2 (multiply-add) x 3 (forward and two
backward products). Attention scores and the weighted sum cost 4 s q per token and layer over
the full square; causal masking halves it, and x3 for forward + backward gives 6 L q s.
MoE layers count ACTIVE parameters: the FFN once per expert a token uses (moe.topk, the shared
expert included) plus the router's matmuls. The merge stage (train.stage=merge: `merge=True`)
runs one merged FFN per layer and no router: it counts as the dense model (the per-micro-batch
weighted sum of the expert weights is not per token and is left out).

`m` is a ModelConfig and `moe` a MoEConfig (None: dense), read by their fields only: the config
layer sits above this one and validates with these counts, so it is never imported here.
"""

from __future__ import annotations

from typing import Dict


# ------------------------------------------------------------------ one layer
def attention_matmul_parameters(m) -> int:
    """q, k, v and o projections."""
    h, q, kv = m.hidden_size, m.num_attention_heads * m.head_dim, m.num_query_groups * m.head_dim
    return h * q + 2 * h * kv + q * h


def attention_parameters(m) -> int:
    """The attention block: projections, QKV biases, q/k norms."""
    q, kv = m.num_attention_heads * m.head_dim, m.num_query_groups * m.head_dim
    return (attention_matmul_parameters(m) + (q + 2 * kv if m.qkv_bias else 0)
            + (2 * m.head_dim if m.qk_norm else 0))


def ffn_parameters(m) -> int:
    """One SwiGLU FFN (the dense one, or one expert)."""
    return 3 * m.hidden_size * m.ffn_hidden_size


def router_parameters(m, moe) -> int:
    """The XFT router of one MoE layer (all of it in matrix products)."""
    r, h = moe.num_routed, m.hidden_size
    return r * h + (r * r if moe.router_gate == "mlp" else 0) + (r * h if moe.router_noise else 0)


def dense_layer_parameters(m) -> int:
    return attention_parameters(m) + ffn_parameters(m) + 2 * m.hidden_size


# ------------------------------------------------------------------ the model
def embedding_parameters(m) -> int:
    """The input embedding and the output layer (one matrix when tied)."""
    return m.vocab_size * m.hidden_size * (1 if m.tie_embeddings else 2)


def dense_parameters(m) -> int:
    """Exact parameter count of the dense model (embeddings and the final norm included)."""
    return m.num_layers * dense_layer_parameters(m) + embedding_parameters(m) + m.hidden_size


def moe_layers(m, moe) -> int:
    """How many of the layers are MoE layers."""
    if moe is None or not moe.enabled:
        return 0
    return sum(moe.is_moe_layer(i) for i in range(m.num_layers))


def parameter_counts(m, moe) -> Dict[str, int]:
    """total: every parameter; active: those one token uses; expert: the expert FFN weights.
    An MoE layer holds every expert plus the router in place of the dense FFN."""
    dense, n_moe = dense_parameters(m), moe_layers(m, moe)
    if n_moe == 0:
        return {"total": dense, "active": dense, "expert": 0}
    ffn, router = ffn_parameters(m), router_parameters(m, moe)
    return {"total": dense + n_moe * ((moe.num_experts - 1) * ffn + router),
            "active": dense + n_moe * ((moe.topk - 1) * ffn + router),
            "expert": n_moe * moe.num_experts * ffn}


def matmul_parameters(m, moe=None, merge: bool = False) -> int:
    """Parameters in matrix products per token (active ones for MoE layers; `merge`: the
    merge stage of that MoE)."""
    total = (m.num_layers * (attention_matmul_parameters(m) + ffn_parameters(m))
             + m.vocab_size * m.hidden_size)
    if moe is not None and not merge:
        total += moe_layers(m, moe) * ((moe.topk - 1) * ffn_parameters(m)
                                       + router_parameters(m, moe))
    return total


def flops_per_token(m, seq_length: int, moe=None, merge: bool = False) -> float:
    q = m.num_attention_heads * m.head_dim
    return 6.0 * matmul_parameters(m, moe, merge) + 6.0 * m.num_layers * q * seq_length
