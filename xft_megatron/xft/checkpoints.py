"""`xft upcycle` and `xft merge`: the two ends of XFT on Megatron checkpoints.

Both stream (`checkpoint/stream.py`): a decoder layer is read from the source checkpoint
(whatever layout saved it: expert, tensor and pipeline shards are gathered by the reader),
transformed by the pure functions of `upcycle.py` / `merge.py`, written and dropped, so
memory stays near one layer of the larger model. One process on a CPU
machine, or torchrun with the layers spread over the ranks; every way writes bitwise the
tensors of the pure transforms, and the result loads under any layout (the parallel section
given is stored as the checkpoint's default). Inputs are validated before anything is
read; nothing is written when a check fails.
"""

import json
import os
import shutil
from typing import Callable, Dict, Hashable, Optional

import torch

from xft_megatron.arch import names as tensors
from xft_megatron.checkpoint import dist as ckpt
from xft_megatron.checkpoint import directory, ranks, stream
from xft_megatron.config import ConfigError, MoEConfig, ParallelConfig
from xft_megatron.errors import UsageError, UserError
from xft_megatron.hf.convert import hf_to_mcore, tokenizer_files
from xft_megatron.model.moe.merge_mlp import merge_coefficients
from xft_megatron.xft.merge import fold
from xft_megatron.xft.upcycle import upcycle

COEFFICIENT_CHOICES = ("uniform", "shared-only", "learned")


def upcycle_checkpoint(src: Optional[str], out: str, moe: MoEConfig, seed: int = 0,
                       noise_std: float = 0.0, hf_dir: Optional[str] = None,
                       layout: Optional[Dict] = None, drop_ratio: float = 0.0) -> str:
    """Dense checkpoint (or HF directory) -> XFT MoE checkpoint; returns the written folder.
    `layout`: the parallel section stored with it (validated against the MoE settings).
    `noise_std`, `drop_ratio`: routed-copy noise and Drop-Upcycling (xft/upcycle.py)."""
    directory.require_empty_dir(out)
    if not moe.enabled:
        raise ConfigError("upcycling needs --num-experts > 0")
    if noise_std < 0:
        raise UsageError(f"--noise must be >= 0, got {noise_std}")
    if not 0.0 <= drop_ratio < 1.0:  # NaN too
        raise UsageError(f"--drop-ratio must be in [0, 1) (the fraction of each routed "
                         f"expert's FFN neurons re-initialized; 0 = exact copies), got "
                         f"{drop_ratio}")
    tmp = None
    if hf_dir:
        dense = out.rstrip("/") + ".dense"  # the converted copy, next to --out
        if ranks.world()[0] == 0:
            directory.remove_dead_siblings(dense)  # what a killed upcycle left
        tmp = ranks.broadcast(directory.sibling_tmp(dense) if ranks.world()[0] == 0 else None)
        src = hf_to_mcore(hf_dir, tmp)
    try:
        dense_cfg = ckpt.load_config(src, parallel={})
        if dense_cfg.moe.enabled:
            raise UsageError(f"'{src}' is already an MoE checkpoint (moe.num_experts="
                             f"{dense_cfg.moe.num_experts}); upcycle a dense checkpoint")
        # validates the MoE settings against the model and the layout
        cfg = dense_cfg.replace(moe=moe, parallel=ParallelConfig(**(layout or {})))
        stream.initialize_single_rank_layout()
        reader = stream.Reader(src, stream.layout_of(dense_cfg))
        names = reader.layout.groups()
        hidden = dense_cfg.model.hidden_size

        def group(g: Hashable) -> Dict[str, torch.Tensor]:
            return dict(upcycle(reader.read(names[g]), moe, hidden, seed, noise_std,
                                drop_ratio))

        layout_out = stream.layout_of(cfg)
        def write(folder: str) -> None:
            stream.write(folder, layout_out, stream.GroupCache(group))
            reader.verified()  # the source's checksums, before the output is committed

        return ckpt.save_streamed(write, out, 0, cfg,
                                  extra_files=tokenizer_files(ckpt.resolve(src)))
    finally:
        if tmp:  # the converted dense copy, once every rank is done with it
            ranks.barrier()
            if ranks.world()[0] == 0:
                shutil.rmtree(tmp, ignore_errors=True)


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
        raise UsageError("--coefficients learned needs a merge-stage checkpoint (trained with "
                         "train.stage=merge); this one has no alphas. Pass uniform, shared-only "
                         "or a JSON file of per-layer alphas")
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"--coefficients '{spec}' is neither one of "
                                f"{', '.join(COEFFICIENT_CHOICES)} nor a JSON file")
    with open(spec) as f:
        table = {int(k): torch.tensor(v, dtype=torch.float64) for k, v in json.load(f).items()}
    for layer, alpha in table.items():
        if alpha.shape != (routed,):
            raise UsageError(f"{spec}: layer {layer} has {alpha.numel()} alphas, expected "
                             f"{routed} (one per routed expert)")

    def from_file(layer: int) -> torch.Tensor:
        if layer not in table:
            raise UsageError(f"{spec} has no alphas for MoE layer {layer}")
        return merge_coefficients(table[layer], shared_weight)

    return from_file


def merge_checkpoint(src: str, out: str, coefficients: str = "uniform",
                     shared_weight: float = 0.75, layout: Optional[Dict] = None,
                     report=print, hf_out: Optional[str] = None) -> str:
    """XFT MoE checkpoint -> dense checkpoint of the base architecture; returns its folder.
    `layout`: the parallel section stored with it. `hf_out`: also write the dense model as an
    HF directory."""
    directory.require_empty_dir(out)
    existed = os.path.isdir(out)
    if hf_out:
        directory.require_empty_dir(hf_out, "--hf-out")
    cfg = ckpt.load_config(src, parallel={})
    if not cfg.moe.enabled:
        raise UsageError(f"'{src}' is a dense checkpoint; there is nothing to merge")
    if not cfg.moe.has_shared_expert:
        raise UsageError(f"'{src}' uses moe.mode=vanilla (no shared expert); the XFT merge "
                         "needs a shared expert")
    if cfg.moe.experts_impl != "grouped":
        raise UsageError(f"'{src}' stores experts as Megatron's SequentialMLP; the merge reads "
                         "the grouped layout (moe.experts_impl=grouped)")
    dense_cfg = cfg.replace(moe=MoEConfig(), parallel=ParallelConfig(
        **{**(layout or {}), "expert": 1, "expert_tensor": None}))
    learned = coefficients == "learned" and cfg.stage == "merge"
    moe_layers = [i for i in range(cfg.model.num_layers) if cfg.moe.is_moe_layer(i)]
    if not learned:
        coeffs = coefficient_source(coefficients, cfg.moe.num_experts, shared_weight)
        table = {i: coeffs(i) for i in moe_layers}  # every layer's, checked up front
    stream.initialize_single_rank_layout()
    reader = stream.Reader(src, stream.layout_of(cfg))
    if learned:  # the stage's alphas and its own lambda
        alphas = reader.read([tensors.layer(i) + tensors.ALPHA for i in moe_layers])
        table = {i: merge_coefficients(alphas[tensors.layer(i) + tensors.ALPHA],
                                       cfg.moe.merge_shared_weight) for i in moe_layers}
    if ranks.world()[0] == 0:
        for layer, c in table.items():
            report(f"layer {layer}: " + " ".join(f"{v:.4f}" for v in c.tolist()))
    names = reader.layout.groups()

    def group(g: Hashable) -> Dict[str, torch.Tensor]:
        return dict(fold(reader.read(names[g]), table.__getitem__))

    dense_layout = stream.layout_of(dense_cfg)
    def write(folder: str) -> None:
        stream.write(folder, dense_layout, stream.GroupCache(group))
        reader.verified()  # the source's checksums, before the output is committed

    path = ckpt.save_streamed(write, out, 0, dense_cfg,
                              extra_files=tokenizer_files(ckpt.resolve(src)))
    if hf_out:
        from xft_megatron.hf.convert import mcore_to_hf

        try:
            mcore_to_hf(path, hf_out)  # in the checkpoint's dtype, as mcore-to-hf
        except BaseException as e:  # all or nothing: the same command must work again
            if ranks.world()[0] == 0:
                shutil.rmtree(out, ignore_errors=True)
                if existed:
                    os.makedirs(out, exist_ok=True)
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            raise UserError(f"the Hugging Face export to '{hf_out}' failed ({e}); the dense "
                            f"checkpoint just written to '{out}' was removed with it, so "
                            "the same command can be run again") from e
    return path
