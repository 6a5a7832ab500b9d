"""benchmarks/profile_breakdown.py: a profile's time per operator and per category of work, per step.

A real torch.profiler run on the CPU (operators' self CPU time standing in for device time)
of a step made of known work: a GEMM, an in-place accumulation into an fp32 buffer, token
dispatch (sort, index_select, index_add_), a cast and a softmax."""

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import profile_breakdown as breakdown


def test_category_of_operators_and_kernels():
    cases = {
        "aten::mm": "gemm", "aten::addmm": "gemm", "aten::_grouped_mm": "gemm",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n": "gemm",
        "aten::_scaled_dot_product_flash_attention": "attention",
        "aten::sort": "dispatch (sort, index, scatter, gather)",
        "aten::index_add_": "dispatch (sort, index, scatter, gather)",
        "aten::topk": "dispatch (sort, index, scatter, gather)",
        "aten::add_": "in-place add (gradient accumulation)",
        "aten::copy_": "copies and casts", "aten::_to_copy": "copies and casts",
        "nccl:all_reduce": "communication", "record_param_comms": "communication",
        "Torch-Compiled Region: 0/1": "compiled (inductor)",
        "aten::mul": breakdown.OTHER, "aten::add": breakdown.OTHER, "aten::silu": breakdown.OTHER,
    }
    assert {op: breakdown.category(op) for op in cases} == cases


def test_breakdown_of_a_real_profile_sums_per_step():
    torch.manual_seed(0)
    x = torch.randn(512, 256)
    w = torch.randn(256, 256)
    buf = torch.zeros(256, 256)
    scores = torch.randn(4096)

    def step():
        y = x @ w
        buf.add_(y[:256].t() @ x[:256])  # the fp32 gradient buffer
        order = scores.sort().indices
        rows = y.index_select(0, order[:512] % 512)
        torch.zeros_like(y).index_add_(0, order[:512] % 512, rows)
        y.to(torch.bfloat16).float().softmax(-1)

    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(4):
            step()
    b = breakdown.breakdown(prof, 4, top=5)
    cats = b["categories"]
    assert b["device"] == "cpu"
    for cat in ("gemm", "in-place add (gradient accumulation)", "copies and casts",
                "dispatch (sort, index, scatter, gather)", breakdown.OTHER):
        assert cats[cat] > 0, (cat, cats)
    assert abs(sum(cats.values()) - b["busy_ms"]) < 1e-9
    assert cats["attention"] == cats["communication"] == 0
    # per step: aten::mm ran twice per step; the top operators are sorted by time
    ops = {op: (ms, calls) for op, ms, calls in b["ops"]}
    assert len(b["ops"]) <= 5 and [r[1] for r in b["ops"]] == sorted(
        (r[1] for r in b["ops"]), reverse=True)
    assert ops.get("aten::mm", (0, 2))[1] == 2, b["ops"]
    everything = breakdown.breakdown(prof, 1, top=1000)
    assert abs(everything["busy_ms"] - 4 * b["busy_ms"]) < 1e-6 * everything["busy_ms"]
    text = breakdown.table({"a": b, "b": everything}, {"a": b["busy_ms"] + 1.0})
    assert "| gemm |" in text and "| **busy** |" in text
    assert "| wall - busy (GPU waits for the host) | 1.0 | - |" in text


def test_profile_steps_and_the_train_path_report():
    """What `train_path.py --profile` runs per variant (`profile_steps`) and prints (its
    `profile_report`), here on the CPU."""
    from benchmarks import train_path

    x, w = torch.randn(256, 128), torch.randn(128, 128)
    b = breakdown.profile_steps(lambda: (x @ w).relu_(), 3)
    assert b["categories"]["gemm"] > 0 and b["ops"][0][2] == 1  # once per step
    rows = [dict(variant="model", micro_batch=4, ms=b["busy_ms"] + 2.0, profile=b),
            dict(variant="path", micro_batch=4, ms=b["busy_ms"] + 5.0, profile=b),
            dict(variant="reference", micro_batch=4, error="out of memory"),
            dict(variant="path", micro_batch=8, ms=1.0, profile=b)]
    text = train_path.profile_report(rows, "[moe mbs=4]", 4)
    head, table = text.splitlines()[0], text.splitlines()[1:4]
    assert head == "[moe mbs=4] GPU time by category of work"
    assert table[0] == "| ms per step | model | path |"
    assert "| wall - busy (GPU waits for the host) | 2.0 | 5.0 |" in text
    assert "[moe mbs=4] path top operators (ms per step, calls): aten::" in text
    assert "reference" not in text



def test_every_train_path_variant_config_says_what_it_measures():
    """`train_path.py`'s variants build the configs their names promise (MoE and dense)."""
    import argparse

    from benchmarks import train_path

    for dense in (False, True):
        args = argparse.Namespace(dense=dense, preset="deepseek-coder-1.3b", layers=2, seq=128,
                                  overrides=[])
        for variant in train_path.VARIANTS:
            cfg = train_path._config(args, 4, variant)
            assert (cfg.moe.enabled, cfg.model.num_layers) == (not dense, 2), variant
            fuse, shared, spec = train_path.PATHS.get(variant, ("false", "pool", "local"))
            assert cfg.model.spec == spec, variant
            assert cfg.precision.grad_accum_fusion == {"true": True, "false": False,
                                                       "null": None}[fuse] or \
                variant not in train_path.PATHS, variant
            if not dense:
                assert cfg.moe.shared_expert_impl == shared, variant
                assert (cfg.moe.experts_impl == "te_grouped") == ("te_experts" in variant)
            assert (cfg.precision.fp8 == "hybrid") == variant.endswith("_fp8"), variant
