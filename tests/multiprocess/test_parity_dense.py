"""P5 for the dense model: every parallel layout gives the single-process loss and gradients.

One reference process writes weights, loss, gradients and a 3-step loss curve per model
(Llama; Qwen3, whose q/k norms need their gradients summed over tensor-parallel ranks); one
group of two gloo processes runs every layout against it (fp32). Tolerances: loss relative 1e-6,
gradient relative (Frobenius, per tensor) 1e-5 -- layouts change only summation order.
"""

import os

import torch

from tests import common
from tests.harness import run_ranks
from xft_megatron.checkpoint import dist as ckpt
from xft_megatron.training.step import forward_backward, train_step

LAYOUTS = {
    "tp2": ["parallel.tensor=2"],
    "tp2_sp": ["parallel.tensor=2", "parallel.sequence_parallel=true"],
    "pp2": ["parallel.pipeline=2"],
    "pp2_vpp2": ["parallel.pipeline=2", "parallel.virtual_pipeline=2"],
    "dp2": [],
}
# model -> (its overrides, the layouts it runs): Qwen3's q/k norm weights are shared by the
# heads that tensor parallelism splits, so their gradients are partial sums over TP ranks
MODELS = {"llama": ([], list(LAYOUTS)),
          "qwen3": (["model.family=qwen3", "model.head_dim=32"], ["tp2", "tp2_sp"])}
STEPS = 3


def _curve(cfg, weights):
    chunks, _ = common.setup(cfg, weights)
    opt, sched = common.optimizer_for(chunks, cfg)
    return [train_step(chunks, opt, sched, common.microbatches(cfg), cfg.train.seq_length,
                          cfg.train.clip_grad)
            ["loss"] for s in range(STEPS)]


def _reference(rank, world, workdir):
    out = {}
    for model, (overrides, _) in MODELS.items():
        cfg = common.tiny_config(*overrides)
        chunks, _ = common.setup(cfg, ddp=False)
        common.perturb_norms(chunks)
        weights = os.path.join(workdir, f"{model}_weights")
        ckpt.save(chunks, weights, 0, cfg)
        chunks, _ = common.setup(cfg, weights, distributed_optimizer=False)
        loss = forward_backward(chunks, common.microbatches(cfg), cfg.train.seq_length)
        grads = {n: p.main_grad.clone() for n, p in chunks[0].module.named_parameters()}
        torch.save(grads, os.path.join(workdir, f"{model}_ref_grads.pt"))
        out[model] = {"loss": loss, "curve": _curve(cfg, weights)}
    return out


def _layouts(rank, world, workdir):
    out = {}
    for model, (overrides, layouts) in MODELS.items():
        weights = os.path.join(workdir, f"{model}_weights")
        for name in layouts:
            cfg = common.tiny_config(*overrides, *LAYOUTS[name])
            chunks, _ = common.setup(cfg, weights, distributed_optimizer=False)
            loss = forward_backward(chunks, common.microbatches(cfg), cfg.train.seq_length)
            common.grads_into_params(chunks)
            ckpt.save(chunks, os.path.join(workdir, f"{model}_grads_{name}"), 0, cfg)
            out[model, name] = {"loss": loss, "curve": _curve(cfg, weights)}
        # read every layout's gradients back unsharded (TP=PP=1, DP=2: full tensors per rank)
        ref = torch.load(os.path.join(workdir, f"{model}_ref_grads.pt"))
        cfg = common.tiny_config(*overrides)
        for name in layouts:
            out[model, name]["worst"], out[model, name]["grad_err"] = common.gradient_errors(
                cfg, os.path.join(workdir, f"{model}_grads_{name}"), ref)
    return out


def test_dense_layouts_match_single_process(tmp_path):
    workdir = str(tmp_path)
    refs = run_ranks(1, _reference, workdir)[0]
    results = run_ranks(2, _layouts, workdir)
    assert len(results[0]) == sum(len(layouts) for _, layouts in MODELS.values())
    for model, ref in refs.items():
        assert ref["curve"][0] > ref["curve"][-1], f"{model}: training did not reduce the loss"
    for rank_result in results:
        for (model, name), r in rank_result.items():
            ref = refs[model]
            assert abs(r["loss"] - ref["loss"]) <= 1e-6 * abs(ref["loss"]), (model, name, r, ref)
            assert r["grad_err"] <= 1e-5, (model, name, r["grad_err"], r["worst"])
            for a, b in zip(r["curve"], ref["curve"]):
                assert abs(a - b) <= 1e-5 * abs(b), (model, name, r["curve"], ref["curve"])
