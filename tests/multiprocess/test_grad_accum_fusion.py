"""precision.grad_accum_fusion on CPU/gloo: weight gradients accumulated straight into DDP's
buffer by the GEMM (Megatron's linear layers through the apex stand-in, our experts through
their own backward) equal the unfused gradients, and the fused path is the one that ran.

- The kernel: `accumulate_wgrad` with bf16 operands and an fp32 buffer adds the exact product
  (fp64 reference, 1e-6 relative), where rounding the product to bf16 first (the unfused
  order) is off by about 1e-3.
- One process, an XFT MoE (grouped experts, mlp gate with noise, tied embeddings: Megatron
  zeroes the tied weight's placeholder) in fp32: every Megatron linear and experts module is
  switched, each trainable weight is marked `grad_added_to_main_grad` after backward, and the
  main_grad buffers equal the unfused ones (1e-6 relative per tensor); two microbatches,
  so the accumulation across microbatches is covered. In bf16: to bf16 tolerance.
- Modules inside torch.compile'd regions are left unfused (the fused backward would split the
  compiled graph at every linear layer).
- The stand-in sits in Megatron's layers module while the parallel state is up, and is gone
  after shutdown. The same kernel under every parallel layout is P5 (test_moe_parity).
"""

import torch

from tests import common
from tests.harness import run_ranks

MOE = ["moe.num_experts=4", "moe.topk=2", "moe.experts_impl=grouped",
       "model.tie_embeddings=true"]


def _grads(dtype, fuse):
    from megatron.core.tensor_parallel import layers

    from xft_megatron.runtime import parallel
    from xft_megatron.training.step import forward_backward

    cfg = common.tiny_config(*MOE, f"precision.dtype={dtype}",
                             f"precision.grad_accum_fusion={str(fuse).lower()}")
    chunks, _ = common.setup(cfg, distributed_optimizer=False)
    module = chunks[0].module
    switched = sum(getattr(m, "gradient_accumulation_fusion", False) for m in module.modules())
    torch.manual_seed(5)  # the router noise draws
    loss = forward_backward(chunks, common.microbatches(cfg), cfg.train.seq_length)
    marked = {n: bool(p.grad_added_to_main_grad) for n, p in module.named_parameters()
              if p.dim() >= 2}
    grads = {n: p.main_grad.clone().double() for n, p in module.named_parameters()}
    standin = getattr(getattr(layers, "fused_weight_gradient_mlp_cuda", None), "__name__", None)
    parallel.shutdown()
    return dict(loss=loss, switched=switched, marked=marked, grads=grads, standin=standin)


def _switched_with_compiled_attention():
    """Names of the modules switched when each layer's attention is torch.compile'd (the
    MoE layers' `train.compile_layers` regions; the eager backend needs no compiler)."""
    from xft_megatron.model.builder import build_model, transformer_config
    from xft_megatron.runtime import parallel
    from xft_megatron.training.optimizer import wrap_ddp

    cfg = common.tiny_config(*MOE, "precision.grad_accum_fusion=true")
    parallel.initialize(cfg.parallel, seed=7)
    tc = transformer_config(cfg)
    chunks = build_model(cfg, tc)
    for layer in chunks[0].decoder.layers:
        layer.self_attention.compile(backend="eager")
    chunks = wrap_ddp(chunks, tc, cfg.precision, distributed_optimizer=False)
    names = [n for n, m in chunks[0].module.named_modules()
             if getattr(m, "gradient_accumulation_fusion", False)]
    parallel.shutdown()
    return names


def _body(rank, world):
    from megatron.core.tensor_parallel import layers

    from xft_megatron.runtime.compat.kernels import accumulate_wgrad

    out = {}
    # the kernel alone
    g = torch.Generator().manual_seed(0)
    dy = torch.randn(300, 48, generator=g).bfloat16()
    x = torch.randn(300, 40, generator=g).bfloat16()
    base = torch.randn(48, 40, generator=g)
    exact = base.double() + dy.double().t() @ x.double()
    fused = base.clone()
    accumulate_wgrad(fused, dy, x)
    rounded = base + (dy.t() @ x).float()
    scale = exact.abs().max().item()
    out["kernel"] = ((fused.double() - exact).abs().max().item() / scale,
                     (rounded.double() - exact).abs().max().item() / scale)
    for dtype in ("fp32", "bf16"):
        out[dtype] = {"plain": _grads(dtype, False), "fused": _grads(dtype, True)}
    out["compiled"] = _switched_with_compiled_attention()
    out["after_shutdown"] = hasattr(layers, "fused_weight_gradient_mlp_cuda")
    return out


def test_fused_weight_gradients_equal_unfused():
    out = run_ranks(1, _body)[0]
    fused_err, rounded_err = out["kernel"]
    assert fused_err <= 1e-6 < 1e-4 <= rounded_err, out["kernel"]
    for dtype, tol in (("fp32", 1e-6), ("bf16", 2e-2)):
        plain, fused = out[dtype]["plain"], out[dtype]["fused"]
        assert plain["switched"] == 0
        # per layer: qkv, proj (attention), experts, and fc1/fc2 of the dense layers if any;
        # plus the output layer (tied: it uses the embedding's weight)
        assert fused["switched"] >= 3 * 2 + 1, fused["switched"]
        assert fused["standin"] == "ApexWgradStandIn", fused["standin"]
        # every weight but the router's (plain autograd) had its gradient fused
        for n, marked in fused["marked"].items():
            assert marked == (".router." not in n), (n, fused["marked"])
        assert not any(plain["marked"].values())
        assert abs(fused["loss"] - plain["loss"]) <= 1e-6 * plain["loss"], dtype
        for n, ref in plain["grads"].items():
            got = fused["grads"][n]
            err = (got - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)
            assert ref.abs().max() > 0, n
            assert err <= tol, (dtype, n, err)
    # compiled regions keep the unfused backward (it would split their graph): only the
    # experts and the output layer are switched
    names = out["compiled"]
    assert not any("self_attention" in n for n in names), names
    assert "output_layer" in names and sum(n.endswith("mlp.experts") for n in names) >= 2, names
    assert not out["after_shutdown"], "the apex stand-in outlived parallel.shutdown"
