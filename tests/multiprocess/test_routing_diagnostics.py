"""The XFT mechanism made visible, on CPU/gloo.

- The router losses weigh what the config says: the gradient of a step equals that of
  `LM loss (per loss token) + coefficient x mean over forwards of the balance loss`, computed
  independently (float64 re-implementation of the balance loss on the routers' inputs, plain
  autograd), with the prompt masked out of the LM loss; the logged router loss is that mean.
- The LM loss reaches the router once the experts differ (planted differences, balance loss
  off): the router gradient matches a central finite difference of the loss; with identical
  experts (right after upcycling) it is zero up to rounding.
- The per-step diagnostics (clean spread, noise scale, routed sets kept under the noise,
  clean entropy) against a direct computation; the noise schedule.
- Expert divergence: against a direct computation, and the same in every layout (EP, TP+SP
  with ETP, PP).
"""

import math
import os

import pytest
import torch

from tests import common
from tests.harness import run_ranks

MOE = ["moe.num_experts=4", "moe.topk=3", "moe.router_noise=false", "model.init_std=0.05"]


# ---------------------------------------------------------------- independent references
def ref_balance(x: torch.Tensor, router, k: int) -> torch.Tensor:
    """The reference's balance loss (before its coefficient) of one micro-batch, float64:
    CV^2(importance) + CV^2(load), load = token counts (no noise), for an mlp gate."""
    x = x.reshape(-1, x.shape[-1]).double()
    h = torch.tanh(x @ router.weight1.double().T) @ router.weight2.double().T
    s = torch.softmax(h, dim=-1)
    idx = torch.sort(s, dim=-1, descending=True, stable=True).indices[:, :k]
    sel = torch.zeros_like(s).scatter(1, idx, 1.0)
    imp, load = (s * sel).sum(0), sel.sum(0)

    def cv2(v):
        return v.var() / (v.mean() ** 2 + 1e-10)

    return cv2(imp) + cv2(load)


def _masked_microbatches(cfg):
    """Two micro-batches whose prompts (the first 50% / 25% of each row) are out of the loss."""
    batch = common.global_batch(cfg)
    s = cfg.train.seq_length
    mask = torch.ones_like(batch["loss_mask"])
    mask[:2, : s // 2] = 0
    mask[2:, : s // 4] = 0
    batch["loss_mask"] = mask
    mb = cfg.train.micro_batch_size
    return [{k: v[i:i + mb] for k, v in batch.items()} for i in range(0, 4, mb)]


def _balance_body(rank, world):
    from xft_megatron.model.moe import losses as moe_losses
    from xft_megatron.model.moe.router import XFTRouter
    from xft_megatron.training.step import forward_backward

    coeff = 0.5
    cfg = common.tiny_config(*MOE, f"moe.balance_coeff={coeff}", "train.micro_batch_size=2")
    ref_cfg = common.tiny_config(*MOE, "moe.balance_coeff=0", "train.micro_batch_size=2")
    mbs = _masked_microbatches(cfg)
    ref_chunks, _ = common.setup(ref_cfg, ddp=False)
    chunks, _ = common.setup(cfg, distributed_optimizer=False)
    chunks[0].module.load_state_dict(ref_chunks[0].state_dict())
    # the project's step: LM loss + router losses through Megatron's schedule
    loss = forward_backward(chunks, mbs, cfg.train.seq_length)
    logged = moe_losses.collect(chunks, cfg.model.num_layers)
    got = {n: p.main_grad.clone() for n, p in chunks[0].module.named_parameters()}
    # independent: plain autograd, per-token LM loss over the loss tokens of the whole batch
    # + coefficient x the mean over the two forwards of the float64 balance loss
    model = ref_chunks[0].train()
    routers = [m for m in model.modules() if isinstance(m, XFTRouter)]
    inputs = []
    hooks = [r.register_forward_hook(lambda m, args, out: inputs.append((m, args[0])))
             for r in routers]
    tokens = sum(mb["loss_mask"].sum() for mb in mbs)
    total, balances = 0.0, []
    for mb in mbs:
        inputs.clear()
        per_token = model(mb["tokens"], mb["position_ids"], None, labels=mb["labels"])
        total = total + (per_token.float() * mb["loss_mask"]).sum() / tokens
        balances.append(torch.stack([ref_balance(x, r, cfg.moe.routed_topk)
                                     for r, x in inputs]))  # [layers]
    for h in hooks:
        h.remove()
    balance = torch.stack(balances).mean(0)  # [layers]: mean over forwards
    (total + coeff * balance.sum()).backward()
    ref = {n: p.grad for n, p in model.named_parameters()}
    errs = {n: common.rel_err(got[n], ref[n]) for n in ref}
    router_errs = {n: e for n, e in errs.items() if ".router." in n}
    return {"worst": max(errs.items(), key=lambda kv: kv[1]), "router": router_errs,
            "logged": logged.tolist(), "expected": (coeff * balance).tolist(),
            "loss": loss, "lm": total.item(), "loss_tokens": tokens.item(),
            "all_tokens": 4 * cfg.train.seq_length}


def test_balance_loss_weighs_its_coefficient_whatever_the_loss_mask():
    r = run_ranks(1, _balance_body)[0]
    assert r["loss_tokens"] < 0.7 * r["all_tokens"]  # the prompts are masked out
    assert abs(r["loss"] - r["lm"]) < 1e-5 * r["lm"]
    name, err = r["worst"]
    assert err < 1e-4, (name, err)  # every gradient, routers included
    assert r["router"] and max(r["router"].values()) < 1e-4, r["router"]
    for got, want in zip(r["logged"], r["expected"]):  # the logged value is the trained one
        assert abs(got - want) <= 1e-6 * abs(want) and want > 0


def _shift(params, delta: torch.Tensor) -> None:
    """Add the flat vector `delta` to the parameters, in their order."""
    with torch.no_grad():
        offset = 0
        for p in params:
            n = p.numel()
            p.add_(delta[offset:offset + n].reshape(p.shape).to(p.dtype))
            offset += n


def _planted_body(rank, world):
    from xft_megatron.checkpoint.dist import local_state_dict
    from xft_megatron.model.moe.router import XFTRouter
    from xft_megatron.training.step import forward_backward
    from xft_megatron.xft.upcycle import upcycle

    dense_cfg = common.tiny_config("model.init_std=0.05")
    dense, _ = common.setup(dense_cfg, ddp=False)
    sd = local_state_dict(dense)
    # every routed expert selected (topk = all experts): the weights are smooth in the router
    # parameters, so a finite difference is valid; balance loss off: the LM loss alone
    cfg = common.tiny_config(*MOE, "moe.topk=4", "moe.balance_loss=none",
                             "moe.router_init_std=0.3")
    moe_sd = dict(upcycle(sd, cfg.moe, cfg.model.hidden_size, seed=3))
    out = {}
    for planted in (False, True):
        weights = dict(moe_sd)
        if planted:  # routed experts differ from the shared one by 30% of the weights' scale
            g = torch.Generator().manual_seed(5)
            for k, v in weights.items():
                if "experts.fc" in k:
                    noise = torch.randn(v.shape, generator=g) * 0.3 * v.std()
                    noise[0] = 0  # the shared expert stays the dense FFN
                    weights[k] = v + noise
        chunks, _ = common.setup(cfg, distributed_optimizer=False)
        chunks[0].module.load_state_dict(weights, strict=False)
        mbs = common.microbatches(cfg)
        forward_backward(chunks, mbs, cfg.train.seq_length)
        router = next(m for m in chunks[0].module.modules() if isinstance(m, XFTRouter))
        params = [router.weight1, router.weight2]
        grad = torch.cat([p.main_grad.reshape(-1) for p in params]).double()
        lm_scale = max(p.main_grad.abs().max().item() for n, p in
                       chunks[0].module.named_parameters() if "experts.fc1" in n)
        row = {"grad_norm": grad.norm().item(), "expert_grad": lm_scale}
        if planted:
            # central difference along the gradient direction and along a random one
            checks = []
            gen = torch.Generator().manual_seed(9)
            for direction in (grad / grad.norm(), torch.randn(grad.shape, generator=gen,
                                                              dtype=torch.float64)):
                direction = direction / direction.norm()
                step = 2e-3
                values = []
                for sign in (1, -1):
                    _shift(params, sign * step * direction)
                    values.append(forward_backward(chunks, mbs, cfg.train.seq_length,
                                                   forward_only=True))
                    _shift(params, -sign * step * direction)  # back to the original
                fd = (values[0] - values[1]) / (2 * step)
                checks.append((fd, torch.dot(grad, direction).item()))
            row["checks"] = checks
        out["planted" if planted else "copies"] = row
    return out


def test_lm_loss_reaches_the_router_once_experts_differ():
    r = run_ranks(1, _planted_body)[0]
    planted, copies = r["planted"], r["copies"]
    # identical experts, weights summing to 1: the LM loss gives the router no gradient
    assert copies["grad_norm"] < 1e-4 * planted["grad_norm"], (copies, planted)
    assert planted["grad_norm"] > 1e-3
    for fd, analytic in planted["checks"]:
        assert abs(fd - analytic) <= 0.02 * abs(planted["checks"][0][1]), planted["checks"]
    assert planted["checks"][0][1] > 0 and abs(planted["checks"][0][0] - planted["checks"][0][1]) \
        <= 0.01 * planted["checks"][0][1]


# ---------------------------------------------------------------- diagnostics, noise schedule
def test_diagnostic_sums_match_a_direct_computation():
    from xft_megatron.model.moe import routing

    g = torch.Generator().manual_seed(0)
    clean = torch.randn(40, 7, generator=g) * 0.5
    std = torch.rand(40, 7, generator=g) + 0.1
    noisy = clean + torch.randn(40, 7, generator=g) * std
    _, idx = routing.select_topk(torch.softmax(noisy, -1), 5)
    selected = torch.zeros(40, 7, dtype=torch.bool).scatter(1, idx, True)
    got = routing.diagnostic_sums(clean, std, selected, 5).tolist()
    spread = sum(statistics_pstdev(row) for row in clean.tolist())
    noise = sum(sum(row) / 7 for row in std.tolist())
    kept = sum(set(sorted(range(7), key=lambda e: -c[e])[:5]) ==
               set(sorted(range(7), key=lambda e: -n[e])[:5])
               for c, n in zip(clean.tolist(), noisy.tolist()))
    entropy = 0.0
    for row in clean.tolist():
        z = [math.exp(v) for v in row]
        p = [v / sum(z) for v in z]
        entropy += -sum(q * math.log(q) for q in p) / math.log(7)
    want = [spread, noise, kept, entropy]
    assert all(abs(a - b) <= 1e-9 * max(1.0, abs(b)) for a, b in zip(got, want)), (got, want)
    assert 0 < kept < 40  # the case exercises both outcomes
    # no noise: every routed set survives, noise scale 0
    _, idx = routing.select_topk(clean, 5)
    clean_sel = torch.zeros(40, 7, dtype=torch.bool).scatter(1, idx, True)
    quiet = routing.diagnostic_sums(clean, None, clean_sel, 5).tolist()
    assert quiet[1] == 0 and quiet[2] == 40


def statistics_pstdev(row):
    m = sum(row) / len(row)
    return math.sqrt(sum((v - m) ** 2 for v in row) / len(row))


def test_noise_schedule_and_router_noise_multiplier():
    from megatron.core.transformer.transformer_config import TransformerConfig

    from xft_megatron.config import ConfigError, MoEConfig
    from xft_megatron.model.moe import routing
    from xft_megatron.model.moe.router import RouterSettings, XFTRouter

    m = MoEConfig(num_experts=8, topk=6, router_noise_anneal_steps=10)
    assert [m.noise_multiplier(s) for s in (0, 5, 10, 20)] == [1.0, 0.5, 0.0, 0.0]
    assert MoEConfig(num_experts=8, topk=6).noise_multiplier(10 ** 6) == 1.0
    assert MoEConfig(num_experts=8, topk=6, router_noise=False).noise_multiplier(0) == 0.0
    with pytest.raises(ConfigError, match="router_noise_anneal_steps"):
        MoEConfig(num_experts=8, topk=6, router_noise_anneal_steps=-1)

    tc = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2,
                           use_cpu_initialization=True)
    torch.manual_seed(0)
    router = XFTRouter(tc, settings=RouterSettings(num_routed=7, routed_topk=5)).train()
    x = torch.randn(8, 4, 16, generator=torch.Generator().manual_seed(1))
    figures = {}
    for mult in (1.0, 0.5, 0.0):
        router.noise_multiplier = mult
        router.reset_loss_stats()
        torch.manual_seed(3)
        w, _ = router(x)
        figures[mult] = router.routing_stats[-len(routing.DIAGNOSTICS):].tolist()
    names = list(routing.DIAGNOSTICS)
    noise = names.index("noise_scale")
    assert abs(figures[0.5][noise] - 0.5 * figures[1.0][noise]) < 1e-9 * figures[1.0][noise]
    assert figures[0.0][noise] == 0 and figures[0.0][names.index("set_survives")] == 32
    router.eval()
    with torch.no_grad():
        clean, _ = router(x)
    assert torch.equal(w, clean)  # multiplier 0 routes as in evaluation


# ---------------------------------------------------------------- expert divergence
DIV_LAYOUTS = {
    "ep2": ["parallel.expert=2"],
    "tp2_sp": ["parallel.tensor=2", "parallel.sequence_parallel=true"],
    "tp2_sp_etp1_ep2": ["parallel.tensor=2", "parallel.sequence_parallel=true",
                        "parallel.expert_tensor=1", "parallel.expert=2"],
    "pp2": ["parallel.pipeline=2"],
}


def _divergence_single(rank, world, workdir):
    from xft_megatron.checkpoint import dist as ckpt
    from xft_megatron.model.moe.divergence import expert_divergence

    cfg = common.tiny_config(*MOE)
    chunks, _ = common.setup(cfg, ddp=False)  # random init: every expert differs
    ckpt.save(chunks, os.path.join(workdir, "moe"), 0, cfg)
    sd = ckpt.local_state_dict(chunks)
    direct = {}
    for layer in range(cfg.model.num_layers):
        pre = f"decoder.layers.{layer}.mlp.experts."
        w = torch.cat([sd[pre + "fc1_weight"].reshape(4, -1), sd[pre + "fc2_weight"].reshape(4, -1)],
                      dim=1).double()
        to_shared = [((w[i] - w[0]).norm() / w[0].norm()).item() for i in range(1, 4)]
        pairs = [((w[i] - w[j]).norm() / w[0].norm()).item()
                 for i in range(1, 4) for j in range(i + 1, 4)]
        direct[str(layer)] = {"to_shared": to_shared, "between_routed": sum(pairs) / len(pairs)}
    return {"direct": direct, "ours": expert_divergence(chunks, cfg.model.num_layers, 4)}


def _divergence_layouts(rank, world, workdir):
    from xft_megatron.model.moe.divergence import expert_divergence

    out = {}
    for name, layout in DIV_LAYOUTS.items():
        cfg = common.tiny_config(*MOE, *layout)
        chunks, _ = common.setup(cfg, os.path.join(workdir, "moe"), ddp=False)
        out[name] = expert_divergence(chunks, cfg.model.num_layers, 4)
    return out


def _close(a, b, tol):
    return all(abs(x - y) <= tol * abs(y) for x, y in zip(a, b))


def test_expert_divergence_direct_and_in_every_layout(tmp_path):
    single = run_ranks(1, _divergence_single, str(tmp_path))[0]
    direct, ours = single["direct"], single["ours"]
    assert set(ours) == set(direct) and len(direct) >= 2
    for layer, d in direct.items():
        assert _close(ours[layer]["to_shared"], d["to_shared"], 1e-5), (layer, ours, d)
        assert _close([ours[layer]["between_routed"]], [d["between_routed"]], 1e-5)
        assert min(d["to_shared"]) > 0.1  # random experts: far apart
    layouts = run_ranks(2, _divergence_layouts, str(tmp_path))
    for rank_result in layouts:  # identical on every rank, in every layout
        for name, got in rank_result.items():
            assert set(got) == set(ours), name
            for layer in ours:
                assert _close(got[layer]["to_shared"], ours[layer]["to_shared"], 1e-5), name
                assert _close([got[layer]["between_routed"]],
                              [ours[layer]["between_routed"]], 1e-5), name
