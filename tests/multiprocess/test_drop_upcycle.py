"""Drop-Upcycling (`drop_ratio`, xft/upcycle.py): in every routed expert a seeded
random subset of round(r * F) FFN neurons is re-initialized (the same neurons in W_gate rows,
W_up rows and W_down columns) from N(mean, std) of the dense matrix, every other entry and the
shared expert stay the dense ones bitwise; r = 0 is bitwise the upcycling without the option.
Through `xft upcycle --drop-ratio`: bitwise the pure transform, in one process and written by
two ranks from a TP-sharded source into an EP=2 layout; bad ratios refused before anything is
written. What it gives up on purpose: P1 (the upcycled MoE's logits are no longer the dense
model's) and P2 (merging it untrained no longer returns the dense weights)."""

import math
import os

import pytest
import torch

from tests.unit.test_pipeline import _quickstart, hf  # noqa: F401 - hf: a fixture used below
from xft_megatron.config import MoEConfig
from xft_megatron.model.moe.merge_mlp import merge_coefficients
from xft_megatron.xft.merge import fold
from xft_megatron.xft.upcycle import upcycle

H, F, LAYERS, N = 64, 512, 2, 8
FC1, FC2 = "mlp.experts.fc1_weight", "mlp.experts.fc2_weight"
# distinct statistics per dense matrix, so a value drawn from the wrong one shows
GATE, UP, DOWN = (0.3, 0.5), (-0.2, 2.0), (0.1, 0.05)


def _dense(seed=0, dtype=torch.float32):
    """A dense state dict: fc1 [2F, H] = gate rows then up rows, fc2 [H, F]."""
    g = torch.Generator().manual_seed(seed)
    normal = lambda shape, m, s: torch.randn(shape, generator=g) * s + m  # noqa: E731
    sd = {"embedding.word_embeddings.weight": torch.randn(32, H, generator=g)}
    for i in range(LAYERS):
        p = f"decoder.layers.{i}."
        sd[p + "self_attention.linear_qkv.weight"] = torch.randn(3 * H, H, generator=g)
        sd[p + "mlp.linear_fc1.weight"] = torch.cat([normal((F, H), *GATE),
                                                    normal((F, H), *UP)])
        sd[p + "mlp.linear_fc2.weight"] = normal((H, F), *DOWN)
    return {k: v.to(dtype) for k, v in sd.items()}


def _up(dense=None, mode="xft", **kw):
    return dict(upcycle(_dense() if dense is None else dense,
                        MoEConfig(num_experts=N, topk=4, mode=mode), H, **kw))


def _dense_ffn(dense, layer):
    p = f"decoder.layers.{layer}.mlp."
    fc1 = dense[p + "linear_fc1.weight"]
    return fc1[:F], fc1[F:], dense[p + "linear_fc2.weight"]


def _changed(up, dense, layer, expert):
    """Per neuron [F]: (gate row differs anywhere, up row differs, down column differs), and
    the same three for 'differs everywhere'."""
    p = f"decoder.layers.{layer}."
    gate, up_w, down = _dense_ffn(dense, layer)
    e1, e2 = up[p + FC1][expert], up[p + FC2][expert]
    diff = (e1[0] != gate, e1[1] != up_w, (e2 != down).T)  # each [F, H]
    return tuple(d.any(1) for d in diff), tuple(d.all(1) for d in diff)


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.3, 0.9])
def test_routed_experts_reinitialize_exactly_round_r_f_neurons(ratio):
    """Shared expert bitwise the dense FFN; each routed expert has exactly round(r * F)
    re-initialized neurons, the same ones in gate rows, up rows and down columns (each of
    them entirely new), and every other entry bitwise the dense one."""
    dense = _dense()
    up = _up(dense, seed=4, drop_ratio=ratio)
    for layer in range(LAYERS):
        gate, up_w, down = _dense_ffn(dense, layer)
        p = f"decoder.layers.{layer}."
        assert torch.equal(up[p + FC1][0], torch.stack([gate, up_w]))  # shared: untouched
        assert torch.equal(up[p + FC2][0], down)
        for j in range(1, N):
            (g_any, u_any, d_any), every = _changed(up, dense, layer, j)
            assert torch.equal(g_any, u_any) and torch.equal(g_any, d_any), (layer, j)
            assert all(torch.equal(g_any, e) for e in every), (layer, j)  # whole rows/columns
            assert g_any.sum().item() == round(ratio * F), (layer, j, g_any.sum().item())


def test_reinitialized_values_follow_each_dense_matrix_statistics():
    """Per layer, the new values of the 7 routed experts pooled (r = 0.25: 128 neurons x 64 x
    7 = 57344 draws per matrix) have the mean and std of their own dense matrix: |mean diff| <=
    5 std / sqrt(n) (the mean's standard error) and |std ratio - 1| <= 5 / sqrt(2n) (the sample
    std's relative standard error), about 0.02 std and 1.5 %: far from the other matrices'
    statistics (GATE, UP, DOWN), and the draws are seeded, so the check is deterministic."""
    dense = _dense()
    up = _up(dense, seed=1, drop_ratio=0.25)
    for layer in range(LAYERS):
        p = f"decoder.layers.{layer}."
        new = ([], [], [])
        for j in range(1, N):
            (mask, _, _), _ = _changed(up, dense, layer, j)
            new[0].append(up[p + FC1][j, 0][mask])
            new[1].append(up[p + FC1][j, 1][mask])
            new[2].append(up[p + FC2][j][:, mask])
        for values, w in zip(new, _dense_ffn(dense, layer)):
            x = torch.cat([v.flatten() for v in values]).double()
            n, mean, std = x.numel(), w.double().mean().item(), w.double().std().item()
            assert n == 7 * 128 * H
            assert abs(x.mean().item() - mean) <= 5 * std / math.sqrt(n), (layer, mean)
            assert abs(x.std().item() / std - 1) <= 5 / math.sqrt(2 * n), (layer, std)


def test_subsets_differ_per_expert_and_layer():
    dense = _dense()
    up = _up(dense, drop_ratio=0.25)
    subsets = {(layer, j): tuple(_changed(up, dense, layer, j)[0][0].nonzero().flatten()
                                 .tolist()) for layer in range(LAYERS) for j in range(1, N)}
    assert len(set(subsets.values())) == len(subsets) == LAYERS * (N - 1)


def test_seeded_reproducible_and_router_untouched():
    a, b = _up(seed=3, drop_ratio=0.25), _up(seed=3, drop_ratio=0.25)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    c = _up(seed=4, drop_ratio=0.25)
    for layer in range(LAYERS):
        p = f"decoder.layers.{layer}."
        assert not torch.equal(a[p + FC1][1:], c[p + FC1][1:])
        assert not torch.equal(a[p + FC2][1:], c[p + FC2][1:])
    plain = _up(seed=3)  # the option leaves the router and the non-FFN tensors alone
    assert all(torch.equal(a[k], plain[k]) for k in a if "experts" not in k)


@pytest.mark.parametrize("noise", [0.0, 0.01])
@pytest.mark.parametrize("mode", ["xft", "vanilla"])
def test_ratio_zero_is_bitwise_the_upcycling_without_the_option(mode, noise):
    a, b = _up(mode=mode, seed=2, noise_std=noise), _up(mode=mode, seed=2, noise_std=noise,
                                                        drop_ratio=0.0)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_noise_is_added_first_and_the_drop_overwrites_its_neurons():
    """With both options: the kept entries are the noise-only result, the re-initialized
    neurons the drop-only result (independent generators), the shared expert exact."""
    dense = _dense()
    both = _up(dense, seed=6, noise_std=0.01, drop_ratio=0.25)
    noise = _up(dense, seed=6, noise_std=0.01)
    drop = _up(dense, seed=6, drop_ratio=0.25)
    for layer in range(LAYERS):
        p = f"decoder.layers.{layer}."
        for j in range(1, N):
            (mask, _, _), _ = _changed(drop, dense, layer, j)  # [F]: the dropped neurons
            for name in (FC1, FC2):  # the neuron axis: fc1 [2, F, H] dim 1, fc2 [H, F] dim 1
                w, want_kept, want_new = both[p + name][j], noise[p + name][j], drop[p + name][j]
                assert torch.equal(w[:, ~mask], want_kept[:, ~mask]), (layer, j, name)
                assert torch.equal(w[:, mask], want_new[:, mask]), (layer, j, name)
        assert torch.equal(both[p + FC1][0], noise[p + FC1][0])


@pytest.mark.parametrize("mode,first", [("xft", 1), ("none", 1), ("vanilla", 0)])
def test_which_experts_are_dropped_per_mode(mode, first):
    """Modes xft and none keep the shared expert 0 exact; vanilla has no shared expert, so
    every expert, expert 0 included, is re-initialized."""
    dense = _dense()
    up = _up(dense, mode=mode, drop_ratio=0.25)
    for j in range(N):
        n = _changed(up, dense, 0, j)[0][0].sum().item()
        assert n == (round(0.25 * F) if j >= first else 0), (mode, j, n)


def test_low_precision_weights_keep_their_dtype_and_untouched_entries():
    dense = _dense(dtype=torch.bfloat16)
    up = _up(dense, drop_ratio=0.5)
    p = "decoder.layers.1."
    assert up[p + FC1].dtype == up[p + FC2].dtype == torch.bfloat16
    (g, u, d), _ = _changed(up, dense, 1, 3)
    assert torch.equal(g, u) and torch.equal(g, d) and g.sum().item() == F // 2


def test_p2_no_longer_holds_with_drop_but_does_at_zero():
    """Merging the untrained upcycle (uniform alpha, lambda 0.75) returns the dense FFN at
    r = 0 and not at r > 0; attention and embeddings pass through either way."""
    dense = _dense()
    coefficients = lambda layer: merge_coefficients(torch.zeros(N - 1), 0.75)  # noqa: E731
    for ratio, p2 in ((0.0, True), (0.25, False)):
        back = dict(fold(_up(dense, drop_ratio=ratio), coefficients))
        for k, w in dense.items():
            close = (back[k] - w).abs().max() <= 1e-6 * w.abs().max()
            assert close == (p2 or "linear_fc" not in k), (ratio, k)


@pytest.mark.parametrize("bad", [-0.1, 1.0, float("nan")])
def test_pure_transform_refuses_bad_ratio(bad):
    with pytest.raises(ValueError, match=r"drop_ratio must be in \[0, 1\)"):
        _up(drop_ratio=bad)


# --- the streamed tool ---------------------------------------------------------------------

TOOL_MOE = dict(num_experts=8, topk=4, router_gate="mlp")
TOOL_ARGS = ("--num-experts", 8, "--topk", 4, "--seed", 5)
MOE_OVERRIDES = ("moe.num_experts=8", "moe.topk=4")


def _tool_single(rank, world, root):
    """`xft upcycle --drop-ratio 0.25` and without it, in one process; refusals; P1."""
    from tests import common
    from tests.multiprocess.test_moe_parity import _logits
    from tests.multiprocess.test_upcycle_merge import _compare
    from xft_megatron.checkpoint import dist as ckpt

    d = lambda name: os.path.join(root, name)  # noqa: E731
    dense_cfg = common.tiny_config()
    chunks, _ = common.setup(dense_cfg, ddp=False)
    common.perturb_norms(chunks)
    ckpt.save(chunks, d("dense"), 0, dense_cfg)
    dense = ckpt.local_state_dict(chunks)
    dense_logits = _logits(chunks, dense_cfg, False)
    out = {"runs": {}, "compare": {}, "refusals": {}, "p1": {}}
    for ratio in (0.25, 0.0):
        expected = dict(upcycle(dense, MoEConfig(**TOOL_MOE), dense_cfg.model.hidden_size,
                                seed=5, drop_ratio=ratio))
        torch.save(expected, d(f"expected_{ratio}.pt"))
        flag = ("--drop-ratio", ratio) if ratio else ()  # 0: the command as it was
        run = common.run_cli("upcycle", "--ckpt", d("dense"), "--out", d(f"up_{ratio}"),
                             *TOOL_ARGS, *flag)
        out["runs"][ratio] = (run.code, run.text)
        out["compare"][ratio] = _compare(d(f"up_{ratio}"), expected, *MOE_OVERRIDES)
        cfg = common.tiny_config(*MOE_OVERRIDES)
        chunks, _ = common.setup(cfg, d(f"up_{ratio}"), ddp=False)
        diff = (_logits(chunks, cfg, False) - dense_logits).abs().max().item()
        out["p1"][ratio] = (diff, dense_logits.abs().max().item())
    for bad in ("-0.1", "1.0", "nan"):
        run = common.run_cli("upcycle", "--ckpt", d("dense"), "--out", d(f"bad_{bad}"),
                             *TOOL_ARGS, "--drop-ratio", bad)
        out["refusals"][bad] = (run.code, run.text, os.path.exists(d(f"bad_{bad}")))
    return out


def _tool_layout(rank, world, root):
    """Two ranks: the dense checkpoint stored as TP=2 shards, upcycled into an EP=2 layout
    (layers spread over the ranks), read back single-layout."""
    from tests.multiprocess.test_upcycle_merge import _compare, _resave, ckpt_layout
    from xft_megatron.xft.checkpoints import upcycle_checkpoint

    d = lambda name: os.path.join(root, name)  # noqa: E731
    _resave(d("dense"), d("dense_tp2"), {"tensor": 2, "sequence_parallel": True})
    upcycle_checkpoint(d("dense_tp2"), d("up_ep2"), MoEConfig(**TOOL_MOE), seed=5,
                       layout={"expert": 2}, drop_ratio=0.25)
    result = _compare(d("up_ep2"), torch.load(d("expected_0.25.pt")), *MOE_OVERRIDES)
    return {**result, "stored": ckpt_layout(d("up_ep2"))}


def test_drop_upcycle_command_is_the_pure_transform_in_any_layout(tmp_path):
    """`xft upcycle --drop-ratio 0.25` writes bitwise the pure transform (and without the flag
    bitwise the plain upcycling); so does an upcycle by two ranks from a TP=2-sharded dense
    checkpoint into an EP=2 layout. P1 holds at r = 0 (max |diff| <= 1e-5 x max |logit|,
    fp32) and is broken on purpose at r = 0.25 (diff > 1e-3 x max |logit|). -0.1, 1.0 and NaN
    are refused (exit 2, naming --drop-ratio) with nothing written."""
    from tests.harness import run_ranks

    root = str(tmp_path)
    r = run_ranks(1, _tool_single, root)[0]
    for ratio in (0.25, 0.0):
        assert r["runs"][ratio][0] == 0, r["runs"][ratio][1]
        c = r["compare"][ratio]
        assert c["keys"] and c["bitwise"], (ratio, c)
    diff, scale = r["p1"][0.0]
    assert scale > 0.1 and diff <= 1e-5 * scale, r["p1"]
    diff, scale = r["p1"][0.25]
    assert diff > 1e-3 * scale, r["p1"]
    for bad, (code, text, written) in r["refusals"].items():
        assert code == 2 and "--drop-ratio must be in [0, 1)" in text and bad in text.lower(), \
            (bad, text)
        assert not written, f"{bad}: wrote output despite refusing"
    for rank_result in run_ranks(2, _tool_layout, root):
        assert rank_result["keys"] and rank_result["bitwise"], rank_result
        assert rank_result["stored"][1] == 2, rank_result["stored"]


# --- the pipeline ----------------------------------------------------------------------------

def test_quickstart_drop_ratio_reaches_every_upcycle_step(tmp_path, hf):  # noqa: F811
    from xft_megatron.cli import build_parser
    from xft_megatron.errors import UsageError
    from xft_megatron.pipeline import quickstart
    from xft_megatron.pipeline import completion as c
    from xft_megatron.pipeline.steps import Upcycle

    out = str(tmp_path / "qs")
    plain, drop = _quickstart(out, hf), _quickstart(out, hf, drop_ratio=0.25)
    ups = [s for s in drop if isinstance(s, Upcycle)]
    assert [s.name for s in ups] == ["upcycle", "upcycle_vanilla", "upcycle_none"]
    parser = build_parser()
    for s in ups:
        assert s.drop_ratio == 0.25 and parser.parse_args(s.argv("D")).drop_ratio == 0.25
    assert all("drop_ratio" not in s.settings() for s in plain if isinstance(s, Upcycle))
    assert all(parser.parse_args(s.argv("D")).drop_ratio == 0.0 for s in plain
               if isinstance(s, Upcycle))
    a, b = c.digests(plain), c.digests(drop)
    assert {k for k in a if a[k] != b[k]} == {
        "upcycle", "xft_moe", "merge", "fold", "upcycle_vanilla", "vanilla_moe",
        "upcycle_none", "none_moe", "eval"}
    s = quickstart.Settings(drop_ratio=0.25)
    args = parser.parse_args(s.command(out, ()).split()[1:])
    assert args.drop_ratio == 0.25
    assert quickstart.settings_from_args(parser.parse_args(["quickstart"])).drop_ratio == 0.0
    with pytest.raises(UsageError, match=r"--drop-ratio must be in \[0, 1\)"):
        quickstart.Settings(drop_ratio=1.0)
