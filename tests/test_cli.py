"""The `xft` command line: errors before work, presets, and the quickstart end to end."""

import os
import re
import subprocess
import sys

XFT = [sys.executable, "-m", "xft_megatron.cli"]


def _run(args, **kw):
    return subprocess.run(XFT + args, capture_output=True, text=True, timeout=600, **kw)


def test_config_errors_are_clear_and_early():
    r = _run(["config", "model.preset=tiny", "parallel.tensor=8"])
    assert r.returncode == 2
    assert "num_attention_heads=4 is not divisible by parallel.tensor=8" in r.stderr
    assert "Traceback" not in r.stderr
    r = _run(["config", "/nonexistent/x.yaml"])
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = _run(["config", "model.preset=tiny", "train.lr=1e-3"])
    assert r.returncode == 0 and "lr: 0.001" in r.stdout


def test_presets_listed():
    r = _run(["presets"])
    assert r.returncode == 0
    for name in ("tiny", "deepseek-coder-1.3b", "qwen2-0.5b", "llama-2-7b"):
        assert name in r.stdout


def test_quickstart_end_to_end(tmp_path):
    out = tmp_path / "qs"
    r = _run(["quickstart", "--out", str(out), "--steps", "40"])
    assert r.returncode == 0, r.stderr[-3000:]
    m = re.search(r"held-out loss\s+([\d.]+) \(init\) -> ([\d.]+)", r.stdout)
    assert m, r.stdout
    init, trained = float(m.group(1)), float(m.group(2))
    assert trained < init - 1.0, (init, trained)  # 40 steps on real code learn something
    assert open(out / "pretrain" / "latest").read().strip() == "iter_0000040"
    assert os.path.isfile(out / "pretrain" / "iter_0000040" / "xft_config.yaml")
