"""FLOPs per token for MFU, against arithmetic written out for the deepseek-coder-1.3b shape."""

from xft_megatron.config import load_config
from xft_megatron.training.flops import flops_per_token, matmul_params


def test_flops_per_token_dense_moe_and_merge_stage():
    cfg = load_config(None, ["model.preset=deepseek-coder-1.3b"])
    m = cfg.model
    h, f, L, v = 2048, 5504, 24, 32256
    assert (m.hidden_size, m.ffn_hidden_size, m.num_layers, m.vocab_size) == (h, f, L, v)
    dense = L * (4 * h * h + 3 * h * f) + v * h  # MHA (16 KV groups = heads), SwiGLU, output
    assert matmul_params(m) == dense
    assert flops_per_token(m, 1024) == 6 * dense + 6 * L * h * 1024
    moe = load_config(None, ["model.preset=deepseek-coder-1.3b", "moe.num_experts=8",
                             "moe.topk=6"]).moe
    router = 7 * h + 7 * 7 + 7 * h  # mlp gate (h->7, 7->7) and the noise projection
    assert matmul_params(m, moe) == dense + L * (5 * 3 * h * f + router)
    merge = load_config(None, ["model.preset=deepseek-coder-1.3b", "moe.num_experts=8",
                               "moe.topk=6", "train.stage=merge"])
    assert merge.stage == "merge"
    assert matmul_params(m, merge.moe, merge=True) == dense  # one merged FFN per layer, no router
