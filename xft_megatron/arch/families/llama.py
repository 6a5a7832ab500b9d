"""Llama (and the models published in its architecture: DeepSeek-Coder, TinyLlama)."""

from typing import Any, Dict

from xft_megatron.arch.families.base import LlamaLike, register
from xft_megatron.errors import HFFormatError


@register
class Llama(LlamaLike):
    name = "llama"
    hf_architecture = "LlamaForCausalLM"
    model_type = "llama"
    presets = {  # values as published
        # a few M parameters, GQA on: for tests and the quickstart
        "tiny": dict(num_layers=4, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4,
                     num_query_groups=2, vocab_size=512, max_position_embeddings=256,
                     rope_theta=10000.0, norm_eps=1e-5),
        "deepseek-coder-1.3b": dict(num_layers=24, hidden_size=2048, ffn_hidden_size=5504,
                                    num_attention_heads=16, num_query_groups=16,
                                    vocab_size=32256, max_position_embeddings=16384,
                                    rope_theta=100000.0, rope_scaling_factor=4.0, norm_eps=1e-6),
        "deepseek-coder-6.7b": dict(num_layers=32, hidden_size=4096, ffn_hidden_size=11008,
                                    num_attention_heads=32, num_query_groups=32,
                                    vocab_size=32256, max_position_embeddings=16384,
                                    rope_theta=100000.0, rope_scaling_factor=4.0, norm_eps=1e-6),
        "tinyllama-1.1b": dict(num_layers=22, hidden_size=2048, ffn_hidden_size=5632,
                               num_attention_heads=32, num_query_groups=4, vocab_size=32000,
                               max_position_embeddings=2048, rope_theta=10000.0, norm_eps=1e-5),
        "llama-2-7b": dict(num_layers=32, hidden_size=4096, ffn_hidden_size=11008,
                           num_attention_heads=32, num_query_groups=32, vocab_size=32000,
                           max_position_embeddings=4096, rope_theta=10000.0, norm_eps=1e-5),
    }

    def check_hf(self, hf: Dict[str, Any], path: str) -> None:
        if hf.get("attention_bias"):  # Llama's attention_bias biases o_proj as well
            raise HFFormatError(f"{path}: attention_bias=true is not supported for Llama (it "
                                "adds biases to q, k, v and o; only q/k/v biases, as Qwen2 "
                                "has them, are implemented)")

    def hf_config(self, m) -> Dict[str, Any]:
        return {**super().hf_config(m), "attention_bias": False, "mlp_bias": False}
