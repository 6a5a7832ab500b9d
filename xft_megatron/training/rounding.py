"""Training without fp32 master weights: optimizer math in fp32, results written back into
low-precision (bf16) weights by round-to-nearest or stochastic rounding.

`Fp32UpdateOptimizer` is the base of our torch optimizers (AdamW here, Adafactor in
adafactor.py). For every parameter it takes an fp32 view (the parameter itself when it is
fp32, as under Megatron's mixed precision where the optimizer holds fp32 master copies;
otherwise a temporary fp32 copy of the bf16 weight), lets the subclass update it in place
from the fp32 gradient and fp32 state, and writes a temporary copy back into the weight:

    nearest     round to nearest even (`Tensor.copy_`)
    stochastic  `stochastic_round`: unbiased, E[round(x)] = x, so updates far below half a
                bf16 ulp still move the weight on average instead of vanishing

The random bits of stochastic rounding come from a `torch.Generator` seeded, for each
parameter and update, from (the optimizer's seed, the update count, the parameter's index):
a pure function of state the checkpoint holds (the update count), so a resumed run draws
exactly the bits the uninterrupted one drew, and data-parallel replicas (same seed, same
count) round identically and stay equal.
"""

import math
from typing import Dict

import torch

_BF16_LOW_BITS = 16  # bf16 is the upper half of an fp32 bit pattern
_MASK64 = (1 << 64) - 1


def stochastic_round(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """`x` (fp32) rounded to bf16 stochastically: to the neighbour above (in magnitude) with
    probability (|x| - |lower|) / ulp, else to the one below. Uniform random bits are added
    to the 16 bits of the fp32 pattern that bf16 drops, then those bits are cut off (a carry
    moves the value to the next bf16 number, across a binade if need be). Non-finite values
    pass through unchanged. `generator` must live on `x`'s device."""
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic_round takes fp32 values, got {x.dtype}")
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << _BF16_LOW_BITS, x.shape, dtype=torch.int32,
                          device=x.device, generator=generator)
    rounded = ((bits + noise) & ~((1 << _BF16_LOW_BITS) - 1)).view(torch.float32)
    rounded = torch.where(torch.isfinite(x), rounded, x)
    return rounded.to(torch.bfloat16)  # exact: the low 16 bits are zero


def mix_seed(*values: int) -> int:
    """One 63-bit seed from several integers (splitmix64 steps): nearby inputs (update n and
    n + 1, parameter i and i + 1) give unrelated streams."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h >> 1


class Fp32UpdateOptimizer(torch.optim.Optimizer):
    """A torch optimizer whose update runs in fp32 whatever the parameters' dtype, with fp32
    state; low-precision results are written back with `rounding` (nearest | stochastic).
    Subclasses define `_new_state(p)` (fresh state, with a tensor `step`) and
    `_update(p, p32, g32, state, group)` (update `p`'s fp32 view `p32` in place;
    `state['step']` already counts this update). The lr is read from each group's 'lr', as
    Megatron's scheduler sets it every step."""

    def __init__(self, params, defaults: Dict, rounding: str = "nearest", seed: int = 0):
        if rounding not in ("nearest", "stochastic"):
            raise ValueError(f"rounding={rounding!r} must be nearest or stochastic")
        super().__init__(params, defaults)
        self.rounding, self.seed = rounding, seed
        self._generators: Dict[torch.device, torch.Generator] = {}

    def _new_state(self, p: torch.Tensor) -> Dict:
        raise NotImplementedError

    def _update(self, p: torch.Tensor, p32: torch.Tensor, g32: torch.Tensor, state: Dict,
                group: Dict) -> None:
        raise NotImplementedError

    def init_state(self) -> None:
        """Create the state (zeros, update count 0) of every parameter that has none, as
        loading a checkpoint into a fresh optimizer needs."""
        for group in self.param_groups:
            for p in group["params"]:
                if not self.state[p]:
                    self.state[p] = self._new_state(p)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                index += 1  # counts every parameter: indices do not depend on the grads
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(self._new_state(p))
                state["step"] += 1
                exact = p.dtype == torch.float32
                p32 = p if exact else p.float()
                g32 = p.grad if p.grad.dtype == torch.float32 else p.grad.float()
                self._update(p, p32, g32, state, group)
                if not exact:
                    self._write_back(p, p32, int(state["step"]), index)
        return loss

    def _write_back(self, p: torch.Tensor, p32: torch.Tensor, step: int, index: int) -> None:
        if self.rounding == "nearest":
            p.copy_(p32)
            return
        if p.dtype != torch.bfloat16:
            raise TypeError(f"stochastic rounding writes bf16 weights, not {p.dtype}")
        gen = self._generators.get(p.device)
        if gen is None:
            gen = self._generators[p.device] = torch.Generator(device=p.device)
        gen.manual_seed(mix_seed(self.seed, step, index))
        p.copy_(stochastic_round(p32, gen))

    def load_state_dict(self, state_dict: Dict) -> None:
        """torch's loader casts floating-point state to the parameter's dtype (bf16 without
        master weights); the state stays fp32 here: each loaded tensor is put back as loaded,
        on the parameter's device."""
        saved = state_dict["state"]
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            for key, value in saved.get(i, {}).items():
                if key != "step" and isinstance(value, torch.Tensor):
                    self.state[p][key] = value.to(device=p.device)


class AdamW(Fp32UpdateOptimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter), the update of torch's AdamW,
    computed in fp32 over parameters of any dtype (the optimizer of pure bf16 training with
    train.optimizer=adam)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, rounding: str = "nearest", seed: int = 0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay), rounding, seed)

    def _new_state(self, p):
        return {"step": torch.tensor(0.0),
                "exp_avg": torch.zeros(p.shape, dtype=torch.float32, device=p.device),
                "exp_avg_sq": torch.zeros(p.shape, dtype=torch.float32, device=p.device)}

    def _update(self, p, p32, g32, state, group):
        beta1, beta2 = group["betas"]
        lr, step = group["lr"], float(state["step"])
        m, v = state["exp_avg"], state["exp_avg_sq"]
        p32.mul_(1 - lr * group["weight_decay"])
        m.lerp_(g32, 1 - beta1)  # m <- beta1 m + (1 - beta1) g
        v.mul_(beta2).addcmul_(g32, g32, value=1 - beta2)
        # bias-corrected: p -= lr * (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)
        denom = (v.sqrt() / math.sqrt(1 - beta2 ** step)).add_(group["eps"])
        p32.addcdiv_(m, denom, value=-lr / (1 - beta1 ** step))
