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


def test_torchrun_tensor_parallel_matches_single_process(tmp_path):
    """The same command under torchrun with TP=2 (two gloo processes) reports the same losses
    as one process: launcher environment, parallel init and TP numerics end to end."""
    def losses(stdout):
        m = re.search(r"train loss\s+([\d.]+) -> ([\d.]+).*\n.*held-out loss\s+([\d.]+) "
                      r"\(init\) -> ([\d.]+)", stdout)
        assert m, stdout
        return [float(x) for x in m.groups()]

    single = _run(["quickstart", "--steps", "10", "--out", str(tmp_path / "a")])
    assert single.returncode == 0, single.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "-m", "xft_megatron.cli", "quickstart", "--steps", "10",
                "--out", str(tmp_path / "b"), "parallel.tensor=2"]
    tp = subprocess.run(torchrun, capture_output=True, text=True, timeout=600)
    assert tp.returncode == 0, tp.stderr[-3000:]
    assert tp.stdout.count("held-out loss") == 1  # printed once per job, not per rank
    for a, b in zip(losses(single.stdout), losses(tp.stdout)):
        assert abs(a - b) <= 2e-4, (single.stdout, tp.stdout)
