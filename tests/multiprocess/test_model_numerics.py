"""The dense model's forward equals transformers' on the same weights (independent reference).

Covers GQA, RoPE theta and linear scaling (x4, DeepSeek-Coder style), RMSNorm eps, QKV bias
and tied embeddings (Qwen2), per-head q/k RMSNorm with a head width of its own (Qwen3), in fp32 (max |diff| <= 1e-5 x max |logit|) and bf16 (relative
Frobenius error vs fp32 within 1.5x of transformers' own bf16 error). Also: the HF name maps invert each other exactly.
"""

import torch

from tests.harness import run_ranks

CASES = {
    "llama_gqa_rope_linear4": ("LlamaForCausalLM", ["model.rope_scaling_factor=4.0",
                                                    "model.rope_theta=100000.0",
                                                    "model.norm_eps=1e-6"]),
    "qwen2_bias_tied": ("Qwen2ForCausalLM", ["model.qkv_bias=true",
                                             "model.tie_embeddings=true",
                                             "model.rope_theta=1000000.0"]),
    # head_dim 32 with hidden 64 and 4 heads: q/k/v are wider than the residual stream
    "qwen3_qk_norm_head_dim": ("Qwen3ForCausalLM", ["model.qk_norm=true", "model.head_dim=32",
                                                    "model.rope_theta=1000000.0",
                                                    "model.norm_eps=1e-6"]),
}


def _body(rank, world):
    import transformers

    from tests import common
    from xft_megatron.arch import families
    from xft_megatron.checkpoint.dist import local_state_dict
    from xft_megatron.hf import llama as hf_llama

    out = {}
    for name, (arch, overrides) in CASES.items():
        cfg = common.tiny_config(*overrides, "model.init_std=0.2")
        chunks, _ = common.setup(cfg, ddp=False)
        model = chunks[0]
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():  # non-trivial norms and biases
            for n, p in model.named_parameters():
                if "layernorm" in n or n.endswith("bias"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3 + ("bias" not in n))
        sd = local_state_dict(chunks)
        hf_sd = dict(hf_llama.to_hf(sd, cfg.model))
        back = dict(hf_llama.from_hf(hf_sd, cfg.model))
        exact_inverse = set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
        family = families.of(cfg.model)
        hf_cfg = transformers.AutoConfig.for_model(**family.hf_config(cfg.model))
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg).float().eval()
        missing, unexpected = hf.load_state_dict(hf_sd, strict=False)
        ids = torch.randint(0, cfg.model.vocab_size, (2, 96), generator=g)
        pos = torch.arange(96).unsqueeze(0).expand(2, -1)
        with torch.no_grad():
            ref = hf(ids).logits
            got = model(ids, pos, None)
            got_bf16 = model.bfloat16()(ids, pos, None).float()
            ref_bf16 = hf.bfloat16()(ids).logits.float()
        out[name] = {
            "max_diff": (got - ref).abs().max().item(),
            "scale": ref.abs().max().item(),
            "bf16_rel": ((got_bf16 - ref).norm() / ref.norm()).item(),
            "hf_bf16_rel": ((ref_bf16 - ref).norm() / ref.norm()).item(),
            "missing": [k for k in missing if not (cfg.model.tie_embeddings and "lm_head" in k)],
            "unexpected": list(unexpected),
            "exact_inverse": exact_inverse,
            "arch": (family.hf_architecture, type(hf).__name__, arch),
        }
    return out


def test_forward_matches_transformers():
    results = run_ranks(1, _body)[0]
    for name, r in results.items():
        assert r["exact_inverse"], name
        assert len(set(r["arch"])) == 1, (name, r["arch"])  # the family's own HF class
        assert not r["missing"] and not r["unexpected"], (name, r)
        assert r["scale"] > 1.0, (name, r)  # logits not vanishingly small: a real comparison
        assert r["max_diff"] <= 1e-5 * r["scale"], (name, r)
        # bf16: no worse than transformers itself in bf16 on the same weights
        assert r["bf16_rel"] <= 1.5 * r["hf_bf16_rel"] + 1e-3, (name, r)
