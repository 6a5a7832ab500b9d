"""An XFT MoE checkpoint exported as an HF model with its own modeling file
(`trust_remote_code`): transformers loads it with no missing or unexpected keys, and its
logits equal Megatron's (fp32, distinct experts, decisive routing) for every routing mode,
gate kind and expert layout; an upcycled (untrained) MoE exported this way reproduces
transformers' own dense model; `--verify` covers the MoE; merge-stage checkpoints are
refused."""

import math
import os
import shutil

import torch

from tests import common
from tests.harness import run_ranks
from tests.tiny_tokenizer import byte_bpe_tokenizer

# name -> config overrides of the MoE checkpoint exported
CASES = {
    "xft_mlp_probs_grouped_every2": ["moe.num_experts=8", "moe.topk=4", "moe.layer_freq=2"],
    "xft_linear_renorm_linear_sequential_qwen2": [
        "moe.num_experts=6", "moe.topk=3", "moe.router_gate=linear", "moe.renorm=linear",
        "moe.router_noise=false", "moe.experts_impl=sequential", "model.qkv_bias=true",
        "model.tie_embeddings=true"],
    "none": ["moe.num_experts=4", "moe.topk=3", "moe.mode=none"],
    "vanilla": ["moe.num_experts=4", "moe.topk=2", "moe.mode=vanilla"],
}


def _randomize(chunks, seed):
    """Distinct experts and a decisive router: every weight drawn afresh, large enough that
    routing differs from token to token and a misplaced expert or router weight shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in chunks[0].named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name or "layernorm" in name:
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_((0.5 if "router" in name else 0.15) * noise)


def _selections(model):
    """Per MoE layer of the HF model: the set of distinct expert choices over the tokens
    last seen, and the tokens each routed expert got."""
    out = []
    for layer in model.model.layers:
        block = layer.mlp
        if not hasattr(block, "router"):
            continue
        block.router.register_forward_hook(lambda m, a, r, out=out: out.append(r.detach()))
    return out


def _export_body(rank, world, root):
    import transformers

    from xft_megatron.checkpoint import dist as ckpt
    from xft_megatron.hf import convert
    from xft_megatron.hf.remote.modeling_xft_moe import routing_weights

    results = {}
    for i, (name, overrides) in enumerate(CASES.items()):
        cfg = common.tiny_config(*overrides)
        chunks, _ = common.setup(cfg, ddp=False)
        _randomize(chunks, seed=i)
        src, out = os.path.join(root, f"{name}_moe"), os.path.join(root, f"{name}_hf")
        ckpt.save(chunks, src, 0, cfg)
        convert.mcore_to_hf(src, out, dtype="fp32")
        hf, info = transformers.AutoModelForCausalLM.from_pretrained(
            out, trust_remote_code=True, output_loading_info=True)
        hf = hf.float().eval()
        logits = _selections(hf)
        ids = torch.randint(0, cfg.model.vocab_size, (2, 48),
                            generator=torch.Generator().manual_seed(i))
        pos = torch.arange(48).unsqueeze(0).expand(2, -1)
        model = chunks[0].eval()
        with torch.no_grad():
            ref = model(ids, pos, None).float()
            got = hf(ids).logits.float()
        moe = cfg.moe
        choices = []
        for h in logits:
            _, selected = routing_weights(torch.softmax(h, -1), moe.routed_topk, moe.mode,
                                          moe.renorm)
            routed = selected[:, 1:] if moe.has_shared_expert else selected
            choices.append({"distinct": len({tuple(r.tolist()) for r in routed}),
                            "possible": math.comb(moe.num_routed, moe.routed_topk),
                            "min_tokens": int(routed.sum(0).min())})
        files = sorted(os.listdir(out))
        results[name] = dict(
            max_diff=(got - ref).abs().max().item(), scale=ref.abs().max().item(),
            argmax=(got.argmax(-1) == ref.argmax(-1)).float().mean().item(),
            missing=info["missing_keys"], unexpected=info["unexpected_keys"],
            moe_layers=len(logits), choices=choices, files=files,
            arch=hf.config.architectures[0], remote_class=type(hf).__name__)
    return results


def _parallel_export_body(rank, world, root):
    from xft_megatron.hf import convert

    for name in CASES:  # small shards, so that every rank writes some
        convert.mcore_to_hf(os.path.join(root, f"{name}_moe"), os.path.join(root, f"{name}_par"),
                            dtype="fp32", shard_bytes=200_000)


def test_exported_moe_matches_megatron_in_transformers(tmp_path):
    """Also: 4 torchrun-style ranks (layers and shards spread over them) write the tensors one
    process writes, bitwise."""
    results = run_ranks(1, _export_body, str(tmp_path))[0]
    run_ranks(4, _parallel_export_body, str(tmp_path))
    for name in CASES:
        one = common.hf_tensors(tmp_path / f"{name}_hf")
        par = common.hf_tensors(tmp_path / f"{name}_par")
        shards = [f for f in os.listdir(tmp_path / f"{name}_par") if f.endswith(".safetensors")]
        assert len(shards) >= 4 and set(one) == set(par), (name, shards)
        assert all(torch.equal(one[k], par[k]) for k in one), name
    assert results["xft_mlp_probs_grouped_every2"]["moe_layers"] == 2  # layers 0 and 2 of 4
    assert results["xft_linear_renorm_linear_sequential_qwen2"]["arch"] == \
        "XFTQwen2MoeForCausalLM"
    for name, r in results.items():
        assert not r["missing"] and not r["unexpected"], (name, r)
        assert "modeling_xft_moe.py" in r["files"] and "config.json" in r["files"], (name, r)
        assert r["remote_class"] == r["arch"], (name, r)
        assert r["scale"] > 1.0 and r["max_diff"] <= 1e-5 * r["scale"], (name, r)
        assert r["argmax"] == 1.0, (name, r)
        for c in r["choices"]:  # the routing is really exercised: tokens disagree on experts
            assert c["distinct"] >= min(4, c["possible"]) and c["min_tokens"] > 0, \
                (name, r["choices"])


def _upcycled_body(rank, world, root):
    import transformers

    from tests.common import run_cli
    from xft_megatron.config import MoEConfig
    from xft_megatron.xft.checkpoints import upcycle_checkpoint

    torch.manual_seed(0)
    hf_cfg = transformers.AutoConfig.for_model(
        model_type="llama", hidden_size=64, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=384,
        max_position_embeddings=256, rope_theta=100000.0,
        rope_scaling={"type": "linear", "factor": 4.0}, initializer_range=0.3)
    dense = transformers.AutoModelForCausalLM.from_config(hf_cfg).float().eval()
    dense_dir = os.path.join(root, "dense_hf")
    dense.save_pretrained(dense_dir, safe_serialization=True)
    byte_bpe_tokenizer(380).save_pretrained(dense_dir)  # travels along: upcycle -> MoE -> HF
    moe_dir = upcycle_checkpoint(None, os.path.join(root, "moe"),
                                 MoEConfig(num_experts=8, topk=6, router_init_std=0.5),
                                 seed=3, hf_dir=dense_dir)
    export = run_cli("convert", "mcore-to-hf", "--ckpt", moe_dir, "--out",
                     os.path.join(root, "moe_hf"), "--dtype", "fp32", "--verify")
    moe = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.join(root, "moe_hf"), trust_remote_code=True).float().eval()
    ids = torch.randint(0, 384, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = dense(ids).logits, moe(ids).logits
    # HumanEval loads the export (our own modeling file: trusted) and decodes with a KV cache
    # through the MoE block: greedy completions equal the dense model's
    from xft_megatron.eval.humaneval import generate_completions, load_problems
    from xft_megatron.hf.files import own_remote_code

    problems = load_problems(limit=2)
    completions = [generate_completions(d, problems, max_new_tokens=8, batch_size=2)
                   for d in (dense_dir, os.path.join(root, "moe_hf"))]
    tampered = os.path.join(root, "tampered")
    shutil.copytree(os.path.join(root, "moe_hf"), tampered)
    with open(os.path.join(tampered, "modeling_xft_moe.py"), "a") as f:
        f.write("\nimport os  # anything else\n")
    trusted = [own_remote_code(d) for d in (os.path.join(root, "moe_hf"), dense_dir, tampered)]
    # the merge stage (experts + alphas) is refused: it folds to a dense model instead
    from xft_megatron.checkpoint import dist as ckpt

    stage_cfg = common.tiny_config("moe.num_experts=4", "moe.topk=2", "train.stage=merge")
    chunks, _ = common.setup(stage_cfg, ddp=False)
    ckpt.save(chunks, os.path.join(root, "stage"), 0, stage_cfg)
    refused = run_cli("convert", "mcore-to-hf", "--ckpt", os.path.join(root, "stage"),
                      "--out", os.path.join(root, "stage_hf"))
    return dict(code=export.code, text=export.text, max_diff=(got - ref).abs().max().item(),
                scale=ref.abs().max().item(), kind=type(moe).__name__,
                stage_code=refused.code, stage_text=refused.text,
                stage_written=os.path.exists(os.path.join(root, "stage_hf")),
                completions=completions, trusted=trusted)


def test_upcycled_moe_in_transformers_is_the_dense_model_and_verify_covers_it(tmp_path):
    """Right after upcycling every expert equals the dense FFN and the normalized weights sum
    to 1: the exported MoE must compute transformers' own dense Llama (fp32, 1e-5 x scale),
    whatever its (deliberately large) router says; so do its greedy HumanEval completions
    (KV-cache decoding through the MoE block)."""
    r = run_ranks(1, _upcycled_body, str(tmp_path))[0]
    assert r["code"] == 0, r["text"]
    assert "trust_remote_code=True" in r["text"] and "argmax agreement 100.00%" in r["text"], \
        r["text"]
    assert r["kind"] == "XFTLlamaMoeForCausalLM"
    assert r["scale"] > 1.0 and r["max_diff"] <= 1e-5 * r["scale"], r
    dense_completions, moe_completions = r["completions"]
    assert len(dense_completions) == 2 and all(c[0] for c in dense_completions.values())
    assert moe_completions == dense_completions, r["completions"]
    assert r["trusted"] == [True, False, False]  # only our own, unchanged modeling file
    assert r["stage_code"] != 0 and "merge-stage checkpoint" in r["stage_text"] and \
        "xft merge" in r["stage_text"] and not r["stage_written"], r
