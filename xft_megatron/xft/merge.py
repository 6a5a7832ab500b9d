"""XFT MoE -> dense weights (../XFT_SPEC.md section 4), as pure functions over tensors.

Per MoE layer, coefficients c_0 = lambda (shared expert) and c_i = (1 - lambda) softmax(alpha)_i
over the routed experts (`merge_coefficients`, in model/moe/merge_mlp.py: the learnable merge
layer owns its rule); the dense FFN is W = sum_j c_j W_j for gate, up and down separately.
Names are those of an unsharded (TP=PP=EP=1) model state dict, as `upcycle.py` writes them.
"""

import concurrent.futures
from typing import Callable, Dict, Iterator, Tuple

import torch

from xft_megatron.arch import names
from xft_megatron.errors import UsageError


def merge_experts(fc1: torch.Tensor, fc2: torch.Tensor, coeffs: torch.Tensor
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Expert fc1 [N, 2, F, H], fc2 [N, H, F] and c [N] -> dense fc1 [2F, H] (gate rows, then
    up rows) and fc2 [H, F], in the experts' dtype (accumulated in float64)."""
    n, _, f, h = fc1.shape
    if coeffs.shape != (n,):
        raise UsageError(f"{coeffs.numel()} coefficients for {n} experts")
    return (weighted_sum(fc1, coeffs, fc1.dtype).reshape(2 * f, h),
            weighted_sum(fc2, coeffs, fc2.dtype))


def weighted_sum(stacked: torch.Tensor, coeffs: torch.Tensor,
                 dtype: torch.dtype = torch.float64, block: int = 1 << 15) -> torch.Tensor:
    """sum_j c_j * stacked[j], accumulated in float64 with the experts added in index order
    element by element (each product and sum rounded once), then cast to `dtype`. Element-wise
    throughout, so any slice of the other dimensions (a tensor-parallel shard) gets bitwise
    the same values as the full tensor. On the CPU it works through `block` elements at a
    time (float64 temporaries stay in cache, each operation below torch's intra-op threading
    grain) on torch's number of threads, each thread its own contiguous span."""
    n = stacked.shape[0]
    flat = stacked.reshape(n, -1)
    total = flat.shape[1]
    c = [float(v) for v in coeffs.double().tolist()]
    out = torch.empty(total, dtype=dtype, device=stacked.device)
    if stacked.device.type != "cpu":
        block = max(total, 1)  # accelerators: whole-tensor operations
    spans = _spans(total, block, torch.get_num_threads() if stacked.device.type == "cpu" else 1)

    def run(lo: int, hi: int) -> None:
        acc = torch.empty(min(block, hi - lo), dtype=torch.float64, device=stacked.device)
        term = torch.empty_like(acc)
        for start in range(lo, hi, block):
            size = min(block, hi - start)
            a, t = acc[:size], term[:size]
            a.zero_()
            for j in range(n):
                t.copy_(flat[j, start:start + size])
                t.mul_(c[j])
                a.add_(t)
            out[start:start + size].copy_(a)

    if len(spans) == 1:
        run(*spans[0])
    else:
        with concurrent.futures.ThreadPoolExecutor(len(spans)) as pool:
            list(pool.map(lambda span: run(*span), spans))
    return out.reshape(stacked.shape[1:])


def _spans(total: int, block: int, workers: int):
    """[lo, hi) ranges covering [0, total), whole blocks each, one per worker at most."""
    blocks = -(-total // block) if total else 1
    per = -(-blocks // max(1, min(workers, blocks)))
    return [(lo, min(total, lo + per * block)) for lo in range(0, max(total, 1), per * block)]


def fold(moe: Dict[str, torch.Tensor], coefficients: Callable[[int], torch.Tensor]
         ) -> Iterator[Tuple[str, torch.Tensor]]:
    """Stream (name, tensor) of the dense state dict: each MoE layer's experts merged with
    `coefficients(layer)` (a [N] tensor), its router dropped; everything else unchanged."""
    for name, value in moe.items():
        layer = names.layer_of(name)
        if "." + names.ROUTER in name or name.endswith("." + names.EXPERT_FC2):
            continue
        if name.endswith("." + names.EXPERT_FC1):
            prefix = name[: -len(names.EXPERT_FC1)]  # 'decoder.layers.3.'
            fc1, fc2 = merge_experts(value, moe[prefix + names.EXPERT_FC2], coefficients(layer))
            yield prefix + names.FC1, fc1
            yield prefix + names.FC2, fc2
            continue
        yield name, value
