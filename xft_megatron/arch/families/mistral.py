"""Mistral: Llama's layers, with sliding-window attention (refused: attention here is full
causal, so only checkpoints without a window are converted)."""

from typing import Any, Dict

from xft_megatron.arch.families.base import LlamaLike, register
from xft_megatron.errors import HFFormatError


@register
class Mistral(LlamaLike):
    name = "mistral"
    hf_architecture = "MistralForCausalLM"
    model_type = "mistral"
    implied = False  # the same features as Llama: a config naming no family is Llama

    def check_hf(self, hf: Dict[str, Any], path: str) -> None:
        if hf.get("sliding_window") is not None:
            raise HFFormatError(f"{path}: sliding_window={hf['sliding_window']} is not "
                                "supported (attention here is full causal); set it to null only "
                                "if the model was trained without it")

    def hf_config(self, m) -> Dict[str, Any]:
        # transformers' MistralConfig defaults to a 4096-token window: say there is none
        return {**super().hf_config(m), "sliding_window": None}
