"""Architecture presets for the Llama-family shapes users start from (values as published)."""

from typing import Any, Dict

from xft_megatron.errors import ConfigError

PRESETS: Dict[str, Dict[str, Any]] = {
    # a few M parameters, GQA on: for tests and the quickstart
    "tiny": dict(num_layers=4, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4,
                 num_query_groups=2, vocab_size=512, max_position_embeddings=256,
                 rope_theta=10000.0, norm_eps=1e-5),
    "deepseek-coder-1.3b": dict(num_layers=24, hidden_size=2048, ffn_hidden_size=5504,
                                num_attention_heads=16, num_query_groups=16, vocab_size=32256,
                                max_position_embeddings=16384, rope_theta=100000.0,
                                rope_scaling_factor=4.0, norm_eps=1e-6),
    "deepseek-coder-6.7b": dict(num_layers=32, hidden_size=4096, ffn_hidden_size=11008,
                                num_attention_heads=32, num_query_groups=32, vocab_size=32256,
                                max_position_embeddings=16384, rope_theta=100000.0,
                                rope_scaling_factor=4.0, norm_eps=1e-6),
    "tinyllama-1.1b": dict(num_layers=22, hidden_size=2048, ffn_hidden_size=5632,
                           num_attention_heads=32, num_query_groups=4, vocab_size=32000,
                           max_position_embeddings=2048, rope_theta=10000.0, norm_eps=1e-5),
    "llama-2-7b": dict(num_layers=32, hidden_size=4096, ffn_hidden_size=11008,
                       num_attention_heads=32, num_query_groups=32, vocab_size=32000,
                       max_position_embeddings=4096, rope_theta=10000.0, norm_eps=1e-5),
    "qwen2-0.5b": dict(num_layers=24, hidden_size=896, ffn_hidden_size=4864,
                       num_attention_heads=14, num_query_groups=2, vocab_size=151936,
                       max_position_embeddings=32768, rope_theta=1000000.0, norm_eps=1e-6,
                       qkv_bias=True, tie_embeddings=True),
    "qwen2-1.5b": dict(num_layers=28, hidden_size=1536, ffn_hidden_size=8960,
                       num_attention_heads=12, num_query_groups=2, vocab_size=151936,
                       max_position_embeddings=32768, rope_theta=1000000.0, norm_eps=1e-6,
                       qkv_bias=True, tie_embeddings=True),
}


def preset_values(name: str) -> Dict[str, Any]:
    """The field values of a preset; ConfigError naming the known presets otherwise."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset '{name}'; known presets: "
                          f"{', '.join(sorted(PRESETS))}")
    return dict(PRESETS[name])
