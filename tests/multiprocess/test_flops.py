"""Parameter and FLOP counts (`arch/counts.py`): against arithmetic written out for the
deepseek-coder-1.3b shape, against the parameters of the models Megatron builds (every
family's attention, MoE layers), and read alike by its three consumers (`ModelConfig`,
the memory estimate, MFU)."""

from tests.harness import run_ranks
from xft_megatron.arch import counts
from xft_megatron.config import load_config
from xft_megatron.training import flops, memory
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


# name -> config overrides: each family's attention (QKV bias, q/k norms with a head width
# of its own), tied and untied embeddings, MoE layers with either router gate
CASES = {
    "llama_tiny": ["model.preset=tiny"],
    "qwen2_0.5b": ["model.preset=qwen2-0.5b"],
    "qwen3_0.6b": ["model.preset=qwen3-0.6b"],
    "qwen3_head_dim_untied": ["model.preset=tiny", "model.family=qwen3", "model.head_dim=32"],
    "moe_mlp_noise_every2": ["model.preset=tiny", "moe.num_experts=8", "moe.topk=4",
                             "moe.layer_freq=2"],
    "moe_linear_qwen3": ["model.preset=qwen3-0.6b", "moe.num_experts=4", "moe.topk=2",
                         "moe.router_gate=linear", "moe.router_noise=false"],
}


def _config(name):
    return load_config(None, CASES[name] + ["train.seq_length=32"])


def _built(rank, world):
    """Per case: (all parameters, expert parameters, parameters in matrix products) of the
    one-rank model built on the meta device (no memory, no initialization)."""
    from xft_megatron.config import ParallelConfig
    from xft_megatron.model.builder import build_model
    from xft_megatron.runtime import parallel

    parallel.initialize(ParallelConfig())
    out = {}
    for name in CASES:
        cfg = _config(name)
        (model,) = build_model(cfg, meta=True)
        params = dict(model.named_parameters())
        matmul = sum(p.numel() for k, p in params.items()
                     if p.dim() >= 2 and "word_embeddings" not in k)
        if cfg.model.tie_embeddings:  # the output layer multiplies by the embedding matrix
            matmul += cfg.model.vocab_size * cfg.model.hidden_size
        out[name] = (sum(p.numel() for p in params.values()),
                     sum(p.numel() for k, p in params.items() if ".experts." in k), matmul)
    return out


def test_one_counter_read_by_config_memory_and_flops_equals_the_built_models():
    built = run_ranks(1, _built)[0]
    for name, (n_all, n_experts, n_matmul) in built.items():
        cfg = _config(name)
        m, moe = cfg.model, cfg.moe
        want = counts.parameter_counts(m, moe)
        assert (n_all, n_experts) == (want["total"], want["expert"]), (name, built[name], want)
        assert m.num_parameters() == counts.dense_parameters(m), name
        assert m.embedding_parameters() == counts.embedding_parameters(m), name
        assert memory.parameter_counts(m, moe) == want, name
        assert memory.estimate(cfg, 1).weights == 4 * want["total"], name  # fp32, one rank
        assert flops.matmul_params(m, moe) == counts.matmul_parameters(m, moe), name
        assert flops.flops_per_token(m, 32, moe) == counts.flops_per_token(m, 32, moe), name
        if not moe.enabled:  # dense: every matrix is used by every token
            assert n_matmul == counts.matmul_parameters(m), (name, n_matmul)
            assert want["total"] == want["active"] == m.num_parameters(), name
        else:
            assert want["total"] > want["active"] > m.num_parameters(), (name, want)
    q3 = _config("qwen3_head_dim_untied").model  # 4 heads of 32 over a 64-wide stream
    assert counts.flops_per_token(q3, 32) == 6 * counts.matmul_parameters(q3) + 6 * 4 * 128 * 32


def _checkpoint_names(rank, world):
    """Per case (and the merge stage of an MoE): the single-rank names of every tensor its
    checkpoint holds, each with its torch_dist keys."""
    from xft_megatron.checkpoint import stream

    stream.initialize_single_rank_layout()
    cases = {name: _config(name) for name in CASES}
    cases["merge_stage"] = load_config(None, CASES["moe_mlp_noise_every2"] +
                                       ["train.stage=merge"])
    return {case: {name: sorted({part.key for part in p.parts})
                   for name, p in stream.layout_of(cfg).params.items()}
            for case, cfg in cases.items()}


def test_every_checkpoint_tensor_is_named_in_model_names():
    """arch/names.py names every tensor the checkpoints hold, for every family, MoE layer
    and the merge stage: the HF maps, upcycling and the merge read names only from there.
    Single-rank names are `layer(i) + ROLE`; Megatron stores them under that key, or the
    layers stacked under `LAYERS + ROLE` (blocks whose layers are all alike)."""
    from xft_megatron.arch import names

    in_layer = [names.ATTN_NORM, names.QKV, names.QKV_BIAS, names.Q_NORM, names.K_NORM,
                names.PROJ, names.MLP_NORM, names.FC1, names.FC2, names.EXPERT_FC1,
                names.EXPERT_FC2, names.ALPHA] + [
        names.ROUTER + r for r in ("weight", "weight1", "weight2", "noise_weight")]
    outer = {names.EMBEDDING, names.FINAL_NORM, names.OUTPUT}
    seen = set()
    for case, tensors in run_ranks(1, _checkpoint_names)[0].items():
        for name, keys in tensors.items():
            layer = names.layer_of(name)
            if layer is None:
                assert name in outer and keys == [name], (case, name, keys)
                seen.add(name)
                continue
            role = name[len(names.layer(layer)):]
            assert name == names.layer(layer) + role and role in in_layer, (case, name)
            assert keys in ([names.LAYERS + role], [name]), (case, name, keys)
            seen.add(role)
    assert seen == set(in_layer) | outer, (set(in_layer) | outer) - seen  # all of them used
