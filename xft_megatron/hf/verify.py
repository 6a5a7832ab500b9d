"""`--verify` for conversions: run both sides on the same random tokens and compare logits.

The Megatron side runs in one process in fp32 with its weights rounded through the dtype the
HF side was written in, so the comparison measures the conversion, not the rounding.
"""

import dataclasses
from typing import Dict

import torch

from xft_megatron.checkpoint import dist as ckpt
from xft_megatron.errors import UserError
from xft_megatron.hf.files import load_hf_model
from xft_megatron.model.builder import build_model
from xft_megatron.runtime import parallel

TOLERANCE = 1e-4  # max |diff| relative to max(1, max |logit|), fp32


class VerificationError(UserError, ValueError):
    """The two sides of a conversion disagree beyond tolerance."""


def compare_logits(hf_dir: str, ckpt_dir: str, batches: int = 2, seq: int = 64,
                   seed: int = 0) -> Dict[str, float]:
    cfg = ckpt.load_config(ckpt_dir, parallel={}, precision={"dtype": "fp32"})
    if cfg.moe.enabled:  # the HF MoE routes every token (no capacity limit)
        cfg = cfg.replace(moe=dataclasses.replace(cfg.moe, capacity_factor=None))
    hf = load_hf_model(hf_dir, dtype=torch.float32).eval()  # our MoE: our modeling file
    written = next(iter(load_hf_model(hf_dir).parameters())).dtype
    parallel.initialize(cfg.parallel)
    chunks = build_model(cfg)
    ckpt.load(chunks, ckpt_dir)
    model = chunks[0].eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(written).float())
    seq = min(seq, cfg.model.max_position_embeddings)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.model.vocab_size, (batches, seq), generator=g)  # [b, s]
    pos = torch.arange(seq).unsqueeze(0).expand(batches, -1)
    device = next(model.parameters()).device  # the GPU where there is one; HF stays on CPU
    with torch.no_grad():
        ref = hf(ids).logits.float()
        got = model(ids.to(device), pos.to(device), None).float().cpu()
    return {
        "max_abs_diff": (got - ref).abs().max().item(),
        "logit_scale": ref.abs().max().item(),
        "cosine": torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), 0).item(),
        "argmax_agreement": (got.argmax(-1) == ref.argmax(-1)).float().mean().item(),
    }


def verify(hf_dir: str, ckpt_dir: str, report=print) -> Dict[str, float]:
    """Compare, print, and raise VerificationError beyond tolerance or on any argmax change."""
    r = compare_logits(hf_dir, ckpt_dir)
    report(f"verify: max |diff| {r['max_abs_diff']:.3e} (logit scale {r['logit_scale']:.2f}), "
           f"cosine {r['cosine']:.8f}, argmax agreement {r['argmax_agreement']:.2%}")
    if r["max_abs_diff"] > TOLERANCE * max(1.0, r["logit_scale"]) or \
            r["argmax_agreement"] < 1.0:
        raise VerificationError(
            f"'{hf_dir}' and '{ckpt_dir}' disagree: max |diff| {r['max_abs_diff']:.3e} exceeds "
            f"{TOLERANCE:g} x logit scale or argmax differs; the conversion is not exact")
    return r
