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


@pytest.mark.parametrize("moe", [False, True])
def test_te_spec_matches_local_and_loads_its_checkpoints(tmp_path, moe):
    pytest.importorskip("transformer_engine.pytorch")
    from tests import common
    from xft_megatron.checkpoint import dist as ckpt
    from xft_megatron.training.step import forward_backward

    base = ["model.init_std=0.2", "train.compile_layers=false"] + (MOE if moe else [])
    cfg = common.tiny_config(*base)
    chunks, _ = common.setup(cfg, ddp=False)
    weights = str(tmp_path / "weights")
    ckpt.save(chunks, weights, 0, cfg)
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
    loss, ref = runs["fp32", "local", "false"]
    plain_loss, plain = runs["bf16", "local", "false"]
    for key in (("bf16", "te", "null"), ("bf16", "te", "false")):
        te_loss, grads = runs[key]
        assert abs(te_loss - loss) <= 1.5 * abs(plain_loss - loss) + 2e-3 * loss, \
            (key, te_loss, plain_loss, loss)
        _assert_as_close_as_bf16(grads, plain, ref)

    # saved under te, loaded under local (and back): the same tensors, bitwise
    te_cfg = common.tiny_config(*base, "precision.dtype=bf16", "model.spec=te")
    te_chunks, _ = common.setup(te_cfg, weights, ddp=False)
    saved = str(tmp_path / "te_saved")
    ckpt.save(te_chunks, saved, 0, te_cfg)
    want = {_canonical(n): p.detach().clone() for n, p in te_chunks[0].named_parameters()}
    for spec in ("local", "te"):
        cfg = common.tiny_config(*base, "precision.dtype=bf16", f"model.spec={spec}")
        chunks, _ = common.setup(cfg, saved, ddp=False)
        got = {_canonical(n): p.detach() for n, p in chunks[0].named_parameters()}
        assert set(got) == set(want), spec
        for n, w in want.items():
            assert torch.equal(got[n], w), (spec, n)
    assert ckpt.read_config(saved)["model"]["spec"] == "te"  # recorded, not inherited
    assert ckpt.load_config(saved).model.spec == "local"
