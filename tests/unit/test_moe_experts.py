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
