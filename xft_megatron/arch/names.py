"""The names of the model's tensors in checkpoints, in one place.

Checkpoints (torch_dist keys), the HF weight maps, upcycling, the merge, the fold and the
streaming layout all name tensors through this module. The names are those of the layer spec
in model/spec.py (Megatron-Core's local modules), which writes them as they are. A layer spec
whose modules are named otherwise (Transformer Engine's, with the norms fused into
`linear_qkv` and `linear_fc1` as `layer_norm_weight`) keeps checkpoints in these names by
passing Megatron's `sharded_state_dict_keys_map` (module key prefix -> checkpoint key prefix);
nothing else changes. tests/multiprocess/test_flops.py checks that every tensor the checkpoints of every
family, MoE layer and the merge stage hold is named here.

Inside decoder layer i (prefix `layer(i)`):
    ATTN_NORM, QKV (+ QKV_BIAS), Q_NORM, K_NORM, PROJ       attention and its norms
    MLP_NORM, FC1 [2F, H] (gate rows, then up rows), FC2   the dense SwiGLU FFN
    EXPERT_FC1 [N, 2, F, H], EXPERT_FC2 [N, H, F]          an MoE layer's experts (0: shared)
    `local_expert(j, FC1 | FC2)`                           the same, one module per expert
    ROUTER + `weight` | `weight1`, `weight2`, `noise_weight`   the XFT router
    ALPHA [N-1]                                            the merge stage's coefficients
Outside the layers: EMBEDDING, FINAL_NORM, OUTPUT (absent when tied).
In a torch_dist checkpoint a layer tensor's key is its name, or, when every layer of the block
is alike, Megatron stacks the layers under `LAYERS + ROLE`; the streaming layout
(checkpoint/stream.py) maps one to the other.
"""

from typing import Optional

LAYERS = "decoder.layers."

ATTN_NORM = "input_layernorm.weight"
QKV = "self_attention.linear_qkv.weight"
QKV_BIAS = "self_attention.linear_qkv.bias"
Q_NORM = "self_attention.q_layernorm.weight"
K_NORM = "self_attention.k_layernorm.weight"
PROJ = "self_attention.linear_proj.weight"
MLP_NORM = "pre_mlp_layernorm.weight"
FC1 = "mlp.linear_fc1.weight"
FC2 = "mlp.linear_fc2.weight"
EXPERTS = "mlp.experts."
EXPERT_FC1 = EXPERTS + "fc1_weight"
EXPERT_FC2 = EXPERTS + "fc2_weight"
ROUTER = "mlp.router."
ALPHA = "mlp.alpha"

EMBEDDING = "embedding.word_embeddings.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT = "output_layer.weight"


def layer(i: int) -> str:
    """'decoder.layers.3.': the prefix of decoder layer i's tensors."""
    return f"{LAYERS}{i}."


def local_expert(j: int, role: str) -> str:
    """Expert j's FC1 or FC2 when the experts are one module each (Megatron's SequentialMLP):
    'mlp.experts.local_experts.3.linear_fc1.weight'."""
    return f"{EXPERTS}local_experts.{j}.{role[len('mlp.'):]}"


def layer_of(name: str) -> Optional[int]:
    """The decoder layer a tensor belongs to ('decoder.layers.3.mlp...' -> 3), or None for
    those outside the layers (embedding, final norm, output layer)."""
    parts = name.split(".")
    if "layers" in parts:
        i = parts.index("layers")
        if i + 1 < len(parts) and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None
