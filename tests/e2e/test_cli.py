"""The `xft` command line: errors before work, presets, and the quickstart end to end."""

import json
import os
import subprocess
import sys

import pytest

from tests.common import run_cli, xft_process
from xft_megatron import cli


def test_config_errors_are_clear_and_early():
    r = xft_process("config", "model.preset=tiny", "parallel.tensor=8")
    assert r.returncode == 2
    assert "num_attention_heads=4 is not divisible by parallel.tensor=8" in r.stderr
    assert "Traceback" not in r.stderr
    r = xft_process("config", "/nonexistent/x.yaml")
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = xft_process("config", "model.preset=tiny", "train.lr=1e-3")
    assert r.returncode == 0 and "lr: 0.001" in r.stdout


def test_presets_listed():
    r = xft_process("presets")
    assert r.returncode == 0
    for name in ("tiny", "deepseek-coder-1.3b", "qwen2-0.5b", "llama-2-7b"):
        assert name in r.stdout


QUICK = ["--steps", "10", "--sft-steps", "10", "--max-files", "150"]
ABLATE = ["--ablations", "vanilla,none"]  # off by default
MODELS = ("base", "sft (dense)", "xft moe", "xft merged (dense)", "vanilla moe (ablation)",
          "none moe (ablation)")


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    """One single-process quickstart (with the ablations), shared by the tests below."""
    out = tmp_path_factory.mktemp("quickstart") / "qs"
    return out, xft_process("quickstart", "--out", str(out), *QUICK, *ABLATE)


def test_quickstart_end_to_end_and_rerun(quickstart_run, tmp_path):
    out, r = quickstart_run
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.load(open(out / "summary.json"))
    losses = summary["heldout_loss"]
    assert set(losses) == set(MODELS)
    for tuned in ("sft (dense)", "xft moe", "xft merged (dense)"):  # tuning helps held-out
        assert losses[tuned] < losses["base"] - 0.1, losses
    assert summary["data"]["train_records"] > 500 and summary["data"]["heldout_records"] > 20
    report = open(out / "report.md").read()
    for name in MODELS:
        assert f"| {name}" in report
    assert "- xft moe: " in report and "routing" in report  # the routing verdict
    for png in ("pretrain_loss", "tuning_loss", "expert_load", "merge_coefficients", "routing",
                "expert_divergence"):
        assert os.path.getsize(out / f"{png}.png") > 5000, png
        assert f"({png}.png)" in report
    assert "completion by the merged model (transformers)" in r.stdout
    assert os.path.isfile(out / "xft_merged" / "hf" / "config.json")
    # HumanEval straight from the folded Megatron checkpoint (converted to HF on the way)
    he = xft_process("eval", "humaneval", "--model", str(out / "xft_merged"), "--limit", "2",
                     "--max-new-tokens", "16", "--out", str(tmp_path / "he"))
    assert he.returncode == 0, he.stderr[-3000:]
    result = json.load(open(tmp_path / "he" / "humaneval.json"))
    assert [t["task_id"] for t in result["per_task"]] == ["HumanEval/0", "HumanEval/1"]
    assert all(s in ("passed", "failed", "timeout", "error")
               for t in result["per_task"] for s in t["results"])
    # a rerun reuses every finished stage and reports the same numbers
    again = xft_process("quickstart", "--out", str(out), *QUICK, *ABLATE)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("reusing") == 12, again.stdout  # every stage
    assert json.load(open(out / "summary.json"))["heldout_loss"] == losses


def test_torchrun_tensor_parallel_matches_single_process(quickstart_run, tmp_path):
    """The quickstart pipeline (no ablations) under torchrun with TP=2 + SP (two gloo
    processes) gives the single process's held-out losses: launcher environment, parallel
    init, TP numerics of the dense and MoE stages, upcycle and fold, end to end. (The
    ablations come after the four models compared, so the shared run's losses apply.)"""
    single, r = quickstart_run
    assert r.returncode == 0, r.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "2", "-m", "xft_megatron.cli", "quickstart"] + QUICK + [
                "--no-ablations", "--out", str(tmp_path / "b"), "parallel.tensor=2",
                "parallel.sequence_parallel=true"]
    tp = subprocess.run(torchrun, capture_output=True, text=True, timeout=600)
    assert tp.returncode == 0, tp.stderr[-3000:]
    assert tp.stdout.count("held-out instruction loss") == 1  # printed once per job
    a = json.load(open(single / "summary.json"))["heldout_loss"]
    b = json.load(open(tmp_path / "b" / "summary.json"))["heldout_loss"]
    assert set(a) == set(MODELS) and set(b) == set(MODELS[:4])
    for k in b:
        assert abs(a[k] - b[k]) <= 1e-4 * a[k], (k, a, b)


def test_error_policy_user_errors_exit_with_a_message_bugs_keep_their_traceback(monkeypatch):
    """One policy (errors.py): a UserError (or the machine's OSError) prints its message and
    exits 2 (3 for a non-finite loss); anything else, e.g. a plain ValueError, is a bug and
    propagates with its traceback."""
    import argparse

    from xft_megatron.errors import UsageError
    from xft_megatron.training.loop import NonFiniteLoss

    def parser_raising(exc):
        def fail(args):
            raise exc

        p = argparse.ArgumentParser()
        p.set_defaults(func=fail)
        return p

    for exc, code in ((UsageError("--n must be >= 1"), 2), (NonFiniteLoss("NaN at step 3"), 3),
                      (FileNotFoundError("'x.jsonl' does not exist"), 2)):
        monkeypatch.setattr(cli, "build_parser", lambda exc=exc: parser_raising(exc))
        run = run_cli()
        assert run.code == code, exc
        assert str(exc) in run.err and "Traceback" not in run.err
    monkeypatch.setattr(cli, "build_parser", lambda: parser_raising(ValueError("a bug")))
    with pytest.raises(ValueError, match="a bug"):
        run_cli()


def test_sigterm_stops_a_quickstart_with_a_checkpoint_and_a_message(tmp_path):
    """SIGTERM (preemption, `kill`) during a quickstart's training stage: the stage
    checkpoints and stops, the quickstart exits 143 saying where it stopped and how to go on
    (no traceback), and the stage's newest checkpoint is the step it names."""
    import signal
    import time

    out = tmp_path / "qs"
    proc = subprocess.Popen(
        [sys.executable, "-m", "xft_megatron.cli", "quickstart", "--out", str(out),
         "--steps", "2000", "--sft-steps", "10", "--max-files", "150", "--no-ablations"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "base" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (
            metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    for notice in ("IS DEPRECATED", "async save is deprecated",  # Megatron's own, not ours
                   "No CUDA runtime is found"):  # torch's, where CUDA_HOME is set
        assert notice not in stdout + stderr, notice
    said = [line for line in stderr.splitlines() if line.startswith("xft: terminated")]
    assert said and "stage base stopped at step" in said[0] and "run the same command" in \
        said[0], stderr[-3000:]
    step = int(said[0].split("stopped at step ")[1].split()[0])
    assert 3 <= step < 2000
    assert (out / "base" / "latest").read_text().strip() == f"iter_{step:07d}"
