"""Adafactor (Shazeer & Stern, 2018) as the XFT reference trains with it: no first moment,
a factored second moment for matrices, update clipping, the learning rate given from outside
(Megatron's schedule through each group's 'lr'; no relative step size).

For a gradient G of a matrix [R, C], at update t (beta2_t = 1 - t^decay_rate):

    row <- beta2_t row + (1 - beta2_t) mean_j(G^2 + eps1)          [R]
    col <- beta2_t col + (1 - beta2_t) mean_i(G^2 + eps1)          [C]
    V    = row col^T / mean(row)                                   (the factored estimate)
    U    = G / sqrt(V);   U <- U / max(1, RMS(U) / clip_threshold)
    W   <- W - lr_t W wd - lr_t U,   lr_t = lr (* max(eps2, RMS(W)) with scale_parameter)

A vector (norms, biases) keeps a full second moment v instead of (row, col). A tensor of
more than two dims is a stack of matrices over its last two dims, each with its own
statistics and its own RMS clip: the grouped experts [E, 2, F, H] and [E, H, F] are then
factored per expert and per gate/up half, like the reference's separate Linear modules.
`set_row_groups(p, g)` splits the rows of a parameter into g stacked matrices
(p.shape[:-2] + [g, rows/g, cols]): the dense SwiGLU fc1 [2F, H] is factored as [2, F, H],
gate and up apart, again as the reference's two Linears.

Computed in fp32 for any parameter dtype, state in fp32 (rounding.Fp32UpdateOptimizer).
Checkpoints: `checkpoint_views(p)` gives each factored statistic as a view shaped like the
parameter with the reduced axis of size 1 (row: p.shape[:-1] + [1]; col: p.shape[:-2] +
[g, cols]) so that it shards like the parameter (training/optimizer.py); the state is stored
in any shape with the right number of values and viewed as needed.
"""

from typing import Dict, Optional, Tuple

import torch

from xft_megatron.training.rounding import Fp32UpdateOptimizer

FACTORED_KEYS = ("exp_avg_sq_row", "exp_avg_sq_col")


class Adafactor(Fp32UpdateOptimizer):
    """Adafactor without momentum, lr from the group (see the module docstring). Defaults are
    the XFT reference's: eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8,
    weight_decay=0, scale_parameter=False."""

    def __init__(self, params, lr: float = 1e-3, eps: Tuple[float, float] = (1e-30, 1e-3),
                 clip_threshold: float = 1.0, decay_rate: float = -0.8,
                 weight_decay: float = 0.0, scale_parameter: bool = False,
                 rounding: str = "nearest", seed: int = 0):
        super().__init__(params, dict(lr=lr, eps=tuple(eps), clip_threshold=clip_threshold,
                                      decay_rate=decay_rate, weight_decay=weight_decay,
                                      scale_parameter=scale_parameter), rounding, seed)
        self._row_groups: Dict[torch.Tensor, int] = {}

    def set_row_groups(self, p: torch.Tensor, groups: int) -> None:
        """Factor `p` [..., R, C] as `groups` stacked matrices [..., groups, R / groups, C]."""
        if p.dim() < 2 or p.shape[-2] % groups:
            raise ValueError(f"cannot split the rows of a {tuple(p.shape)} tensor into "
                             f"{groups} matrices")
        if self.state.get(p):
            raise RuntimeError("set_row_groups must come before the state is created")
        self._row_groups[p] = groups

    def matrix_shape(self, p: torch.Tensor) -> Optional[Tuple[int, ...]]:
        """The [..., R, C] stack of matrices `p` is factored as; None for a vector."""
        if p.dim() < 2:
            return None
        g = self._row_groups.get(p, 1)
        if g == 1:
            return tuple(p.shape)
        return (*p.shape[:-2], g, p.shape[-2] // g, p.shape[-1])

    def checkpoint_views(self, p: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The factored statistics of `p` shaped like `p` with the reduced axis of size 1
        (views of the state: a load into them restores it). Empty for a vector."""
        shape = self.matrix_shape(p)
        if shape is None or not self.state.get(p):
            return {}
        g = self._row_groups.get(p, 1)
        state = self.state[p]
        return {"exp_avg_sq_row": state["exp_avg_sq_row"].view(*p.shape[:-1], 1),
                "exp_avg_sq_col": state["exp_avg_sq_col"].view(*p.shape[:-2], g,
                                                                 p.shape[-1])}

    def _new_state(self, p):
        shape = self.matrix_shape(p)
        zeros = lambda s: torch.zeros(s, dtype=torch.float32, device=p.device)  # noqa: E731
        if shape is None:
            return {"step": torch.tensor(0.0), "exp_avg_sq": zeros(p.shape)}
        return {"step": torch.tensor(0.0), "exp_avg_sq_row": zeros(shape[:-1]),
                "exp_avg_sq_col": zeros(shape[:-2] + shape[-1:])}

    def _update(self, p, p32, g32, state, group):
        eps1, eps2 = group["eps"]
        beta2 = 1.0 - float(state["step"]) ** group["decay_rate"]
        shape = self.matrix_shape(p)
        if shape is None:  # a vector: full second moment, one "matrix"
            g = g32.reshape(1, -1)  # [1, n]
            v = state["exp_avg_sq"].view(1, -1)
            v.mul_(beta2).add_(g * g + eps1, alpha=1.0 - beta2)
            u = v.rsqrt() * g
        else:
            g = g32.view(shape)  # [..., R, C]
            row = state["exp_avg_sq_row"].view(shape[:-1])  # [..., R]
            col = state["exp_avg_sq_col"].view(shape[:-2] + shape[-1:])  # [..., C]
            sq = g * g + eps1
            row.mul_(beta2).add_(sq.mean(dim=-1), alpha=1.0 - beta2)
            col.mul_(beta2).add_(sq.mean(dim=-2), alpha=1.0 - beta2)
            r = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)  # [..., R, 1]
            c = col.unsqueeze(-2).rsqrt()  # [..., 1, C]
            u = (r * c).mul_(g)
        # per matrix: clip the update's RMS, scale by the learning rate
        u.div_((_rms(u) / group["clip_threshold"]).clamp_(min=1.0))
        lr = group["lr"]
        if group["scale_parameter"]:
            lr = lr * _rms(p32.view(u.shape)).clamp_(min=eps2)
        if group["weight_decay"]:
            p32.view(u.shape).add_(p32.view(u.shape) * lr, alpha=-group["weight_decay"])
        p32.view(u.shape).sub_(u.mul_(lr))


def _rms(x: torch.Tensor) -> torch.Tensor:
    """Root mean square over the last two dims, kept for broadcasting: [..., 1, 1]."""
    return x.square().mean(dim=(-2, -1), keepdim=True).sqrt_()
