"""Megatron parameter names, read in one place.

The model's parameters are named as the local layer spec (model/spec.py) names them, e.g.
`decoder.layers.3.mlp.experts.fc1_weight`; the HF maps, upcycling, the merge and the streaming
checkpoint layout read layer numbers and roles out of those names through this module.
"""

from typing import Optional


def layer_of(name: str) -> Optional[int]:
    """The decoder layer a parameter belongs to ('decoder.layers.3.mlp...' -> 3), or None for
    parameters outside the layers (embedding, final norm, output layer)."""
    parts = name.split(".")
    if "layers" in parts:
        i = parts.index("layers")
        if i + 1 < len(parts) and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None
