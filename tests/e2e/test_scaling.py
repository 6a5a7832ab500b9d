"""The scaling-study harness (benchmarks/scaling.py): the CPU smoke study end to end under
torchrun (gloo), its CSV, summary and plots; point expansion, validation and plot skipping."""

import csv
import math
import os
import subprocess
import sys

import pytest

from benchmarks.scaling import COLUMNS, PARTS, Study, expand, make_point
from benchmarks.scaling_plots import write_plots
from tests.common import REPO

SMOKE = os.path.join(REPO, "benchmarks", "studies", "cpu_smoke.yaml")
H200 = os.path.join(REPO, "benchmarks", "studies", "h200.yaml")
REQUIRED = ("gpus", "tp", "pp", "ep", "dp", "dispatcher", "experts", "topk", "status",
            "reason", "tokens_per_s", "tokens_per_s_per_gpu", "mfu", "peak_mem_gib",
            "step_s", "forward_s", "backward_s", "optimizer_s", "grad_sync_s",
            "moe_dispatch_s", "moe_combine_s", "loss_first", "loss_last")
POSITIVE = ("step_s", "tokens_per_s", "tokens_per_s_per_gpu", "tflops_per_gpu", "peak_tflops",
            "mfu", "peak_mem_gib", "mem_estimate_gib", "breakdown_step_s", "forward_s",
            "backward_s", "optimizer_s", "moe_dispatch_s", "moe_combine_s", "loss_first",
            "loss_last", "params_total", "params_active")
SLACK = 1.10  # timer boundaries add a little around the parts


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("scaling")
    r = subprocess.run([sys.executable, "-m", "benchmarks.scaling", SMOKE, "--out", str(out),
                        "--devices", "2"], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with open(out / "scaling.csv") as f:
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames, list(reader)
    return out, header, rows, r.stdout


def _num(row, key):
    return float(row[key])


def test_csv_has_every_column_and_one_row_per_point(smoke):
    _, header, rows, _ = smoke
    assert header == list(COLUMNS)
    assert set(REQUIRED) <= set(header)
    assert len(rows) == 5
    assert [r["status"] for r in rows].count("ok") == 4


def test_skipped_point_is_listed_not_silent(smoke):
    out, _, rows, stdout = smoke
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert len(skipped) == 1 and skipped[0]["gpus"] == "4" and skipped[0]["ep"] == "4"
    assert "needs 4 devices, 2 present" in skipped[0]["reason"]
    assert skipped[0]["tokens_per_s"] == ""  # nothing measured for it
    summary = (out / "summary.md").read_text()
    assert f"{skipped[0]['point']}: **skipped**" in summary
    assert "skipped: needs 4 devices" in stdout


def test_measurements_are_finite_positive_and_consistent(smoke):
    _, _, rows, _ = smoke
    for r in (r for r in rows if r["status"] == "ok"):
        for key in POSITIVE:
            v = _num(r, key)
            assert math.isfinite(v) and v > 0, (r["point"], key, v)
        tokens = _num(r, "global_batch") * _num(r, "seq_length")
        assert _num(r, "tokens_per_s") == pytest.approx(tokens / _num(r, "step_s"), rel=1e-4)
        assert _num(r, "tokens_per_s_per_gpu") == pytest.approx(
            _num(r, "tokens_per_s") / _num(r, "gpus"), rel=1e-4)
        assert _num(r, "mfu") == pytest.approx(
            _num(r, "tflops_per_gpu") / _num(r, "peak_tflops"), rel=1e-4)
        assert _num(r, "step_s_min") <= _num(r, "step_s") <= _num(r, "step_s_max")
        assert _num(r, "loss_last") < _num(r, "loss_first")  # it trains on real text
        assert _num(r, "pipeline_p2p_s") == 0  # no pipeline parallelism in this study
        assert int(r["dp"]) * int(r["tp"]) * int(r["pp"]) == int(r["gpus"])


def test_breakdown_parts_fit_in_the_step(smoke):
    _, _, rows, _ = smoke
    for r in (r for r in rows if r["status"] == "ok"):
        step = _num(r, "breakdown_step_s")
        parts = sum(_num(r, k) for k in PARTS)
        assert parts <= step * SLACK, (r["point"], parts, step)
        assert _num(r, "other_s") >= -0.1 * step
        compute = _num(r, "forward_s") + _num(r, "backward_s")
        moe = _num(r, "moe_dispatch_s") + _num(r, "moe_combine_s")
        assert moe <= compute * SLACK, (r["point"], moe, compute)
        # (what the instrumentation costs is a benchmark's question, not a test's)


def test_dispatcher_timers_see_expert_parallel_communication(smoke):
    _, _, rows, _ = smoke
    ok = {(r["ep"], r["dispatcher"], r["experts"]): r for r in rows if r["status"] == "ok"}
    local = ok[("1", "alltoall", "4")]  # EP 1: the all-to-all is an identity
    assert _num(local, "moe_dispatch_s") >= 0 and _num(local, "moe_combine_s") >= 0
    for dispatcher in ("alltoall", "allgather"):  # the timers wrap the real collectives
        ep2 = ok[("2", dispatcher, "4")]
        assert _num(ep2, "moe_dispatch_s") > 0 and _num(ep2, "moe_combine_s") > 0, dispatcher


def test_plots_written_and_listed(smoke):
    out, _, _, _ = smoke
    summary = (out / "summary.md").read_text()
    for name in ("throughput_vs_gpus.png", "mfu_vs_layout.png", "memory_vs_experts.png"):
        assert (out / name).stat().st_size > 10_000, name
        assert f"`{name}`: written" in summary
    for column in COLUMNS:
        assert f"`{column}`" in summary


def test_points_deduplicated_validated_and_plots_skipped_without_their_axis(tmp_path):
    study = Study.load(SMOKE)
    points, varies = expand(study)
    assert len(points) == 5  # the base point is in both sweeps, run once
    assert points[0].sweeps == ["experts", "layout"]
    assert varies == {"experts": ["moe.num_experts"],
                      "layout": ["gpus", "moe.dispatcher", "parallel.expert"]}
    bad = make_point(study, {"gpus": 2, "parallel.expert": 3})
    assert bad.config is None and "not divisible by parallel.expert=3" in bad.error
    study.sweeps = [s for s in study.sweeps if s["name"] == "experts"]
    points, varies = expand(study)
    plots = {name: why for name, path, why in write_plots([], points, varies, str(tmp_path))}
    assert plots["throughput_vs_gpus.png"] == "no sweep varies the GPU count"
    assert plots["mfu_vs_layout.png"] == "no sweep varies the parallel layout"
    assert plots["memory_vs_experts.png"].startswith("fewer than two successful points")
    assert not list(tmp_path.iterdir())


def test_h200_study_plan(tmp_path):
    """The GPU study validates and has the points it promises, on 1 and 2 GPUs."""
    points, varies = expand(Study.load(H200))
    assert all(p.error is None for p in points), [p.error for p in points if p.error]
    shapes = {(p.gpus, p.config.moe.num_experts, p.config.moe.topk if p.config.moe.enabled
               else 0, p.config.parallel.expert, p.config.moe.dispatcher) for p in points}
    for need in ((1, 0, 0, 1, "alltoall"), (2, 0, 0, 1, "alltoall"), (1, 8, 6, 1, "alltoall"),
                 (1, 8, 2, 1, "alltoall"), (1, 4, 2, 1, "alltoall"), (1, 16, 2, 1, "alltoall"),
                 (2, 8, 6, 1, "alltoall"), (2, 8, 6, 2, "alltoall"), (2, 8, 6, 2, "allgather")):
        assert need in shapes, need
    assert {p.gpus for p in points} == {1, 2}
    assert varies["experts"] == ["moe.num_experts"]
    assert {"gpus", "parallel.expert", "moe.dispatcher"} <= set(varies["layout"])
