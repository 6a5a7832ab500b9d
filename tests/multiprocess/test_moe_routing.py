"""The XFT router against a float64 re-implementation of ../XFT_SPEC.md sections 2-3, written
here token by token (no shared code with the implementation): weights, selected experts, g_0,
balance losses; ties; K-1 = N-1; modes `none` and `vanilla`. Tolerance: float32 vs float64,
1e-6 absolute on weights (all in [0, 1]), 1e-5 relative on losses."""

import math

import pytest
import torch

from xft_megatron.model.moe import routing


# ----------------------------------------------------------------- float64 reference (spec)
def spec_weights(s, k, mode, renorm):
    """s: list of probabilities over R routed experts, one token. -> (weights, selected)."""
    order = sorted(range(len(s)), key=lambda i: (-s[i], i))  # ties: lower index first
    top = order[:k]
    g = [0.0] * len(s)
    if mode == "vanilla":
        z = sum(s[j] for j in top)
        for i in top:
            g[i] = s[i] / z
        return g, sorted(top)
    if mode == "none":
        for i in top:
            g[i] = s[i]
        return [1.0] + g, [0] + sorted(i + 1 for i in top)
    s_max = max(s)
    if renorm == "probs":
        z = sum(math.exp(s[j]) for j in top)
        for i in top:
            g[i] = s_max * math.exp(s[i]) / z
    else:
        z = sum(s[j] for j in top)
        for i in top:
            g[i] = s_max * s[i] / z
    return [1.0 - s_max] + g, [0] + sorted(i + 1 for i in top)


def spec_cv2(x):
    n = len(x)
    mean = sum(x) / n
    var = sum((v - mean) ** 2 for v in x) / (n - 1)
    return var / (mean * mean + 1e-10)


def spec_cv_loss(s_rows, k, load_rows=None):
    """importance = sum over tokens of selected s_i; load = token counts (or given rows)."""
    r = len(s_rows[0])
    imp, load = [0.0] * r, [0.0] * r
    for s in s_rows:
        for i in sorted(range(r), key=lambda i: (-s[i], i))[:k]:
            imp[i] += s[i]
            load[i] += 1.0
    if load_rows is not None:
        load = [sum(row[i] for row in load_rows) for i in range(r)]
    return spec_cv2(imp) + spec_cv2(load)


def spec_smooth_load_row(clean, noisy, std, k):
    srt = sorted(noisy, reverse=True)
    t_in, t_out = srt[k], srt[k - 1]
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    return [phi((c - t_in) / sd) if n > t_in else phi((c - t_out) / sd)
            for c, n, sd in zip(clean, noisy, std)]


def _probs(t, r, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(t, r, generator=g) * scale, dim=-1)


# ----------------------------------------------------------------- tests
@pytest.mark.parametrize("mode,renorm,k", [("xft", "probs", 5), ("xft", "linear", 5),
                                           ("xft", "probs", 7), ("xft", "probs", 1),
                                           ("none", "probs", 5), ("vanilla", "probs", 6),
                                           ("vanilla", "probs", 8)])
def test_weights_match_spec(mode, renorm, k):
    r = 8 if mode == "vanilla" else 7
    probs = _probs(64, r, seed=k)
    w, sel = routing.expert_weights(probs, k, mode, renorm)
    e = r if mode == "vanilla" else r + 1
    assert w.shape == (64, e) and sel.shape == (64, e) and sel.dtype == torch.bool
    for t in range(64):
        ref_w, ref_sel = spec_weights(probs[t].double().tolist(), k, mode, renorm)
        assert torch.nonzero(sel[t]).flatten().tolist() == ref_sel
        assert (w[t].double() - torch.tensor(ref_w, dtype=torch.float64)).abs().max() < 1e-6
    if mode in ("xft", "vanilla"):  # the property that makes upcycling exact
        assert (w.double().sum(-1) - 1).abs().max() < 1e-6
    if mode == "xft":  # g_0 = 1 - s_max
        assert torch.allclose(w[:, 0], 1 - probs.max(-1).values)
    if mode == "none":  # shared weight 1 plus raw probabilities: total weight > 1
        assert torch.all(w.sum(-1) > 1.0)


def test_ties_pick_lower_index_and_all_selected_case():
    # exact ties: uniform rows and duplicated maxima
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25],
                          [0.1, 0.4, 0.4, 0.1],
                          [0.3, 0.1, 0.3, 0.3]])
    w, sel = routing.expert_weights(probs, 2, "xft", "probs")
    assert sel[:, 1:].nonzero().tolist() == [[0, 0], [0, 1], [1, 1], [1, 2], [2, 0], [2, 2]]
    for t in range(3):
        ref_w, _ = spec_weights(probs[t].double().tolist(), 2, "xft", "probs")
        assert (w[t].double() - torch.tensor(ref_w, dtype=torch.float64)).abs().max() < 1e-6
    # K-1 = N-1: every routed expert selected, weights s_max * softmax(s)
    w, sel = routing.expert_weights(probs, 4, "xft", "probs")
    assert sel.all()
    s_max = probs.max(-1, keepdim=True).values
    assert torch.allclose(w[:, 1:], s_max * torch.softmax(probs, -1), atol=1e-7)


def test_cv_balance_loss_matches_spec():
    probs = _probs(96, 7, seed=11)
    w, sel = routing.expert_weights(probs, 5)
    routed = sel[:, 1:]
    got = routing.cv_balance_loss(routing.importance(probs, routed), routed.float().sum(0))
    ref = spec_cv_loss(probs.double().tolist(), 5)
    assert abs(got.item() - ref) <= 1e-5 * ref


def test_smooth_load_matches_spec():
    g = torch.Generator().manual_seed(3)
    clean = torch.randn(40, 7, generator=g)
    std = torch.nn.functional.softplus(torch.randn(40, 7, generator=g)) + 0.01
    noisy = clean + torch.randn(40, 7, generator=g) * std
    got = routing.smooth_load(clean, noisy, std, 5)
    rows = [spec_smooth_load_row(c, n, s, 5) for c, n, s in
            zip(clean.double().tolist(), noisy.double().tolist(), std.double().tolist())]
    ref = [sum(r[i] for r in rows) for i in range(7)]
    assert torch.allclose(got.double(), torch.tensor(ref, dtype=torch.float64), rtol=1e-5)


def test_switch_loss_matches_megatron_formula():
    from megatron.core.transformer.moe.moe_utils import switch_load_balancing_loss_func

    probs = _probs(50, 6, seed=4)
    _, sel = routing.expert_weights(probs, 2, "vanilla")
    counts = sel.float().sum(0)
    ours = routing.switch_balance_loss(probs.sum(0), counts, 2, 50)
    theirs = switch_load_balancing_loss_func(probs, counts, 50, 2, 6, 1.0)
    assert torch.allclose(ours, theirs, rtol=1e-6)


def _router(gate, noise, balance="cv", z=0.0):
    from megatron.core.transformer.transformer_config import TransformerConfig

    from xft_megatron.model.moe.router import RouterSettings, XFTRouter

    tc = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2,
                           use_cpu_initialization=True)
    torch.manual_seed(0)
    return XFTRouter(tc, settings=RouterSettings(num_routed=7, routed_topk=5, gate=gate,
                                                  noise=noise, balance_loss=balance,
                                                  balance_coeff=0.01, z_loss_coeff=z))


@pytest.mark.parametrize("gate,noise", [("mlp", True), ("linear", False)])
def test_router_module_matches_spec(gate, noise):
    """Gate, noise, softmax, weights and the attached balance loss of the module."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))  # as the schedules do
    router = _router(gate, noise, z=1e-3).train()
    x = torch.randn(6, 4, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
    torch.manual_seed(42)
    w, sel = router(x)
    xd = x.detach().reshape(-1, 16).double()
    if gate == "mlp":
        clean = torch.tanh(xd @ router.weight1.double().T) @ router.weight2.double().T
    else:
        clean = xd @ router.weight.double().T
    noisy, load_rows = clean, None
    if noise:
        std = torch.nn.functional.softplus(xd @ router.noise_weight.double().T) + 0.01
        torch.manual_seed(42)
        noisy = clean + torch.randn(24, 7).double() * std
        load_rows = [spec_smooth_load_row(c, n, s, 5) for c, n, s in
                     zip(clean.tolist(), noisy.tolist(), std.tolist())]
    s = torch.softmax(noisy, -1)
    for t in range(24):
        ref_w, ref_sel = spec_weights(s[t].tolist(), 5, "xft", "probs")
        assert torch.nonzero(sel[t]).flatten().tolist() == ref_sel
        assert (w[t].double() - torch.tensor(ref_w, dtype=torch.float64)).abs().max() < 1e-6
    lse2 = torch.logsumexp(noisy, -1).square().mean().item()
    ref_loss = 0.01 * spec_cv_loss(s.tolist(), 5, load_rows) + 1e-3 * lse2
    assert router.loss_count == 1
    assert abs(router.loss_sum.item() - ref_loss) <= 1e-5 * ref_loss
    # the loss reaches the router through the backward of the weights (scaled by tokens)
    w.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in router.parameters())


def test_router_eval_has_no_noise_and_no_loss():
    router = _router("mlp", True).eval()
    x = torch.randn(5, 2, 16)
    a, _ = router(x)
    b, _ = router(x)
    assert torch.equal(a, b) and router.loss_count == 0


def _modes_body(rank, world):
    from tests import common
    from xft_megatron.checkpoint.dist import local_state_dict
    from xft_megatron.xft.upcycle import upcycle

    dense_cfg = common.tiny_config("model.init_std=0.1")
    chunks, _ = common.setup(dense_cfg, ddp=False)
    sd = local_state_dict(chunks)
    x = torch.randn(16, 2, dense_cfg.model.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense_out, _ = chunks[0].decoder.layers[0].mlp(x)
    out = {}
    for mode in ("xft", "none", "vanilla"):
        cfg = common.tiny_config("model.init_std=0.1", "moe.num_experts=4", "moe.topk=3",
                                 f"moe.mode={mode}", "moe.router_init_std=0.5")
        chunks, _ = common.setup(cfg, ddp=False)
        chunks[0].load_state_dict(dict(upcycle(sd, cfg.moe, cfg.model.hidden_size)),
                                  strict=False)
        layer = chunks[0].decoder.layers[0].mlp.eval()
        with torch.no_grad():
            weights, selected = layer.router(x)
            moe_out, _ = layer(x)
        factor = weights.sum(-1).reshape(16, 2, 1)
        out[mode] = dict(
            err=((moe_out - factor * dense_out).abs().max() / dense_out.abs().max()).item(),
            factor_min=factor.min().item(), factor_mean=factor.mean().item(),
            num_experts=layer.experts.fc1_weight.shape[0], columns=weights.shape[1],
            col0_always=bool(selected[:, 0].all()), per_token=selected.sum(-1).unique().tolist())
    return out


def test_modes_scale_the_output_as_specified():
    """Upcycled experts: xft gives the dense FFN (weights sum to 1); `none` gives the dense FFN
    times 1 + sum of the selected probabilities (> 1, the failure XFT fixes); `vanilla` has
    no shared expert (no always-on column) and gives the dense FFN."""
    from tests.harness import run_ranks

    r = run_ranks(1, _modes_body)[0]
    for mode in ("xft", "none", "vanilla"):
        assert r[mode]["err"] < 1e-5, (mode, r[mode])
        assert r[mode]["num_experts"] == 4 and r[mode]["columns"] == 4
        assert r[mode]["per_token"] == [3]
    assert abs(r["xft"]["factor_min"] - 1) < 1e-6 and abs(r["xft"]["factor_mean"] - 1) < 1e-6
    assert r["none"]["factor_min"] > 1.3, r["none"]  # 1 + top-2 of 3 probabilities >= 1 + 2/3
    assert r["xft"]["col0_always"] and r["none"]["col0_always"]
    assert not r["vanilla"]["col0_always"]
    assert abs(r["vanilla"]["factor_mean"] - 1) < 1e-6
