"""The quickstart as a small study: several mined sources (site-packages too), another sequence
length, seeds and a chosen ablation; the settings, seeds and command recorded and replayable."""

import json
import math
import os
import shlex

from tests.common import xft_process
from xft_megatron import cli
from xft_megatron.data.code_corpus import source_dirs
from xft_megatron.data.mine_code import mine_tree, split_files

MODELS = {"base", "sft (dense)", "xft moe", "xft merged (dense)", "vanilla moe (ablation)"}


def _write(root, rel, text):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _function(name):
    return f'def {name}(x):\n    """Doc of {name}."""\n    y = x + {len(name)}\n' \
        f'    return y * "{name}"\n'


def test_several_roots_mine_as_one_tree(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for i in range(12):
        _write(a, f"alpha{i}.py", _function(f"fa{i}"))
        _write(b, f"beta{i}/__init__.py", _function(f"fb{i}"))
    _write(b, "copy_of_alpha0.py", _function("fa0"))  # same content as a/alpha0.py
    train, held, stats = mine_tree([str(a), str(b)], heldout_every=3)
    assert stats["files"] == 24  # the copy is dropped: files are unique across roots
    names = {r["name"] for r in train + held}
    assert names == {f"fa{i}" for i in range(12)} | {f"fb{i}" for i in range(12)}
    modules = {r["module"] for r in train + held}
    assert "beta3" in modules and "alpha3" in modules  # relative to their own root
    assert {r["module"] for r in train}.isdisjoint({r["module"] for r in held})
    # per-root file limit, and the split of one root alone is the same rule
    train_files, held_files = split_files([str(a), str(b)], heldout_every=3, max_files=5)
    assert len(train_files) + len(held_files) == 10


def test_quickstart_study_options_recorded_and_replayable(tmp_path):
    out = tmp_path / "study"
    r = xft_process("quickstart", "--out", str(out), "--src", "stdlib", "--src", "site-packages",
                    "--max-files", "60", "--seq-length", "256", "--seed", "7", "--router-seed",
                    "3", "--ablations", "vanilla", "--steps", "8", "--sft-steps", "6",
                    "--tune-lr", "2e-3", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.load(open(out / "summary.json"))
    losses = summary["heldout_loss"]
    assert set(losses) == MODELS and all(math.isfinite(v) for v in losses.values())
    assert losses["sft (dense)"] < losses["base"]
    # both sources mined: the standard library and this interpreter's site-packages
    roots = source_dirs(["stdlib", "site-packages"])
    assert summary["data"]["sources"] == roots and len(roots) >= 2
    assert summary["data"]["files"] > 60
    settings, cfg = summary["settings"], summary["config"]
    assert (settings["seed"], settings["router_seed"], settings["ablations"]) == (7, 3,
                                                                                  ["vanilla"])
    assert cfg["train"]["seed"] == 7 and cfg["train"]["seq_length"] == 256
    report = (out / "report.md").read_text()
    assert "seeds: training 7" in report and "router initialization 3" in report
    assert summary["command"] in report
    # the recorded command parses back to the same settings
    args = cli.build_parser().parse_args(shlex.split(summary["command"])[1:])
    assert (args.src, args.seed, args.router_seed, args.seq_length, args.sft_steps,
            args.ablations, args.tune_lr) == (["stdlib", "site-packages"], 7, 3, 256, 6,
                                              "vanilla", 2e-3)
    # equal budget and data: every tuned model ran 6 steps on the same batches, and the
    # upcycled MoEs start as the dense base, so their first step's loss is the dense one
    first = {}
    for stage in ("sft", "xft_moe", "vanilla_moe"):
        rows = [json.loads(line) for line in open(out / stage / "metrics.jsonl")]
        assert len(rows) == 6, stage
        first[stage] = rows[0]["lm_loss"]
    for stage in ("xft_moe", "vanilla_moe"):
        assert abs(first[stage] - first["sft"]) < 1e-3 * first["sft"], first
    assert os.path.isdir(out / "upcycle_vanilla") and not os.path.exists(out / "none_moe")


def test_bad_study_options_stop_early(tmp_path):
    r = xft_process("quickstart", "--out", str(tmp_path / "x"), "--ablations", "vanilla,bogus",
                    timeout=300)
    assert r.returncode == 2 and "unknown ablations ['bogus']" in r.stderr
    r = xft_process("quickstart", "--out", str(tmp_path / "y"), "--src",
                    str(tmp_path / "missing"), timeout=300)
    assert r.returncode == 2 and "does not exist" in r.stderr
    assert not os.path.exists(tmp_path / "y" / "data")
