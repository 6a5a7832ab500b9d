"""Grouped experts on the CPU path: the weighted SwiGLU's hand-written backward against
autograd's numerical Jacobian (float64), and the expert computation against a direct
per-expert SwiGLU written here (including an expert with no tokens)."""

import torch
import torch.nn.functional as F

from xft_megatron.model.moe.experts import swiglu_experts, weighted_swiglu


def test_weighted_swiglu_gradients():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(7, 10, dtype=torch.float64, generator=g).requires_grad_()
    p = torch.rand(7, dtype=torch.float64, generator=g).requires_grad_()
    assert torch.autograd.gradcheck(weighted_swiglu, (h, p))


def test_swiglu_backward_forms_agree():
    """The compiled (CUDA) form of the SwiGLU backward and the in-place eager one compute the
    same gradients (fp64 and bf16 inputs), so the GPU path is checked here too, in eager."""
    from xft_megatron.model.moe.experts import _swiglu_backward, _swiglu_backward_eager

    g = torch.Generator().manual_seed(2)
    for dtype, tol in ((torch.float64, 1e-12), (torch.bfloat16, 1e-2)):
        h = torch.randn(9, 12, generator=g).to(dtype)
        p = torch.rand(9, generator=g)
        grad = torch.randn(9, 6, generator=g).to(dtype)
        for a, b in zip(_swiglu_backward(h, p, grad), _swiglu_backward_eager(h, p, grad)):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert torch.allclose(a.double(), b.double(), rtol=tol, atol=tol)


def test_experts_match_direct_swiglu():
    g = torch.Generator().manual_seed(1)
    e, f, hdim = 3, 6, 5
    counts = torch.tensor([4, 0, 3])
    x = torch.randn(7, hdim, dtype=torch.float64, generator=g)
    probs = torch.rand(7, dtype=torch.float64, generator=g)
    fc1 = torch.randn(e, 2 * f, hdim, dtype=torch.float64, generator=g)
    fc2 = torch.randn(e, hdim, f, dtype=torch.float64, generator=g)
    out = swiglu_experts(x, counts, probs, fc1, fc2, use_grouped=False)
    rows, start = [], 0
    for j, n in enumerate(counts.tolist()):
        for t in range(start, start + n):
            gate, up = fc1[j, :f] @ x[t], fc1[j, f:] @ x[t]
            rows.append(fc2[j] @ (F.silu(gate) * up * probs[t]))
        start += n
    assert torch.allclose(out, torch.stack(rows), atol=1e-12)
