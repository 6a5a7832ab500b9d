"""Streaming torch_dist checkpoints (`checkpoint/stream.py`): what `write` produces is the
checkpoint a single-rank Megatron save writes (same keys, global shapes, dtypes, chunks and
objects) and Megatron loads it back bitwise; `Reader` returns the saved values; each layer
group is built once, by exactly one rank; a checkpoint of another model is refused."""

import os

import torch

from tests.harness import run_ranks

CASES = {
    "dense": [],
    "dense_bf16_tied_bias": ["model.tie_embeddings=true", "model.qkv_bias=true",
                             "precision.dtype=bf16"],
    "moe_mlp_gate": ["moe.num_experts=4", "moe.topk=3", "moe.layer_freq=2"],
    "merge_stage": ["moe.num_experts=4", "moe.topk=3", "train.stage=merge"],
}


def _metadata(folder):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = FileSystemReader(folder).read_metadata().state_dict_metadata
    out = {}
    for key, entry in md.items():
        if isinstance(entry, TensorStorageMetadata):
            out[key] = (tuple(entry.size), entry.properties.dtype,
                        sorted((tuple(c.offsets), tuple(c.sizes)) for c in entry.chunks))
        else:
            out[key] = "object"
    return out


def _structure_body(rank, world, root):
    from tests import common
    from xft_megatron.checkpoint import dist as ckpt
    from xft_megatron.checkpoint import stream

    out = {}
    for name, overrides in CASES.items():
        cfg = common.tiny_config(*overrides)
        chunks, _ = common.setup(cfg, ddp=False)
        common.perturb_norms(chunks)
        state = {k: v.clone() for k, v in ckpt.local_state_dict(chunks).items()}
        megatron = ckpt.save(chunks, os.path.join(root, name, "megatron"), 0, cfg)
        stream.initialize_single_rank_layout()
        layout = stream.layout_of(cfg)
        builds = []

        def group(g, layout=layout, state=state, builds=builds):
            builds.append(g)
            return {n: state[n] for n in layout.groups()[g]}

        streamed = ckpt.save_streamed(
            lambda f, layout=layout, group=group: stream.write(f, layout,
                                                               stream.GroupCache(group)),
            os.path.join(root, name, "stream"), 0, cfg)
        read = stream.Reader(streamed, layout).read(list(layout.params))
        read_megatron = stream.Reader(megatron, layout).read(list(layout.params))
        fresh, _ = common.setup(cfg, streamed, ddp=False, seed=99)
        loaded = ckpt.local_state_dict(fresh)
        same = lambda a, b: set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)  # noqa
        out[name] = dict(metadata_equal=_metadata(megatron) == _metadata(streamed),
                         keys=len(_metadata(streamed)),
                         reader_streamed=same(read, state), reader_megatron=same(read_megatron, state),
                         megatron_load=same(loaded, state),
                         builds_once=sorted(map(str, builds)) == sorted(map(str, layout.groups())),
                         files=len([f for f in os.listdir(streamed) if f.endswith(".distcp")]))
    try:  # a checkpoint of another model (different FFN width) is refused up front
        other = stream.layout_of(common.tiny_config("model.ffn_hidden_size=128"))
        stream.Reader(os.path.join(root, "dense", "stream"), other)
        out["refusal"] = None
    except ckpt.CheckpointError as e:
        out["refusal"] = str(e)
    return out


def test_streamed_checkpoint_is_what_megatron_writes(tmp_path):
    r = run_ranks(1, _structure_body, str(tmp_path))[0]
    for name in CASES:
        x = r[name]
        assert x["metadata_equal"] and x["keys"] > 10, (name, x)
        assert x["reader_streamed"] and x["reader_megatron"] and x["megatron_load"], (name, x)
        assert x["builds_once"], (name, x)
        assert x["files"] > 10, (name, x)  # one file per chunk: nothing is held for a file
    assert "does not hold the model" in r["refusal"] and "linear_fc1" in r["refusal"], r


def _spread_body(rank, world, root):
    """Two ranks write one checkpoint: each group is built by exactly one rank, and the
    result equals the single-process state."""
    from tests import common
    from xft_megatron.checkpoint import dist as ckpt
    from xft_megatron.checkpoint import stream

    cfg = common.tiny_config("moe.num_experts=4", "moe.topk=3")
    torch.manual_seed(0)
    stream.initialize_single_rank_layout()
    layout = stream.layout_of(cfg)
    g = torch.Generator().manual_seed(1)
    state = {n: torch.randn(p.shape, generator=g) for n, p in layout.params.items()}
    builds = []

    def group(grp):
        builds.append(str(grp))
        return {n: state[n] for n in layout.groups()[grp]}

    path = ckpt.save_streamed(lambda f: stream.write(f, layout, stream.GroupCache(group)),
                              os.path.join(root, "spread"), 0, cfg)
    read = stream.Reader(path, layout).read(list(layout.params))
    return dict(builds=builds, groups=sorted(map(str, layout.groups())),
                equal=all(torch.equal(read[n], state[n]) for n in state))


def test_groups_are_spread_over_ranks(tmp_path):
    a, b = run_ranks(2, _spread_body, str(tmp_path))
    assert a["equal"] and b["equal"]
    assert a["builds"] and b["builds"], "both ranks must write"
    assert not set(a["builds"]) & set(b["builds"])
    assert sorted(a["builds"] + b["builds"]) == a["groups"]


def test_group_cache_prefetch_builds_each_group_once_ahead_of_use():
    """With prefetch and a plan, group i+1 is built on the background thread while group i is
    used; every group once, values unchanged; asking out of plan order still answers right."""
    import threading
    import time

    from xft_megatron.checkpoint.stream import GroupCache

    calls = []

    def build(g):
        calls.append((g, threading.current_thread().name))
        time.sleep(0.02)
        return {f"decoder.layers.{g}.w": torch.full((2,), float(g)),
                f"decoder.layers.{g}.b": torch.full((1,), -float(g))}

    cache = GroupCache(build, prefetch=True)
    cache.plan([0, 1, 2, 3])
    try:
        for g in range(4):
            assert cache(f"decoder.layers.{g}.w").tolist() == [float(g)] * 2
            assert cache(f"decoder.layers.{g}.b").tolist() == [-float(g)]
        assert [g for g, _ in calls] == [0, 1, 2, 3]
        assert calls[0][1] == threading.main_thread().name
        assert all(name.startswith("prefetch") for _, name in calls[1:]), calls
        calls.clear()
        cache.plan([5, 6, 7])
        assert cache("decoder.layers.5.w").tolist() == [5.0, 5.0]  # 6 is now built ahead
        assert cache("decoder.layers.7.w").tolist() == [7.0, 7.0]  # but 7 comes first
        assert sorted(g for g, _ in calls) == [5, 6, 7]  # 6 built ahead (waited for), unused
    finally:
        cache.close()
    plain = GroupCache(build)  # no prefetch: built on demand, in the caller's thread
    calls.clear()
    plain.plan([0, 1])
    plain("decoder.layers.0.w")
    assert calls == [(0, threading.main_thread().name)]
