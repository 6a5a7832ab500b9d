"""Transformer Engine installed but not chosen. These tests run only where TE imports (CPU
included: `scripts/te_here.sh test`); elsewhere they are skipped, as the GPU tests are
without a GPU.

When TE is importable, Megatron-Core switches several of its own paths to TE: fused Adam and
its multi-tensor kernels, the placeholder weight gradient, `te_general_gemm`. The default local
spec must still train exactly as it does without TE. The same tiny XFT MoE trains 3 steps
(clipping active, distributed optimizer, then `grad_accum_fusion` too) in a process where TE
imports and in one where importing it is refused. The losses and gradient norms must be
identical (fp32 on the CPU: bitwise).
"""

import json
import os
import socket
import subprocess
import sys

import pytest

pytest.importorskip("transformer_engine.pytorch", reason="Transformer Engine is not installed")

CHILD = r"""
import importlib.abc, json, sys
if sys.argv[1] == "blocked":
    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("transformer_engine", "transformer_engine_torch", "apex"):
                raise ModuleNotFoundError(f"{name} is blocked for this test", name=name)
    sys.meta_path.insert(0, Refuse())
from tests import common
from xft_megatron.training.step import train_step
from megatron.core.tensor_parallel import layers
out = {"have_te": layers.HAVE_TE}
for fuse in ("false", "true"):
    cfg = common.tiny_config("moe.num_experts=4", "moe.topk=2", "moe.router_noise=false",
                             "train.clip_grad=0.05", f"precision.grad_accum_fusion={fuse}")
    chunks, _ = common.setup(cfg)
    opt, sched = common.optimizer_for(chunks, cfg)
    steps = [train_step(chunks, opt, sched, common.microbatches(cfg, i), cfg.train.seq_length,
                        cfg.train.clip_grad) for i in range(3)]
    out[fuse] = [[s["loss"], s["grad_norm"]] for s in steps]
print("RESULT " + json.dumps(out))
"""


def _run(mode):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", CHILD, mode], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(lines[0][len("RESULT "):])


def test_training_with_te_installed_equals_training_without():
    with_te, without = _run("importable"), _run("blocked")
    assert with_te["have_te"] and not without["have_te"]
    for fuse in ("false", "true"):
        assert with_te[fuse] == without[fuse], (fuse, with_te[fuse], without[fuse])
        assert all(norm > 0.05 for _, norm in with_te[fuse])  # clipping was active


def _layouts(rank, world, overrides):
    """{config: {spec: {checkpoint key: (kind, global shape, values held)}}} of this rank's
    models built under both layer specs: local on the meta device, te for real on the CPU
    (tiny), where TE's modules are told CUDA is there (they refuse to construct otherwise);
    nothing runs. The configs share one parallel layout (the first one's)."""
    import torch

    from tests import common
    from xft_megatron.model import builder
    from xft_megatron.runtime import parallel

    parallel.initialize(common.tiny_config(*next(iter(overrides.values()))).parallel)
    torch.cuda.is_available = lambda: True  # this process only: TE's constructors ask

    def layout(model):
        """{stored key: (kind, global shape, values this rank holds)}: a factory as what it
        stores (TE's experts: one chunk per expert of the grouped tensors)."""
        out = {}

        def add(v):
            if isinstance(v, (list, tuple, dict)):
                for b in v.values() if isinstance(v, dict) else v:
                    add(b)
                return
            if hasattr(v, "build"):
                add(v.build())
                return
            kind, shape = type(v).__name__, tuple(getattr(v, "global_shape", None) or
                                                  v.data.shape)
            held = v.data.numel() if kind == "ShardedTensor" else 1  # objects: count them
            if v.key in out:
                assert out[v.key][:2] == (kind, shape), (v.key, out[v.key], kind, shape)
                held += out[v.key][2]
            out[v.key] = (kind, shape, held)

        for v in model.sharded_state_dict().values():
            add(v)
        return out

    out = {}
    for name, extra in overrides.items():
        cfg = common.tiny_config(*extra)
        (local,) = builder.build_model(cfg, meta=True)
        te = builder._gpt_model(cfg, builder.transformer_config(cfg), 0, cfg.model.num_layers,
                                True, True, None, "te")
        assert any(n.endswith("linear_qkv.layer_norm_weight")
                   for n, _ in te.named_parameters()), name  # TE's fused norm is in use
        assert te.config.fp8 == (None if cfg.precision.fp8 == "none" else cfg.precision.fp8)
        grouped = [n for n, _ in te.named_parameters() if ".experts.linear_fc1.weight" in n]
        assert bool(grouped) == (cfg.moe.experts_impl == "te_grouped"), name
        out[name] = {"local": layout(local), "te": layout(te)}
    return out


def test_the_te_spec_writes_checkpoints_in_the_same_names_and_shapes():
    """model.spec=te fuses the norms into TE's linears (`layer_norm_weight`); its checkpoints
    still hold this project's names (arch/names.py), with the same shapes and the same stored
    objects, so either spec loads what the other saved and conversion, upcycling, the merge
    and resharding are unchanged. Dense, MoE every other layer, the merge stage, Qwen3's q/k
    norms with tied embeddings, and MoE under FP8."""
    from tests.harness import run_ranks
    from xft_megatron.arch import names

    configs = {
        "dense": [],
        "moe": ["moe.num_experts=4", "moe.topk=2", "moe.layer_freq=2"],
        "merge": ["moe.num_experts=4", "moe.topk=2", "moe.layer_freq=2", "train.stage=merge"],
        "qwen3_tied": ["model.qk_norm=true", "model.tie_embeddings=true"],
        # FP8 changes how TE's GEMMs compute, not what is stored
        "moe_fp8": ["moe.num_experts=4", "moe.topk=2", "moe.layer_freq=2", "model.spec=te",
                    "precision.dtype=bf16", "precision.fp8=hybrid"],
        # TE's grouped linears for the experts, stored as this project's grouped experts
        "moe_te_experts": ["moe.num_experts=4", "moe.topk=2", "moe.layer_freq=2",
                           "model.spec=te", "moe.experts_impl=te_grouped"],
    }
    got = run_ranks(1, _layouts, configs)[0]
    for name, specs in got.items():
        local, te = specs["local"], specs["te"]
        assert local == te, (name, sorted(set(local) ^ set(te)),
                             {k: (local.get(k), te.get(k)) for k in local if te.get(k) !=
                              local.get(k)})
        keys = set(local)
        assert any(names.ATTN_NORM in k for k in keys) and any(names.MLP_NORM in k for k in keys)
        assert not any("layer_norm_weight" in k for k in keys), name


def test_te_experts_store_this_rank_s_experts_where_the_grouped_ones_do():
    """moe.experts_impl=te_grouped under expert and expert tensor parallelism (2 ranks):
    each rank's chunks of the stored grouped tensors have the names, global shapes and sizes
    this project's grouped experts give them, so checkpoints reshard across both."""
    from tests.harness import run_ranks

    moe = ["moe.num_experts=4", "moe.topk=2", "model.spec=te", "moe.experts_impl=te_grouped"]
    for layout in (["parallel.expert=2"], ["parallel.expert_tensor=2"]):
        for rank, specs in enumerate(run_ranks(2, _layouts, {"l": moe + layout})):
            local, te = specs["l"]["local"], specs["l"]["te"]
            assert local == te, (layout, rank, {k: (local.get(k), te.get(k)) for k in local
                                                if te.get(k) != local.get(k)})
            fc1 = next(v for k, v in te.items() if k.endswith("experts.fc1_weight"))
            assert fc1[1] == (4, 2, 176, 64) and fc1[2] == 2 * 176 * 64 * 4 // 2, fc1


def _te_experts_round_trip(rank, world, folder, layout):
    """Save a TE-experts model (built on the CPU, TE told CUDA is there) and load it into
    this project's grouped experts, and back: every expert's weights where they belong,
    bitwise."""
    import torch

    from tests import common
    from xft_megatron.checkpoint import dist as ckpt
    from xft_megatron.model import builder
    from xft_megatron.model.moe.divergence import local_expert_vectors
    from xft_megatron.runtime import parallel

    cfg = common.tiny_config("moe.num_experts=4", "moe.topk=2", "model.spec=te",
                             "moe.experts_impl=te_grouped", *layout)
    parallel.initialize(cfg.parallel)
    (local,) = builder.build_model(cfg, spec="local")
    real = torch.cuda.is_available
    torch.cuda.is_available = lambda: True
    te = builder._gpt_model(cfg, builder.transformer_config(cfg), 0, cfg.model.num_layers,
                            True, True, None, "te")
    torch.cuda.is_available = real
    with torch.no_grad():  # values that differ per tensor, expert, gate/up half and rank
        for i, p in enumerate(te.parameters()):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(
                1000 * rank + i)))
    ckpt.save([te], folder + "/te", 0, cfg)
    ckpt.load([local], folder + "/te")

    def experts(model):
        return [m for n, m in model.named_modules() if n.endswith("mlp.experts")]

    checked = 0
    for grouped, ours in zip(experts(te), experts(local)):
        for i in range(grouped.num_local_experts):
            fc1, fc2 = grouped.local_expert_weights(i)
            assert torch.equal(ours.fc1_weight[i], fc1) and torch.equal(ours.fc2_weight[i], fc2)
            checked += 1
    # and back: the grouped experts' checkpoint into TE's experts
    with torch.no_grad():
        for m in experts(local):
            m.fc1_weight.mul_(-2)
            m.fc2_weight.add_(1)
    ckpt.save([local], folder + "/local", 0, cfg)
    ckpt.load([te], folder + "/local")
    for grouped, ours in zip(experts(te), experts(local)):
        for i in range(grouped.num_local_experts):
            fc1, fc2 = grouped.local_expert_weights(i)
            assert torch.equal(ours.fc1_weight[i], fc1) and torch.equal(ours.fc2_weight[i], fc2)
        # the expert divergence (routing diagnostics) reads either module the same
        assert torch.equal(local_expert_vectors(grouped), local_expert_vectors(ours))
    return checked


@pytest.mark.parametrize("layout", [[], ["parallel.expert=2"], ["parallel.expert_tensor=2"]])
def test_te_experts_checkpoints_load_into_the_grouped_experts(tmp_path, layout):
    from tests.harness import run_ranks

    world = 1 if not layout else 2
    checked = run_ranks(world, _te_experts_round_trip, str(tmp_path / "ckpt"), layout)
    assert all(c == (4 // (2 if "parallel.expert=2" in layout else 1)) * 4 for c in checked)
