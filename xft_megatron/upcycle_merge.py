"""`xft upcycle` and `xft merge`: the two ends of XFT on Megatron checkpoints.

Both read a checkpoint saved under any layout (torch_dist reshards on load), run in whatever
layout they are launched with (one process, or torchrun over many: each rank holds only its
shards), and write a checkpoint that loads under any layout. Upcycling copies each rank's
dense FFN shard into its experts and draws routers (and optional copy noise) from the same
seeded generators as `transforms/upcycle.py`; the merge gathers each layer's experts over
the expert parallel group and folds this rank's tensor-parallel shard with
`transforms/merge.py`. Every layout writes bitwise the tensors of the pure transforms. Inputs are validated before any model is built;
nothing is written when a check fails.
"""

import dataclasses
import json
import os
import shutil
from typing import Callable, Dict, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.transformer.moe.moe_layer import MoELayer

from xft_megatron import parallel
from xft_megatron.checkpoint import dist as ckpt
from xft_megatron.config import ConfigError, MoEConfig, ParallelConfig
from xft_megatron.convert import hf_to_mcore, tokenizer_files
from xft_megatron.model.builder import build_model
from xft_megatron.moe.merge_mlp import MergeMLP, gather_coefficients
from xft_megatron.transforms.merge import merge_coefficients, merge_experts
from xft_megatron.transforms.upcycle import noise_seed, router_weights

COEFFICIENT_CHOICES = ("uniform", "shared-only", "learned")


def _new_dir(out: str) -> None:
    if os.path.exists(out) and os.listdir(out):
        raise FileExistsError(f"'{out}' exists and is not empty; choose a new --out")


def upcycle_checkpoint(src: Optional[str], out: str, moe: MoEConfig, seed: int = 0,
                       noise_std: float = 0.0, hf_dir: Optional[str] = None,
                       layout: Optional[Dict] = None) -> str:
    """Dense checkpoint (or HF directory) -> XFT MoE checkpoint; returns the written folder.
    `layout`: the parallel section to run in (default: one process; under torchrun each rank
    builds only its shards). Every layout writes the same tensors."""
    _new_dir(out)
    if not moe.enabled:
        raise ConfigError("upcycling needs --num-experts > 0")
    if noise_std < 0:
        raise ValueError(f"--noise must be >= 0, got {noise_std}")
    if hf_dir and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--hf runs in one process; convert first under torchrun")
    tmp = None
    if hf_dir:
        tmp = out.rstrip("/") + ".dense-tmp"
        src = hf_to_mcore(hf_dir, tmp)
    try:
        dense_cfg = ckpt.load_config(src, parallel={})
        if dense_cfg.moe.enabled:
            raise ValueError(f"'{src}' is already an MoE checkpoint (moe.num_experts="
                             f"{dense_cfg.moe.num_experts}); upcycle a dense checkpoint")
        # validates the MoE settings against the model and the layout
        cfg = dense_cfg.replace(moe=moe, parallel=ParallelConfig(**(layout or {})))
        if cfg.parallel.expert_tensor != cfg.parallel.tensor:
            raise ConfigError("upcycle with parallel.expert_tensor equal to parallel.tensor "
                              "(experts are split like the dense FFN); any layout loads the "
                              "result")
        parallel.initialize(cfg.parallel)
        dense_layout = dataclasses.replace(cfg.parallel, expert=1,
                                           expert_tensor=cfg.parallel.tensor)
        dense_chunks = build_model(dense_cfg.replace(parallel=dense_layout))
        ckpt.load(dense_chunks, src)
        moe_chunks = build_model(cfg)
        upcycle_chunks(dense_chunks, moe_chunks, moe, seed, noise_std)
        return ckpt.save(moe_chunks, out, 0, cfg, extra_files=tokenizer_files(ckpt.resolve(src)))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


@torch.no_grad()
def upcycle_chunks(dense_chunks, moe_chunks, moe: MoEConfig, seed: int = 0,
                   noise_std: float = 0.0) -> None:
    """Fill this rank's MoE model shards from its dense model shards (same layout): experts
    are copies of this rank's FFN shard, routers drawn like `transforms.upcycle` (full tensors
    from the same seeded generators, then this rank's slice), so every layout matches the
    single-process transform bitwise."""
    ep_rank = ps.get_expert_model_parallel_rank()
    tp_rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    for dc, mc in zip(dense_chunks, moe_chunks):
        dense, model = ckpt.unwrap(dc), ckpt.unwrap(mc)
        src = dict(dense.named_parameters())
        for name, p in model.named_parameters():
            if name in src:
                p.copy_(src[name])
        for dlayer, mlayer in zip(dense.decoder.layers, model.decoder.layers):
            if not isinstance(mlayer.mlp, MoELayer):
                continue
            layer = mlayer.layer_number - 1
            experts = mlayer.mlp.experts
            e_local, _, f_local, h = experts.fc1_weight.shape
            fc1 = dlayer.mlp.linear_fc1.weight.reshape(1, 2, f_local, h)
            fc2 = dlayer.mlp.linear_fc2.weight.unsqueeze(0)
            experts.fc1_weight.copy_(fc1.expand(e_local, -1, -1, -1))
            experts.fc2_weight.copy_(fc2.expand(e_local, -1, -1))
            if noise_std > 0:
                _add_routed_noise(experts, moe.num_experts, noise_std, seed, layer,
                                  ep_rank * e_local, tp_rank, tp)
            router = router_weights(moe, h, seed, layer, experts.fc1_weight.dtype)
            for k, v in router.items():
                getattr(mlayer.mlp.router, k).copy_(v)


def _add_routed_noise(experts, num_experts, std, seed, layer, first, tp_rank, tp):
    """The noise `transforms.upcycle` adds to routed copies, drawn at full size from the same
    generator, sliced to this rank's experts and FFN shard."""
    e_local, _, f_local, h = experts.fc1_weight.shape
    g = torch.Generator().manual_seed(noise_seed(seed, layer))
    shapes = ((num_experts - 1, 2, f_local * tp, h), (num_experts - 1, h, f_local * tp))
    noises = [torch.randn(shape, generator=g) for shape in shapes]
    for w, noise in ((experts.fc1_weight, noises[0]), (experts.fc2_weight, noises[1])):
        full = torch.cat([torch.zeros_like(noise[:1]), noise])  # expert 0 (shared): exact
        part = full[first:first + e_local].narrow(2, tp_rank * f_local, f_local)  # FFN axis
        w += (part.to(w.dtype) * std).to(w.device)


def coefficient_source(spec: str, num_experts: int, shared_weight: float
                       ) -> Callable[[int], torch.Tensor]:
    """layer -> merge coefficients [N] for `--coefficients`: uniform (alpha = 0),
    shared-only (the shared expert alone), or a JSON file {"<layer>": [alpha_1..alpha_N-1]}
    with 0-based global layer indices."""
    merge_coefficients(torch.zeros(1), shared_weight)  # validates lambda
    routed = num_experts - 1
    if spec == "uniform":
        return lambda layer: merge_coefficients(torch.zeros(routed), shared_weight)
    if spec == "shared-only":
        return lambda layer: merge_coefficients(torch.zeros(routed), 1.0)
    if spec == "learned":
        raise ValueError("--coefficients learned needs a merge-stage checkpoint (trained with "
                         "moe.stage=merge); this one has no alphas. Pass uniform, shared-only "
                         "or a JSON file of per-layer alphas")
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"--coefficients '{spec}' is neither one of "
                                f"{', '.join(COEFFICIENT_CHOICES)} nor a JSON file")
    with open(spec) as f:
        table = {int(k): torch.tensor(v, dtype=torch.float64) for k, v in json.load(f).items()}
    for layer, alpha in table.items():
        if alpha.shape != (routed,):
            raise ValueError(f"{spec}: layer {layer} has {alpha.numel()} alphas, expected "
                             f"{routed} (one per routed expert)")

    def from_file(layer: int) -> torch.Tensor:
        if layer not in table:
            raise ValueError(f"{spec} has no alphas for MoE layer {layer}")
        return merge_coefficients(table[layer], shared_weight)

    return from_file


def merge_checkpoint(src: str, out: str, coefficients: str = "uniform",
                     shared_weight: float = 0.75, layout: Optional[Dict] = None,
                     report=print, hf_out: Optional[str] = None) -> str:
    """XFT MoE checkpoint -> dense checkpoint of the base architecture; returns its folder.
    `layout`: the parallel section to run the merge in (default: one process). `hf_out`: also
    write the dense model as an HF directory (one process only)."""
    _new_dir(out)
    if hf_out:
        _new_dir(hf_out)
        if dist.is_initialized() and dist.get_world_size() > 1 or \
                int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("--hf-out runs in one process; under torchrun, merge first and "
                             "then run `xft convert mcore-to-hf` on the result")
    cfg = ckpt.load_config(src, parallel=dict(layout or {}))
    if not cfg.moe.enabled:
        raise ValueError(f"'{src}' is a dense checkpoint; there is nothing to merge")
    if not cfg.moe.has_shared_expert:
        raise ValueError(f"'{src}' uses moe.mode=vanilla (no shared expert); the XFT merge "
                         "needs a shared expert")
    if cfg.moe.experts_impl != "grouped":
        raise ValueError(f"'{src}' stores experts as Megatron's SequentialMLP; the merge reads "
                         "the grouped layout (moe.experts_impl=grouped)")
    if cfg.parallel.expert_tensor != cfg.parallel.tensor:
        raise ConfigError("merge with parallel.expert_tensor equal to parallel.tensor (the "
                          "dense FFN is split like the experts); any layout loads the result")
    learned = coefficients == "learned" and cfg.moe.stage == "merge"
    if not learned:
        coeffs = coefficient_source(coefficients, cfg.moe.num_experts, shared_weight)
        table = {layer: coeffs(layer) for layer in range(cfg.model.num_layers)
                 if cfg.moe.is_moe_layer(layer)}  # every layer's coefficients, checked up front
    parallel.initialize(cfg.parallel)
    moe_chunks = build_model(cfg)
    ckpt.load(moe_chunks, src)
    if learned:
        table = gather_coefficients(moe_chunks)
    dense_cfg = cfg.replace(moe=MoEConfig(), parallel=dataclasses.replace(
        cfg.parallel, expert=1, expert_tensor=cfg.parallel.tensor))
    dense_chunks = build_model(dense_cfg)  # same process groups; experts are gone
    fold_chunks(moe_chunks, dense_chunks, table.__getitem__)
    if dist.get_rank() == 0:
        for layer, c in table.items():
            report(f"layer {layer}: " + " ".join(f"{v:.4f}" for v in c.tolist()))
    path = ckpt.save(dense_chunks, out, 0, dense_cfg, extra_files=tokenizer_files(ckpt.resolve(src)))
    if hf_out:
        from xft_megatron.convert import mcore_to_hf

        mcore_to_hf(path, hf_out, dtype=dense_cfg.precision.dtype)
    return path


def _gather_over_experts(local: torch.Tensor) -> torch.Tensor:
    """[E_local, ...] on each expert-parallel rank -> [E, ...] in global expert order."""
    group = ps.get_expert_model_parallel_group()
    if group.size() == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(group.size())]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts, dim=0)


@torch.no_grad()
def fold_chunks(moe_chunks, dense_chunks, coefficients: Callable[[int], torch.Tensor]) -> None:
    """Fill this rank's dense model shards from its MoE model shards (same layout): every
    non-FFN tensor copied, each MoE layer's experts merged with `coefficients(layer)`
    (0-based global layer)."""
    if ps.get_expert_tensor_parallel_rank() != ps.get_tensor_model_parallel_rank():
        raise RuntimeError("expert and tensor parallel ranks differ; cannot fold in place")
    for mc, dc in zip(moe_chunks, dense_chunks):
        moe, dense = ckpt.unwrap(mc), ckpt.unwrap(dc)
        src = dict(moe.named_parameters())
        filled = set()
        for name, p in dense.named_parameters():
            if name in src:
                p.copy_(src[name])
                filled.add(id(p))
        for mlayer, dlayer in zip(moe.decoder.layers, dense.decoder.layers):
            if not isinstance(mlayer.mlp, (MoELayer, MergeMLP)):
                continue
            fc1 = _gather_over_experts(mlayer.mlp.experts.fc1_weight)  # [N, 2, F/tp, H]
            fc2 = _gather_over_experts(mlayer.mlp.experts.fc2_weight)  # [N, H, F/tp]
            w1, w2 = merge_experts(fc1, fc2, coefficients(mlayer.layer_number - 1))
            for target, value in ((dlayer.mlp.linear_fc1.weight, w1),
                                  (dlayer.mlp.linear_fc2.weight, w2)):
                target.copy_(value)
                filled.add(id(target))
        missing = [n for n, p in dense.named_parameters() if id(p) not in filled]
        if missing:
            raise RuntimeError(f"fold left dense tensors unset: {missing[:5]}")
