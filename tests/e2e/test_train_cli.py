"""`xft train` through all four stages (pretrain -> sft, upcycle -> moe -> merge) on real
files, bad records, `--dry-run`, and `xft eval loss` (any layout; equal to transformers' loss
on the same tokens for an HF-converted model)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.harness import run_ranks

TINY = ["model.preset=tiny", "train.seq_length=128", "train.micro_batch_size=2",
        "train.global_batch_size=8", "train.lr=3e-3", "train.lr_warmup_steps=1",
        "train.min_lr=3e-4", "data.template=plain"]


def _write_jsonl(path, records, raw_lines=()):
    with open(path, "wb") as f:
        for r in records:
            f.write(json.dumps(r).encode() + b"\n")
        for line in raw_lines:
            f.write(line + b"\n")


def _make_data(root):
    import sysconfig

    src = os.path.join(sysconfig.get_paths()["stdlib"], "json")
    texts = [{"text": open(os.path.join(src, f), encoding="utf-8").read()}
             for f in sorted(os.listdir(src)) if f.endswith(".py")]
    _write_jsonl(os.path.join(root, "text.jsonl"), texts)
    pairs = [{"instruction": f"Write a function add_{i} that adds {i} to its argument.",
              "response": f"def add_{i}(x):\n    return x + {i}\n"} for i in range(120)]
    _write_jsonl(os.path.join(root, "sft.jsonl"), pairs)
    _write_jsonl(os.path.join(root, "sft_bad.jsonl"), pairs[:40] + [
        {"instruction": "no response here"}, {"instruction": "x", "response": ""}],
        raw_lines=[b"{broken json", b"\xff\xfe not utf-8"])


def _four_stages(rank, world, root):
    from xft_megatron.config import MoEConfig
    from xft_megatron.errors import UserError
    from xft_megatron.eval.loss import evaluate_loss
    from xft_megatron.training import run
    from xft_megatron.xft.checkpoints import upcycle_checkpoint

    if rank == 0:
        _make_data(root)
    torch.distributed.init_process_group("gloo") if not torch.distributed.is_initialized() \
        else None
    torch.distributed.barrier()
    out = {}
    pre = run.main(None, TINY + [f"data.path={root}/text.jsonl", f"checkpoint.save={root}/pre",
                                 "train.train_steps=12"], progress=False)
    out["pre"] = pre.losses
    sft_args = TINY + [f"checkpoint.load={root}/pre", "train.stage=sft", "train.train_steps=4",
                       f"checkpoint.save={root}/sft"]
    try:
        run.main(None, sft_args + [f"data.path={root}/sft_bad.jsonl"], progress=False)
        out["bad_error"] = None
    except UserError as e:  # every rank: rank 0's message, the others' pointer to it
        out["bad_error"] = str(e)
    skip = run.main(None, sft_args + [f"data.path={root}/sft_bad.jsonl", "data.on_error=skip"],
                    progress=False)
    out["skip_steps"] = skip.steps_done
    sft = run.main(None, sft_args[:-2] + ["train.epochs=2", f"checkpoint.save={root}/sft2",
                                          f"data.path={root}/sft.jsonl"], progress=False)
    out["sft_steps"], out["sft"] = sft.steps_done, sft.losses

    upcycle_checkpoint(f"{root}/pre", f"{root}/up", MoEConfig(num_experts=4, topk=3), seed=1,
                       layout={})
    moe = run.main(None, TINY + [f"checkpoint.load={root}/up", "train.stage=moe",
                                 "parallel.expert=2", "train.train_steps=4",
                                 f"data.path={root}/sft.jsonl", f"checkpoint.save={root}/moe"],
                   progress=False)
    out["moe"], out["moe_layer_losses"] = moe.losses, moe.moe_losses
    merge = run.main(None, TINY + [f"checkpoint.load={root}/moe", "train.stage=merge",
                                   "train.train_steps=3", "train.lr=0.05",
                                   f"data.path={root}/sft.jsonl",
                                   f"checkpoint.save={root}/merge"], progress=False)
    out["merge_coefficients"] = merge.merge_coefficients

    data = f"{root}/sft.jsonl"
    cache = f"{root}/eval_cache"
    for name in ("pre", "sft2", "moe", "merge"):
        out[f"eval_{name}"] = evaluate_loss(f"{root}/{name}", data, cache_dir=cache,
                                          template="plain")
    out["eval_moe_tp2"] = evaluate_loss(f"{root}/moe", data, cache_dir=cache, template="plain",
                                        layout={"tensor": 2, "sequence_parallel": True})
    out["eval_moe_ep2"] = evaluate_loss(f"{root}/moe", data, cache_dir=cache, template="plain",
                                        layout={"expert": 2})
    return out


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("stages"))
    return run_ranks(2, _four_stages, root)[0]


def _mean(x):
    return sum(x) / len(x)


def test_pretrain_loss_goes_down(stages):
    losses = stages["pre"]
    assert len(losses) == 12 and _mean(losses[-3:]) < _mean(losses[:3]) - 0.3, losses


def test_bad_records_fail_or_skip_with_file_and_line(stages):
    msg = stages["bad_error"]
    assert msg and "sft_bad.jsonl:41" in msg and "sft_bad.jsonl:43" in msg
    assert "data.on_error=skip" in msg
    assert stages["skip_steps"] == 4


def test_sft_epochs_set_the_steps_and_instruction_loss_drops(stages):
    # 120 samples of ~84 tokens, packed into 129-token rows, batches of 8 rows: 2 epochs
    assert stages["sft_steps"] >= 2 and stages["sft"][-1] < stages["sft"][0]
    assert stages["eval_sft2"]["loss"] < stages["eval_pre"]["loss"]


def test_moe_and_merge_stages_train(stages):
    assert all(x > 0 for x in stages["moe_layer_losses"])
    coeffs = stages["merge_coefficients"]
    assert len(coeffs) == 4  # the tiny preset's 4 layers, all MoE
    for c in coeffs.values():
        assert len(c) == 4 and abs(sum(c) - 1.0) < 1e-6 and abs(c[0] - 0.75) < 1e-9
        assert max(abs(x - 0.25 / 3) for x in c[1:]) > 1e-4  # alpha moved from uniform


def test_eval_loss_any_layout(stages):
    for name in ("pre", "sft2", "moe", "merge"):
        r = stages[f"eval_{name}"]
        assert set(r) == {"loss", "perplexity", "tokens", "records", "skipped_records"}
        assert r["tokens"] > 0 and r["records"] == 120 and r["skipped_records"] == 0
        assert abs(r["perplexity"] - torch.tensor(r["loss"]).exp().item()) < 1e-6 * r["perplexity"]
    ref = stages["eval_moe"]
    for layout in ("eval_moe_tp2", "eval_moe_ep2"):
        assert stages[layout]["tokens"] == ref["tokens"]
        assert abs(stages[layout]["loss"] - ref["loss"]) < 1e-5 * ref["loss"], layout


def _hf_eval(rank, world, root):
    from tests.common import tiny_hf_llama
    from xft_megatron.eval.loss import evaluate_loss
    from xft_megatron.hf import convert

    hf = tiny_hf_llama(f"{root}/hf", intermediate_size=176, vocab_size=384,
                       max_position_embeddings=256, rope_theta=10000.0, initializer_range=0.1)
    convert.hf_to_mcore(f"{root}/hf", f"{root}/mc")
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 384, (n,), generator=g).tolist() for n in (17, 40, 9, 63, 25)]
    _write_jsonl(f"{root}/ids.jsonl", [{"input_ids": s} for s in seqs])
    total, count = 0.0, 0
    with torch.no_grad():
        for s in seqs:
            ids = torch.tensor([s])
            logits = hf(ids).logits.double()
            ce = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
            total, count = total + ce.item(), count + len(s) - 1
    ours = evaluate_loss(f"{root}/mc", f"{root}/ids.jsonl", seq_length=64,
                         cache_dir=f"{root}/cache", micro_batch_size=2)
    return ours, total / count, count


def test_eval_loss_equals_transformers(tmp_path):
    ours, ref, count = run_ranks(1, _hf_eval, str(tmp_path))[0]
    assert ours["tokens"] == count
    assert abs(ours["loss"] - ref) < 1e-5 * ref, (ours, ref)


def test_dry_run_and_config_errors(tmp_path):
    up = [sys.executable, "-m", "xft_megatron.cli", "train", "--dry-run", "--world-size", "8",
          "model.preset=deepseek-coder-1.3b", "moe.num_experts=8", "moe.topk=6",
          "parallel.expert=8", "precision.dtype=bf16", "train.seq_length=1024",
          "train.micro_batch_size=1", "train.global_batch_size=64",
          f"checkpoint.save={tmp_path}/x", "data.path=unused.jsonl"]
    r = subprocess.run(up, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "world 8 = TP 1 x PP 1 x DP 8; EP 8" in r.stdout
    from xft_megatron.config import load_config
    from xft_megatron.training.memory import parameter_counts

    cfg = load_config(None, up[7:-2])
    counts = parameter_counts(cfg.model, cfg.moe)
    assert f"total {counts['total']:,}" in r.stdout and f"active {counts['active']:,}" in r.stdout
    assert counts["total"] > counts["active"] > cfg.model.num_parameters()
    bad = subprocess.run(up[:-1] + ["parallel.expert=3"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "moe.num_experts=8 is not divisible by parallel.expert=3" \
        in bad.stderr
    nodata = subprocess.run(up[:-1], capture_output=True, text=True, timeout=120)
    assert nodata.returncode == 2 and "data.path is not set" in nodata.stderr
