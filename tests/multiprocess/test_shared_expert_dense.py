"""The shared expert off the dispatch path (moe.shared_expert_impl=dense) on CPU/gloo.

Against the layout that keeps it as expert 0 of the routed pool (`pool`, what every earlier
run used), on one model with 1 shared + 4 routed experts, top-3 (2 routed per token), noise
off, balance and z-loss on, clipping active:
- one process: the same LM loss, router losses, routing statistics (N wide), gradients and
  expert divergence; an upcycled model still gives the dense logits (P1);
- P5 in every layout the option allows (EP=2, EP=4, TP=2+SP, EP=2+TP=2+SP, PP=2+EP=2, and
  EP=2+TP=2+SP with the weight gradients accumulated into DDP's buffer): the single-process
  pool loss (relative 1e-6), router losses and gradients (1e-5), and 3-step loss curve and
  gradient norms (1e-5). Every checkpoint a dense layout saves is read back by the pool
  layout on one process, and the conversion tools' storage layout is that of the pool, so
  the stored tensors are the same;
- tokens per expert-parallel rank: under EP=2 each rank receives exactly the tokens routed
  to its two routed experts (from both ranks of its EP group), and the shared expert runs on
  each rank's own tokens only; in the pool layout the rank holding expert 0 receives every
  token of its EP group for it, on top of its routed share (1 shared + 3 routed there: the
  pool needs EP to divide N);
- P6: runs stopped and resumed repeat the uninterrupted ones exactly (EP=2; Adam with the
  distributed optimizer, and Adafactor in pure bf16 with stochastic rounding, whose factored
  state is stored in the per-expert chunks); a pool run resumed as dense (same parallel
  section) restarts the optimizer and carries the weights: the first resumed step's loss is
  the uninterrupted pool run's (1e-5).
"""

import os

import torch

from tests import common
from tests.harness import run_ranks
from xft_megatron.checkpoint import dist as ckpt
from xft_megatron.checkpoint import stream
from xft_megatron.model.moe import divergence
from xft_megatron.model.moe import losses as moe_losses
from xft_megatron.training.step import forward_logits
from xft_megatron.xft.upcycle import upcycle

MOE = ["moe.num_experts=5", "moe.topk=3", "moe.router_noise=false", "moe.z_loss_coeff=1e-3",
       "moe.balance_coeff=0.1"]
CLIP = 0.5
P5 = MOE + [f"train.clip_grad={CLIP}"]
DENSE = "moe.shared_expert_impl=dense"
SP = "parallel.sequence_parallel=true"
LAYOUTS = {
    "ep2": ["parallel.expert=2"],
    "ep4": ["parallel.expert=4"],
    "tp2_sp": ["parallel.tensor=2", SP],
    "ep2_tp2_sp": ["parallel.expert=2", "parallel.tensor=2", SP],
    "pp2_ep2": ["parallel.pipeline=2", "parallel.expert=2"],
    "ep2_tp2_sp_fused": ["parallel.expert=2", "parallel.tensor=2", SP,
                         "precision.grad_accum_fusion=true"],
}
STEPS = 3


def _run(cfg, weights, workdir, name):
    """`common.p5_run`, with the step's routing statistics and the expert divergence."""
    def measure(chunks):
        return {"routing": moe_losses.collect_routing(chunks, cfg.model.num_layers),
                "divergence": divergence.expert_divergence(chunks, cfg.model.num_layers,
                                                           cfg.moe.num_experts)}
    return common.p5_run(cfg, weights, workdir, name, STEPS, measure)


def _reference(rank, world, workdir):
    cfg = common.tiny_config(*P5)
    chunks, _ = common.setup(cfg, ddp=False)
    common.perturb_norms(chunks)
    weights = os.path.join(workdir, "weights")
    ckpt.save(chunks, weights, 0, cfg)
    out = {"pool": _run(cfg, weights, workdir, "pool")}
    chunks, _ = common.setup(cfg, os.path.join(workdir, "grads_pool"), ddp=False)
    torch.save(ckpt.local_state_dict(chunks), os.path.join(workdir, "ref_grads.pt"))
    out["dense"] = _run(common.tiny_config(*P5, DENSE), weights, workdir, "dense")
    out["dense_grads"] = common.gradient_errors(cfg, os.path.join(workdir, "grads_dense"),
                                                torch.load(os.path.join(workdir, "ref_grads.pt")))
    # P1: an upcycled model (every expert a copy of the dense FFN) gives the dense logits
    dense_cfg = common.tiny_config()
    chunks, _ = common.setup(dense_cfg, ddp=False)
    common.perturb_norms(chunks)
    dense_sd = ckpt.local_state_dict(chunks)
    tokens = [{k: v[i:i + 1] for k, v in common.global_batch(dense_cfg, 5).items()}
              for i in range(2)]
    with torch.no_grad():
        chunks[0].eval()
        dense_logits = forward_logits(chunks, tokens, dense_cfg.train.seq_length)
        up_cfg = common.tiny_config(*MOE)
        chunks, _ = common.setup(up_cfg, ddp=False)
        chunks[0].load_state_dict(dict(upcycle(dense_sd, up_cfg.moe, up_cfg.model.hidden_size,
                                               seed=1)), strict=False)
        ckpt.save(chunks, os.path.join(workdir, "upcycled"), 0, up_cfg)
    torch.save(dense_logits, os.path.join(workdir, "dense_logits.pt"))
    # a layer built alone, as the benchmarks build one (Megatron's default process groups)
    from xft_megatron.model.builder import transformer_config
    from xft_megatron.model.spec import moe_mlp_spec

    dense_cfg = common.tiny_config(*P5, DENSE)
    layer = moe_mlp_spec(dense_cfg.moe)(config=transformer_config(dense_cfg), layer_number=1)
    layer.eval()
    with torch.no_grad():
        y, _ = layer(torch.randn(8, 1, dense_cfg.model.hidden_size))
    out["alone"] = (type(layer.shared_expert).__name__, tuple(y.shape),
                    bool(torch.isfinite(y).all()))
    # the conversion tools' storage layout is the same for both settings
    stream.initialize_single_rank_layout()
    out["same_layout"] = stream.layout_of(cfg).params == \
        stream.layout_of(common.tiny_config(*P5, DENSE)).params
    return out


def _tokens_per_rank(cfg, weights):
    """This rank's count of tokens its experts received and of tokens its shared expert ran
    on, and the tokens its EP group routed to each of the N experts (one forward)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    chunks, _ = common.setup(cfg, weights, ddp=False)
    count = {"received": 0, "shared_ran": 0}
    routed = torch.zeros(cfg.moe.num_experts, dtype=torch.float64)

    def experts_ran(module, args, out):
        count["received"] += args[0].shape[0]  # tokens [n, H] sorted by local expert

    def shared_ran(module, args, out):
        count["shared_ran"] += args[0].shape[0] * args[0].shape[1]  # hidden [s, b, H]

    def router_ran(module, args, out):
        routed.add_(out[1].sum(0).double())  # selected [T, N]

    for m in chunks[0].modules():
        if hasattr(m, "router") and hasattr(m, "experts"):
            m.experts.register_forward_hook(experts_ran)
            m.router.register_forward_hook(router_ran)
            if hasattr(m, "shared_expert"):
                m.shared_expert.register_forward_hook(shared_ran)
    with torch.no_grad():
        forward_logits(chunks, common.microbatches(cfg), cfg.train.seq_length)
    dist.all_reduce(routed, group=ps.get_expert_model_parallel_group())
    ep_rank = ps.get_expert_model_parallel_rank()
    return {**count, "routed": routed.tolist(), "ep_rank": ep_rank}


def _interrupted(cfg, stop_after=3, resume_cfg=None):
    """(losses of an uninterrupted run, losses of the same run stopped after `stop_after`
    steps and resumed, under `resume_cfg` when given)."""
    import dataclasses

    from xft_megatron.training.loop import train

    data = common.RandomBatches(cfg)
    full = train(cfg, data, progress=False).losses
    cut = dataclasses.replace(cfg, checkpoint=dataclasses.replace(
        cfg.checkpoint, save=cfg.checkpoint.save + "_split", save_interval=1))
    polls = []
    first = train(cut, data, progress=False,
                  should_stop=lambda: polls.append(1) or len(polls) == stop_after)
    then = cut if resume_cfg is None else dataclasses.replace(
        resume_cfg, checkpoint=cut.checkpoint)
    second = train(then, data, progress=False, resume=True)
    return full, first.losses + second.losses


def _resumes(workdir):
    """Exact resume with the shared expert off the dispatch path (EP=2, DP=4): Adam with the
    distributed optimizer, and Adafactor in pure bf16 (its factored state in the per-expert
    chunks); and a pool run resumed as dense (the optimizer restarts, the weights carry)."""
    run = ["train.train_steps=5", "train.lr_warmup_steps=2", "train.clip_grad=1.0",
           "checkpoint.keep=0", "parallel.expert=2", "moe.router_noise=true"]
    adafactor = ["train.optimizer=adafactor", "train.distributed_optimizer=false",
                 "precision.dtype=bf16", "precision.master_weights=none",
                 "precision.rounding=stochastic"]
    out = {}
    for name, extra in (("adam", []), ("adafactor", adafactor)):
        cfg = common.tiny_config(*MOE, *run, *extra, DENSE,
                                 f"checkpoint.save={workdir}/resume_{name}")
        out[name] = _interrupted(cfg)
    # noise off: a resume under another layout restarts the RNG streams
    same = [*MOE, *run, "parallel.expert=1", "moe.router_noise=false",
            f"checkpoint.save={workdir}/resume_pool"]
    out["pool_to_dense"] = _interrupted(common.tiny_config(*same),
                                        resume_cfg=common.tiny_config(*same, DENSE))
    return out


def _layouts(rank, world, workdir):
    weights = os.path.join(workdir, "weights")
    out = {"resume": _resumes(workdir)}
    for name, lo in LAYOUTS.items():
        out[name] = _run(common.tiny_config(*P5, DENSE, *lo), weights, workdir, name)
    ref = torch.load(os.path.join(workdir, "ref_grads.pt"))
    pool_cfg = common.tiny_config(*P5)
    for name in LAYOUTS:  # every dense layout's checkpoint, read back by the pool layout
        out[name]["worst"], out[name]["grad_err"] = common.gradient_errors(
            pool_cfg, os.path.join(workdir, f"grads_{name}"), ref)
    # P1 under EP=2+TP=2+SP, train mode
    cfg = common.tiny_config(*MOE, DENSE, *LAYOUTS["ep2_tp2_sp"])
    chunks, _ = common.setup(cfg, os.path.join(workdir, "upcycled"), ddp=False)
    tokens = [{k: v[i:i + 1] for k, v in common.global_batch(cfg, 5).items()} for i in range(2)]
    with torch.no_grad():
        out["p1_logits"] = forward_logits(chunks, tokens, cfg.train.seq_length)
    out["tokens"] = {
        "dense": _tokens_per_rank(common.tiny_config(*P5, *LAYOUTS["ep2"], DENSE), weights),
        # the pool needs EP | N: 1 shared + 3 routed, freshly initialized
        "pool": _tokens_per_rank(common.tiny_config(*P5, *LAYOUTS["ep2"], "moe.num_experts=4"),
                                 None)}
    return out


def test_shared_expert_off_the_dispatch_path(tmp_path):
    workdir = str(tmp_path)
    ref = run_ranks(1, _reference, workdir)[0]
    pool, dense = ref["pool"], ref["dense"]
    assert ref["same_layout"]
    assert ref["alone"] == ("SharedExpert", (8, 1, 64), True), ref["alone"]
    assert all(n > CLIP for n in pool["norms"]), pool["norms"]  # clipping is active
    assert pool["curve"][0] > pool["curve"][-1]
    # one process: dense equals pool
    assert abs(dense["loss"] - pool["loss"]) <= 1e-6 * pool["loss"]
    for key in ("router", "curve", "norms"):
        for a, b in zip(dense[key], pool[key]):
            assert abs(a - b) <= 1e-5 * abs(b), (key, dense[key], pool[key])
    worst, err = ref["dense_grads"]
    assert err <= 1e-5, (worst, err)
    for key, rows in pool["routing"].items():  # [layers][N] loads, g_0, diagnostics
        got = torch.tensor(dense["routing"][key], dtype=torch.float64)
        exp = torch.tensor(rows, dtype=torch.float64)
        assert got.shape == exp.shape and torch.allclose(got, exp, rtol=1e-6, atol=1e-9), key
    assert len(pool["routing"]["expert_load"][0]) == 5
    for layer, row in pool["divergence"].items():
        assert len(row["to_shared"]) == 4 and all(d > 0 for d in row["to_shared"]), pool["divergence"]
        for a, b in zip(dense["divergence"][layer]["to_shared"], row["to_shared"]):
            assert abs(a - b) <= 1e-6 * b, (layer, dense["divergence"], pool["divergence"])

    results = run_ranks(4, _layouts, workdir)
    dense_logits = torch.load(os.path.join(workdir, "dense_logits.pt"))
    scale = dense_logits.abs().max().item()
    for r in results:
        assert (r["p1_logits"] - dense_logits).abs().max().item() <= 1e-5 * scale
        for name in LAYOUTS:
            got = r[name]
            assert abs(got["loss"] - pool["loss"]) <= 1e-6 * pool["loss"], (name, got, pool)
            for key in ("router", "curve", "norms"):
                for a, b in zip(got[key], pool[key]):
                    assert abs(a - b) <= 1e-5 * abs(b), (name, key, got[key], pool[key])
            assert got["grad_err"] <= 1e-5, (name, got["grad_err"], got["worst"])
            for layer, row in pool["divergence"].items():
                for a, b in zip(got["divergence"][layer]["to_shared"], row["to_shared"]):
                    assert abs(a - b) <= 1e-5 * b, (name, layer)
    for r in results:
        for name in ("adam", "adafactor"):
            full, resumed = r["resume"][name]
            assert len(full) == 5 and resumed == full, (name, full, resumed)
        full, resumed = r["resume"]["pool_to_dense"]  # the step after the cut: same weights
        assert len(resumed) == 5 and resumed[:3] == full[:3]
        assert abs(resumed[3] - full[3]) <= 1e-5 * full[3], (full, resumed)
    # tokens per expert-parallel rank (EP=2: experts 1, 2 on EP rank 0, 3, 4 on EP rank 1)
    # the global batch (4 x 32 tokens) over 4 data-parallel ranks, through every MoE layer
    own_tokens = 4 * 32 // 4 * len(pool["routing"]["expert_load"])
    for r in results:
        t = r["tokens"]["dense"]
        routed, ep_rank = t["routed"], t["ep_rank"]
        mine = routed[1 + 2 * ep_rank] + routed[2 + 2 * ep_rank]
        assert t["received"] == mine, t
        assert t["shared_ran"] == own_tokens, t  # the shared FFN on this rank's tokens only
        group_tokens = routed[0]  # every token of the EP group has the shared expert
        assert group_tokens == 2 * own_tokens and sum(routed[1:]) == 2 * group_tokens
        p = r["tokens"]["pool"]
        assert p["shared_ran"] == 0
        if p["ep_rank"] == 0:  # experts 0 (shared) and 1: every token of the group, again
            assert p["routed"][0] == group_tokens
            assert p["received"] == p["routed"][0] + p["routed"][1] > group_tokens, p
        else:  # experts 2 and 3
            assert p["received"] == p["routed"][2] + p["routed"][3], p
