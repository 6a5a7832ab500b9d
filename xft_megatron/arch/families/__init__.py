"""Model families: the HF architectures this project converts, trains and exports.

One module per family holds what is its own: the config.json <-> ModelConfig mapping and its
refusals, the names of the tensors it copies per layer, its presets. `base.py` holds what the
Llama-like families share and the table, FAMILIES, everything else looks them up in:

    families.of(m)                           # the family of a ModelConfig (m.family)
    families.for_model_type(t, path)         # the family of an HF config.json's model_type

Adding a family: a module here with a `LlamaLike` subclass under `@register`, imported
below; its two MoE classes in `hf/remote/modeling_xft_moe.py` (`moe_classes` names them); a
case in the HF parity tests (tests/multiprocess/test_convert.py). A new attention feature (a field of
ModelConfig) also needs its Megatron submodule in `model/spec.py` and its parameters in
`arch/counts.py`.
"""

from typing import Any, Dict

from xft_megatron.errors import ConfigError
from xft_megatron.arch.families.base import (FAMILIES, LlamaLike, for_features, for_model_type,
                                             get, of, register)
from xft_megatron.arch.families import llama, mistral, qwen2, qwen3  # noqa: F401,E402 (registers)

__all__ = ["FAMILIES", "PRESETS", "LlamaLike", "for_features", "for_model_type", "get", "of",
           "preset_values", "register"]

# preset name -> ModelConfig fields, over all families (a preset implies its family through
# the features it sets)
PRESETS: Dict[str, Dict[str, Any]] = {
    name: values for family in FAMILIES.values() for name, values in family.presets.items()}


def preset_values(name: str) -> Dict[str, Any]:
    """The field values of a preset; ConfigError naming the known presets otherwise."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset '{name}'; known presets: "
                          f"{', '.join(sorted(PRESETS))}")
    return dict(PRESETS[name])
