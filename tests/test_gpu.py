"""GPU checks (marked `gpu`; run by scripts/gpu.sh on the GPU machine, skipped without CUDA).

The bf16 model on the GPU (SDPA flash kernels, compiled SwiGLU) against transformers in fp32
on the CPU with the same weights, and a few training steps that must reduce the loss.
"""

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("compiled", [False, True])
def test_gpu_forward_and_training_match_reference(compiled):
    import transformers

    from tests import common
    from xft_megatron.checkpoint.dist import gather_full_state_dict
    from xft_megatron.training.step import train_step
    from xft_megatron.transforms import hf_llama

    cfg = common.tiny_config("model.rope_scaling_factor=4.0", "model.init_std=0.2",
                             "precision.dtype=bf16", f"train.compile_layers={compiled}")
    chunks, _ = common.setup(cfg, ddp=False)
    model = chunks[0]
    assert next(model.parameters()).is_cuda
    sd = {k: v.float().cpu() for k, v in gather_full_state_dict(chunks).items()}
    hf_cfg = transformers.AutoConfig.for_model(**hf_llama.hf_config_dict(cfg.model))
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg).float().eval()
    hf.load_state_dict(dict(hf_llama.to_hf(sd, cfg.model)), strict=False)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 128))
    pos = torch.arange(128).unsqueeze(0).expand(2, -1)
    with torch.no_grad():
        ref = hf(ids).logits
        ref_bf16 = hf.bfloat16()(ids).logits.float()
        got = model(ids.cuda(), pos.cuda(), None).float().cpu()
    err = ((got - ref).norm() / ref.norm()).item()
    hf_err = ((ref_bf16 - ref).norm() / ref.norm()).item()
    assert err <= 1.5 * hf_err + 1e-3, (err, hf_err)

    chunks, _ = common.setup(cfg)
    opt, sched = common.optimizer_for(chunks, cfg)
    losses = [train_step(chunks, opt, sched, common.microbatches(cfg), cfg.train.seq_length)
              ["loss"] for _ in range(5)]
    assert losses[-1] < losses[0] - 0.05, losses
