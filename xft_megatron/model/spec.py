"""Layer specs: Megatron-Core's TransformerLayer with our SDPA attention and SP-capable RMSNorm,
and either the dense SwiGLU FFN or Megatron's MoE layer with the XFT router and our experts.

`model.spec`: `local` (the default) uses only Megatron-Core modules and ours: no
transformer-engine, no apex. `te` takes Transformer Engine's modules through Megatron-Core's
wrappers for the dense parts: the input norm fused into the qkv projection, TE's attention and
output projection, and in dense layers the pre-FFN norm fused into fc1 and fc2; MoE layers
keep our norm before the router, the XFT router and our experts. Checkpoints are named alike
under both (`TE_CHECKPOINT_NAMES`), so either spec loads what the other saved.
"""

from functools import partial

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.moe.experts import GroupedMLPSubmodules, SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import (
    MlpBuilder,
    TransformerLayer,
    TransformerLayerSubmodules,
)

from xft_megatron.config import LAYER_SPECS, ConfigError, ModelConfig, MoEConfig
from xft_megatron.model.attention import SDPAttention
from xft_megatron.model.moe.experts import GroupedExperts
from xft_megatron.model.moe.layer import SharedExpertMoELayer
from xft_megatron.model.moe.merge_mlp import MergeMLP
from xft_megatron.model.moe.router import RouterSettings, XFTRouter
from xft_megatron.model.moe.te_experts import TEGroupedExperts
from xft_megatron.model.norm import RMSNorm


# TE fuses the norm before the attention into linear_qkv and the norm before a dense FFN into
# linear_fc1 (`layer_norm_weight`); checkpoints keep this project's names (arch/names.py)
TE_CHECKPOINT_NAMES = {"self_attention.linear_qkv.layer_norm_": "input_layernorm.",
                       "mlp.linear_fc1.layer_norm_": "pre_mlp_layernorm."}


def te_modules():
    """Megatron-Core's Transformer Engine wrappers (`megatron.core.extensions.
    transformer_engine`); ConfigError naming what is missing when TE does not import."""
    try:
        from megatron.core.extensions import transformer_engine as te
    except ImportError as e:  # TE absent, or its library cannot load
        raise ConfigError(f"model.spec=te needs Transformer Engine, which does not import here "
                          f"({e}); install transformer-engine[pytorch] or use "
                          "model.spec=local") from None
    if not getattr(te, "HAVE_TE", True):
        raise ConfigError("model.spec=te needs Transformer Engine, which does not import here; "
                          "install transformer-engine[pytorch] or use model.spec=local")
    return te


def attention_spec(m: ModelConfig) -> ModuleSpec:
    """Causal self-attention; with `m.qk_norm`, an RMSNorm over each head's q and k (one
    weight of size head_dim each) before RoPE, as Qwen3 has it."""
    qk_norm = RMSNorm if m.qk_norm else IdentityOp
    return ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=ColumnParallelLinear,
            core_attention=SDPAttention,
            linear_proj=RowParallelLinear,
            q_layernorm=qk_norm,
            k_layernorm=qk_norm,
        ),
    )


def te_attention_spec(m: ModelConfig) -> ModuleSpec:
    """Causal self-attention from TE: the input RMSNorm fused into the qkv projection, TE's
    fused attention, TE's output projection; q/k norms (Qwen3) ours, as in the local spec
    (a TE norm would add a stored `_extra_state` the local spec's checkpoints lack)."""
    te = te_modules()
    qk_norm = RMSNorm if m.qk_norm else IdentityOp
    return ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=te.TELayerNormColumnParallelLinear,
            core_attention=te.TEDotProductAttention,
            linear_proj=te.TERowParallelLinear,
            q_layernorm=qk_norm,
            k_layernorm=qk_norm,
        ),
    )


def _swiglu_linears() -> MLPSubmodules:
    """fc1 holds [gate; up] (column parallel), fc2 is down (row parallel)."""
    return MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)


def dense_mlp_spec(spec: str = "local") -> MlpBuilder:
    """SwiGLU FFN, built as Megatron's TransformerLayer builds its FFN (`MlpBuilder`); with
    spec te, the pre-FFN RMSNorm fused into TE's fc1."""
    if spec == "te":
        te = te_modules()
        return partial(MLP.as_mlp_submodule, submodules=MLPSubmodules(
            linear_fc1=te.TELayerNormColumnParallelLinear, linear_fc2=te.TERowParallelLinear))
    return partial(MLP.as_mlp_submodule, submodules=_swiglu_linears())


def moe_mlp_spec(moe: MoEConfig, merge: bool = False, spec: str = "local") -> MlpBuilder:
    """Megatron's MoELayer (dispatch, combine, EP/ETP) with the XFT router; experts are our
    grouped GEMM module, Megatron's SequentialMLP (one MLP per expert, for comparison) or
    TE's grouped linears stored as ours (`te_grouped`, under spec te; under spec local, as
    meta builds take it, the grouped experts whose layout that is).
    With `moe.shared_expert_impl=dense`, the layer that runs the shared expert off the
    dispatch path (`moe/layer.py`).
    With `merge` (the merge stage, train.stage=merge), the learnable merge of the same
    (frozen) experts instead."""
    if merge:
        return partial(MergeMLP, num_experts=moe.num_experts,
                       shared_weight=moe.merge_shared_weight)
    router = partial(XFTRouter, settings=RouterSettings.from_config(moe))
    if moe.shared_expert_impl == "dense":  # the shared expert off the dispatch path
        experts = partial(GroupedExperts, shared_slots=1)
        return partial(SharedExpertMoELayer, num_experts=moe.num_experts,
                       submodules=MoESubmodules(experts=experts, router=router))
    if moe.experts_impl == "sequential":
        experts = partial(SequentialMLP, submodules=_swiglu_linears())
    elif moe.experts_impl == "te_grouped" and spec == "te":  # TE's, stored as ours
        te = te_modules()
        experts = partial(TEGroupedExperts, submodules=GroupedMLPSubmodules(
            linear_fc1=te.TEColumnParallelGroupedLinear,
            linear_fc2=te.TERowParallelGroupedLinear))
    else:  # grouped, or the layout te_grouped is stored in
        experts = GroupedExperts
    return partial(MoELayer, submodules=MoESubmodules(experts=experts, router=router))


def layer_spec(m: ModelConfig, mlp: MlpBuilder, spec: str = "local",
               fused_mlp_norm: bool = False) -> ModuleSpec:
    """A pre-norm decoder layer of model `m` around the given FFN spec. With spec te the
    attention is TE's (its norm fused in), and `fused_mlp_norm` says the FFN spec holds its
    own norm (TE's dense fc1); otherwise our RMSNorm runs before the FFN."""
    te = spec == "te"
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=IdentityOp if te else RMSNorm,
            self_attention=te_attention_spec(m) if te else attention_spec(m),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=IdentityOp if te and fused_mlp_norm else RMSNorm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=dict(TE_CHECKPOINT_NAMES) if te else {},
        ),
    )


def block_spec(m: ModelConfig, moe: MoEConfig, first_layer: int, num_layers_here: int,
               merge: bool = False, spec: str = "local") -> TransformerBlockSubmodules:
    """The layers one pipeline stage (or virtual chunk) builds: global layers
    first_layer .. first_layer + num_layers_here - 1, MoE where `moe` says so (the merge
    stage's merged FFN there with `merge`), from the modules of `spec` (local | te)."""
    if spec not in LAYER_SPECS:
        raise ConfigError(f"model.spec={spec!r} must be one of {', '.join(LAYER_SPECS)}")
    dense = layer_spec(m, dense_mlp_spec(spec), spec, fused_mlp_norm=True)
    sparse = None
    if moe.enabled:
        sparse = layer_spec(m, moe_mlp_spec(moe, merge, spec), spec)
    specs = [sparse if moe.is_moe_layer(first_layer + i) else dense
             for i in range(num_layers_here)]
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=RMSNorm)
