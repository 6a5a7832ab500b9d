"""Model FLOPs utilization (MFU): FLOPs per token from `arch/counts.py` (its docstring says
what is counted), against the GPU's peak.
"""

from typing import Optional

from xft_megatron.arch.counts import flops_per_token, matmul_parameters
from xft_megatron.config import ModelConfig, MoEConfig

H200_BF16_DENSE_PEAK = 989e12  # FLOP/s, NVIDIA datasheet (dense, no sparsity)

matmul_params = matmul_parameters  # the name the training loop and benchmarks report under

__all__ = ["H200_BF16_DENSE_PEAK", "flops_per_token", "matmul_params", "mfu"]


def mfu(m: ModelConfig, seq_length: int, tokens_per_s: float,
        moe: Optional[MoEConfig] = None, peak: float = H200_BF16_DENSE_PEAK,
        merge: bool = False) -> float:
    return flops_per_token(m, seq_length, moe, merge) * tokens_per_s / peak
