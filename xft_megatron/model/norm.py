"""RMSNorm that works under sequence parallelism.

Megatron-Core's torch norm wrapper refuses sequence parallelism. Under SP each tensor-parallel
rank normalizes its own slice of the sequence, so the weight gradient is a partial sum: the
`sequence_parallel` attribute on the weight tells Megatron's `finalize_model_grads` to
all-reduce it over the tensor-parallel group, exactly as it does for its TE/apex norms.
"""

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(torch.nn.Module):
    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(
            torch.ones(hidden_size, dtype=config.params_dtype,
                       device="cpu" if config.use_cpu_initialization else None)
        )
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [s, b, h]
        # normalize in fp32, scale in the input dtype, as Llama does
        return torch.nn.functional.rms_norm(
            x.float(), (x.shape[-1],), None, self.eps
        ).to(x.dtype) * self.weight
