"""Dense -> XFT MoE weights (../XFT_SPEC.md section 1), as pure functions over tensors.

Names are those of an unsharded (TP=PP=EP=1) model state dict. Every expert, shared and
routed, is an exact copy of the dense SwiGLU FFN; the router is drawn from N(0, std) with a
generator seeded by (seed, layer), so the result does not depend on any parallel layout.

Two optional ways to make the routed copies differ (both off by default, exact copies):
  noise_std   N(0, noise_std) added to every entry of the routed copies (an ablation);
  drop_ratio  Drop-Upcycling (Nakamura et al., ICLR 2025): in each routed expert a seeded
              random subset of round(r * F) FFN neurons is re-initialized, i.e. those rows
              of W_gate and W_up and those columns of W_down are drawn from a normal with the
              mean and std of the dense matrix (each of the three its own, fp32, over the
              whole matrix); every other entry stays the dense one. The subset of expert j of
              layer l comes from a generator seeded by (seed, l, j): the same on any layout.
With both, the noise is added first and the drop then overwrites its neurons, so the
re-initialized entries follow exactly the stated normal and every other entry is the
noise-only result. The shared expert 0 gets neither; in mode `vanilla` (no shared expert)
every expert is routed and the drop re-initializes all of them (as Drop-Upcycling does),
while the noise keeps its rule of experts 1..N-1.
"""

import hashlib
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch

from xft_megatron.arch import names
from xft_megatron.config import MoEConfig

Stats = Tuple[Tuple[torch.Tensor, torch.Tensor], ...]  # ((mean, std) of W_gate, W_up, W_down)


def experts_from_dense(fc1: torch.Tensor, fc2: torch.Tensor, num_experts: int,
                       noise_std: float = 0.0,
                       generator: Optional[torch.Generator] = None,
                       drop_ratio: float = 0.0,
                       drop_generator: Optional[Callable[[int], torch.Generator]] = None,
                       drop_from: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dense fc1 [2F, H], fc2 [H, F] -> expert fc1 [N, 2, F, H], fc2 [N, H, F], all copies.

    `noise_std` > 0 adds N(0, noise_std) to the ROUTED copies (expert index >= 1) only: the
    spec's optional ablation; 0 (default) keeps them exact. `drop_ratio` r > 0 then
    re-initializes round(r * F) neurons of each expert j >= `drop_from` (1: the shared expert
    0 stays exact; 0: every expert, mode vanilla) with `drop_generator(j)` (module
    docstring); r = 0 draws nothing."""
    check_drop_ratio(drop_ratio)
    two_f, h = fc1.shape
    e1 = fc1.reshape(1, 2, two_f // 2, h).repeat(num_experts, 1, 1, 1)
    e2 = fc2.unsqueeze(0).repeat(num_experts, 1, 1)
    if noise_std > 0:
        for w in (e1, e2):
            w[1:] += torch.randn(w[1:].shape, generator=generator, dtype=torch.float32
                                 ).to(w.dtype) * noise_std
    if drop_ratio > 0:
        if drop_generator is None:
            raise ValueError("drop_ratio > 0 needs drop_generator (expert -> torch.Generator)")
        stats = dense_statistics(fc1, fc2)
        for j in range(drop_from, num_experts):
            g = drop_generator(j)
            reinitialize_neurons(e1[j], e2[j], dropped_neurons(two_f // 2, drop_ratio, g),
                                 stats, g)
    return e1, e2


def check_drop_ratio(drop_ratio: float) -> None:
    """Refuse a Drop-Upcycling ratio outside [0, 1) (NaN included)."""
    if not 0.0 <= drop_ratio < 1.0:
        raise ValueError(f"drop_ratio must be in [0, 1) (the fraction of each routed expert's "
                         f"FFN neurons re-initialized; 0 = exact copies), got {drop_ratio}")


def dense_statistics(fc1: torch.Tensor, fc2: torch.Tensor) -> Stats:
    """(mean, std) in fp32 of the dense W_gate = fc1[:F], W_up = fc1[F:] (fc1 [2F, H]) and
    W_down = fc2 [H, F], each over its whole matrix (std: Bessel-corrected, torch's)."""
    f = fc1.shape[0] // 2
    return tuple((w.float().mean(), w.float().std()) for w in (fc1[:f], fc1[f:], fc2))


def dropped_neurons(num_neurons: int, drop_ratio: float,
                    generator: torch.Generator) -> torch.Tensor:
    """Sorted indices [round(r * F)] of the FFN neurons to re-initialize, a uniform random
    subset of range(F) drawn from `generator`."""
    k = round(drop_ratio * num_neurons)
    return torch.randperm(num_neurons, generator=generator)[:k].sort().values


def reinitialize_neurons(fc1: torch.Tensor, fc2: torch.Tensor, neurons: torch.Tensor,
                         stats: Stats, generator: torch.Generator) -> None:
    """In place, for one expert's fc1 [2, F, H] (gate, up) and fc2 [H, F]: rows `neurons` [k]
    of the gate and up matrices and columns `neurons` of fc2 drawn from N(mean, std) of the
    respective dense matrix (`stats`), in fp32, cast to the weights' dtype. Draw order: gate
    [k, H], up [k, H], down [H, k]."""
    k, h = neurons.numel(), fc1.shape[-1]
    for i, shape in ((0, (k, h)), (1, (k, h)), (2, (h, k))):
        mean, std = stats[i]
        value = torch.randn(shape, generator=generator, dtype=torch.float32) * std + mean
        if i < 2:
            fc1[i, neurons] = value.to(fc1.dtype)
        else:
            fc2[:, neurons] = value.to(fc2.dtype)


# the MoEConfig fields an upcycled checkpoint is made with: its weights depend on them (which
# layers, how many experts, the router's parameters and their initial scale) and its stored
# config records them with topk; the other fields only shape training
WEIGHT_FIELDS = ("num_experts", "topk", "mode", "layer_freq", "router_gate", "router_noise",
                 "router_init_std")


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
            noise_std: float = 0.0, drop_ratio: float = 0.0
            ) -> Iterator[Tuple[str, torch.Tensor]]:
    """Stream (name, tensor) of the MoE state dict from a dense one; layers chosen by
    `moe.is_moe_layer` get experts and a router, everything else passes through unchanged.
    `noise_std`, `drop_ratio`: the optional routed-copy noise and Drop-Upcycling (module
    docstring); neither changes the router."""
    if not moe.enabled:
        raise ValueError("upcycling needs moe.num_experts > 0")
    check_drop_ratio(drop_ratio)
    drop_from = 1 if moe.has_shared_expert else 0  # vanilla: every expert is routed
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
        fc1, fc2 = experts_from_dense(
            value, dense[prefix + names.FC2], moe.num_experts, noise_std, g, drop_ratio,
            lambda expert, layer=layer: torch.Generator().manual_seed(
                drop_seed(seed, layer, expert)), drop_from)
        yield prefix + names.EXPERT_FC1, fc1
        yield prefix + names.EXPERT_FC2, fc2
        for k, v in router_weights(moe, hidden_size, seed, layer, value.dtype).items():
            yield prefix + names.ROUTER + k, v


def noise_seed(seed: int, layer: int) -> int:
    """The generator seed of a layer's optional expert-copy noise (apart from the router's)."""
    return seed * 100_003 + 50_000 + layer


def drop_seed(seed: int, layer: int, expert: int) -> int:
    """The generator seed of one expert's Drop-Upcycling (neuron subset and new values): a
    hash of (seed, layer, expert), so it is the same in every process and collides neither
    with another expert's nor with the router's or the noise's seeds in practice."""
    key = f"xft drop-upcycling seed={seed} layer={layer} expert={expert}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1  # < 2**63
