"""Dense -> XFT MoE weights (../XFT_SPEC.md section 1), as pure functions over tensors.

Names are those of an unsharded (TP=PP=EP=1) model state dict. Every expert, shared and
routed, is an exact copy of the dense SwiGLU FFN; the router is drawn from N(0, std) with a
generator seeded by (seed, layer), so the result does not depend on any parallel layout.
"""

from typing import Dict, Iterator, Optional, Tuple

import torch

from xft_megatron.config import MoEConfig
from xft_megatron.model import names


def experts_from_dense(fc1: torch.Tensor, fc2: torch.Tensor, num_experts: int,
                       noise_std: float = 0.0,
                       generator: Optional[torch.Generator] = None
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dense fc1 [2F, H], fc2 [H, F] -> expert fc1 [N, 2, F, H], fc2 [N, H, F], all copies.

    `noise_std` > 0 adds N(0, noise_std) to the ROUTED copies (expert index >= 1) only: the
    spec's optional ablation; 0 (default) keeps them exact."""
    two_f, h = fc1.shape
    e1 = fc1.reshape(1, 2, two_f // 2, h).repeat(num_experts, 1, 1, 1)
    e2 = fc2.unsqueeze(0).repeat(num_experts, 1, 1)
    if noise_std > 0:
        for w in (e1, e2):
            w[1:] += torch.randn(w[1:].shape, generator=generator, dtype=torch.float32
                                 ).to(w.dtype) * noise_std
    return e1, e2


def router_weights(moe: MoEConfig, hidden_size: int, seed: int, layer: int,
                   dtype=torch.float32) -> Dict[str, torch.Tensor]:
    """Fresh router parameters of one layer (names relative to `names.ROUTER`)."""
    g = torch.Generator().manual_seed(seed * 100_003 + layer)
    r = moe.num_routed
    shapes = {"weight": (r, hidden_size)} if moe.router_gate == "linear" else \
        {"weight1": (r, hidden_size), "weight2": (r, r)}
    if moe.router_noise:
        shapes["noise_weight"] = (r, hidden_size)
    return {name: (torch.randn(shape, generator=g) * moe.router_init_std).to(dtype)
            for name, shape in shapes.items()}


def upcycle(dense: Dict[str, torch.Tensor], moe: MoEConfig, hidden_size: int, seed: int = 0,
            noise_std: float = 0.0) -> Iterator[Tuple[str, torch.Tensor]]:
    """Stream (name, tensor) of the MoE state dict from a dense one; layers chosen by
    `moe.is_moe_layer` get experts and a router, everything else passes through unchanged."""
    if not moe.enabled:
        raise ValueError("upcycling needs moe.num_experts > 0")
    for name, value in dense.items():
        layer = names.layer_of(name)
        sparse = layer is not None and moe.is_moe_layer(layer)
        if sparse and name.endswith("." + names.FC2):
            continue  # emitted with fc1
        if not (sparse and name.endswith("." + names.FC1)):
            yield name, value
            continue
        prefix = name[: -len(names.FC1)]  # 'decoder.layers.3.'
        g = torch.Generator().manual_seed(noise_seed(seed, layer))
        fc1, fc2 = experts_from_dense(value, dense[prefix + names.FC2], moe.num_experts,
                                      noise_std, g)
        yield prefix + names.EXPERT_FC1, fc1
        yield prefix + names.EXPERT_FC2, fc2
        for k, v in router_weights(moe, hidden_size, seed, layer, value.dtype).items():
            yield prefix + names.ROUTER + k, v


def noise_seed(seed: int, layer: int) -> int:
    """The generator seed of a layer's optional expert-copy noise (apart from the router's)."""
    return seed * 100_003 + 50_000 + layer
