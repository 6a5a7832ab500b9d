"""P1 and P5 for the XFT MoE, on CPU/gloo.

P1: a model whose experts are all copies of one dense FFN (upcycled) gives the dense model's
logits in every layout: max |diff| <= 1e-5 * max |dense logit| (fp32). Covered: single
process, DP=4, EP=2, EP=4, TP=2+SP, TP=2+SP with ETP=1, EP=2+TP=2+SP, PP=2, PP=2+EP=2; the
alltoall and allgather dispatchers; mlp gate with noise on (train mode) and linear gate with
noise off (eval). The checkpoint is written single-process and resharded by every layout.

P5: a model with distinct experts (noise off: noise draws depend on the layout) gives the
single-process LM loss, router losses (cv balance + z-loss), gradients, and 3-step loss curve
and gradient norms with clipping active (the norm is above train.clip_grad at every step), in
the layouts above, EP=2+TP=2+SP with ETP=1, and EP=2+TP=2+SP and PP=2+EP=2 with the weight
gradients accumulated into DDP's buffer by the GEMM (precision.grad_accum_fusion): loss
relative 1e-6, gradient relative (per tensor) 1e-5, curve and norms 1e-5. The norm counts
each expert shard once whatever its replication: over tensor-parallel ranks (ETP < TP) and
expert-data-parallel ranks.
Also: router and expert weights receive gradients, the shared expert always does; and P2
through the model: folding the upcycled weights back (random merge coefficients) gives the
dense logits.

One reference process, one group of four gloo processes for all layouts.
"""

import os

import torch

from tests import common
from tests.harness import run_ranks
from xft_megatron.checkpoint import dist as ckpt
from xft_megatron.model.moe import losses as moe_losses
from xft_megatron.model.moe.merge_mlp import merge_coefficients
from xft_megatron.training.step import forward_backward, forward_logits
from xft_megatron.xft.merge import fold
from xft_megatron.xft.upcycle import upcycle

MOE = ["moe.num_experts=8", "moe.topk=4"]
VARIANTS = {  # P1 router variants: (overrides, forward in train mode)
    "mlp_noise": (["moe.router_gate=mlp", "moe.router_noise=true"], True),
    "linear": (["moe.router_gate=linear", "moe.router_noise=false"], False),
}
SP = "parallel.sequence_parallel=true"
LAYOUTS = {
    "dp4": [],
    "ep2": ["parallel.expert=2"],
    "ep4": ["parallel.expert=4"],
    "tp2_sp": ["parallel.tensor=2", SP],
    "tp2_sp_etp1": ["parallel.tensor=2", SP, "parallel.expert_tensor=1"],
    "ep2_tp2_sp": ["parallel.expert=2", "parallel.tensor=2", SP],
    "pp2": ["parallel.pipeline=2"],
    "pp2_ep2": ["parallel.pipeline=2", "parallel.expert=2"],
}
DISPATCHERS = ("alltoall", "allgather")
CLIP = 0.5  # the gradient norm of the P5 model is 1.0-1.4 over its first steps: always clipped
P5_MOE = MOE + ["moe.router_noise=false", "moe.z_loss_coeff=1e-3", "moe.balance_coeff=0.1",
                f"train.clip_grad={CLIP}"]
P5_LAYOUTS = {name: LAYOUTS[name] for name in ("ep2", "ep4", "tp2_sp_etp1", "ep2_tp2_sp",
                                               "pp2_ep2")}
P5_LAYOUTS["ep2_tp2_sp_etp1"] = LAYOUTS["ep2_tp2_sp"] + ["parallel.expert_tensor=1"]
# weight gradients accumulated into DDP's buffer by the GEMM (the default on a GPU)
P5_LAYOUTS["ep2_tp2_sp_fused"] = LAYOUTS["ep2_tp2_sp"] + ["precision.grad_accum_fusion=true"]
P5_LAYOUTS["pp2_ep2_fused"] = LAYOUTS["pp2_ep2"] + ["precision.grad_accum_fusion=true"]
STEPS = 3


def _tokens(cfg):
    """The same two micro-batches on every rank (logits are compared, not trained)."""
    batch = common.global_batch(cfg, step=5)
    return [{k: v[i:i + 1] for k, v in batch.items()} for i in range(2)]


def _logits(chunks, cfg, train_mode):
    for c in chunks:
        c.train(train_mode)
    with torch.no_grad():
        return forward_logits(chunks, _tokens(cfg), cfg.train.seq_length)


def _p5_run(cfg, weights, workdir, name):
    return common.p5_run(cfg, weights, workdir, name, STEPS)


def _reference(rank, world, workdir):
    # dense model and its logits
    dense_cfg = common.tiny_config()
    chunks, _ = common.setup(dense_cfg, ddp=False)
    common.perturb_norms(chunks)
    dense_sd = ckpt.local_state_dict(chunks)
    torch.save(_logits(chunks, dense_cfg, False), os.path.join(workdir, "dense_logits.pt"))
    out = {"p1_single": {}}
    # upcycled checkpoints, and the single-process P1 check
    for name, (overrides, train_mode) in VARIANTS.items():
        cfg = common.tiny_config(*MOE, *overrides)
        chunks, _ = common.setup(cfg, ddp=False)
        moe_sd = dict(upcycle(dense_sd, cfg.moe, cfg.model.hidden_size, seed=1))
        missing, unexpected = chunks[0].load_state_dict(moe_sd, strict=False)
        assert not unexpected and all(k.endswith("_extra_state") for k in missing), \
            (unexpected, missing)
        ckpt.save(chunks, os.path.join(workdir, f"up_{name}"), 0, cfg)
        out["p1_single"][name] = _logits(chunks, cfg, train_mode)
    # P2 through the model: fold the upcycled weights (random alpha) into a dense model
    g = torch.Generator().manual_seed(4)
    folded = dict(fold(moe_sd, lambda layer: merge_coefficients(torch.randn(7, generator=g))))
    chunks, _ = common.setup(dense_cfg, ddp=False)
    missing, unexpected = chunks[0].load_state_dict(folded, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing)
    out["p2_logits"] = _logits(chunks, dense_cfg, False)
    # P5 reference: distinct (randomly initialized) experts
    cfg = common.tiny_config(*P5_MOE)
    chunks, _ = common.setup(cfg, ddp=False)
    common.perturb_norms(chunks)
    weights = os.path.join(workdir, "p5_weights")
    ckpt.save(chunks, weights, 0, cfg)
    chunks, _ = common.setup(cfg, weights, distributed_optimizer=False)
    out["p5"] = {"loss": forward_backward(chunks, common.microbatches(cfg),
                                          cfg.train.seq_length),
                 "router": moe_losses.collect(chunks, cfg.model.num_layers).tolist()}
    grads = {n: p.main_grad.clone() for n, p in chunks[0].module.named_parameters()}
    torch.save(grads, os.path.join(workdir, "ref_grads.pt"))
    out["grad_sums"] = {n: g.abs().sum().item() for n, g in grads.items()}
    out["shared_grad"] = [grads[n][0].abs().sum().item() for n in grads
                          if n.endswith("experts.fc1_weight")]
    single = _p5_run(cfg, weights, workdir, "single")
    out["p5"]["curve"], out["p5"]["norms"] = single["curve"], single["norms"]
    return out


def _layouts(rank, world, workdir):
    dense = torch.load(os.path.join(workdir, "dense_logits.pt"))
    scale = dense.abs().max().item()
    p1 = {}
    for layout, lo in LAYOUTS.items():
        for disp in DISPATCHERS:
            for name, (overrides, train_mode) in VARIANTS.items():
                if disp == "allgather" and name != "linear":
                    continue
                cfg = common.tiny_config(*MOE, *overrides, *lo, f"moe.dispatcher={disp}")
                chunks, _ = common.setup(cfg, os.path.join(workdir, f"up_{name}"), ddp=False)
                got = _logits(chunks, cfg, train_mode)
                p1[f"{layout}/{disp}/{name}"] = (got - dense).abs().max().item() / scale
    p5 = {}
    weights = os.path.join(workdir, "p5_weights")
    for layout, lo in P5_LAYOUTS.items():
        p5[layout] = _p5_run(common.tiny_config(*P5_MOE, *lo), weights, workdir, layout)
    p5["ep2_allgather"] = _p5_run(
        common.tiny_config(*P5_MOE, *LAYOUTS["ep2"], "moe.dispatcher=allgather"), weights,
        workdir, "ep2_allgather")
    # every layout's gradients, read back unsharded (each rank holds full tensors at DP=4)
    ref = torch.load(os.path.join(workdir, "ref_grads.pt"))
    cfg = common.tiny_config(*P5_MOE)
    for layout in p5:
        p5[layout]["worst"], p5[layout]["grad_err"] = common.gradient_errors(
            cfg, os.path.join(workdir, f"grads_{layout}"), ref)
    return {"p1": p1, "p5": p5, "scale": scale}


def test_moe_p1_and_p5_across_layouts(tmp_path):
    workdir = str(tmp_path)
    ref = run_ranks(1, _reference, workdir)[0]
    dense = torch.load(os.path.join(workdir, "dense_logits.pt"))
    scale = dense.abs().max().item()
    for name, logits in ref["p1_single"].items():  # P1, single process
        assert (logits - dense).abs().max().item() <= 1e-5 * scale, name
    assert (ref["p2_logits"] - dense).abs().max().item() <= 1e-5 * scale  # P2
    # gradients reach every router parameter and expert; the shared expert always
    for n, s in ref["grad_sums"].items():
        if ".mlp.router." in n or ".mlp.experts." in n:
            assert s > 0, f"no gradient reached {n}"
    assert ref["shared_grad"] and all(s > 0 for s in ref["shared_grad"])
    assert all(v > 0 for v in ref["p5"]["router"]), ref["p5"]["router"]
    assert ref["p5"]["curve"][0] > ref["p5"]["curve"][-1], "MoE training did not reduce loss"
    assert all(n > CLIP for n in ref["p5"]["norms"]), ref["p5"]["norms"]  # clipping is active

    results = run_ranks(4, _layouts, workdir)
    for r in results:
        bad = {k: v for k, v in r["p1"].items() if not v <= 1e-5}
        assert not bad, f"P1 violated (max |diff| / logit scale): {bad}"
        for layout, got in r["p5"].items():
            exp = ref["p5"]
            assert abs(got["loss"] - exp["loss"]) <= 1e-6 * exp["loss"], (layout, got, exp)
            for a, b in zip(got["router"], exp["router"]):
                assert abs(a - b) <= 1e-5 * abs(b), (layout, got["router"], exp["router"])
            assert got["grad_err"] <= 1e-5, (layout, got["grad_err"], got["worst"])
            for a, b in zip(got["curve"], exp["curve"]):
                assert abs(a - b) <= 1e-5 * abs(b), (layout, got["curve"], exp["curve"])
            for a, b in zip(got["norms"], exp["norms"]):
                assert abs(a - b) <= 1e-5 * b, (layout, got["norms"], exp["norms"])
