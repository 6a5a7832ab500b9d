"""Kernels Megatron-Core takes from apex when apex is installed, and ours otherwise.

Megatron's linear layers fuse the weight gradient into DDP's gradient buffer
(`gradient_accumulation_fusion`) only through apex's `fused_weight_gradient_mlp_cuda`;
without apex they compute a bf16 weight gradient, which DDP's hook then adds to the fp32
`main_grad` as a second kernel (and after a rounding to bf16). `accumulate_wgrad` does it in
one GEMM whose accumulator is `main_grad` itself, and `ApexWgradStandIn` offers it under
apex's names; `compat.patches.kernel_patches` puts it where Megatron looks for apex's.
"""

from __future__ import annotations

import torch


def accumulate_wgrad(main_grad: torch.Tensor, grad_output: torch.Tensor,
                     inputs: torch.Tensor) -> None:
    """main_grad [out, in] += grad_output [n, out]^T @ inputs [n, in], in one GEMM that
    accumulates in main_grad's dtype (fp32 for bf16 operands: the product is never rounded
    to bf16). On CUDA through `addmm(out_dtype=...)`; the CPU has no mixed-dtype GEMM, so
    there the operands are widened first (the same sums, in the same dtype)."""
    if grad_output.dtype == main_grad.dtype:
        main_grad.addmm_(grad_output.t(), inputs)
    elif main_grad.is_cuda:
        torch.addmm(main_grad, grad_output.t(), inputs, out_dtype=main_grad.dtype,
                    out=main_grad)
    else:
        main_grad.addmm_(grad_output.t().to(main_grad.dtype), inputs.to(main_grad.dtype))


class ApexWgradStandIn:
    """The two functions of apex's `fused_weight_gradient_mlp_cuda` that Megatron's linear
    layers call (same arguments: the 2-D input, the 2-D output gradient, the buffer)."""

    @staticmethod
    def wgrad_gemm_accum_fp32(inputs, grad_output, main_grad):
        accumulate_wgrad(main_grad, grad_output, inputs)

    @staticmethod
    def wgrad_gemm_accum_fp16(inputs, grad_output, main_grad):
        accumulate_wgrad(main_grad, grad_output, inputs)
