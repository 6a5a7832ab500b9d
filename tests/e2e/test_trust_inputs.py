"""Inputs that used to be accepted with wrong results or unbounded cost: a run extended past
its checkpoint's schedule, data without a single target token, YAML alias bombs and deep
nesting, safetensors files whose tensors share bytes."""

import json
import os
import struct

import pytest
import torch

from tests import common
from tests.harness import run_ranks


# ---------------------------------------------------------------- extending a run
def _extend_body(rank, world, root):
    from xft_megatron.training.loop import train

    base = ["train.lr_decay_style=cosine", "train.lr_warmup_steps=1", "train.min_lr=1e-5"]
    full = common.tiny_config(*base, "train.train_steps=6", f"checkpoint.save={root}/full")
    train(full, common.RandomBatches(full), progress=False)
    short = common.tiny_config(*base, "train.train_steps=3", f"checkpoint.save={root}/run")
    train(short, common.RandomBatches(short), progress=False)
    longer = common.tiny_config(*base, "train.train_steps=6", f"checkpoint.save={root}/run")
    train(longer, common.RandomBatches(longer), progress=False, resume=True)

    def rows(name):
        with open(os.path.join(root, name, "metrics.jsonl")) as f:
            return [json.loads(line) for line in f]

    return {"full": rows("full"), "run": rows("run")}


def test_resume_with_more_steps_follows_the_new_schedule(tmp_path, capsys):
    r = run_ranks(1, _extend_body, str(tmp_path))[0]
    full, run = r["full"], r["run"]
    assert [x["step"] for x in run] == [1, 2, 3, 4, 5, 6]
    # steps 4-6 at the learning rates of a run planned for 6 steps from the start (the
    # checkpoint's 3-step schedule would have decayed to min_lr), and the weights move
    for a, b in zip(run[3:], full[3:]):
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-12) and a["lr"] > 2e-5, (a, b)
    assert run[3]["loss"] != run[5]["loss"]


def test_schedule_changes_are_named():
    from xft_megatron.training.loop import schedule_changes

    cfg = common.tiny_config("train.train_steps=8", "train.lr=2e-3")
    stored = {**cfg.train.__dict__, "train_steps": 4}
    assert schedule_changes(stored, cfg.train) == ["train.train_steps 4 -> 8"]
    assert schedule_changes(cfg.train.__dict__, cfg.train) == []


# ---------------------------------------------------------------- no target tokens
def test_data_without_targets_is_refused_before_training(tmp_path):
    data = tmp_path / "one_token.jsonl"
    data.write_text("".join(json.dumps({"input_ids": [i + 5]}) + "\n" for i in range(40)))
    r = common.run_cli("train", *common.BASE, "train.train_steps=2", f"data.path={data}",
                       "data.format=tokens", f"checkpoint.save={tmp_path / 'ckpt'}", catch=True)
    assert r.code == 2, r.text
    assert "no target tokens" in r.err and "0 targets" in r.err, r.err
    assert not (tmp_path / "ckpt" / "latest").exists()


def _empty_batch_body(rank, world):
    from xft_megatron.training.step import EmptyBatch, forward_backward

    cfg = common.tiny_config()
    chunks, _ = common.setup(cfg, distributed_optimizer=False)
    mbs = common.microbatches(cfg)
    for mb in mbs:
        mb["loss_mask"] = torch.zeros_like(mb["loss_mask"])
    try:
        forward_backward(chunks, mbs, cfg.train.seq_length)
    except EmptyBatch as e:
        return str(e)
    return None


def test_a_batch_without_targets_stops_the_step():
    message = run_ranks(1, _empty_batch_body)[0]
    assert message and "no target tokens" in message


def test_data_report_counts_targets():
    from xft_megatron.data.records import DataReport

    report = DataReport(read=1, kept=1, samples=1, tokens=10, targets=7)
    assert "7 targets" in report.summary()
    assert DataReport.from_dict(report.to_dict()).targets == 7
    legacy = {k: v for k, v in report.to_dict().items() if k != "targets"}
    assert DataReport.from_dict(legacy).targets is None  # a cache from before: not refused


# ---------------------------------------------------------------- YAML bombs
BOMB = "".join(f"{a}: &{a} [" + ",".join([f"*{p}"] * 9) + "]\n"
               for p, a in zip("abcdefgh", "bcdefghi"))


@pytest.mark.parametrize("name,text,expected", [
    ("bomb", 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + BOMB +
     "train:\n  lr: *i\n", "aliases"),
    ("deep", "train:\n  lr: " + "[" * 3000 + "]" * 3000 + "\n", "nested"),
    ("deep_maps", "train:\n" + "".join("  " * (i + 1) + f"k{i}:\n" for i in range(60)) +
     "  " * 61 + "v: 1\n", "nest"),
    ("cycle_free_ok", "model: &m\n  preset: tiny\ntrain:\n  lr: 0.001\n", None),
])
def test_yaml_bombs_and_deep_nesting_refused(tmp_path, name, text, expected):
    from xft_megatron.config import ConfigError, read_yaml

    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    assert len(text) < 20_000
    if expected is None:
        assert read_yaml(str(path))["train"]["lr"] == 0.001
    else:
        with pytest.raises(ConfigError, match=expected):
            read_yaml(str(path))


def test_override_values_and_checkpoint_configs_are_bounded_too(tmp_path):
    from xft_megatron.config import ConfigError, parse_overrides

    with pytest.raises(ConfigError, match="nested"):
        parse_overrides(["train.lr=" + "[" * 3000 + "]" * 3000])


# ---------------------------------------------------------------- malformed safetensors
def _safetensors(path, entries, data: bytes):
    header = json.dumps(entries).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + data)


@pytest.mark.parametrize("entries,nbytes,expected", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12, "overlaps"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 8, "overlaps"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, 8, "byte range"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12, "gap"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 16, "data section"),
])
def test_malformed_safetensors_refused_like_the_library(tmp_path, entries, nbytes, expected):
    from safetensors import safe_open

    from xft_megatron.errors import HFFormatError
    from xft_megatron.hf.files import _open_weights

    path = str(tmp_path / "model.safetensors")
    _safetensors(path, entries, bytes(range(nbytes)))
    with pytest.raises(HFFormatError, match=expected):
        _open_weights(path)
    with pytest.raises(Exception):  # the safetensors library refuses the same file
        with safe_open(path, framework="pt") as f:
            for k in f.keys():
                f.get_tensor(k)


def test_wellformed_safetensors_read_exactly(tmp_path):
    from safetensors.torch import save_file

    from xft_megatron.hf.files import _open_weights

    tensors = {"w": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64),
               "h": torch.randn(4).to(torch.bfloat16), "e": torch.zeros(0, 3)}
    path = str(tmp_path / "ok.safetensors")
    save_file(tensors, path)
    f = _open_weights(path)
    assert set(f.keys()) == set(tensors)
    for k, v in tensors.items():
        assert torch.equal(f.get_tensor(k), v), k


# ---------------------------------------------------------------- one writer per pipeline
def test_a_second_quickstart_into_the_same_folder_is_refused(tmp_path):
    """While a quickstart holds --out (here: a process holding its lock, as a running one
    does), a second one into the same folder is refused before it touches anything."""
    import subprocess
    import sys

    out = tmp_path / "qs"
    (out / "data").mkdir(parents=True)
    (out / "data" / "train.jsonl").write_text("kept\n")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[2]); "
         "from xft_megatron.checkpoint import lock; "
         "lock.acquire(sys.argv[1], 'xft quickstart'); print('held', flush=True); "
         "time.sleep(120)", str(out), common.REPO],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        r = common.xft_process("quickstart", "--out", out, "--steps", "3", "--sft-steps", "3",
                               "--max-files", "20", timeout=300)
        assert r.returncode == 2, r.stderr[-2000:]
        assert "xft quickstart" in r.stderr and str(holder.pid) in r.stderr, r.stderr
        assert (out / "data" / "train.jsonl").read_text() == "kept\n"
        assert sorted(p.name for p in out.iterdir()) == [".xft-lock", "data"]
    finally:
        holder.kill()
        holder.wait()
