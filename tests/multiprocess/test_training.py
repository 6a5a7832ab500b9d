"""The training loop: P6 (an interrupted and resumed run repeats the uninterrupted loss curve
exactly), resume under another layout (weights and schedule kept), the NaN policy (stop keeps
the last good checkpoint; skip leaves the weights untouched), routing metrics, and the
metrics files. One group of two gloo processes runs every scenario."""

import json
import math
import os

import pytest
import torch

from tests import common
from tests.harness import run_ranks

# XFT MoE with noisy gating on: exact resume needs every RNG stream restored
MOE = ["moe.num_experts=4", "moe.topk=3", "moe.router_noise=true", "parallel.expert=2",
       "train.train_steps=6", "train.lr_warmup_steps=2", "train.lr_decay_style=cosine",
       "train.clip_grad=1.0", "checkpoint.keep=0"]


def _nan_at(step_to_break, calls):
    def hook(loss):
        calls.append(loss)
        return float("nan") if len(calls) == step_to_break else loss
    return hook


def _weights(chunks):
    from xft_megatron.checkpoint import dist as ckpt

    return {k: v.clone() for k, v in ckpt.local_state_dict(chunks).items()}


def _body(rank, world, root):
    from xft_megatron.checkpoint import directory
    from xft_megatron.checkpoint import dist as ckpt
    from xft_megatron.training.loop import NonFiniteLoss, train

    out = {}
    # P6: uninterrupted vs stopped after step 3 and resumed
    cfg = common.tiny_config(*MOE, f"checkpoint.save={root}/full")
    data = common.RandomBatches(cfg)
    out["full"] = train(cfg, data, progress=False).losses
    cfg = common.tiny_config(*MOE, f"checkpoint.save={root}/split", "checkpoint.save_interval=2")
    polls = []
    first = train(cfg, data, progress=False, should_stop=lambda: polls.append(1) or len(polls) == 3)
    out["first"], out["first_stopped"] = first.losses, first.stopped_early
    out["first_ckpt"] = os.path.basename(first.checkpoint)
    second = train(cfg, data, progress=False, resume=True)
    out["second"], out["second_start"] = second.losses, second.start_step
    out["listing"] = sorted(os.listdir(f"{root}/split"))
    out["train_state"] = ckpt.read_train_state(f"{root}/split")

    # resume under another layout (data parallel 2 instead of expert parallel 2): the weights
    # of step 3 load into the new layout and training continues from step 3
    dp = common.tiny_config(*[o for o in MOE if o != "parallel.expert=2"],
                            f"checkpoint.save={root}/split_dp")
    import shutil

    if rank == 0:
        shutil.copytree(f"{root}/split", f"{root}/split_dp")
        directory.write_atomic(f"{root}/split_dp/latest", "iter_0000003\n")
    torch.distributed.barrier()
    moved = train(dp, data, progress=False, resume=True)
    out["moved_start"], out["moved"] = moved.start_step, moved.losses

    # checkpoint.final_optimizer=false: the final save holds the weights, scheduler and step
    # alone; a --resume with more steps goes on from it with fresh optimizer moments
    from xft_megatron.checkpoint import space

    lean = [*MOE, f"checkpoint.save={root}/lean", "checkpoint.final_optimizer=false"]
    train(common.tiny_config(*lean, "train.train_steps=3"), data, progress=False)
    out["lean_state"] = ckpt.read_train_state(f"{root}/lean")
    out["lean_bytes"] = space.folder_bytes(f"{root}/lean/iter_0000003")
    out["full_bytes"] = space.folder_bytes(f"{root}/split/iter_0000003")  # with its optimizer
    more = train(common.tiny_config(*lean, "train.train_steps=5"), data, progress=False,
                 resume=True)
    out["lean_resumed"] = (more.start_step, more.losses)

    # the NaN policy. stop: raises at step 3, the checkpoint of step 2 stays the latest
    stop = common.tiny_config(*MOE, f"checkpoint.save={root}/nan_stop",
                              "checkpoint.save_interval=1", "train.on_nan=stop")
    try:
        train(stop, data, progress=False, loss_hook=_nan_at(3, []))
        out["stop_error"] = None
    except NonFiniteLoss as e:
        out["stop_error"] = str(e)
    out["stop_latest"] = open(f"{root}/nan_stop/latest").read().strip()
    # a finished merge stage resumed (a pipeline killed right after its last save): the
    # finished run's summary and coefficients, not those of a run of no steps
    merge = common.tiny_config(*MOE, f"checkpoint.save={root}/merge", "train.stage=merge",
                               "train.train_steps=2", "train.lr_warmup_steps=1")
    done = train(merge, data, progress=False)
    again = train(merge, data, progress=False, resume=True)
    out["merge_resumed"] = {
        "coefficients": again.merge_coefficients == done.merge_coefficients and
        bool(done.merge_coefficients),
        "summary": {k: tuple(json.loads(json.dumps(x.summary.get(k))) for x in (again, done))
                    for k in
                    ("steps_done", "final_loss", "start_step", "merge_coefficients")},
        "checkpoint": (again.checkpoint, done.checkpoint)}
    # a NaN at step 1 names no checkpoint (none exists); a run whose every step was skipped
    # writes none and says why (it used to end in an optimizer assertion called a full disk)
    for name, policy in (("nan_first", "stop"), ("nan_all", "skip")):
        cfg = common.tiny_config(*MOE, f"checkpoint.save={root}/{name}", "train.train_steps=2",
                                 "train.lr_warmup_steps=1",
                                 f"train.on_nan={policy}")
        try:
            train(cfg, data, progress=False, loss_hook=lambda loss: float("nan"))
            out[name] = None
        except NonFiniteLoss as e:
            out[name] = str(e)
        out[name + "_listing"] = sorted(os.listdir(f"{root}/{name}")) \
            if os.path.isdir(f"{root}/{name}") else []
    # skip: step 3 changes nothing (weights equal a 2-step run's), the run goes on
    skip = common.tiny_config(*MOE, f"checkpoint.save={root}/nan_skip", "train.on_nan=skip",
                              "train.train_steps=3")
    res = train(skip, data, progress=False, loss_hook=_nan_at(3, []))
    out["skipped"] = res.skipped_steps
    two = common.tiny_config(*MOE, f"checkpoint.save={root}/two", "train.train_steps=3")
    polls = []
    train(two, data, progress=False, should_stop=lambda: polls.append(1) or len(polls) == 2)
    a = _weights(common.setup(skip, f"{root}/nan_skip", ddp=False)[0])
    b = _weights(common.setup(two, f"{root}/two", ddp=False)[0])
    out["skip_same_weights"] = all(torch.equal(a[k], b[k]) for k in a)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("training"))
    return run_ranks(2, _body, root), root


def test_resume_reproduces_the_uninterrupted_run(results):
    r, _ = results[0]
    assert r["first_stopped"] and r["first_ckpt"] == "iter_0000003"
    assert len(r["first"]) == 3 and r["second_start"] == 3 and len(r["second"]) == 3
    assert r["first"] + r["second"] == r["full"], (r["first"] + r["second"], r["full"])
    assert r["train_state"]["step"] == 6 and r["train_state"]["consumed_samples"] == 24
    assert r["listing"] == ["iter_0000002", "iter_0000003", "iter_0000004", "iter_0000006",
                            "latest", "metrics.jsonl", "summary.json", "tensorboard"]


def test_resume_under_another_layout_keeps_weights_and_schedule(results):
    r = results[0][0]
    assert r["moved_start"] == 3 and len(r["moved"]) == 3
    # same weights and step, fresh optimizer moments: close to the exact curve, not equal
    assert all(math.isfinite(x) for x in r["moved"])
    assert abs(r["moved"][0] - r["full"][3]) < 0.05 * abs(r["full"][3])


def test_a_weights_only_final_checkpoint_is_smaller_and_resumes(results):
    r = results[0][0]
    assert r["lean_state"]["step"] == 3 and r["lean_state"]["optimizer"] is False
    # fp32 weights alone vs weights + fp32 main copy + two Adam moments: about a quarter
    assert r["lean_bytes"] < 0.4 * r["full_bytes"], (r["lean_bytes"], r["full_bytes"])
    start, losses = r["lean_resumed"]
    assert start == 3 and len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert abs(losses[0] - r["full"][3]) < 0.05 * abs(r["full"][3])  # the step-3 weights


def test_nan_policy(results):
    r = results[0][0]
    assert r["stop_error"] and "step 3" in r["stop_error"] and "on_nan=skip" in r["stop_error"]
    assert r["stop_latest"] == "iter_0000002"
    assert "iter_0000002" in r["stop_error"]  # the last good checkpoint itself is named
    assert "No checkpoint of this run was written yet" in r["nan_first"], r["nan_first"]
    assert "step 1" in r["nan_first"] and "iter_" not in r["nan_first"]
    assert "every step so far (1-2)" in r["nan_all"] and "no checkpoint is written" in \
        r["nan_all"], r["nan_all"]
    assert not [n for n in r["nan_first_listing"] + r["nan_all_listing"] if "iter_" in n]
    assert r["skipped"] == [3] and r["skip_same_weights"]


def test_a_finished_run_resumed_keeps_its_result(results):
    r = results[0][0]["merge_resumed"]
    assert r["coefficients"], r
    for key, (again, done) in r["summary"].items():
        assert again == done, (key, again, done)
    assert r["checkpoint"][0] == r["checkpoint"][1] and r["checkpoint"][0], r


def test_metrics_files(results):
    root = results[1]
    lines = [json.loads(x) for x in open(os.path.join(root, "full", "metrics.jsonl"))]
    assert [x["step"] for x in lines] == [1, 2, 3, 4, 5, 6]
    for x in lines:
        for key in ("loss", "lm_loss", "moe_loss", "lr", "grad_norm", "tokens_per_s",
                    "memory_gib"):
            assert math.isfinite(x[key]), key
        load = torch.tensor(x["expert_load"])  # [layers, experts]: fraction of tokens
        assert torch.allclose(load[:, 0], torch.ones(load.shape[0]))  # the shared expert
        assert torch.allclose(load.sum(dim=1), torch.full((load.shape[0],), 3.0))  # top-3
        g0 = torch.tensor(x["shared_weight"])
        assert ((g0 > 0) & (g0 < 1)).all()
        # routing diagnostics of every MoE layer, in their ranges
        for key, low, high in (("set_survives", 0, 1), ("clean_entropy", 0, 1),
                               ("clean_spread", 0, math.inf), ("noise_scale", 0, math.inf)):
            assert len(x[key]) == load.shape[0] and all(low <= v <= high for v in x[key]), key
    assert lines[1]["lr"] > lines[0]["lr"]  # warmup
    summary = json.load(open(os.path.join(root, "full", "summary.json")))
    assert summary["steps_done"] == 6 and summary["final_loss"] == lines[-1]["loss"]
    # the expert divergence at the final save, in the log and the summary
    assert "expert_divergence" in lines[-1] and \
        summary["expert_divergence"] == lines[-1]["expert_divergence"]
    assert set(summary["routing"]) >= {"shared_weight", "set_survives", "clean_entropy"}
    assert os.listdir(os.path.join(root, "full", "tensorboard"))


def test_resumed_metrics_keep_one_line_per_step(tmp_path):
    """A run resumed at step 4 (its checkpoint) after one that logged 6 steps and was cut
    mid-line: metrics.jsonl keeps steps 1-4, then the resumed run's 5 and 6 follow."""
    from xft_megatron.training.metrics import Metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 10.0 - s}) + "\n"
                            for s in range(1, 7)) + '{"step": 7, "lo')
    m = Metrics(str(tmp_path), True, start_step=4, total_steps=6, progress=False)
    for s in (5, 6):
        m.log(s, {"loss": 1.0, "lr": 0.1})
    m.close()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in rows] == [9.0, 8.0, 7.0, 6.0, 1.0, 1.0]


def test_a_full_disk_under_the_log_stops_with_one_message(tmp_path, capfd):
    """The TensorBoard writer's file write fails in its background thread (ENOSPC injected at
    its record writer): no thread traceback is printed, the next log call raises one
    LogWriteError naming the folder and what to do, and the previous thread hook is back."""
    import threading

    reported, pytest_hook = [], threading.excepthook
    threading.excepthook = reported.append  # what would be printed as a traceback
    try:
        _fill_the_log_disk(tmp_path)
    finally:
        threading.excepthook = pytest_hook
    assert reported == [] and "Traceback" not in capfd.readouterr().err


def _fill_the_log_disk(tmp_path):
    import errno
    import threading
    import time

    from xft_megatron.training.metrics import LogWriteError, Metrics

    hook = threading.excepthook
    m = Metrics(str(tmp_path), True, start_step=0, total_steps=50, progress=False)
    worker = m.writer._get_file_writer().event_writer._async_writer._worker

    def full(data):
        raise OSError(errno.ENOSPC, "No space left on device")

    worker._record_writer.write = full
    with pytest.raises(LogWriteError, match=r"could not write the training log in .* at step "
                       r"\d+ \(\[Errno 28\] No space left on device; its disk has .* free\)"):
        for step in range(1, 51):
            m.log(step, {"loss": 1.0, "lr": 0.1})
            time.sleep(0.02)  # the thread takes the record and fails
    with pytest.raises(LogWriteError):
        m.close()
    assert threading.excepthook is hook
