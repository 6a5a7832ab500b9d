"""model.spec=te on the GPU (marked `gpu`; skipped without CUDA or Transformer Engine).

The TE layer spec against the local one from one checkpoint: gradients as close to the fp32
local model's as the bf16 local model's are, with TE's weight-gradient accumulation into the
fp32 buffer on (the default under te) and off; and a checkpoint saved under one spec loads
under the other with the same tensors, bitwise.
"""

import pytest
import torch

from tests.gpu.test_gpu import _assert_as_close_as_bf16

pytestmark = pytest.mark.gpu

MOE = ["moe.num_experts=8", "moe.topk=6", "moe.router_noise=false", "moe.layer_freq=2"]


def _canonical(name: str) -> str:
    """A parameter's name as the checkpoint names it (model/spec.TE_CHECKPOINT_NAMES)."""
    from xft_megatron.model.spec import TE_CHECKPOINT_NAMES

    for module_prefix, stored in TE_CHECKPOINT_NAMES.items():
        name = name.replace("." + module_prefix, "." + stored)
    return name


def _assert_run_as_close_as_bf16(run, plain, ref):
    """(loss, gradients) of a bf16 path against the fp32 reference's: the loss within 1.5x the
    plain bf16 path's error (+0.2%), the gradients as `_assert_as_close_as_bf16` says."""
    (loss, grads), (plain_loss, plain_grads), (ref_loss, ref_grads) = run, plain, ref
    assert abs(loss - ref_loss) <= 1.5 * abs(plain_loss - ref_loss) + 2e-3 * ref_loss, \
        (loss, plain_loss, ref_loss)
    _assert_as_close_as_bf16(grads, plain_grads, ref_grads)


def _assert_within_fp8(fp8_run, bf16_run):
    """(loss, gradients) of an FP8 run within FP8's rounding of the same bf16 run (E4M3 carries
    3 mantissa bits, E5M2 2: a few per cent per GEMM): the loss within 2%, every tensor's
    gradient within 30%."""
    (fp8_loss, fp8), (loss, bf16) = fp8_run, bf16_run
    assert abs(fp8_loss - loss) <= 0.02 * loss, (fp8_loss, loss)
    assert set(fp8) == set(bf16)
    for n, g in bf16.items():
        assert (fp8[n] - g).norm() <= 0.3 * g.norm() + 1e-6, n


def _assert_loads_bitwise(saved, want, configs):
    """Each config loads checkpoint `saved` into exactly the parameters `want` (by stored
    name), bitwise."""
    from tests import common

    for cfg in configs:
        chunks, _ = common.setup(cfg, saved, ddp=False)
        got = {_canonical(n): p.detach() for n, p in chunks[0].named_parameters()}
        assert set(got) == set(want), cfg.model.spec
        for n, w in want.items():
            assert torch.equal(got[n], w), (cfg.model.spec, cfg.precision.fp8, n)


@pytest.mark.parametrize("moe", [False, True])
def test_te_spec_matches_local_and_loads_its_checkpoints(tmp_path, moe):
    pytest.importorskip("transformer_engine.pytorch")
    from tests import common
    from xft_megatron.checkpoint import dist as ckpt
    from xft_megatron.training.step import forward_backward

    base = ["model.init_std=0.2", "train.compile_layers=false"] + (MOE if moe else [])
    weights = common.initial_weights(common.tiny_config(*base), str(tmp_path / "weights"))
    runs = {}
    for dtype, spec, fuse in (("fp32", "local", "false"), ("bf16", "local", "false"),
                              ("bf16", "te", "null"), ("bf16", "te", "false")):
        cfg = common.tiny_config(*base, f"precision.dtype={dtype}", f"model.spec={spec}",
                                 f"precision.grad_accum_fusion={fuse}")
        chunks, _ = common.setup(cfg, weights, distributed_optimizer=False)
        loss = forward_backward(chunks, common.microbatches(cfg), cfg.train.seq_length)
        module = chunks[0].module
        runs[dtype, spec, fuse] = loss, {_canonical(n): p.main_grad.float().clone()
                                         for n, p in module.named_parameters()}
        if spec == "te":
            fused = [m for m in module.modules() if getattr(m, "fuse_wgrad_accumulation", 0)]
            assert bool(fused) == (fuse == "null"), fuse
    for key in (("bf16", "te", "null"), ("bf16", "te", "false")):
        _assert_run_as_close_as_bf16(runs[key], runs["bf16", "local", "false"],
                                     runs["fp32", "local", "false"])

    # saved under te, loaded under local (and back): the same tensors, bitwise
    te_cfg = common.tiny_config(*base, "precision.dtype=bf16", "model.spec=te")
    te_chunks, _ = common.setup(te_cfg, weights, ddp=False)
    saved = str(tmp_path / "te_saved")
    ckpt.save(te_chunks, saved, 0, te_cfg)
    want = {_canonical(n): p.detach().clone() for n, p in te_chunks[0].named_parameters()}
    _assert_loads_bitwise(saved, want, [common.tiny_config(*base, "precision.dtype=bf16",
                                                           f"model.spec={spec}")
                                        for spec in ("local", "te")])
    assert ckpt.read_config(saved)["model"]["spec"] == "te"  # recorded, not inherited
    assert ckpt.load_config(saved).model.spec == "local"


@pytest.mark.parametrize("moe", [False, True])
def test_fp8_runs_te_linears_in_fp8_close_to_bf16_and_stores_nothing_fp8(tmp_path, moe):
    """precision.fp8=hybrid (tensorwise scaling) from one checkpoint against the same TE model
    in bf16: TE's linears run under FP8 autocast (and only with fp8 on), the loss and the
    weight gradients stay within FP8's rounding (E4M3 carries 3 mantissa bits, E5M2 2: a few
    per cent per GEMM), and a checkpoint saved under FP8 holds the same parameters with no FP8
    state, so local and bf16 runs load it bitwise."""
    pytest.importorskip("transformer_engine.pytorch")
    from transformer_engine.pytorch import fp8 as te_fp8

    supported, why = te_fp8.check_fp8_support()
    if not supported:
        pytest.skip(f"this GPU has no FP8 GEMMs: {why}")
    from tests import common
    from xft_megatron.checkpoint import dist as ckpt
    from xft_megatron.training.step import forward_backward

    base = ["model.init_std=0.2", "train.compile_layers=false", "precision.dtype=bf16",
            "model.spec=te"] + (MOE if moe else [])
    weights = common.initial_weights(common.tiny_config(*base), str(tmp_path / "weights"))
    runs = {}
    for fp8 in ("none", "hybrid"):
        cfg = common.tiny_config(*base, f"precision.fp8={fp8}")
        chunks, _ = common.setup(cfg, weights, distributed_optimizer=False)
        module = chunks[0].module
        seen = []
        linears = [m for n, m in module.named_modules() if n.endswith("linear_qkv")]
        hooks = [m.register_forward_hook(
            lambda *_: seen.append(te_fp8.FP8GlobalStateManager.is_fp8_enabled()))
            for m in linears]
        loss = forward_backward(chunks, common.microbatches(cfg), cfg.train.seq_length)
        for h in hooks:
            h.remove()
        assert seen and all(s == (fp8 != "none") for s in seen), (fp8, seen)
        runs[fp8] = loss, {n: p.main_grad.float().clone() for n, p in module.named_parameters()}
        if fp8 == "hybrid":
            saved = str(tmp_path / "fp8_saved")
            ckpt.save(chunks, saved, 0, cfg)
            want = {_canonical(n): p.detach().clone() for n, p in module.named_parameters()}
            states = [m.get_extra_state() for m in module.modules()
                      if hasattr(m, "fp8_meta")]
            assert states and all(s.numel() == 0 for s in states)  # tensorwise: stateless
    _assert_within_fp8(runs["hybrid"], runs["none"])  # every tensor, and all of them:
    bf16, fp8 = runs["none"][1], runs["hybrid"][1]
    flat = torch.cat([g.flatten() for g in bf16.values()])
    flat8 = torch.cat([fp8[n].flatten() for n in bf16])
    assert (flat8 - flat).norm() <= 0.15 * flat.norm(), ((flat8 - flat).norm(), flat.norm())
    assert torch.nn.functional.cosine_similarity(flat8, flat, dim=0) >= 0.98

    _assert_loads_bitwise(saved, want, [common.tiny_config(*base, f"model.spec={spec}",
                                                           f"precision.fp8={fp8}")
                                        for spec, fp8 in (("local", "none"), ("te", "none"),
                                                          ("te", "hybrid"))])


def _grads_by_expert(module):
    """main_grad of every parameter, the experts' split per expert in this project's shapes
    (fc1 [2, F, H], fc2 [H, F]) whichever module holds them, other names as stored."""
    out = {}
    for name, m in module.named_modules():
        if hasattr(m, "local_expert_weights"):  # TE's grouped linears
            for i in range(m.num_local_experts):
                fc1 = getattr(m.linear_fc1, f"weight{i}").main_grad.float()
                out[f"{name}.fc1.{i}"] = fc1.view(2, -1, fc1.shape[1]).clone()
                out[f"{name}.fc2.{i}"] = getattr(m.linear_fc2, f"weight{i}").main_grad.float()
        elif hasattr(m, "fc1_weight"):  # ours
            for i in range(m.fc1_weight.shape[0]):
                out[f"{name}.fc1.{i}"] = m.fc1_weight.main_grad[i].float().clone()
                out[f"{name}.fc2.{i}"] = m.fc2_weight.main_grad[i].float().clone()
    out.update({_canonical(n): p.main_grad.float().clone()
                for n, p in module.named_parameters() if ".experts." not in n})
    return out


def test_te_experts_match_the_grouped_experts_and_run_in_fp8(tmp_path):
    """moe.experts_impl=te_grouped (TE's grouped linears) from one checkpoint against this
    project's grouped experts: gradients as close to the fp32 local model's as the bf16 local
    model's are, expert by expert; with precision.fp8=hybrid the experts' GEMMs run in FP8
    too, within FP8's rounding of the bf16 run (as the dense parts are held to above)."""
    pytest.importorskip("transformer_engine.pytorch")
    from transformer_engine.pytorch import fp8 as te_fp8

    from tests import common
    from xft_megatron.training.step import forward_backward

    base = ["model.init_std=0.2", "train.compile_layers=false"] + MOE
    weights = common.initial_weights(common.tiny_config(*base), str(tmp_path / "weights"))
    fp8_ok = te_fp8.check_fp8_support()[0]
    runs = {}
    for key in (("fp32", "local", "grouped", "none"), ("bf16", "local", "grouped", "none"),
                ("bf16", "te", "te_grouped", "none")) + \
            ((("bf16", "te", "te_grouped", "hybrid"),) if fp8_ok else ()):
        dtype, spec, impl, fp8 = key
        cfg = common.tiny_config(*base, f"precision.dtype={dtype}", f"model.spec={spec}",
                                 f"moe.experts_impl={impl}", f"precision.fp8={fp8}")
        chunks, _ = common.setup(cfg, weights, distributed_optimizer=False)
        loss = forward_backward(chunks, common.microbatches(cfg), cfg.train.seq_length)
        module = chunks[0].module
        assert any(hasattr(m, "local_expert_weights") for m in module.modules()) == \
            (impl == "te_grouped")
        runs[key] = loss, _grads_by_expert(module)
    te = runs[("bf16", "te", "te_grouped", "none")]
    _assert_run_as_close_as_bf16(te, runs[("bf16", "local", "grouped", "none")],
                                 runs[("fp32", "local", "grouped", "none")])
    if fp8_ok:
        _assert_within_fp8(runs[("bf16", "te", "te_grouped", "hybrid")], te)
