"""Faults while training (reliability items 1, 2, 5): SIGKILL at many points of checkpoint
writing, SIGTERM mid-run (preemption), and a file-size limit (disk full) during a save.
Every time the previous checkpoint must load and the resumed run must repeat the
uninterrupted loss curve exactly. Figures go to RELIABILITY.md."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests import common, fault_child
from tests.harness import run_ranks

HERE = os.path.join(common.REPO, "tests")  # the child scripts
CHILD = [sys.executable, os.path.join(HERE, "fault_child.py")]


def _prepare(rank, world, base, ref_root):
    """base: the tiny run stopped after step 2 (iter 1 and 2 saved); ref: 4 steps straight."""
    from xft_megatron.training.loop import train

    cfg = fault_child.config(base)
    polls = []
    train(cfg, common.RandomBatches(cfg), progress=False,
          should_stop=lambda: polls.append(1) or len(polls) == 2)
    ref = fault_child.config(ref_root)
    return train(ref, common.RandomBatches(ref), progress=False).losses


def _verify(rank, world, dirs, ref):
    """For each killed run: which checkpoint survives, and the resumed curve."""
    from xft_megatron.checkpoint import dist as ckpt
    from xft_megatron.training.loop import train

    out = []
    for d in dirs:
        path = ckpt.resolve(d)
        step = ckpt.read_train_state(path)["step"]
        cfg = fault_child.config(d)
        resumed = train(cfg, common.RandomBatches(cfg), progress=False, resume=True).losses
        out.append({"dir": d, "survivor": os.path.basename(path), "step": step,
                    "exact": ref[:step] + resumed == ref,
                    "leftovers": sorted(n for n in os.listdir(d) if n.startswith("."))})
    return out


def _run_children(jobs, parallel=2):
    """jobs: [(dir, args)] -> {dir: returncode}, `parallel` at a time."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": common.REPO}
    results, running = {}, []
    jobs = list(jobs)
    while jobs or running:
        while jobs and len(running) < parallel:
            d, args = jobs.pop(0)
            running.append((d, subprocess.Popen(CHILD + [d] + args, env=env,
                                                stdout=subprocess.DEVNULL,
                                                stderr=subprocess.DEVNULL)))
        time.sleep(0.2)
        for d, p in list(running):
            if p.poll() is not None:
                results[d] = p.returncode
                print(f"child {os.path.basename(d)}: {p.returncode}", file=sys.stderr)
                running.remove((d, p))
    return results


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    ref = run_ranks(1, _prepare, str(root / "base"), str(root / "ref"))[0]
    return root, ref


def test_sigkill_at_many_points_of_a_save(prepared):
    root, ref = prepared
    counting = root / "count"
    shutil.copytree(root / "base", counting)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": common.REPO}
    out = subprocess.run(CHILD + [str(counting), "0"], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    ops = int(out.stdout.split("OPS")[-1].split()[0])
    assert ops >= 20  # file-system operations one save makes (every one is a kill point)
    # 10 of them, spread evenly over the save from first to last (each child costs a
    # process start), plus 2 wall-clock points inside Megatron's writer
    picks = sorted({1 + round(i * (ops - 1) / 9) for i in range(10)})
    jobs = [(str(root / f"op{k:03d}"), [str(k)]) for k in picks]
    jobs += [(str(root / f"t{i}"), ["0", f"{delay}"]) for i, delay in enumerate((0.1, 0.5))]
    for d, _ in jobs:
        shutil.copytree(root / "base", d)
    codes = _run_children(jobs)
    killed = [d for d, c in codes.items() if c == -signal.SIGKILL]
    assert len([d for d in killed if "op" in os.path.basename(d)]) == len(picks)
    checks = run_ranks(1, _verify, [d for d, _ in jobs], ref)[0]
    for c in checks:
        assert c["survivor"] in ("iter_0000002", "iter_0000003"), c
        assert c["exact"], c
    survivors = {c["survivor"] for c in checks}
    assert survivors == {"iter_0000002", "iter_0000003"}  # kills before and after the switch
    figures = {"kill points": len(jobs), "killed": len(killed),
               "previous checkpoint loaded": sum(c["survivor"] == "iter_0000002" for c in checks),
               "new checkpoint complete": sum(c["survivor"] == "iter_0000003" for c in checks),
               "resume exact": sum(c["exact"] for c in checks), "save operations": ops}
    print("FIGURES kill-during-save", json.dumps(figures))


def test_sigterm_checkpoints_and_resumes_exactly(prepared, tmp_path):
    """`xft train` gets SIGTERM mid-run: it finishes the step, saves, exits 0; --resume
    then reproduces the uninterrupted loss curve."""
    root, _ = prepared
    data = tmp_path / "text.jsonl"
    import sysconfig

    src = os.path.join(sysconfig.get_paths()["stdlib"], "json")
    with open(data, "w") as f:
        for name in sorted(os.listdir(src)):
            if name.endswith(".py"):
                f.write(json.dumps({"text": open(os.path.join(src, name)).read()}) + "\n")
    args = ["model.preset=tiny", "train.seq_length=64", "train.micro_batch_size=2",
            "train.global_batch_size=4", "train.train_steps=40", "train.lr_warmup_steps=2",
            f"data.path={data}", "checkpoint.save_interval=0"]
    xft = [sys.executable, "-m", "xft_megatron.cli", "train"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = subprocess.run(xft + args + [f"checkpoint.save={tmp_path}/full"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert full.returncode == 0, full.stderr[-2000:]
    run = tmp_path / "pre"
    p = subprocess.Popen(xft + args + [f"checkpoint.save={run}"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or
                                      len(metrics.read_text().splitlines()) < 5):
        time.sleep(0.05)
    t0 = time.time()
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    exit_s = time.time() - t0
    assert p.returncode == 0, err[-2000:]
    stopped = json.load(open(run / "summary.json"))["steps_done"]
    assert 5 <= stopped < 40 and open(run / "latest").read().strip() == f"iter_{stopped:07d}"
    resumed = subprocess.run(xft + args + [f"checkpoint.save={run}", "--resume"],
                             capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    def curve(d):
        return [json.loads(x)["loss"] for x in open(d / "metrics.jsonl")]

    assert curve(run) == curve(tmp_path / "full")  # metrics.jsonl appends across the resume
    print("FIGURES sigterm", json.dumps({"stopped_at_step": stopped, "exit_s": round(exit_s, 2)}))


def _catches(pid: int, sig: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        mask = next(int(x.split()[1], 16) for x in f if x.startswith("SigCgt:"))
    return bool(mask >> (sig - 1) & 1)


def test_sigterm_while_starting_up_still_checkpoints(tmp_path):
    """SIGTERM as soon as `xft train` catches it (before torch is imported): the run starts
    up, stops after its first step with a checkpoint and exits 0 (it used to die, rc -15)."""
    data = tmp_path / "text.jsonl"
    _stdlib_jsonl(data)
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "xft_megatron.cli", "train",
                          "model.preset=tiny", "train.seq_length=32", "train.micro_batch_size=2",
                          "train.global_batch_size=2", "train.train_steps=20",
                          "train.lr_warmup_steps=1", f"data.path={data}",
                          f"checkpoint.save={run}", "checkpoint.save_interval=0"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not _catches(p.pid, signal.SIGTERM):
        assert time.time() < deadline and p.poll() is None
        time.sleep(0.002)
    torch_loaded = "libtorch" in open(f"/proc/{p.pid}/maps").read()
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-2000:]
    assert not torch_loaded  # the handler came before the heavy imports
    assert open(run / "latest").read().strip() == "iter_0000001"


def _disk_full(rank, world, base):
    import resource

    from xft_megatron.checkpoint import dist as ckpt
    from xft_megatron.training.loop import train

    cfg = fault_child.config(base)
    before = open(os.path.join(base, "latest")).read()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        train(cfg, common.RandomBatches(cfg), progress=False, resume=True)
        error = None
    except ckpt.CheckpointWriteError as e:
        error = str(e)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    return {"error": error, "latest_same": open(os.path.join(base, "latest")).read() == before,
            "survivor": os.path.basename(ckpt.resolve(base)),
            "listing": sorted(os.listdir(base))}


def _log_full(rank, world, base):
    """The training log cannot grow (a file-size limit just above metrics.jsonl's size):
    the run stops with one message, TensorBoard's writer thread prints no traceback."""
    import io
    import resource

    from xft_megatron.training.loop import train
    from xft_megatron.training.metrics import LogWriteError

    cfg = fault_child.config(base)
    before = open(os.path.join(base, "latest")).read()
    limit = os.path.getsize(os.path.join(base, "metrics.jsonl")) + 16
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    err, real_stderr = io.StringIO(), sys.stderr
    sys.stderr = err
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        train(cfg, common.RandomBatches(cfg), progress=False, resume=True)
        error = None
    except LogWriteError as e:
        error = str(e)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        sys.stderr = real_stderr
    return {"error": error, "stderr": err.getvalue(),
            "latest_same": open(os.path.join(base, "latest")).read() == before}


def test_disk_full_during_save_keeps_the_previous_checkpoint(prepared):
    root, _ = prepared
    d = root / "fsize"
    shutil.copytree(root / "base", d)
    r = run_ranks(1, _disk_full, str(d))[0]
    assert r["error"] and "Nothing was replaced" in r["error"] and "iter_0000003" in r["error"]
    assert "free: is it full, or a file-size limit set?" in r["error"]  # names the free space
    assert r["latest_same"] and r["survivor"] == "iter_0000002"
    assert not [n for n in r["listing"] if n.startswith(".tmp")]  # no partial folder left
    d = root / "logfull"
    shutil.copytree(root / "base", d)
    r = run_ranks(1, _log_full, str(d))[0]
    assert r["error"] and "could not write the training log" in r["error"] and \
        "File too large" in r["error"] and "--resume" in r["error"], r
    assert "Traceback" not in r["stderr"], r["stderr"][-2000:]
    assert r["latest_same"]


def test_a_dying_rank_ends_the_job_quickly(tmp_path):
    """Rank 2 of 4 exits in its third step (DP=2 x TP=2): the job ends with a non-zero
    status within a bounded time (torchrun stops the other ranks), naming the failed rank."""
    args = ["model.preset=tiny", "train.seq_length=32", "train.micro_batch_size=1",
            "train.global_batch_size=4", "train.train_steps=50", "parallel.tensor=2",
            "parallel.sequence_parallel=true", "data.path=builtin:stdlib",
            f"checkpoint.save={tmp_path}/run", "data.cache_dir=" + str(tmp_path / "cache")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
           "--monitor-interval", "1", os.path.join(HERE, "rank_fault_child.py"), "2"] + args
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": common.REPO}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    end = time.time()
    assert r.returncode != 0
    fault = [x for x in r.stdout.splitlines() if x.startswith("FAULT")]
    assert fault, r.stdout[-2000:] + r.stderr[-2000:]
    seconds = end - float(fault[0].split()[-1])
    assert "exitcode" in r.stderr and "17" in r.stderr
    assert seconds < 60, seconds
    print("FIGURES rank-failure", json.dumps({"seconds_to_exit": round(seconds, 1),
                                               "returncode": r.returncode}))


def _processes_with(text: str):
    """pids of this machine's processes whose command line contains `text`."""
    out = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read() and int(pid) != os.getpid():
                    out.append(int(pid))
        except (OSError, ValueError):
            continue
    return out


def _wait_for(path, proc, seconds=120):
    """Until the held writer has written its pid to `path`."""
    deadline = time.time() + seconds
    while time.time() < deadline and not (
            os.path.exists(path) and open(path).read().split()):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    assert os.path.exists(path), f"no save was reached in {seconds}s"
    time.sleep(0.3)  # the trainer now waits for its writers


def _stdlib_jsonl(path):
    import sysconfig

    src = os.path.join(sysconfig.get_paths()["stdlib"], "json")
    with open(path, "w") as f:
        for name in sorted(os.listdir(src)):
            if name.endswith(".py"):
                f.write(json.dumps({"text": open(os.path.join(src, name)).read()}) + "\n")


def test_concurrent_run_refused_and_ctrl_c_or_kill_during_a_save(tmp_path):
    """Two runs into one checkpoint.save: the second is refused at start, naming the first,
    which goes on. Ctrl-C (SIGINT) to the first while Megatron's writer writes its second
    checkpoint: it exits within seconds, no writer left, `latest` still names the first
    checkpoint, which --resume loads. SIGKILL to a third run during its save: no process of
    it survives; its lock and partial folder are taken over / removed by the next run."""
    from xft_megatron.checkpoint import dist as ckpt
    from xft_megatron.checkpoint import lock

    data = tmp_path / "text.jsonl"
    _stdlib_jsonl(data)
    args = ["model.preset=tiny", "train.seq_length=64", "train.micro_batch_size=2",
            "train.global_batch_size=4", "train.train_steps=3", "train.lr_warmup_steps=1",
            f"data.path={data}", "checkpoint.save_interval=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": common.REPO}

    def start(run, marker=None, extra=()):
        a = ["train"] + args + [f"checkpoint.save={run}"] + list(extra)
        code = (f"import tests.fault_child as f; f.hold_writer({str(marker)!r}); "
                if marker else "import tests.fault_child as f; ") + f"f.xft(*{a!r})"
        return subprocess.Popen([sys.executable, "-c", code], cwd=common.REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=common.sigint_as_usual)

    x, y = tmp_path / "x", tmp_path / "y"
    mx, my = tmp_path / "held-x", tmp_path / "held-y"
    a, d = start(x, mx), start(y, my)
    _wait_for(mx, a)
    second = subprocess.run([sys.executable, "-m", "xft_megatron.cli", "train"] + args +
                            [f"checkpoint.save={x}", "--resume"], capture_output=True,
                            text=True, env=env, timeout=300)
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"pid {a.pid}" in second.stderr and lock.HOST in second.stderr, second.stderr
    assert "in use by another run" in second.stderr and "started" in second.stderr

    t0 = time.time()
    a.send_signal(signal.SIGINT)  # the writer of iter 2 is writing
    _, err = a.communicate(timeout=60)
    sigint_s = time.time() - t0
    assert a.returncode == 130 and "Traceback" not in err and "interrupted" in err, err[-3000:]
    time.sleep(0.5)
    assert not _processes_with(str(mx)), "a writer of the interrupted run survived"
    assert open(x / "latest").read().strip() == "iter_0000001"
    assert sorted(os.listdir(x)) == ["data_cache", "iter_0000001", "latest", "metrics.jsonl",
                                     "summary.json", "tensorboard"]  # no partial, no lock

    _wait_for(my, d)
    d.kill()
    d.wait(timeout=30)
    deadline = time.time() + 10
    while _processes_with(str(my)) and time.time() < deadline:
        time.sleep(0.1)
    survivors = _processes_with(str(my))
    assert not survivors, f"writer processes {survivors} outlived their killed trainer"
    left = sorted(os.listdir(y))
    assert lock.LOCK_FILE in left and any(n.startswith(".tmp-iter_0000002") for n in left)

    resumed = start(x, extra=["--resume"])  # the interrupted run continues from iter 1
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert "resumed from" in out + err and "iter_0000001" in out + err
    assert open(x / "latest").read().strip() == "iter_0000003"
    ckpt.verify(ckpt.resolve(str(x)), collective=False)

    import contextlib
    import io

    from xft_megatron.checkpoint import directory

    notice = io.StringIO()
    with contextlib.redirect_stderr(notice):  # the killed run's lock and partial folder
        with lock.hold(str(y), "test"):
            directory.remove_stale(str(y))
    assert f"pid {d.pid}" in notice.getvalue() and "no longer running" in notice.getvalue()
    assert sorted(os.listdir(y)) == ["data_cache", "iter_0000001", "latest", "metrics.jsonl",
                                     "tensorboard"]
    print("FIGURES concurrent+interrupt", json.dumps({
        "concurrent run refused": 1, "sigint exit_s": round(sigint_s, 2),
        "sigint clean": 1, "sigkill writer survivors": len(survivors)}))


def test_no_process_survives_the_kill_tests(prepared):
    """Run last in this module: no process of the killed trainers (whose command lines name
    the module's directory), e.g. a Megatron writer they forked, is still alive."""
    root, _ = prepared
    deadline = time.time() + 10
    while _processes_with(str(root)) and time.time() < deadline:
        time.sleep(0.2)
    assert not _processes_with(str(root))
