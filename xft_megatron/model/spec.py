"""Layer specs: Megatron-Core's TransformerLayer with our SDPA attention and SP-capable RMSNorm.

Only Megatron-Core modules and ours: no transformer-engine, no apex.
"""

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from xft_megatron.model.attention import SDPAttention
from xft_megatron.model.norm import RMSNorm


def attention_spec() -> ModuleSpec:
    return ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=ColumnParallelLinear,
            core_attention=SDPAttention,
            linear_proj=RowParallelLinear,
            q_layernorm=IdentityOp,
            k_layernorm=IdentityOp,
        ),
    )


def dense_mlp_spec() -> ModuleSpec:
    """SwiGLU FFN: fc1 holds [gate; up] (column parallel), fc2 is down (row parallel)."""
    return ModuleSpec(
        module=MLP,
        submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
    )


def layer_spec(mlp: ModuleSpec) -> ModuleSpec:
    """A pre-norm decoder layer around the given FFN spec."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=attention_spec(),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
        ),
    )


def dense_block_spec(num_layers_here: int) -> TransformerBlockSubmodules:
    """The block spec for the layers one pipeline stage (or virtual chunk) builds."""
    return TransformerBlockSubmodules(
        layer_specs=[layer_spec(dense_mlp_spec())] * num_layers_here, layer_norm=RMSNorm
    )
