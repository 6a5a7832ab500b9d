"""The reference's numerics as training options: Adafactor (against transformers' own, with
the XFT reference's settings), pure bf16 training (no master weights: nearest or stochastic
rounding of each fp32 update into the bf16 weights), the non-distributed optimizer path
through Megatron, the router's learning-rate multiplier, and exact resume (P6) of an
Adafactor + pure bf16 run. The unit tests run in this process; the Megatron scenarios run
on one group of two gloo processes."""

import math
import warnings

import pytest
import torch

from tests import common
from tests.harness import run_ranks
from xft_megatron.config import ConfigError
from xft_megatron.training.adafactor import Adafactor
from xft_megatron.training.rounding import AdamW, stochastic_round

REFERENCE = dict(scale_parameter=False, relative_step=False, warmup_init=False, beta1=None,
                 eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8, weight_decay=0.0)
STEPS = 20


def _hf_adafactor(params, lr):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers.optimization import Adafactor as HFAdafactor

        return HFAdafactor(params, lr=lr, **REFERENCE)


def _mlp(dtype):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(),
                               torch.nn.Linear(32, 8, bias=False), torch.nn.Tanh(),
                               torch.nn.Linear(8, 4)).to(dtype)


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def _train_pair(dtype):
    """STEPS steps of ours and transformers' Adafactor on the same model and batches, with a
    linear lr schedule written into param_group['lr'] (as Megatron's scheduler does)."""
    ours, ref = _mlp(dtype), _mlp(dtype)
    opts = Adafactor(ours.parameters(), lr=0.0), _hf_adafactor(ref.parameters(), lr=0.0)
    g = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        x = torch.randn(8, 16, generator=g).to(dtype)
        for model, opt in zip((ours, ref), opts):
            for group in opt.param_groups:
                group["lr"] = 1e-2 * (1 - step / STEPS)
            opt.zero_grad()
            model(x).float().pow(2).mean().backward()
            opt.step()
    return ours, ref


def test_adafactor_matches_transformers_fp32():
    ours, ref = _train_pair(torch.float32)
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        assert not torch.equal(a, _mlp(torch.float32).state_dict()[name])  # it trained
        assert _rel(a, b) < 1e-6, (name, _rel(a, b))  # measured: <= 2e-7 after 20 steps


def test_adafactor_matches_transformers_bf16():
    """bf16 weights, update in fp32, written back with round-to-nearest (as transformers'
    Adafactor does for bf16 parameters)."""
    ours, ref = _train_pair(torch.bfloat16)
    for a, b in zip(ours.parameters(), ref.parameters()):
        assert a.dtype == torch.bfloat16
        assert _rel(a, b) < 1e-3  # measured: bitwise equal
    opt = Adafactor(_mlp(torch.bfloat16).parameters())
    opt.init_state()
    assert all(t.dtype == torch.float32 for s in opt.state.values() for k, t in s.items()
               if k != "step")


def test_stacked_matrices_are_factored_one_by_one():
    """[E, 2, F, H] (the grouped experts) is E * 2 matrices, each with its own statistics and
    RMS clip; set_row_groups(p, 2) factors a fused [2F, H] as gate and up apart."""
    g = torch.Generator().manual_seed(2)
    for shape, groups in (((3, 2, 4, 5), 1), ((8, 5), 2)):
        w = torch.randn(shape, generator=g)
        ours = torch.nn.Parameter(w.clone())
        opt = Adafactor([ours], lr=1e-2)
        if groups > 1:
            opt.set_row_groups(ours, groups)
        mats = w.reshape(-1, shape[-2] // groups, shape[-1])
        refs = [torch.nn.Parameter(m.clone()) for m in mats]
        ref_opt = _hf_adafactor(refs, lr=1e-2)
        for _ in range(5):
            grad = torch.randn(shape, generator=g) * torch.rand(shape[:-1] + (1,),
                                                                generator=g) * 10
            ours.grad = grad
            for r, gr in zip(refs, grad.reshape(mats.shape)):
                r.grad = gr.clone()
            opt.step()
            ref_opt.step()
        assert _rel(ours.detach().reshape(mats.shape), torch.stack(refs).detach()) < 1e-6


def test_stochastic_rounding_neighbours_unbiased_deterministic():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 3
    # the two bf16 neighbours of each x: its fp32 pattern cut to bf16 (towards zero), and
    # the next bf16 number away from zero
    toward_zero = (x.view(torch.int32) & -65536)
    a, b = toward_zero.view(torch.float32), (toward_zero + 65536).view(torch.float32)
    draws = torch.stack([stochastic_round(x, torch.Generator().manual_seed(s))
                         for s in range(2000)]).float()
    assert draws.dtype == torch.float32 and ((draws == a) | (draws == b)).all()
    ulp = (b - a).abs()
    # the mean of 2000 draws has a standard deviation <= ulp / (2 sqrt(2000)) ~ 0.011 ulp
    assert ((draws.mean(0) - x).abs() / ulp).max() < 0.06
    same = [stochastic_round(x, torch.Generator().manual_seed(s)) for s in (5, 5, 6)]
    assert torch.equal(same[0], same[1]) and not torch.equal(same[0], same[2])
    special = torch.tensor([0.0, -0.0, math.inf, -math.inf, 1.0, -2.0])
    assert torch.equal(stochastic_round(special, torch.Generator()).float(), special)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_updates_below_half_an_ulp(rounding):
    """Weights at 1.0 (bf16 ulp 2^-7) and steps of 1e-3 (Adam with a constant gradient moves
    each weight by lr per step): round-to-nearest loses every one, stochastic rounding keeps
    them on average. The weights stay bf16."""
    p = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
    opt = AdamW([p], lr=1e-3, rounding=rounding, seed=3)
    for _ in range(100):
        p.grad = torch.ones_like(p)
        opt.step()
    assert p.dtype == torch.bfloat16
    if rounding == "nearest":
        assert torch.equal(p, torch.ones_like(p))
    else:  # expected 1 - 100 * 1e-3 = 0.9
        assert abs(p.float().mean().item() - 0.9) < 2e-3


def test_pure_bf16_adam_equals_adamw_on_fp32_copies_rounded_each_step():
    ours = _mlp(torch.bfloat16)
    ref = [torch.nn.Parameter(p.detach().float().clone()) for p in ours.parameters()]
    opt = AdamW(ours.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                                foreach=False)
    g = torch.Generator().manual_seed(4)
    for _ in range(10):
        for p, r in zip(ours.parameters(), ref):
            grad = torch.randn(p.shape, generator=g)
            p.grad, r.grad = grad.to(torch.bfloat16), grad.to(torch.bfloat16).float()
        opt.step()
        ref_opt.step()
        with torch.no_grad():
            for r in ref:
                r.copy_(r.to(torch.bfloat16).float())
    for p, r in zip(ours.parameters(), ref):
        assert p.dtype == torch.bfloat16 and torch.equal(p.float(), r)


@pytest.mark.parametrize("overrides, words", [
    (["train.optimizer=adafactor"], "train.distributed_optimizer=false"),
    (["precision.dtype=bf16", "precision.master_weights=none"],
     "train.distributed_optimizer=false"),
    (["precision.master_weights=none", "train.distributed_optimizer=false"],
     "precision.dtype=bf16"),
    (["precision.dtype=bf16", "precision.rounding=stochastic",
      "train.distributed_optimizer=false"], "master_weights=none"),
    (["train.optimizer=adafactor", "train.distributed_optimizer=false", "parallel.tensor=2"],
     "parallel.tensor=1"),
    (["train.optimizer=sgd"], "adam or adafactor"),
    (["train.router_lr_mult=-1"], "router_lr_mult"),
])
def test_refused_combinations(overrides, words):
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        common.tiny_config(*overrides)


def test_accepted_combinations():
    cfg = common.tiny_config("train.optimizer=adafactor", "train.distributed_optimizer=false",
                             "precision.dtype=bf16", "precision.master_weights=none",
                             "precision.rounding=stochastic", "train.adafactor_eps1=1e-30")
    assert cfg.train.adafactor_decay_rate == -0.8 and cfg.train.adafactor_clip_threshold == 1.0
    assert common.tiny_config().train.optimizer == "adam"


# --- through Megatron: two gloo processes ------------------------------------------------

MOE = ["moe.num_experts=4", "moe.topk=3", "moe.router_noise=true", "parallel.expert=2",
       "train.train_steps=6", "train.lr_warmup_steps=2", "train.lr_decay_style=cosine",
       "train.clip_grad=1.0", "checkpoint.keep=0"]
PURE = ["train.optimizer=adafactor", "train.distributed_optimizer=false",
        "precision.dtype=bf16", "precision.master_weights=none", "precision.rounding=stochastic"]


def _interrupted(cfg, data):
    """(uninterrupted losses, losses of a run stopped after step 3 and resumed)."""
    from xft_megatron.training.loop import train

    full = train(cfg, data, progress=False).losses
    split = cfg.checkpoint.save + "_split"
    import dataclasses

    cut = dataclasses.replace(cfg, checkpoint=dataclasses.replace(
        cfg.checkpoint, save=split, save_interval=2))
    polls = []
    first = train(cut, data, progress=False,
                  should_stop=lambda: polls.append(1) or len(polls) == 3)
    second = train(cut, data, progress=False, resume=True)
    return full, first.losses + second.losses


def _body(rank, world, root):
    from megatron.core.dist_checkpointing import load_tensors_metadata

    from xft_megatron.arch import names
    from xft_megatron.checkpoint import dist as ckpt
    from xft_megatron.training.step import train_step

    out = {}
    # P6 with Adafactor in pure bf16 with stochastic rounding (MoE, expert parallel 2)
    cfg = common.tiny_config(*MOE, *PURE, f"checkpoint.save={root}/pure")
    out["pure"] = _interrupted(cfg, common.RandomBatches(cfg))
    # dense, data parallel 2, fp32 Adafactor: fc1 factored as [2, F, H] saves and resumes
    cfg = common.tiny_config("train.optimizer=adafactor", "train.distributed_optimizer=false",
                             "train.train_steps=6", f"checkpoint.save={root}/dense")
    out["dense"] = _interrupted(cfg, common.RandomBatches(cfg))
    meta = load_tensors_metadata(ckpt.resolve(f"{root}/dense"))
    out["dense_keys"] = {k: tuple(v.global_shape) for k, v in meta.items()
                         if "exp_avg_sq" in k and "layers" in k and
                         (names.FC1 in k or names.QKV in k)}
    # Adam: the distributed optimizer and the non-distributed one give the same curve
    from xft_megatron.training.loop import train

    curves = {}
    for flag in ("true", "false"):
        cfg = common.tiny_config(*MOE, f"train.distributed_optimizer={flag}",
                                 f"checkpoint.save={root}/adam_{flag}")
        curves[flag] = train(cfg, common.RandomBatches(cfg), progress=False).losses
    out["adam"] = curves

    # router_lr_mult: the router group's lr is lr * mult; mult=0 freezes the router
    for layout in (["train.distributed_optimizer=false", "train.optimizer=adafactor"], []):
        for mult in (0.5, 0.0):
            cfg = common.tiny_config(*MOE, *layout, f"train.router_lr_mult={mult}")
            chunks, _ = common.setup(cfg, distributed_optimizer=cfg.train.distributed_optimizer)
            opt, sched = common.optimizer_for(chunks, cfg)
            before = {n: p.detach().clone() for n, p in chunks[0].module.named_parameters()}
            sched.step(1)  # warmup 1/2: lr 1e-3 / 2
            lrs = sorted({(g["lr_mult"], g["lr"]) for g in opt.param_groups if g["params"]})
            stats = train_step(chunks, opt, sched, common.microbatches(cfg),
                               cfg.train.seq_length, cfg.train.clip_grad)
            changed = {n: not torch.equal(before[n], p) for n, p in
                       chunks[0].module.named_parameters()}
            out[("router", bool(layout), mult)] = (lrs, changed, stats["loss"])
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("optimizers"))
    return run_ranks(2, _body, root)


def test_pure_bf16_adafactor_resumes_exactly(results):
    for r in results:
        full, resumed = r["pure"]
        assert len(full) == 6 and all(math.isfinite(x) for x in full)
        assert resumed == full, (resumed, full)


def test_dense_adafactor_saves_factored_state_and_resumes_exactly(results):
    r = results[0]
    full, resumed = r["dense"]
    assert resumed == full, (resumed, full)
    cfg = common.tiny_config()
    f, h = cfg.model.ffn_hidden_size, cfg.model.hidden_size
    shapes = set(r["dense_keys"].values())
    # fc1 [2F, H] factored as [2, F, H]: rows [2F] (as [2F, 1]) and columns [2, H]
    assert any(s[-2:] == (2 * f, 1) for s in shapes), shapes
    assert any(s[-2:] == (2, h) for s in shapes), shapes
    assert any(s[-2:] == (1, h) for s in shapes), shapes  # qkv: one matrix


def test_adam_distributed_or_not_gives_the_same_curve(results):
    curves = results[0]["adam"]
    assert len(curves["true"]) == 6
    for a, b in zip(curves["true"], curves["false"]):
        assert abs(a - b) < 1e-6 * abs(b), (curves["true"], curves["false"])


def test_router_lr_mult(results):
    from xft_megatron.arch import names

    for r in results:
        for local in (True, False):
            lrs, changed, loss = r[("router", local, 0.5)]
            assert lrs == [(0.5, 2.5e-4), (1.0, 5e-4)], lrs
            lrs, changed, loss = r[("router", local, 0.0)]
            assert math.isfinite(loss)
            router = [n for n in changed if names.ROUTER in n]
            assert router and not any(changed[n] for n in router), changed
            assert any(changed[n] for n in changed if n not in router)
