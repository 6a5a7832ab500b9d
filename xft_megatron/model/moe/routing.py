"""XFT routing math as pure functions over tensors (../XFT_SPEC.md sections 2 and 3).

No modules, no process groups: the router module calls these, and the tests check them
against a float64 re-implementation of the spec.

Layout of the returned weights: one column per expert of the MoE layer. In modes `xft` and
`none`, column 0 is the shared expert (always selected) and columns 1..N-1 the routed experts
in the router's score order; in `vanilla` every column is a routed expert.
"""

import math
from typing import Dict, Tuple

import torch
import torch.nn.functional as F

_CV_EPS = 1e-10
NOISE_FLOOR = 0.01  # the reference's minimum noise scale


def gate_logits(x: torch.Tensor, weights: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Clean router logits h [T, R] in fp32 of tokens x [T, H]: gate `linear` (`weight`
    [R, H]) h = W x; gate `mlp` (`weight1` [R, H], `weight2` [R, R]) h = W2 tanh(W1 x)."""
    x = x.float()
    if "weight" in weights:
        return F.linear(x, weights["weight"].float())
    return F.linear(torch.tanh(F.linear(x, weights["weight1"].float())),
                    weights["weight2"].float())


def noise_std(x: torch.Tensor, noise_weight: torch.Tensor) -> torch.Tensor:
    """The noisy gate's per-token, per-expert noise scale [T, R]: softplus(W_noise x) plus
    the reference's floor."""
    return F.softplus(F.linear(x.float(), noise_weight.float())) + NOISE_FLOOR


def select_topk(scores: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k along the last dim with a fixed tie rule: among equal scores the lower expert
    index wins (a stable descending sort). Returns (values [T, k], indices [T, k])."""
    values, indices = torch.sort(scores, dim=-1, descending=True, stable=True)
    return values[:, :k], indices[:, :k]


def expert_weights(probs: torch.Tensor, k: int, mode: str = "xft",
                   renorm: str = "probs") -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token expert weights from router probabilities.

    probs: [T, R] softmax over the R router experts (fp32). k: routed experts per token.
    Returns (weights [T, E], selected [T, E] bool) with E = R + 1 in modes xft/none, R in
    vanilla:
      xft:     g_0 = 1 - s_max, g_i = s_max * renorm(s_T)_i on the top-k, 0 elsewhere
      none:    g_0 = 1, g_i = s_i on the top-k (no normalization: the ablation XFT fixes)
      vanilla: g_i = s_i / sum_T s_j on the top-k (no shared expert)
    renorm (xft only): `probs` = softmax over the selected probabilities (the reference's
    rule), `linear` = s_i / sum_T s_j.
    """
    top, idx = select_topk(probs, k)  # [T, k], descending
    if mode == "xft":
        s_max = top[:, :1]
        if renorm == "probs":
            routed = s_max * torch.softmax(top, dim=-1)
        elif renorm == "linear":
            routed = s_max * top / top.sum(dim=-1, keepdim=True)
        else:
            raise ValueError(f"renorm must be probs or linear, got {renorm!r}")
        shared = 1.0 - s_max
    elif mode == "none":
        routed, shared = top, torch.ones_like(top[:, :1])
    elif mode == "vanilla":
        routed, shared = top / top.sum(dim=-1, keepdim=True), None
    else:
        raise ValueError(f"mode must be xft, none or vanilla, got {mode!r}")
    weights = torch.zeros_like(probs).scatter(1, idx, routed)
    selected = torch.zeros_like(probs, dtype=torch.bool).scatter(1, idx, True)
    if shared is not None:
        weights = torch.cat([shared, weights], dim=1)
        selected = torch.cat([torch.ones_like(selected[:, :1]), selected], dim=1)
    return weights, selected


def cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation var/mean^2 (unbiased variance, as the reference);
    0 for a single value."""
    x = x.float()
    if x.numel() <= 1:
        return x.new_zeros(())
    return x.var() / (x.mean() ** 2 + _CV_EPS)


def importance(probs: torch.Tensor, selected_routed: torch.Tensor) -> torch.Tensor:
    """[R]: sum over tokens of each expert's probability where it was selected."""
    return (probs * selected_routed).sum(dim=0)


def smooth_load(clean: torch.Tensor, noisy: torch.Tensor, noise_std: torch.Tensor,
                k: int) -> torch.Tensor:
    """Shazeer et al.'s differentiable load: [R], the sum over tokens of the probability that
    the expert is in the token's top-k under fresh noise. Needs k < R.

    clean/noisy: [T, R] logits before and after noise; noise_std: [T, R] noise scale."""
    top = torch.sort(noisy, dim=-1, descending=True).values[:, :k + 1]
    threshold_in = top[:, k:k + 1]  # the (k+1)-th value: the bar to stay in
    threshold_out = top[:, k - 1:k]  # the k-th value: the bar to get in
    is_in = noisy > threshold_in
    normal = torch.distributions.Normal(clean.new_zeros(()), clean.new_ones(()))
    p_in = normal.cdf((clean - threshold_in) / noise_std)
    p_out = normal.cdf((clean - threshold_out) / noise_std)
    return torch.where(is_in, p_in, p_out).sum(dim=0)


def cv_balance_loss(imp: torch.Tensor, load: torch.Tensor) -> torch.Tensor:
    """The reference's balance loss (before its coefficient): CV^2(importance)+CV^2(load)."""
    return cv_squared(imp) + cv_squared(load)


def switch_balance_loss(prob_sum: torch.Tensor, counts: torch.Tensor, k: int,
                        num_tokens) -> torch.Tensor:
    """Megatron-Core's switch-style aux loss (before its coefficient) from token totals:
    R / (k * T^2) * sum_e prob_sum_e * count_e, with prob_sum_e = sum_t p_te."""
    r = prob_sum.shape[-1]
    return (prob_sum * counts).sum() * r / (k * num_tokens * num_tokens)


# columns of `diagnostic_sums` (each a sum over tokens; divide by the token count)
DIAGNOSTICS = ("clean_spread", "noise_scale", "set_survives", "clean_entropy")


def diagnostic_sums(clean: torch.Tensor, noise_std, noisy_selected: torch.Tensor,
                    k: int) -> torch.Tensor:
    """[4] float64 sums over the T tokens of one micro-batch, in `DIAGNOSTICS` order:
      clean_spread   std over the R experts of the clean gate logits h (population std)
      noise_scale    mean over the R experts of the noise's standard deviation (0 without)
      set_survives   1 where the clean top-k set equals the routed (noisy) one, else 0
      clean_entropy  entropy of softmax(h), divided by log R (1 = uniform routing)
    clean: [T, R] logits before noise; noise_std: [T, R] or None; noisy_selected: [T, R]
    bool, the routed experts actually chosen (top-k of the noisy probabilities)."""
    clean = clean.detach().double()
    r = clean.shape[-1]
    spread = clean.std(dim=-1, unbiased=False).sum()
    noise = noise_std.detach().double().mean(dim=-1).sum() if noise_std is not None \
        else clean.new_zeros(())
    _, idx = select_topk(clean, k)
    clean_sel = torch.zeros_like(noisy_selected).scatter(1, idx, True)
    survives = (clean_sel == noisy_selected).all(dim=-1).double().sum()
    logp = torch.log_softmax(clean, dim=-1)
    entropy = -(logp.exp() * logp).sum(dim=-1).sum() / (math.log(r) if r > 1 else 1.0)
    return torch.stack([spread, noise, survives, entropy])
