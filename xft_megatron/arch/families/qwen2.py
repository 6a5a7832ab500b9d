"""Qwen2: Llama's layers with biases on the q, k and v projections."""

from typing import Any, Dict

from xft_megatron.arch.families.base import LlamaLike, register
from xft_megatron.errors import HFFormatError


@register
class Qwen2(LlamaLike):
    name = "qwen2"
    hf_architecture = "Qwen2ForCausalLM"
    model_type = "qwen2"
    qkv_bias = True
    presets = {  # values as published
        "qwen2-0.5b": dict(num_layers=24, hidden_size=896, ffn_hidden_size=4864,
                           num_attention_heads=14, num_query_groups=2, vocab_size=151936,
                           max_position_embeddings=32768, rope_theta=1000000.0, norm_eps=1e-6,
                           qkv_bias=True, tie_embeddings=True),
        "qwen2-1.5b": dict(num_layers=28, hidden_size=1536, ffn_hidden_size=8960,
                           num_attention_heads=12, num_query_groups=2, vocab_size=151936,
                           max_position_embeddings=32768, rope_theta=1000000.0, norm_eps=1e-6,
                           qkv_bias=True, tie_embeddings=True),
    }

    def check_hf(self, hf: Dict[str, Any], path: str) -> None:
        if hf.get("use_sliding_window"):
            raise HFFormatError(f"{path}: use_sliding_window=true is not supported")

    def hf_config(self, m) -> Dict[str, Any]:
        return {**super().hf_config(m), "use_sliding_window": False}
