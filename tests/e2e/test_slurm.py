"""slurm/xft.sbatch on a real Slurm cluster: one slurmctld and two slurmd (two emulated nodes)
on this machine, started for this module and stopped at its end. `xft train` runs on CPU/gloo
with one process per node (world size 2, rendezvous across the nodes). Three submissions,
the first two at the same time (one CPU per node each):

1. an uninterrupted run: exit status 0 through `sbatch --wait`, the final checkpoint, the
   per-job log folder with one log per node;
2. the same run stopped mid-way by `scancel --batch --signal=TERM`: the batch shell forwards
   it to the training processes, which save a checkpoint after the current step; the job
   ends with status 0;
3. the same command submitted again: it resumes from that checkpoint (the launcher adds
   --resume); mid-way, USR1 to its batch shell (what `--signal=B:USR1@300` sends before the
   time limit) stops it with a checkpoint and requeues the job, which resumes again and
   finishes. The loss curve of 2 + 3 equals the curve of 1 exactly.

Needs Slurm (slurm-wlm, munge; scripts/test.sh installs them) and root or passwordless sudo
to run the daemons; skipped with the reason otherwise.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import time

import pytest

from tests.common import REPO

SBATCH = os.path.join(REPO, "slurm", "xft.sbatch")
NODES = ("n1", "n2")
PROGRAMS = ("slurmctld", "slurmd", "sbatch", "scancel", "scontrol", "squeue", "sinfo",
            "munge", "unmunge", "munged")
STEPS = 200  # ~25 ms each here: long enough to stop mid-run, short enough for the budget


def _which(name):
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.access(p, os.X_OK)), None)


def _root_prefix():
    """The prefix that runs a command as root ([] when we are root), or None if none does."""
    if os.geteuid() == 0:
        return []
    if shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"],
                                               capture_output=True).returncode == 0:
        return ["sudo", "-n"]
    return None


def _ensure_slurm():
    """Install slurm-wlm and munge when missing and we may; skip (with the reason) otherwise."""
    missing = [p for p in PROGRAMS if not _which(p)]
    as_root = _root_prefix()
    if missing and as_root is None:
        pytest.skip(f"Slurm is not installed ({', '.join(missing)} missing) and cannot be "
                    "installed here: not root and no passwordless sudo")
    if missing:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                     "slurm-wlm", "munge"]):
            r = subprocess.run(as_root + cmd, capture_output=True, text=True, env=env,
                               timeout=600)
            assert r.returncode == 0, \
                f"{' '.join(cmd)} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}"
        missing = [p for p in PROGRAMS if not _which(p)]
        assert not missing, f"installed slurm-wlm and munge, still missing: {missing}"
    if as_root is None:
        pytest.skip("Slurm's daemons (slurmd) run as root: not root and no passwordless sudo")
    return as_root


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Cluster:
    """slurmctld + one slurmd per emulated node, configured under `root` (as in
    shared/SLURM_LOCAL.md); munged too when none is running."""

    def __init__(self, root, as_root):
        self.root, self.as_root = str(root), as_root
        self.conf = os.path.join(self.root, "slurm.conf")
        self.env = {**os.environ, "SLURM_CONF": self.conf}
        self.munged_pid_file = None

    def write_config(self):
        for d in ("state", "spool", "log"):
            os.makedirs(os.path.join(self.root, d), exist_ok=True)
        ctld, *node_ports = _free_ports(1 + len(NODES))
        cpus = os.cpu_count() or 1
        r = self.root
        lines = [
            "ClusterName=xfttest", "SlurmctldHost=localhost", f"SlurmctldPort={ctld}",
            "SlurmUser=root", "AuthType=auth/munge",
            f"StateSaveLocation={r}/state", f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/slurmctld.pid", f"SlurmdPidFile={r}/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log", f"SlurmdLogFile={r}/log/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU", "MpiDefault=none",
            "ReturnToService=2", "SlurmdTimeout=30", "InactiveLimit=0", "KillWait=5",
            "MinJobAge=5",  # `sbatch --wait` then polls every 2 s (it waits longer otherwise)
            # a requeued job may start again cred_expire + 1 s after the requeue (default 121 s)
            "AuthInfo=cred_expire=5", "SchedulerParameters=sched_interval=1",
        ]
        lines += [f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={p} "
                  f"CPUs={cpus} RealMemory=1000 State=UNKNOWN" for n, p in zip(NODES, node_ports)]
        lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")

    def _munge_works(self):
        munge = subprocess.run([_which("munge"), "-n"], capture_output=True)
        return munge.returncode == 0 and subprocess.run(
            [_which("unmunge")], input=munge.stdout, capture_output=True).returncode == 0

    def start(self):
        self.write_config()
        if not self._munge_works():
            subprocess.run(self.as_root + ["mkdir", "-p", "/run/munge"], check=True)
            subprocess.run(self.as_root + ["chown", "munge:munge", "/run/munge"], check=True)
            subprocess.run(self.as_root + ["runuser", "-u", "munge", "--", _which("munged")],
                           check=True, timeout=30)
            self.munged_pid_file = "/run/munge/munged.pid"
            assert self._munge_works(), "munged started but munge/unmunge still fail"
        run = lambda *cmd: subprocess.run(self.as_root + ["env", f"SLURM_CONF={self.conf}"]
                                          + list(cmd), check=True, timeout=30)
        run(_which("slurmctld"), "-c")
        for n in NODES:
            run(_which("slurmd"), "-N", n)
        deadline = time.time() + 30
        while time.time() < deadline:
            states = self.sinfo()
            if states and all(s == "idle" for s in states):
                return
            time.sleep(0.2)
        raise AssertionError(f"nodes not idle after 30 s: {self.sinfo()}\n" + self.daemon_logs())

    def sinfo(self):
        r = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True,
                           env=self.env, timeout=30)
        return r.stdout.split()

    def daemon_logs(self, tail=3000):
        out = []
        for name in sorted(os.listdir(os.path.join(self.root, "log"))):
            with open(os.path.join(self.root, "log", name), errors="replace") as f:
                out.append(f"--- {name}\n{f.read()[-tail:]}")
        return "\n".join(out)

    def stop(self):
        """Cancel what still runs, then TERM every daemon this cluster started (by its pid
        file), KILL after 10 s."""
        try:
            jobs = self.command("squeue", "-h", "-o", "%i", check=False, timeout=10).stdout
            if jobs.split():
                self.command("scancel", *jobs.split(), check=False, timeout=10)
                deadline = time.time() + 20
                while time.time() < deadline and self.command(
                        "squeue", "-h", "-o", "%i", check=False, timeout=10).stdout.split():
                    time.sleep(0.5)
        except subprocess.TimeoutExpired:
            pass
        files = [os.path.join(self.root, f"slurmd-{n}.pid") for n in NODES]
        files.append(os.path.join(self.root, "slurmctld.pid"))
        if self.munged_pid_file:
            files.append(self.munged_pid_file)
        pids = []
        for path in files:
            try:
                pids.append(int(open(path).read().split()[0]))
            except (OSError, ValueError, IndexError):
                continue
            subprocess.run(self.as_root + ["kill", "-TERM", str(pids[-1])], capture_output=True)
        deadline = time.time() + 10
        while pids and time.time() < deadline:
            pids = [p for p in pids if os.path.exists(f"/proc/{p}")]
            time.sleep(0.1)
        for p in pids:
            subprocess.run(self.as_root + ["kill", "-KILL", str(p)], capture_output=True)

    def command(self, *cmd, timeout=60, check=True):
        r = subprocess.run(list(cmd), capture_output=True, text=True, env=self.env,
                           timeout=timeout)
        if check:
            assert r.returncode == 0, f"{' '.join(cmd)}: {r.returncode}\n{r.stdout}{r.stderr}"
        return r


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    as_root = _ensure_slurm()
    c = Cluster(tmp_path_factory.mktemp("slurm"), as_root)
    try:
        c.start()
        yield c
    finally:
        c.stop()


def _job_env(cluster):
    """The submitting environment: the cluster's config, this interpreter, CPU/gloo with one
    process per node; nothing from an enclosing launcher or Slurm job."""
    env = {k: v for k, v in cluster.env.items() if not k.startswith(("SLURM_", "SBATCH_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(SLURM_CONF=cluster.conf, XFT_PYTHON=sys.executable, NPROC_PER_NODE="1",
               OMP_NUM_THREADS="1", PYTHONPATH=REPO, CUDA_VISIBLE_DEVICES="")
    return env


def _make_data(path):
    src = os.path.join(sysconfig.get_paths()["stdlib"], "json")
    with open(path, "w") as f:
        for name in sorted(os.listdir(src)):
            if name.endswith(".py"):
                f.write(json.dumps({"text": open(os.path.join(src, name)).read()}) + "\n")


class Job:
    """`sbatch --wait slurm/xft.sbatch train ...` on both nodes, running in the background."""

    def __init__(self, cluster, workdir, name, args):
        self.cluster, self.workdir, self.name = cluster, str(workdir), name
        cmd = ["sbatch", "--wait", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1",
               f"--job-name={name}", "--output=%x-%j.out", SBATCH, "train"] + args
        self.proc = subprocess.Popen(cmd, cwd=self.workdir, env=_job_env(cluster),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.id, self.log_dir = None, None
        deadline = time.time() + 30
        while time.time() < deadline and self.proc.poll() is None:
            ids = cluster.command("squeue", "-h", "-n", name, "-o", "%i").stdout.split()
            if ids:
                self.id = ids[0]
                break
            time.sleep(0.2)
        assert self.id, f"job {name} not seen in squeue\n{self.report()}"
        self.log_dir = os.path.join(self.workdir, "logs", f"{name}-{self.id}")

    def log(self, name):
        try:
            with open(os.path.join(self.log_dir, name), errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def wait_until(self, predicate, what, timeout=120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if predicate():
                return
            assert self.proc.poll() is None, f"job {self.name} ended before {what}\n" + \
                self.report()
            time.sleep(0.1)
        raise AssertionError(f"job {self.name}: no {what} after {timeout} s\n{self.report()}")

    def finish(self, timeout=180):
        """Wait for `sbatch --wait`: the job's exit status."""
        if self.proc.returncode is not None:
            return self.proc.returncode
        try:
            self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.cluster.command("scancel", str(self.id), check=False)
            self.proc.communicate(timeout=30)
            raise AssertionError(f"job {self.name} still running after {timeout} s\n"
                                 + self.report())
        return self.proc.returncode

    def report(self):
        """The job's logs and the daemons' logs, for failure messages."""
        parts = [f"sbatch status {self.proc.returncode}"]
        batch = os.path.join(self.workdir, f"{self.name}-{self.id}.out")
        if os.path.exists(batch):
            parts.append(f"--- {batch}\n{open(batch, errors='replace').read()[-3000:]}")
        if os.path.isdir(self.log_dir or ""):
            for name in sorted(os.listdir(self.log_dir)):
                text = self.log(name).replace("\r", "\n")
                parts.append(f"--- {name}\n{text[-3000:]}")
        parts.append(self.cluster.daemon_logs(1500))
        return "\n".join(parts)


def _curve(save):
    with open(os.path.join(save, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r["step"] for r in rows], [r["loss"] for r in rows]


def _resumed_steps(job, node_logs):
    """The step each launch of the job resumed from, in launch order. Rank 0 (which prints it)
    may sit on either node: c10d rendezvous numbers the nodes in the order they arrive."""
    found = {}
    for name in node_logs:
        # Each launch on a node starts its part of the log with "... restart K) starts torchrun".
        parts = re.split(r"restart (\d+)\) starts torchrun", job.log(name))
        for restart, text in zip(parts[1::2], parts[2::2]):
            for step in re.findall(r"resumed from \S+ at step (\d+)", text):
                found.setdefault(int(restart), []).append(int(step))
    assert all(len(v) == 1 for v in found.values()), (found, job.report())
    return [found[k][0] for k in sorted(found)]


def _lines(path):
    """Complete lines in a file being appended to (0 if it does not exist yet)."""
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def _latest_step(save):
    with open(os.path.join(save, "latest")) as f:
        name = f.read().strip()
    assert os.path.isfile(os.path.join(save, name, "xft_config.yaml")), name
    return int(name[len("iter_"):])


def _args(workdir, save):
    return ["model.preset=tiny", "train.seq_length=64", "train.micro_batch_size=2",
            "train.global_batch_size=4", f"train.train_steps={STEPS}",
            "train.lr_warmup_steps=2", f"data.path={workdir}/text.jsonl",
            "checkpoint.save_interval=0", f"checkpoint.save={save}"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("jobs")
    _make_data(str(d / "text.jsonl"))
    return d


@pytest.fixture(scope="module")
def reference(cluster, workdir):
    """The uninterrupted run, submitted (not waited for): it runs alongside the stopped one
    (one CPU per node each), which saves time; `finish()` waits for it."""
    save = str(workdir / "ref")
    return Job(cluster, workdir, "ref", _args(workdir, save)), save


def test_stop_resubmit_and_requeue_repeat_the_uninterrupted_curve(cluster, workdir, reference):
    """TERM to the batch shell stops the run with a checkpoint (status 0); the same command
    submitted again resumes; USR1 to its batch shell (the time-limit warning) stops it again
    and requeues the job, which resumes once more and finishes. The loss curve of the three
    pieces equals the uninterrupted one exactly."""
    t0 = time.time()
    save = str(workdir / "pre")
    lines = lambda: _lines(os.path.join(save, "metrics.jsonl"))

    first = Job(cluster, workdir, "pre", _args(workdir, save))
    first.wait_until(lambda: lines() >= 5, "5 training steps")
    cluster.command("scancel", "--batch", "--signal=TERM", first.id)
    assert first.finish() == 0, first.report()
    stopped = _latest_step(save)
    assert 5 <= stopped < STEPS - 20, stopped
    assert lines() == stopped
    summary = json.load(open(os.path.join(save, "summary.json")))
    assert summary["stopped_early"] and summary["steps_done"] == stopped
    assert "got SIGTERM" in first.log("launcher.log") and \
        "requeueing" not in first.log("launcher.log"), first.report()
    t1 = time.time()

    second = Job(cluster, workdir, "again", _args(workdir, save))
    second.wait_until(lambda: lines() >= stopped + 5, "5 steps after resuming")
    cluster.command("scancel", "--batch", "--signal=USR1", second.id)
    assert second.finish() == 0, second.report()  # `sbatch --wait` waits across the requeue
    restarted = _resumed_steps(second, ["n1.log", "n2.log"])
    assert len(restarted) == 2 and restarted[0] == stopped and \
        stopped < restarted[1] < STEPS, second.report()
    launcher = second.log("launcher.log")
    assert "got SIGUSR1" in launcher and "requeueing job" in launcher and \
        "(restart 1)" in launcher, second.report()
    assert _latest_step(save) == STEPS
    t2 = time.time()

    ref, ref_save = reference
    assert ref.finish() == 0, "the uninterrupted run failed:\n" + ref.report()
    steps, losses = _curve(save)  # metrics.jsonl appends across the stops
    assert steps == list(range(1, STEPS + 1))
    assert losses == _curve(ref_save)[1]
    print("FIGURES slurm", json.dumps({
        "stopped_at": stopped, "requeued_at": restarted[1],
        "stopped_job_s": round(t1 - t0, 1), "resumed_and_requeued_job_s": round(t2 - t1, 1)}))


def test_a_job_trains_on_two_nodes_checkpoints_and_logs_per_node(reference):
    job, save = reference
    assert job.finish() == 0, job.report()
    assert _latest_step(save) == STEPS, job.report()
    steps, _ = _curve(save)
    assert steps == list(range(1, STEPS + 1))
    assert sorted(os.listdir(job.log_dir)) == ["launcher.log", "n1.log", "n2.log"], job.report()
    launcher, n1, n2 = job.log("launcher.log"), job.log("n1.log"), job.log("n2.log")
    assert "on 2 node(s) [n[1-2]] x 1 process(es); rendezvous 127.0.0.1:" in launcher, launcher
    assert f"checkpoint.save={save} --resume" in launcher  # `train` resumes when it can
    assert "the step ended with status 0" in launcher
    assert "node n1 (node rank 0, restart 0) starts torchrun" in n1, job.report()
    assert "node n2 (node rank 1, restart 0) starts torchrun" in n2, job.report()
    ranks = n1 + n2  # rank 0 prints; the rendezvous decides on which node it runs
    assert "world 2 = TP 1 x PP 1 x DP 2" in ranks  # one rank per node joined the rendezvous
    assert f"wrote {save}/iter_{STEPS:07d}" in ranks
