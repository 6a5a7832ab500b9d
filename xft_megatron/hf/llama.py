"""Pure name/layout maps between Megatron-Core GPT state dicts and HF ones of the Llama-like
families (`xft_megatron/arch/families/`).

Both directions work on full (unsharded) tensors, one layer at a time if the caller wishes,
and never touch process groups. The tensors a family copies as they are come from its
`attention_tensors`; the fused ones are laid out alike in every family: Megatron's QKV weight
per query group (for each of the G groups, [q rows of its H/G heads; k rows; v rows], each
head `d` rows) and fc1 as [gate rows; up rows].
"""

from typing import Callable, Dict, Iterator, Optional, Tuple

import torch

from xft_megatron.arch import families
from xft_megatron.arch import names
from xft_megatron.config import ModelConfig

Tensor = torch.Tensor
Shapes = Dict[str, Tuple[int, ...]]


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, m: ModelConfig) -> Tensor:
    """HF q [H*d, ...], k/v [G*d, ...] -> Megatron linear_qkv [(H + 2G)*d, ...]."""
    g, d = m.num_query_groups, m.head_dim
    per = m.num_attention_heads // g
    rest = q.shape[1:]
    q = q.reshape(g, per * d, *rest)
    k = k.reshape(g, d, *rest)
    v = v.reshape(g, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(qkv: Tensor, m: ModelConfig) -> Tuple[Tensor, Tensor, Tensor]:
    """Inverse of `fuse_qkv`."""
    g, d = m.num_query_groups, m.head_dim
    per = m.num_attention_heads // g
    rest = qkv.shape[1:]
    grouped = qkv.reshape(g, (per + 2) * d, *rest)
    q, k, v = torch.split(grouped, [per * d, d, d], dim=1)
    return (q.reshape(-1, *rest).contiguous(), k.reshape(-1, *rest).contiguous(),
            v.reshape(-1, *rest).contiguous())


def layer_to_hf(sd: Dict[str, Tensor], m: ModelConfig, i: int) -> Dict[str, Tensor]:
    """One decoder layer, Megatron names (arch/names.py) -> HF names `model.layers.{i}.`."""
    s = names.layer(i)
    out = attention_to_hf(sd, m, i)
    out.update(ffn_to_hf(sd[s + names.FC1], sd[s + names.FC2], f"model.layers.{i}.mlp."))
    return out


def attention_to_hf(sd: Dict[str, Tensor], m: ModelConfig, i: int) -> Dict[str, Tensor]:
    """The norms and attention of one decoder layer (all but the FFN), Megatron -> HF."""
    s = names.layer(i)
    o = f"model.layers.{i}."
    out = {o + hf: sd[s + name]
           for name, (hf, _) in families.of(m).attention_tensors(m).items()}
    q, k, v = split_qkv(sd[s + names.QKV], m)
    out.update({o + "self_attn.q_proj.weight": q, o + "self_attn.k_proj.weight": k,
                o + "self_attn.v_proj.weight": v})
    if m.qkv_bias:
        qb, kb, vb = split_qkv(sd[s + names.QKV_BIAS], m)
        out.update({o + "self_attn.q_proj.bias": qb, o + "self_attn.k_proj.bias": kb,
                    o + "self_attn.v_proj.bias": vb})
    return out


def ffn_to_hf(fc1: Tensor, fc2: Tensor, prefix: str) -> Dict[str, Tensor]:
    """A SwiGLU FFN, Megatron fc1 [2F, H] (gate rows, then up rows) and fc2 [H, F] -> HF
    gate_proj/up_proj/down_proj under `prefix`."""
    gate, up = torch.chunk(fc1, 2, dim=0)
    return {prefix + "gate_proj.weight": gate.contiguous(),
            prefix + "up_proj.weight": up.contiguous(), prefix + "down_proj.weight": fc2}


def layer_from_hf(sd: Dict[str, Tensor], m: ModelConfig, i: int) -> Dict[str, Tensor]:
    """One decoder layer, HF names -> Megatron names (arch/names.py)."""
    s = f"model.layers.{i}."
    o = names.layer(i)
    out = {o + name: sd[s + hf]
           for name, (hf, _) in families.of(m).attention_tensors(m).items()}
    out.update({
        o + names.QKV: fuse_qkv(
            sd[s + "self_attn.q_proj.weight"], sd[s + "self_attn.k_proj.weight"],
            sd[s + "self_attn.v_proj.weight"], m),
        o + names.FC1: torch.cat(
            [sd[s + "mlp.gate_proj.weight"], sd[s + "mlp.up_proj.weight"]], dim=0),
        o + names.FC2: sd[s + "mlp.down_proj.weight"],
    })
    if m.qkv_bias:
        out[o + names.QKV_BIAS] = fuse_qkv(
            sd[s + "self_attn.q_proj.bias"], sd[s + "self_attn.k_proj.bias"],
            sd[s + "self_attn.v_proj.bias"], m)
    return out


# Megatron name -> HF name of the tensors outside the decoder layers
OUTER = {names.EMBEDDING: "model.embed_tokens.weight", names.FINAL_NORM: "model.norm.weight",
         names.OUTPUT: "lm_head.weight"}


def outer_names(m: ModelConfig) -> Dict[str, str]:
    """OUTER without the output layer when the embeddings are tied."""
    return {k: v for k, v in OUTER.items() if not (m.tie_embeddings and k == names.OUTPUT)}


def to_hf(sd: Dict[str, Tensor], m: ModelConfig) -> Iterator[Tuple[str, Tensor]]:
    """Whole model, Megatron -> HF, tensor by tensor (the conversions call the per-layer
    functions directly)."""
    outer = outer_names(m)
    yield outer[names.EMBEDDING], sd[names.EMBEDDING]
    for i in range(m.num_layers):
        yield from layer_to_hf(sd, m, i).items()
    for name in list(outer)[1:]:
        yield outer[name], sd[name]


def from_hf(sd: Dict[str, Tensor], m: ModelConfig) -> Iterator[Tuple[str, Tensor]]:
    """Whole model, HF -> Megatron."""
    outer = outer_names(m)
    yield names.EMBEDDING, sd[outer[names.EMBEDDING]]
    for i in range(m.num_layers):
        yield from layer_from_hf(sd, m, i).items()
    for name in list(outer)[1:]:
        yield name, sd[outer[name]]


def hf_shapes(m: ModelConfig, layer_ffn: Optional[Callable[[int], Shapes]] = None) -> Shapes:
    """Name -> shape of every HF tensor of a model of config `m`, layer by layer (embedding
    first, final norm and output layer last): the order a conversion writes them in.
    `layer_ffn(i)`: the FFN tensors of layer i (default: the dense SwiGLU FFN)."""
    h, v = m.hidden_size, m.vocab_size
    q, kv = m.num_attention_heads * m.head_dim, m.num_query_groups * m.head_dim
    layer_ffn = layer_ffn or (lambda i: ffn_shapes(m, f"model.layers.{i}.mlp."))
    copied = families.of(m).attention_tensors(m).values()
    out = {"model.embed_tokens.weight": (v, h)}
    for i in range(m.num_layers):
        s = f"model.layers.{i}."
        out.update({s + hf: shape for hf, shape in copied})
        out.update({s + "self_attn.q_proj.weight": (q, h), s + "self_attn.k_proj.weight": (kv, h),
                    s + "self_attn.v_proj.weight": (kv, h)})
        if m.qkv_bias:
            out.update({s + "self_attn.q_proj.bias": (q,), s + "self_attn.k_proj.bias": (kv,),
                        s + "self_attn.v_proj.bias": (kv,)})
        out.update(layer_ffn(i))
    out["model.norm.weight"] = (h,)
    if not m.tie_embeddings:
        out["lm_head.weight"] = (v, h)
    return out


def ffn_shapes(m: ModelConfig, prefix: str) -> Shapes:
    """The HF tensors of one SwiGLU FFN under `prefix` (as `ffn_to_hf` names them)."""
    h, f = m.hidden_size, m.ffn_hidden_size
    return {prefix + "gate_proj.weight": (f, h), prefix + "up_proj.weight": (f, h),
            prefix + "down_proj.weight": (h, f)}
