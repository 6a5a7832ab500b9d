"""Qwen3: Llama's layers with an RMSNorm over each head's q and k before RoPE (`q_norm`,
`k_norm`, weights of size head_dim) and a head width of its own (`head_dim`, not
hidden_size / num_attention_heads)."""

from typing import Any, Dict, Optional

from xft_megatron.arch import names
from xft_megatron.arch.families.base import LlamaLike, TensorNames, register
from xft_megatron.errors import HFFormatError


@register
class Qwen3(LlamaLike):
    name = "qwen3"
    hf_architecture = "Qwen3ForCausalLM"
    model_type = "qwen3"
    qk_norm = True
    presets = {  # values as published
        "qwen3-0.6b": dict(num_layers=28, hidden_size=1024, ffn_hidden_size=3072,
                           num_attention_heads=16, num_query_groups=8, head_dim=128,
                           vocab_size=151936, max_position_embeddings=40960,
                           rope_theta=1000000.0, norm_eps=1e-6, qk_norm=True,
                           tie_embeddings=True),
        "qwen3-1.7b": dict(num_layers=28, hidden_size=2048, ffn_hidden_size=6144,
                           num_attention_heads=16, num_query_groups=8, head_dim=128,
                           vocab_size=151936, max_position_embeddings=40960,
                           rope_theta=1000000.0, norm_eps=1e-6, qk_norm=True,
                           tie_embeddings=True),
    }

    def check_hf(self, hf: Dict[str, Any], path: str) -> None:
        if hf.get("use_sliding_window"):
            raise HFFormatError(f"{path}: use_sliding_window=true is not supported")
        if hf.get("attention_bias"):  # Qwen3's attention_bias biases o_proj as well
            raise HFFormatError(f"{path}: attention_bias=true is not supported for Qwen3 (it "
                                "adds biases to q, k, v and o)")

    def hf_head_dim(self, hf: Dict[str, Any]) -> Optional[int]:
        return hf.get("head_dim", 128)  # transformers' Qwen3Config default

    def attention_tensors(self, m) -> TensorNames:
        d = (m.head_dim,)
        return {**super().attention_tensors(m),
                names.Q_NORM: ("self_attn.q_norm.weight", d),
                names.K_NORM: ("self_attn.k_norm.weight", d)}

    def hf_config(self, m) -> Dict[str, Any]:
        return {**super().hf_config(m), "attention_bias": False, "use_sliding_window": False}
