"""The XFT variants study's arms (benchmarks/xft_arms.py): every arm is a valid quickstart
command line, and the summary reports per-arm means, spread and the merged - SFT gap."""

import json
import os

import pytest

from benchmarks import xft_arms
from xft_megatron import cli
from xft_megatron.config import ConfigError, load_config


def test_every_arm_is_a_valid_quickstart_command_line():
    assert "paper" in xft_arms.ARMS and xft_arms.flags("paper", 80) == []
    assert xft_arms.flags("anneal", 80) == ["moe.router_noise_anneal_steps=40"]
    for arm in xft_arms.ARMS:
        extra = xft_arms.flags(arm, 80)
        args = cli.build_parser().parse_args(["quickstart", "--out", "x"] + extra)
        overrides = [a for a in extra if "=" in a]
        assert list(args.overrides) == overrides, arm
        # the study's own settings plus the arm's: every key exists and every value is valid
        load_config(None, ["model.preset=tiny", "precision.dtype=bf16"] + overrides)
    # an arm's upcycling-time settings reach the upcycling (quickstart.Settings.moe)
    from xft_megatron.pipeline import quickstart

    wide = quickstart.pipeline_spec("OUT", quickstart.Settings(), xft_arms.flags("wide", 80))
    assert wide.moe.router_init_std == 0.3
    with pytest.raises(ConfigError):  # the check above can fail: a misspelled key
        load_config(None, ["model.preset=tiny", "train.router_lr_mul=10"])
    with pytest.raises(SystemExit, match="unknown arm"):
        xft_arms.flags("nosuch", 80)


def test_summary_has_mean_spread_and_the_gap_to_sft(tmp_path):
    losses = {"1": (1.70, 1.71), "2": (1.72, 1.71)}  # seed: (sft, merged)
    for seed, (sft, merged) in losses.items():
        run = tmp_path / f"paper_seed{seed}"
        os.makedirs(run)
        (run / "summary.json").write_text(json.dumps({"heldout_loss": {
            "sft (dense)": sft, "xft moe": merged + 0.001, "xft merged (dense)": merged}}))
    text = xft_arms.summarize(str(tmp_path))
    row = next(line for line in text.splitlines() if line.startswith("| paper"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "1,2"
    assert cells[2] == "1.7100 +- 0.0141"  # sft: mean and sample sd of 1.70, 1.72
    assert cells[4] == "1.7100 +- 0.0000"  # merged
    assert cells[5] == "0.0000 +- 0.0141"  # merged - sft per seed: +0.01, -0.01


def test_a_run_stopped_after_its_evaluation_is_summarized_from_the_eval_marker(tmp_path):
    """A unit cut off after the held-out evaluation (before the report and summary.json):
    its losses come from eval/DONE.json; a run without either is left out."""
    run = tmp_path / "drop50_seed1" / "eval"
    os.makedirs(run)
    (run / "DONE.json").write_text(json.dumps({"result": {
        "sft (dense)": {"loss": 1.68}, "xft moe": {"loss": 1.70},
        "xft merged (dense)": {"loss": 1.97}}}))
    os.makedirs(tmp_path / "refnum_seed1" / "eval")  # started, never evaluated
    text = xft_arms.summarize(str(tmp_path))
    rows = [line for line in text.splitlines() if line.startswith("| drop50")]
    assert len(rows) == 1 and "refnum" not in text
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[2:6] == ["1.6800", "1.7000", "1.9700", "0.2900"], cells


def test_curves_compare_two_arms_step_by_step_per_stage(tmp_path):
    """`curves`: per stage and common seed, the steps both arms logged, mean and largest
    |a - b|, the mean of a - b over the last 10 steps, the last losses; one plot each."""
    def write(arm, seed, stage, losses):
        folder = tmp_path / f"{arm}_seed{seed}" / stage
        os.makedirs(folder)
        (folder / "metrics.jsonl").write_text("".join(
            json.dumps({"step": i + 1, "lm_loss": v, "lr": 1e-4}) + "\n"
            for i, v in enumerate(losses)))

    bf16 = [2.0 - 0.01 * i for i in range(20)]
    write("te", 1, "sft", bf16)
    write("te_fp8", 1, "sft", [v + (0.002 if i < 10 else 0.004) for i, v in enumerate(bf16)])
    write("te", 1, "xft_moe", [1.5, 1.4, 1.3])
    write("te_fp8", 1, "xft_moe", [1.5, 1.45])  # stopped early: the steps both logged
    write("te", 2, "sft", bf16)  # seed 2 ran one arm only: left out
    plots = tmp_path / "plots"
    text = xft_arms.curves(str(tmp_path), "te", "te_fp8", str(plots))
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in text.splitlines()[2:]}
    assert set(rows) == {"sft (dense)", "xft moe"}
    assert rows["sft (dense)"][1:] == ["1", "20", "0.0030", "0.0040", "-0.0040", "1.8100",
                                       "1.8140"]
    assert rows["xft moe"][1:] == ["1", "2", "0.0250", "0.0500", "-0.0250", "1.4000", "1.4500"]
    assert sorted(os.listdir(plots)) == ["te_vs_te_fp8_sft_seed1.png",
                                         "te_vs_te_fp8_xft_moe_seed1.png"]
    with pytest.raises(SystemExit, match="no seed ran both te and paper"):
        xft_arms.curves(str(tmp_path), "te", "paper")
