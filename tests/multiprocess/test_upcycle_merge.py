"""`xft upcycle` / `xft merge` on checkpoints: P2 through the commands (upcycle, then merge
with any coefficients and lambda, returns the dense weights: max |diff| <= 1e-6 * max |W|,
fp32), the coefficients printed per layer, refusals that write nothing, and P3 (the merge in
any layout writes bitwise the single-process fold)."""

import json
import os

import torch

from tests.harness import run_ranks


def _body(rank, world, root):
    from tests import common
    from xft_megatron.checkpoint import dist as ckpt

    cfg = common.tiny_config()
    chunks, _ = common.setup(cfg, ddp=False)
    common.perturb_norms(chunks)
    dense_dir = os.path.join(root, "dense")
    ckpt.save(chunks, dense_dir, 0, cfg)
    dense = ckpt.local_state_dict(chunks)
    d = lambda name: os.path.join(root, name)  # noqa: E731

    xft = common.run_cli
    out = {"upcycle": xft("upcycle", "--ckpt", dense_dir, "--out", d("moe"),
                          "--num-experts", 4, "--topk", 3, "--router-gate", "linear")}
    out["modes"] = {}  # the paper's ablations from the command line
    for mode in ("vanilla", "none"):
        run = xft("upcycle", "--ckpt", dense_dir, "--out", d(f"moe_{mode}"),
                  "--num-experts", 4, "--topk", 3, "--mode", mode)
        out["modes"][mode] = (run.code, ckpt.load_config(d(f"moe_{mode}"), parallel={}).moe.mode
                              if run.code == 0 else run.text)
    out["modes"]["xft"] = (0, ckpt.load_config(d("moe"), parallel={}).moe.mode)
    alphas = {str(i): [0.5 * i, -1.0, 2.0] for i in range(cfg.model.num_layers)}
    with open(d("alphas.json"), "w") as f:
        json.dump(alphas, f)
    out["merges"] = {}
    for name, args in {"uniform": ["--shared-weight", 0.3, "--hf-out", d("merged_hf")],
                       "shared-only": ["--coefficients", "shared-only"],
                       "file": ["--coefficients", d("alphas.json"), "--shared-weight", 0.9]
                       }.items():
        run = xft("merge", "--ckpt", d("moe"), "--out", d(f"merged_{name}"), *args)
        mcfg = ckpt.load_config(d(f"merged_{name}"), parallel={})
        chunks, _ = common.setup(mcfg, d(f"merged_{name}"), ddp=False)
        got = ckpt.local_state_dict(chunks)
        err = max(((got[k] - v).abs().max() / v.abs().max()).item() for k, v in dense.items())
        out["merges"][name] = dict(code=run.code, text=run.text, same_keys=set(got) == set(dense),
                                   err=err, moe=mcfg.moe.num_experts)
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(d("merged_hf"), dtype=torch.float32)
    ids = torch.randint(0, cfg.model.vocab_size, (1, 16))
    chunks, _ = common.setup(cfg, dense_dir, ddp=False)
    with torch.no_grad():
        ref = chunks[0](ids, torch.arange(16).unsqueeze(0), None)
        out["hf_err"] = ((hf(ids).logits - ref).abs().max() / ref.abs().max()).item()
    refusals = {
        "upcycle_moe": ("upcycle", "--ckpt", d("moe"), "--out", d("r1"), "--num-experts", 4,
                        "--topk", 3),
        "merge_dense": ("merge", "--ckpt", dense_dir, "--out", d("r2")),
        "topk_gt_experts": ("upcycle", "--ckpt", dense_dir, "--out", d("r3"),
                            "--num-experts", 4, "--topk", 5),
        "lambda": ("merge", "--ckpt", d("moe"), "--out", d("r4"), "--shared-weight", 1.5),
        "learned": ("merge", "--ckpt", d("moe"), "--out", d("r5"), "--coefficients", "learned"),
        "out_exists": ("merge", "--ckpt", d("moe"), "--out", d("moe")),
    }
    out["refusals"] = {}
    for name, argv in refusals.items():
        run = xft(*argv)
        target = argv[argv.index("--out") + 1]
        written = os.path.exists(target) and name != "out_exists"
        out["refusals"][name] = dict(code=run.code, text=run.text, written=written)
    return out


def test_upcycle_and_merge_commands(tmp_path):
    r = run_ranks(1, _body, str(tmp_path))[0]
    assert r["upcycle"].code == 0, r["upcycle"].text
    assert r["modes"] == {m: (0, m) for m in ("vanilla", "none", "xft")}, r["modes"]
    for name, m in r["merges"].items():
        assert m["code"] == 0, (name, m["text"])
        assert m["same_keys"] and m["moe"] == 0, name
        assert m["err"] <= 1e-6, (name, m["err"])
    assert "layer 0: 0.3000 0.2333 0.2333 0.2333" in r["merges"]["uniform"]["text"]
    assert r["hf_err"] <= 1e-5, r["hf_err"]  # --hf-out: transformers runs the merged model
    assert "layer 0: 1.0000 0.0000 0.0000 0.0000" in r["merges"]["shared-only"]["text"]
    expected = {
        "upcycle_moe": "already an MoE checkpoint",
        "merge_dense": "dense checkpoint; there is nothing to merge",
        "topk_gt_experts": "moe.topk=5 exceeds moe.num_experts=4",
        "lambda": "must be in [0, 1]",
        "learned": "merge-stage checkpoint",
        "out_exists": "exists and is not empty",
    }
    for name, msg in expected.items():
        got = r["refusals"][name]
        assert got["code"] == 2 and msg in got["text"], (name, got)
        assert not got["written"], f"{name}: wrote output despite refusing"


P3_LAYOUTS = {
    "ep2": {"expert": 2},
    "ep4": {"expert": 4},
    "tp2_ep2": {"tensor": 2, "expert": 2, "sequence_parallel": True},
    "pp2": {"pipeline": 2},
    "pp2_ep2": {"pipeline": 2, "expert": 2},
    "tp2": {"tensor": 2, "sequence_parallel": True},
}


UPCYCLE_MOE = dict(num_experts=8, topk=4, router_gate="mlp")


def _p3_reference(rank, world, root):
    from tests import common
    from xft_megatron.checkpoint import dist as ckpt
    from xft_megatron.config import MoEConfig
    from xft_megatron.model.moe.merge_mlp import merge_coefficients
    from xft_megatron.xft.checkpoints import merge_checkpoint
    from xft_megatron.xft.merge import fold
    from xft_megatron.xft.upcycle import upcycle

    # upcycling reference (pure transform, noisy copies so that slicing errors show)
    dense_cfg = common.tiny_config()
    chunks, _ = common.setup(dense_cfg, ddp=False)
    ckpt.save(chunks, os.path.join(root, "dense"), 0, dense_cfg)
    torch.save(dict(upcycle(ckpt.local_state_dict(chunks), MoEConfig(**UPCYCLE_MOE),
                            dense_cfg.model.hidden_size, seed=5, noise_std=0.01)),
               os.path.join(root, "upcycled_expected.pt"))

    cfg = common.tiny_config("moe.num_experts=8", "moe.topk=4")
    chunks, _ = common.setup(cfg, ddp=False)  # random init: distinct experts
    ckpt.save(chunks, os.path.join(root, "moe"), 0, cfg)
    sd = ckpt.local_state_dict(chunks)
    g = torch.Generator().manual_seed(0)
    alphas = {str(i): torch.randn(7, generator=g).tolist() for i in range(cfg.model.num_layers)}
    with open(os.path.join(root, "alphas.json"), "w") as f:
        json.dump(alphas, f)
    expected = dict(fold(sd, lambda i: merge_coefficients(torch.tensor(alphas[str(i)]), 0.6)))
    torch.save(expected, os.path.join(root, "expected.pt"))
    merge_checkpoint(os.path.join(root, "moe"), os.path.join(root, "single"),
                     os.path.join(root, "alphas.json"), 0.6, report=lambda *a: None)
    return _compare(os.path.join(root, "single"), expected)


def _compare(path, expected, *overrides):
    from tests import common
    from xft_megatron.checkpoint import dist as ckpt

    chunks, _ = common.setup(common.tiny_config(*overrides), path, ddp=False)
    got = ckpt.local_state_dict(chunks)
    return {"keys": set(got) == set(expected),
            "bitwise": all(torch.equal(got[k], expected[k]) for k in expected),
            "max_diff": max((got[k] - expected[k]).abs().max().item() for k in expected)}


def _resave(src, dst, layout, *overrides):
    """`src` (a single-rank checkpoint) loaded in `layout` and saved again by Megatron: the
    stored chunks are then that layout's expert/tensor/pipeline shards."""
    from tests import common
    from xft_megatron.checkpoint import dist as ckpt

    flags = [f"parallel.{k}={str(v).lower()}" for k, v in layout.items()]
    cfg = common.tiny_config(*overrides, *flags)
    chunks, _ = common.setup(cfg, src, ddp=False)
    ckpt.save(chunks, dst, 0, cfg)


def _p3_layouts(rank, world, root):
    from xft_megatron.config import MoEConfig
    from xft_megatron.xft.checkpoints import merge_checkpoint, upcycle_checkpoint

    d = lambda name: os.path.join(root, name)  # noqa: E731
    expected = torch.load(d("expected.pt"))
    upcycled = torch.load(d("upcycled_expected.pt"))
    moe = ("moe.num_experts=8", "moe.topk=4")
    out = {}
    for name, layout in P3_LAYOUTS.items():
        if "expert" not in layout:  # a dense model has no expert axis
            _resave(d("dense"), d(f"dense_{name}"), layout)
            upcycle_checkpoint(d(f"dense_{name}"), d(f"up_{name}"), MoEConfig(**UPCYCLE_MOE),
                               seed=5, noise_std=0.01, layout=layout)
            out[f"upcycle/{name}"] = _compare(d(f"up_{name}"), upcycled, *moe)
        _resave(d("moe"), d(f"moe_{name}"), layout, *moe)
        merge_checkpoint(d(f"moe_{name}"), d(f"merged_{name}"), d("alphas.json"), 0.6, layout,
                         report=lambda *a: None)
        out[f"merge/{name}"] = _compare(d(f"merged_{name}"), expected)
    upcycle_checkpoint(d("dense"), d("up_etp1"), MoEConfig(**UPCYCLE_MOE), seed=5,
                       noise_std=0.01, layout={"tensor": 2, "expert": 2, "expert_tensor": 1,
                                               "sequence_parallel": True})
    out["upcycle/etp1_tp2"] = _compare(d("up_etp1"), upcycled, *moe)
    out["upcycle/etp1_tp2"]["stored"] = ckpt_layout(d("up_etp1"))
    return out


def ckpt_layout(path):
    from xft_megatron.checkpoint import dist as ckpt

    p = ckpt.read_config(path)["parallel"]
    return p["tensor"], p["expert"], p["expert_tensor"]


def test_distributed_fold_and_upcycle_are_bitwise_the_single_process_transforms(tmp_path):
    """P3: MoE checkpoints saved by Megatron under EP=2, EP=4, TP=2+EP=2, PP=2, PP=2+EP=2 (so
    stored as those layouts' expert/tensor/pipeline shards), merged by 4 ranks (layers spread
    over them), give bitwise the tensors of the pure single-process fold (distinct experts,
    per-layer alphas, lambda 0.6). Dense checkpoints saved under PP=2 / TP=2+SP upcycled by 4
    ranks give bitwise the pure upcycle transform (noise on the routed copies, so any slicing
    error shows); so does an upcycle stored with ETP=1 under TP=2."""
    root = str(tmp_path)
    single = run_ranks(1, _p3_reference, root)[0]
    assert single["keys"] and single["bitwise"], single
    results = run_ranks(4, _p3_layouts, root)
    assert len(results[0]) == len(P3_LAYOUTS) + 3, sorted(results[0])
    for rank_result in results:
        for name, r in rank_result.items():
            assert r["keys"] and r["bitwise"], (name, r)
    assert results[0]["upcycle/etp1_tp2"]["stored"] == (2, 2, 1)


def _families_body(rank, world, root):
    """For each registered family, a tiny random model of transformers' own class: upcycled
    from its HF directory, exported as the remote-code MoE, merged back to HF."""
    import transformers

    from tests.multiprocess.test_convert import HF_CASES, _safetensors
    from xft_megatron.arch import families
    from xft_megatron.config import MoEConfig
    from xft_megatron.hf.convert import mcore_to_hf
    from xft_megatron.xft.checkpoints import merge_checkpoint, upcycle_checkpoint

    out = {}
    for i, name in enumerate(families.FAMILIES):
        d = lambda what: os.path.join(root, f"{name}_{what}")  # noqa: E731
        torch.manual_seed(i)
        dense = transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.for_model(**HF_CASES[name])).float().eval()
        with torch.no_grad():  # non-trivial norms (q/k norms included) and biases
            for n, p in dense.named_parameters():
                if "norm" in n or n.endswith("bias"):
                    p.normal_(1.0 if "norm" in n else 0.0, 0.3)
        dense.save_pretrained(d("hf"), safe_serialization=True)
        moe = upcycle_checkpoint(None, d("moe"), MoEConfig(num_experts=4, topk=3,
                                                           router_init_std=0.5),
                                 seed=3, hf_dir=d("hf"))
        mcore_to_hf(moe, d("moe_hf"), dtype="fp32")
        moe_hf = transformers.AutoModelForCausalLM.from_pretrained(
            d("moe_hf"), trust_remote_code=True).float().eval()
        merge_checkpoint(moe, d("merged"), "uniform", 0.3, report=lambda *a: None,
                         hf_out=d("merged_hf"))
        merged = transformers.AutoModelForCausalLM.from_pretrained(d("merged_hf")).float()
        ids = torch.randint(0, HF_CASES[name]["vocab_size"], (2, 40),
                            generator=torch.Generator().manual_seed(i))
        with torch.no_grad():
            ref, got = dense(ids).logits, moe_hf(ids).logits
        orig, back = _safetensors(d("hf")), _safetensors(d("merged_hf"))
        if HF_CASES[name].get("tie_word_embeddings"):
            orig.pop("lm_head.weight", None)
        out[name] = dict(
            moe_class=type(moe_hf).__name__, merged_class=type(merged).__name__,
            want=(families.get(name).moe_classes()[0], families.get(name).hf_architecture),
            moe_diff=(got - ref).abs().max().item(), scale=ref.abs().max().item(),
            same_keys=set(orig) == set(back),
            fold_err=max(((back[k] - w).abs().max() / w.abs().max()).item()
                         for k, w in orig.items() if k in back))
    return out


def test_every_family_upcycles_and_folds_back_to_its_hf_model(tmp_path):
    """P1 and P2 per model family, from and back to transformers' own classes: the upcycled
    MoE, exported with the family's remote-code class, computes the dense model (fp32,
    1e-5 x max |logit|), and the merge (uniform alphas, lambda 0.3) of that untrained MoE,
    exported to HF, is the original model's tensors (max |diff| <= 1e-6 * max |W|)."""
    r = run_ranks(1, _families_body, str(tmp_path))[0]
    from xft_megatron.arch import families

    assert set(r) == set(families.FAMILIES)
    for name, x in r.items():
        assert (x["moe_class"], x["merged_class"]) == x["want"], (name, x)
        assert x["scale"] > 1.0 and x["moe_diff"] <= 1e-5 * x["scale"], (name, x)
        assert x["same_keys"] and x["fold_err"] <= 1e-6, (name, x)
