"""Build the GPT of any of the model families (`xft_megatron/arch/families/`) on Megatron-Core.

`transformer_config` maps our dataclasses onto Megatron's TransformerConfig; `build_model`
returns the model chunks this rank owns (one, or one per virtual pipeline stage).
"""

import contextlib
import dataclasses
from typing import List, Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
from megatron.core.transformer.transformer_config import TransformerConfig

from xft_megatron.arch import names
from xft_megatron.config import Config, ConfigError, PrecisionConfig
from xft_megatron.model.spec import block_spec, te_modules
from xft_megatron.runtime import compat


def transformer_config(cfg: Config) -> TransformerConfig:
    m, p, prec = cfg.model, cfg.parallel, cfg.precision
    on_gpu = compat.has_cuda()
    return TransformerConfig(
        **_moe_fields(cfg),
        **_fp8_fields(prec),
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=m.qkv_bias,
        qk_layernorm=m.qk_norm,  # also: Megatron sums the q/k norm gradients over TP ranks
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_std,
        # layout
        tensor_model_parallel_size=p.tensor,
        pipeline_model_parallel_size=p.pipeline,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline,
        expert_model_parallel_size=p.expert,
        expert_tensor_parallel_size=p.expert_tensor,
        sequence_parallel=p.sequence_parallel,
        # numerics
        params_dtype=prec.torch_dtype,
        bf16=prec.dtype == "bf16",
        fp16=prec.dtype == "fp16",
        pipeline_dtype=prec.torch_dtype,
        calculate_per_token_loss=True,
        # gloo matches point-to-point messages per peer in posting order; with PP=2 the
        # previous and next stage are the same peer, and batched p2p posts activations and
        # gradients in an order that pairs them wrongly. Megatron's unbatched p2p orders by
        # rank parity, which pairs them right. NCCL keeps the batched path.
        batch_p2p_comm=on_gpu,
        # kernels: no TE/apex; torch.compile'd SwiGLU on GPU only (CPU CI has no compiler budget)
        bias_activation_fusion=on_gpu,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        use_cpu_initialization=not on_gpu,
        perform_initialization=True,
        # no CUDA graphs (cuda_graph_impl "none"); the default modules ("full") warn that
        # they are deprecated
        cuda_graph_modules=[],
    )


def _fp8_fields(prec: PrecisionConfig) -> dict:
    """Megatron's FP8 settings: TransformerBlock runs each layer under TE's autocast with the
    recipe they name (precision.fp8, fp8_recipe); only TE's modules compute in FP8."""
    if prec.fp8 == "none":
        return {}
    return dict(fp8=prec.fp8, fp8_recipe=prec.fp8_recipe)


def _moe_fields(cfg: Config) -> dict:
    """Megatron's MoE settings: the layer, dispatcher and experts read these; routing and its
    losses are the XFT router's (`RouterSettings`), so Megatron's own balancing is off."""
    e = cfg.moe
    if not e.enabled:
        return {}
    return dict(
        num_moe_experts=e.dispatched_experts,
        moe_router_topk=e.dispatched_topk,
        moe_ffn_hidden_size=cfg.model.ffn_hidden_size,
        moe_token_dispatcher_type=e.dispatcher,
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        # the dispatcher counts kept tokens instead of assuming topk per token when set
        moe_expert_capacity_factor=e.capacity_factor,
        moe_layer_freq=[int(e.is_moe_layer(i)) for i in range(cfg.model.num_layers)],
        moe_grouped_gemm=False,
        moe_permute_fusion=False,
        moe_router_fusion=False,
    )


def build_model(cfg: Config, tconfig: Optional[TransformerConfig] = None,
                meta: bool = False, spec: Optional[str] = None) -> List[GPTModel]:
    """The GPTModel chunks this rank owns, on this rank's device, in the configured dtype,
    from the layer modules of `spec` (default `model.spec`).
    `meta`: parameters without storage (names, shapes and the checkpoint layout only; used by
    the streaming checkpoint tools); that layout is the same under every spec, so a meta build
    takes the local modules unless `spec` says otherwise. Needs parallel state (see
    `xft_megatron.runtime.parallel.initialize`)."""
    spec = spec or ("local" if meta else cfg.model.spec)
    if not meta:
        check_spec(spec)
    tconfig = tconfig or transformer_config(cfg)
    if meta:
        tconfig = dataclasses.replace(tconfig, perform_initialization=False,
                                      use_cpu_initialization=True)
    vp = cfg.parallel.virtual_pipeline
    chunks = []
    for vp_stage in range(vp or 1):
        stage = vp_stage if vp else None
        pre = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage)
        post = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage)
        n_here = get_num_layers_to_build(tconfig, vp_stage=stage)
        first = get_transformer_layer_offset(tconfig, vp_stage=stage)
        with torch.device("meta") if meta else contextlib.nullcontext():
            model = _gpt_model(cfg, tconfig, first, n_here, pre, post, stage, spec)
        model.to(device="meta" if meta else compat.device(), dtype=cfg.precision.torch_dtype)
        _mark_expert_params(model)
        if cfg.stage == "merge":
            for name, p in model.named_parameters():  # the merge stage trains alpha alone
                p.requires_grad_(name.endswith(names.ALPHA))
        compile_on = cfg.train.compile_layers
        if compile_on is None:  # TE's modules are not compiled unless asked (not measured)
            compile_on = compat.has_cuda() and spec == "local"
        if not meta and compile_on:
            compile_layers(model)
        chunks.append(model)
    return chunks


def check_spec(spec: str) -> None:
    """ConfigError, before anything is built, when the layer modules of `spec` cannot run
    here: model.spec=te needs Transformer Engine and a GPU."""
    if spec != "te":
        return
    te_modules()
    if not compat.has_cuda():
        raise ConfigError("model.spec=te runs Transformer Engine's CUDA kernels and needs a GPU; "
                          "use model.spec=local on the CPU")


# precision.fp8_recipe -> the TE check of whether this GPU runs it (transformer_engine.
# pytorch.fp8): the FP8 GEMMs of each recipe need a GPU generation of their own
_FP8_SUPPORT = {"tensorwise": "check_fp8_support", "blockwise": "check_fp8_block_scaling_support",
                "mxfp8": "check_mxfp8_support"}


def check_runnable(cfg: Config) -> None:
    """ConfigError, before anything is built, when what `cfg` computes with cannot run here:
    the layer modules (`check_spec`) and precision.fp8's recipe on this GPU (TE says why:
    tensorwise needs Hopper or Ada, blockwise Hopper and CUDA 12.9, mxfp8 Blackwell; the
    config has already required model.spec=te for FP8, Config._check_fp8)."""
    check_spec(cfg.model.spec)
    prec = cfg.precision
    if prec.fp8 == "none":
        return
    from transformer_engine.pytorch import fp8 as te_fp8

    supported, reason = getattr(te_fp8, _FP8_SUPPORT[prec.fp8_recipe])()
    if not supported:
        gpu = torch.cuda.get_device_name()
        raise ConfigError(f"precision.fp8={prec.fp8} with precision.fp8_recipe="
                          f"{prec.fp8_recipe} cannot run on this GPU ({gpu}): {reason} Use "
                          "another precision.fp8_recipe, or precision.fp8=none")


def _gpt_model(cfg: Config, tconfig: TransformerConfig, first: int, n_here: int, pre: bool,
               post: bool, stage: Optional[int], spec: str) -> GPTModel:
    m = cfg.model
    return GPTModel(
        config=tconfig,
        transformer_layer_spec=block_spec(m, cfg.moe, first, n_here, cfg.stage == "merge",
                                          spec),
        vocab_size=m.vocab_size,
        max_sequence_length=m.max_position_embeddings,
        pre_process=pre,
        post_process=post,
        share_embeddings_and_output_weights=m.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(m.rope_theta) if float(m.rope_theta).is_integer() else m.rope_theta,
        seq_len_interpolation_factor=(
            m.rope_scaling_factor if m.rope_scaling_factor != 1.0 else None
        ),
        vp_stage=stage,
    )


def _mark_expert_params(model) -> None:
    """Expert weights reduce their gradients over the expert-data-parallel group (the ranks
    holding the same expert shard) in every layout. Megatron flags them so only with EP > 1,
    which would leave experts replicated over tensor-parallel ranks (ETP < TP) unreduced."""
    for name, p in model.named_parameters():
        if ".mlp.experts." in name:
            p.allreduce = False


def compile_layers(model: GPTModel) -> None:
    """Regional compilation: each dense decoder layer through torch.compile. Layers share one
    compiled graph (parameters are graph inputs), so compile time does not grow with depth.
    In MoE layers only the attention block is compiled: token dispatch has data-dependent
    shapes and host synchronization that would break the graph every step.
    GPU only: on the CPU it would need a C++ toolchain and minutes per run."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    if not compat.has_cuda():
        raise ConfigError("train.compile_layers=true needs a CUDA GPU; set it to false on CPU")
    for layer in model.decoder.layers:
        if isinstance(layer.mlp, MoELayer):
            layer.self_attention.compile(dynamic=False)
        else:
            layer.compile(dynamic=False)


def count_parameters(chunks) -> int:
    """Parameters held by this rank (shared embeddings counted once)."""
    seen = set()
    total = 0
    for c in chunks:
        for p in c.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total
