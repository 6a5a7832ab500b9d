"""The learnable merge stage: its forward equals a dense model built from the folded weights
(distinct experts, random alpha; logits max |diff| <= 1e-5 * scale, fp32), only alpha gets
gradients, the loss and alpha gradients are the same under EP=2 and TP=2+SP (relative 1e-6 /
1e-5), and `xft merge --coefficients learned` writes bitwise the pure fold with the trained
alphas."""

import os

import torch

from tests import common
from tests.harness import run_ranks

MOE = ["moe.num_experts=8", "moe.topk=4"]
STAGE = MOE + ["train.stage=merge", "moe.merge_shared_weight=0.6"]


def _alpha_grads(chunks):
    return {n: p.main_grad.clone() for n, p in chunks[0].module.named_parameters()
            if p.requires_grad}


def _reference(rank, world, root):
    from xft_megatron.checkpoint import dist as ckpt
    from xft_megatron.model.moe.merge_mlp import merge_coefficients
    from xft_megatron.training.step import forward_backward, forward_logits
    from xft_megatron.xft.checkpoints import merge_checkpoint
    from xft_megatron.xft.merge import fold

    moe_cfg = common.tiny_config(*MOE)
    chunks, _ = common.setup(moe_cfg, ddp=False)  # random init: distinct experts
    common.perturb_norms(chunks)
    ckpt.save(chunks, os.path.join(root, "moe"), 0, moe_cfg)
    moe_sd = ckpt.local_state_dict(chunks)

    cfg = common.tiny_config(*STAGE)
    chunks, _ = common.setup(cfg, os.path.join(root, "moe"), ddp=False)
    g = torch.Generator().manual_seed(0)
    alphas = {}
    with torch.no_grad():
        for layer in chunks[0].decoder.layers:
            layer.mlp.alpha.copy_(torch.randn(7, generator=g))
            alphas[layer.layer_number - 1] = layer.mlp.alpha.detach().clone()
    ckpt.save(chunks, os.path.join(root, "stage"), 0, cfg)
    mbs = common.microbatches(cfg)
    with torch.no_grad():
        stage_logits = forward_logits(chunks, mbs[:2], cfg.train.seq_length)
    expected = dict(fold(moe_sd, lambda i: merge_coefficients(alphas[i], 0.6)))
    dense_cfg = common.tiny_config()
    dense, _ = common.setup(dense_cfg, ddp=False)
    dense[0].load_state_dict(expected, strict=False)
    with torch.no_grad():
        dense_logits = forward_logits(dense, mbs[:2], cfg.train.seq_length)

    chunks, _ = common.setup(cfg, os.path.join(root, "stage"), distributed_optimizer=False)
    loss = forward_backward(chunks, mbs, cfg.train.seq_length)
    grads = _alpha_grads(chunks)

    # the training loop trains alpha alone and reports the coefficients
    from xft_megatron.training.loop import train

    tcfg = common.tiny_config(*STAGE, "train.train_steps=3", "train.lr=0.5",
                              f"checkpoint.save={os.path.join(root, 'trained')}",
                              f"checkpoint.load={os.path.join(root, 'moe')}")
    run = train(tcfg, common.RandomBatches(tcfg), progress=False)
    trained = run.merge_coefficients
    before = ckpt.local_state_dict(common.setup(tcfg, os.path.join(root, "moe"),
                                                      ddp=False)[0])
    after = ckpt.local_state_dict(common.setup(tcfg, os.path.join(root, "trained"),
                                                     ddp=False)[0])
    frozen = all(torch.equal(before[k], after[k]) for k in before if not k.endswith("alpha"))

    merge_checkpoint(os.path.join(root, "stage"), os.path.join(root, "folded"), "learned",
                     report=lambda *a: None)
    dense, _ = common.setup(dense_cfg, os.path.join(root, "folded"), ddp=False)
    got = ckpt.local_state_dict(dense)
    return dict(
        logit_err=(stage_logits - dense_logits).abs().max().item(),
        scale=dense_logits.abs().max().item(), loss=loss,
        grads={k: v.tolist() for k, v in grads.items()},
        trained=trained, frozen=frozen,
        learned_bitwise=set(got) == set(expected) and all(
            torch.equal(got[k], expected[k]) for k in expected))


def _layouts(rank, world, root):
    from xft_megatron.training.step import forward_backward

    out = {}
    for name, layout in {"ep2": ["parallel.expert=2"],
                         "tp2_sp": ["parallel.tensor=2", "parallel.sequence_parallel=true"]
                         }.items():
        cfg = common.tiny_config(*STAGE, *layout)
        chunks, _ = common.setup(cfg, os.path.join(root, "stage"), distributed_optimizer=False)
        loss = forward_backward(chunks, common.microbatches(cfg), cfg.train.seq_length)
        out[name] = dict(loss=loss, grads={k: v.tolist() for k, v in
                                           _alpha_grads(chunks).items()})
    return out


def test_merge_stage(tmp_path):
    root = str(tmp_path)
    ref = run_ranks(1, _reference, root)[0]
    assert ref["logit_err"] <= 1e-5 * ref["scale"], ref["logit_err"]
    assert ref["learned_bitwise"]
    # training moved the routed coefficients off uniform; lambda stayed; nothing else changed
    assert sorted(ref["trained"]) == [0, 1, 2, 3] and ref["frozen"]
    for c in ref["trained"].values():
        assert abs(c[0] - 0.6) < 1e-7 and abs(sum(c) - 1) < 1e-6
        assert max(abs(x - 0.4 / 7) for x in c[1:]) > 1e-4, c
    names = sorted(ref["grads"])
    assert names and all(n.endswith("mlp.alpha") for n in names), names  # only alpha trains
    assert all(any(abs(x) > 0 for x in ref["grads"][n]) for n in names)
    for rank_result in run_ranks(2, _layouts, root):
        for layout, r in rank_result.items():
            assert abs(r["loss"] - ref["loss"]) <= 1e-6 * ref["loss"], (layout, r["loss"])
            assert sorted(r["grads"]) == names
            for n in names:
                a, b = torch.tensor(r["grads"][n]), torch.tensor(ref["grads"][n])
                assert common.rel_err(a, b) <= 1e-5, (layout, n, a, b)
