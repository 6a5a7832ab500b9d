"""HF <-> Megatron conversion: P4 (HF -> Megatron -> HF is bitwise; Megatron's forward equals
transformers'), both config dialects, and refusals of what is not implemented exactly."""

import json
import os

import pytest
import torch

from tests.harness import run_ranks

HF_CASES = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=176,
                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=384, max_position_embeddings=256, rms_norm_eps=1e-6,
                  rope_theta=100000.0, rope_scaling={"type": "linear", "factor": 4.0},
                  tie_word_embeddings=False, initializer_range=0.3),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=176,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=384, max_position_embeddings=256, rms_norm_eps=1e-6,
                  rope_theta=1000000.0, tie_word_embeddings=True, initializer_range=0.3),
    "mistral": dict(model_type="mistral", hidden_size=64, intermediate_size=176,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    vocab_size=128, max_position_embeddings=256, rms_norm_eps=1e-5,
                    rope_theta=10000.0, sliding_window=None, tie_word_embeddings=False,
                    initializer_range=0.3),
    # per-head q/k RMSNorm; head_dim 32 differs from hidden_size / heads = 16
    "qwen3": dict(model_type="qwen3", hidden_size=64, intermediate_size=176,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=32, vocab_size=128, max_position_embeddings=256, rms_norm_eps=1e-6,
                  rope_theta=1000000.0, tie_word_embeddings=False, initializer_range=0.3),
}


def _body(rank, world, root):
    import transformers
    from safetensors.torch import load_file

    from xft_megatron.checkpoint import dist as ckpt
    from xft_megatron.hf import convert
    from xft_megatron.model.builder import build_model

    out = {}
    for name, hf_kwargs in HF_CASES.items():
        torch.manual_seed(0)
        hf_cfg = transformers.AutoConfig.for_model(**hf_kwargs)
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg).float().eval()
        with torch.no_grad():
            for n, p in hf.named_parameters():
                if "norm" in n or n.endswith("bias"):
                    p.normal_(1.0 if "norm" in n else 0.0, 0.3)
        src = os.path.join(root, f"{name}_hf")
        hf.save_pretrained(src, safe_serialization=True)
        mc = os.path.join(root, f"{name}_mcore")
        convert.hf_to_mcore(src, mc)
        back = os.path.join(root, f"{name}_back")
        convert.mcore_to_hf(mc, back, dtype="fp32")

        orig = {}
        for f in os.listdir(src):
            if f.endswith(".safetensors"):
                orig.update(load_file(os.path.join(src, f)))
        new = {}
        for f in os.listdir(back):
            if f.endswith(".safetensors"):
                new.update(load_file(os.path.join(back, f)))
        if hf_kwargs["tie_word_embeddings"]:
            orig.pop("lm_head.weight", None)
        bitwise = set(orig) == set(new) and all(torch.equal(orig[k], new[k]) for k in orig)

        cfg = ckpt.load_config(mc)
        from xft_megatron.runtime import parallel

        parallel.initialize(cfg.parallel)
        chunks = build_model(cfg)
        ckpt.load(chunks, mc)
        ids = torch.randint(0, hf_kwargs["vocab_size"], (2, 80))
        pos = torch.arange(80).unsqueeze(0).expand(2, -1)
        with torch.no_grad():
            ref = hf(ids).logits
            got = chunks[0](ids, pos, None)
        torch.save({"ids": ids, "logits": ref}, os.path.join(root, f"{name}_ref.pt"))
        reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
            back, output_loading_info=True)
        with torch.no_grad():
            again = reloaded.float()(ids).logits
        out[name] = dict(bitwise=bitwise, max_diff=(got - ref).abs().max().item(),
                         family=(cfg.model.family, type(reloaded).__name__),
                         qk_norm_tensors=sum(k.endswith(("q_norm.weight", "k_norm.weight"))
                                             for k in new),
                         scale=ref.abs().max().item(),
                         reload_equal=torch.equal(again, ref),
                         missing=info["missing_keys"], unexpected=info["unexpected_keys"],
                         rope=(cfg.model.rope_theta, cfg.model.rope_scaling_factor))
    return out


def test_hf_round_trip_is_bitwise_and_forward_matches(tmp_path):
    r = run_ranks(1, _body, str(tmp_path))[0]
    assert r["llama"]["rope"] == (100000.0, 4.0)
    assert r["qwen3"]["qk_norm_tensors"] == 4  # q_norm and k_norm of both layers, round-tripped
    for name, x in r.items():
        assert x["family"] == (name, transformers_class(name)), (name, x["family"])
        assert x["bitwise"], name
        assert x["scale"] > 1.0 and x["max_diff"] <= 1e-5 * x["scale"], (name, x)
        assert x["reload_equal"], name
        assert not x["missing"] and not x["unexpected"], (name, x)


def transformers_class(family):
    from xft_megatron.arch import families

    return families.get(family).hf_architecture


LAYOUTS = {"llama": ["parallel.tensor=2"],  # 3 layers: no PP
           "qwen2": ["parallel.tensor=2", "parallel.pipeline=2",
                     "parallel.sequence_parallel=true"],
           "qwen3": ["parallel.tensor=2", "parallel.sequence_parallel=true"]}


def _layout_body(rank, world, root):
    from xft_megatron.checkpoint import dist as ckpt
    from xft_megatron.config import parse_overrides
    from xft_megatron.model.builder import build_model
    from xft_megatron.runtime import parallel
    from xft_megatron.training.step import forward_logits

    out = {}
    for name, overrides in LAYOUTS.items():
        mc = os.path.join(root, f"{name}_mcore")
        cfg = ckpt.load_config(mc, parallel=parse_overrides(overrides)["parallel"])
        parallel.initialize(cfg.parallel)
        chunks = build_model(cfg)
        ckpt.load(chunks, mc)
        ref = torch.load(os.path.join(root, f"{name}_ref.pt"))
        ids = ref["ids"]
        mbs = [{"tokens": ids[i:i + 1],
                "position_ids": torch.arange(ids.shape[1]).unsqueeze(0)} for i in range(2)]
        for c in chunks:
            c.eval()
        with torch.no_grad():
            got = forward_logits(chunks, mbs, ids.shape[1])
        out[name] = dict(max_diff=(got - ref["logits"]).abs().max().item(),
                         scale=ref["logits"].abs().max().item(),
                         argmax=bool((got.argmax(-1) == ref["logits"].argmax(-1)).all()))
    out["torchrun"] = _convert_on_all_ranks(root)
    return out


def _convert_on_all_ranks(root):
    """Both conversions run by every rank (layers spread over them) write what one process
    writes: the same Megatron tensors, the same HF tensors (HF shards kept small so that
    every rank writes some)."""
    from xft_megatron.checkpoint import dist as ckpt
    from xft_megatron.checkpoint import stream
    from xft_megatron.hf import convert

    name = "llama"
    mc, mc_all = os.path.join(root, f"{name}_mcore"), os.path.join(root, f"{name}_mcore_all")
    convert.hf_to_mcore(os.path.join(root, f"{name}_hf"), mc_all)
    back_all = os.path.join(root, f"{name}_back_all")
    convert.mcore_to_hf(mc, back_all, dtype="fp32", shard_bytes=60_000)
    if torch.distributed.get_rank() != 0:
        return {}
    layout = stream.layout_of(ckpt.load_config(mc))
    a = stream.Reader(ckpt.resolve(mc), layout).read(list(layout.params))
    b = stream.Reader(ckpt.resolve(mc_all), layout).read(list(layout.params))
    back = _safetensors(os.path.join(root, f"{name}_back"))
    spread = _safetensors(back_all)
    files = sorted(f for f in os.listdir(back_all) if f.endswith(".safetensors"))
    return dict(mcore_equal=set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a),
                hf_equal=set(back) == set(spread) and all(torch.equal(back[k], spread[k])
                                                          for k in back),
                shards=len(files))


def _safetensors(folder):
    from safetensors.torch import load_file

    out = {}
    for f in os.listdir(folder):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, f)))
    return out


def test_converted_checkpoint_matches_transformers_in_parallel_layouts(tmp_path):
    """P4 in layouts: the converted checkpoint, loaded at TP=2 (Llama), TP=2+SP, PP=2
    (Qwen2, tied embeddings) and TP=2+SP (Qwen3: q/k norms), gives transformers' logits: max |diff| <= 1e-4 (fp32), same
    argmax. Both conversions under 4 ranks write what one process writes."""
    root = str(tmp_path)
    run_ranks(1, _body, root)
    results = run_ranks(4, _layout_body, root)
    for rank_result in results:
        for name, r in rank_result.items():
            if name != "torchrun":
                assert r["max_diff"] <= 1e-4 * max(1.0, r["scale"]) and r["argmax"], (name, r)
    spread = results[0]["torchrun"]
    assert spread["mcore_equal"] and spread["hf_equal"], spread
    assert spread["shards"] >= 4, spread  # every rank wrote shards


def _write_cfg(d, **kw):
    os.makedirs(d, exist_ok=True)
    base = dict(HF_CASES["llama"])
    base.pop("rope_scaling")
    base.update(kw)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(base, f)
    return d


def test_config_dialects_and_refusals(tmp_path):
    from xft_megatron.errors import HFFormatError
    from xft_megatron.hf.files import model_config_from_hf, weights_index

    d5 = _write_cfg(str(tmp_path / "v5"), rope_parameters={"rope_type": "linear",
                                                            "factor": 4.0,
                                                            "rope_theta": 100000.0})
    m, arch = model_config_from_hf(d5)
    assert (m.rope_theta, m.rope_scaling_factor, arch) == (100000.0, 4.0, "LlamaForCausalLM")
    q3 = _write_cfg(str(tmp_path / "qwen3"), model_type="qwen3")  # no head_dim: Qwen3's 128
    m, arch = model_config_from_hf(q3)
    assert (m.family, m.head_dim, m.qk_norm, m.qkv_bias, arch) == \
        ("qwen3", 128, True, False, "Qwen3ForCausalLM")
    cases = [
        (dict(model_type="mistral", sliding_window=4096), "sliding_window=4096 is not supp"),
        (dict(model_type="gpt2"), "model_type 'gpt2' is not supported"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope type 'yarn'"),
        (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
        (dict(num_attention_heads=5), "hidden_size=64 is not divisible"),
        (dict(attention_bias=True), "attention_bias=true is not supported for Llama"),
        (dict(model_type="qwen3", attention_bias=True), "not supported for Qwen3"),
        (dict(model_type="qwen2", use_sliding_window=True), "use_sliding_window=true"),
    ]
    for i, (kw, msg) in enumerate(cases):
        with pytest.raises(HFFormatError, match=msg):
            model_config_from_hf(_write_cfg(str(tmp_path / f"bad{i}"), **kw))
    with pytest.raises(HFFormatError, match="config.json is missing"):
        model_config_from_hf(str(tmp_path / "nothing"))
    shards = _write_cfg(str(tmp_path / "shards"))
    with open(os.path.join(shards, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {"a": "model-00001-of-00002.safetensors"}}, f)
    with pytest.raises(HFFormatError, match="model-00001-of-00002.safetensors"):
        weights_index(shards)


def _verify_body(rank, world, root):
    import transformers

    from tests.common import run_cli
    from xft_megatron.hf.verify import VerificationError, verify

    codes = {}
    for seed in (0, 1):
        torch.manual_seed(seed)
        hf = transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.for_model(**HF_CASES["llama"]))
        hf.save_pretrained(os.path.join(root, f"hf{seed}"), safe_serialization=True)
    runs = {"in": run_cli("convert", "hf-to-mcore", "--hf", os.path.join(root, "hf0"),
                          "--out", os.path.join(root, "mc"), "--verify"),
            "out": run_cli("convert", "mcore-to-hf", "--ckpt", os.path.join(root, "mc"),
                           "--out", os.path.join(root, "back"), "--verify")}
    # the same model as PyTorch .bin shards with an index (older published checkpoints)
    from safetensors.torch import load_file

    src, binary = os.path.join(root, "hf0"), os.path.join(root, "hf0_bin")
    os.makedirs(binary)
    tensors = {}
    for f in os.listdir(src):
        if f.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(src, f)))
        elif f.endswith(".json"):
            with open(os.path.join(src, f)) as a, open(os.path.join(binary, f), "w") as b:
                b.write(a.read())
    if os.path.exists(os.path.join(binary, "model.safetensors.index.json")):
        os.remove(os.path.join(binary, "model.safetensors.index.json"))
    names, weight_map = sorted(tensors), {}
    for i, part in enumerate((names[::2], names[1::2])):
        fname = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: tensors[k] for k in part}, os.path.join(binary, fname))
        weight_map.update({k: fname for k in part})
    with open(os.path.join(binary, "pytorch_model.bin.index.json"), "w") as f:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    runs["bin"] = run_cli("convert", "hf-to-mcore", "--hf", binary,
                          "--out", os.path.join(root, "mc_bin"), "--verify")
    codes.update({name: run.code for name, run in runs.items()})
    try:  # a checkpoint against another model's weights must fail
        verify(os.path.join(root, "hf1"), os.path.join(root, "mc"), report=lambda *a: None)
        codes["mismatch"] = "accepted"
    except VerificationError as e:
        codes["mismatch"] = str(e)
    return codes, "".join(run.text for run in runs.values())


def test_verify_flag_and_bin_shards(tmp_path):
    codes, text = run_ranks(1, _verify_body, str(tmp_path))[0]
    assert codes["in"] == 0 and codes["out"] == 0 and codes["bin"] == 0, text
    assert text.count("verify: max |diff|") == 3 and "argmax agreement 100.00%" in text, text
    assert "disagree" in codes["mismatch"], codes["mismatch"]
