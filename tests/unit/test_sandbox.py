"""Sandboxed execution of untrusted programs, pass@k, HumanEval programs, and the HumanEval
evaluation end to end on a tiny random HF model.

Hostile programs run twice where it matters: with the Python-level guards (the default) and
without them, to check the OS-enforced protections on their own. The unguarded checks that could
harm this machine run only where `isolation` reports the protection that makes them harmless.
The attack batch (ATTACKS) runs as root and, from a root test process, under an unprivileged uid;
it bypasses the guards itself, so guarded and unguarded runs test the OS layer alike.
"""

import dataclasses
import errno
import glob
import itertools
import json
import math
import os
import re
import socket
import subprocess
import sys
import textwrap

import pytest

from xft_megatron.eval.humaneval import (build_program, evaluate_humaneval,
                                         generate_completions, load_problems, pass_at_k,
                                         truncate_completion)
from xft_megatron.sandbox.runner import SandboxLimits, run_program

STATUSES = {"passed", "failed", "timeout", "error"}
UNGUARDED = SandboxLimits(python_guards=False)
# a world-reachable interpreter lets a root parent drop the program to uid 65534
SYSTEM_PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable


def _workdir(result) -> str:
    """Programs below print their working directory on the first line."""
    return result.stdout_tail.splitlines()[0]


def _processes_of(workdir: str):
    """Live processes whose environment names `workdir` as HOME (= sandbox processes)."""
    marker = f"HOME={workdir}\0".encode()
    found = []
    for path in glob.glob("/proc/[0-9]*/environ"):
        try:
            with open(path, "rb") as f:
                if marker in f.read():
                    found.append(path)
        except OSError:
            pass
    return found


def _assert_cleaned_up(result):
    workdir = _workdir(result)
    assert not os.path.exists(workdir), f"temp dir {workdir} was not removed"
    assert _processes_of(workdir) == [], "sandbox processes survived the run"


def test_benign_programs_pass_and_fail():
    ok = run_program("import os\nprint(os.getcwd())\n"
                     "def add(a, b):\n    return a + b\n"
                     "assert add(2, 3) == 5\nopen('scratch.txt', 'w').write('inside')\n")
    assert ok.status == "passed" and ok.returncode == 0, ok
    assert {"session", "env", "rlimits", "python-guards"} <= set(ok.isolation)
    _assert_cleaned_up(ok)
    wrong = run_program("def add(a, b):\n    return a - b\nassert add(2, 3) == 5\n")
    assert wrong.status == "failed" and wrong.returncode == 1
    assert "AssertionError" in wrong.stderr_tail
    assert run_program("raise SystemExit(3)").returncode == 3
    for early_exit in ("import sys\nsys.exit(0)\n", "import os\nos._exit(0)\n"):
        r = run_program(early_exit + "assert False\n")
        assert r.status == "failed" and "before reaching its end" in r.stderr_tail, r
    assert run_program("def broken(:\n").status == "failed"


def test_infinite_loop_times_out_and_leaves_no_process():
    loop = "import os\nprint(os.getcwd(), flush=True)\nwhile True:\n    pass\n"
    r = run_program(loop, timeout_s=1.5)
    assert r.status == "timeout" and r.seconds < 3.5, r
    _assert_cleaned_up(r)
    # without the guards: children in the group, and (with a PID namespace) one that left it
    spawner = ("import os, time\nprint(os.getcwd(), flush=True)\n"
               "for _ in range(3):\n    if os.fork() == 0:\n        time.sleep(60)\n"
               "        os._exit(0)\n{escape}while True:\n    pass\n")
    r = run_program(spawner.format(escape=""), timeout_s=1.5, limits=UNGUARDED)
    assert r.status == "timeout" and r.seconds < 3.5, r
    _assert_cleaned_up(r)
    if "pidns" in r.isolation:
        r = run_program(spawner.format(escape="os.setsid()\n"), timeout_s=1.5, limits=UNGUARDED)
        assert r.status == "timeout", r
        _assert_cleaned_up(r)


def test_cpu_limit_stops_a_busy_program_before_the_wall_clock():
    r = run_program("while True:\n    pass\n", timeout_s=30, limits=SandboxLimits(cpu_seconds=1))
    assert r.status == "timeout" and r.seconds < 15, r  # stopped by RLIMIT_CPU, not at 30 s


def test_fork_bomb_and_process_creation_are_refused():
    r = run_program("import os\nwhile True:\n    os.fork()\n", timeout_s=5)
    assert r.status in ("failed", "error") and r.seconds < 5, r
    spawners = textwrap.dedent("""
        import multiprocessing, os, subprocess
        attempts = {"system": lambda: os.system("true"), "popen": lambda: os.popen("true"),
                    "subprocess": lambda: subprocess.run(["true"]),
                    "execv": lambda: os.execv("/bin/true", ["true"]),
                    "spawn": lambda: os.spawnv(os.P_WAIT, "/bin/true", ["true"]),
                    "multiprocessing": lambda: multiprocessing.Process(target=print).start(),
                    "ctypes": lambda: __import__("ctypes")}
        for name, attempt in attempts.items():
            try:
                attempt()
                print("RAN", name)
            except (PermissionError, ImportError):
                print("refused", name)
    """)
    r = run_program(spawners)
    assert r.status == "passed", r
    assert "RAN" not in r.stdout_tail and r.stdout_tail.count("refused") == 7, r.stdout_tail


def test_process_limit_is_os_enforced_for_a_non_root_program():
    bounded = textwrap.dedent("""
        import os, time
        count = 0
        for _ in range(40):
            try:
                pid = os.fork()
            except OSError:
                break
            if pid == 0:
                time.sleep(30)
                os._exit(0)
            count += 1
        print("forked", count)
    """)
    r = run_program(bounded, limits=SandboxLimits(python_guards=False, processes=8,
                                                  python=SYSTEM_PYTHON))
    if "nproc" not in r.isolation:
        pytest.skip(f"program runs as uid 0, where the kernel ignores RLIMIT_NPROC "
                    f"(isolation: {r.isolation}); the Python guards refuse fork instead")
    assert r.status == "passed", r
    assert int(r.stdout_tail.split()[-1]) < 8, r.stdout_tail


def test_memory_bomb_fails_without_harming_the_parent():
    for limits in (SandboxLimits(), UNGUARDED):
        r = run_program("block = bytearray(50 * 10**9)\nprint(len(block))\n", limits=limits)
        assert r.status == "failed" and "MemoryError" in r.stderr_tail, r
        assert r.seconds < 5


def test_huge_file_write_is_capped_by_rlimit_fsize():
    writer = textwrap.dedent("""
        import os
        try:
            with open("big.bin", "wb") as f:
                for _ in range(50):
                    f.write(b"x" * 1000**2)
                    f.flush()
        except OSError as e:
            print("stopped", os.path.getsize("big.bin"))
            raise
    """)
    r = run_program(writer, limits=SandboxLimits(file_bytes=10 * 1000**2))
    assert r.status == "failed" and "File too large" in r.stderr_tail, r
    assert int(r.stdout_tail.split()[-1]) <= 10 * 1000**2


def test_writes_outside_the_working_directory_fail(tmp_path):
    target, keep = tmp_path / "escape.txt", tmp_path / "keep.txt"
    keep.write_text("keep me")
    attacker = textwrap.dedent(f"""
        import io, os, pathlib, shutil
        print(os.getcwd())
        target, keep = {str(target)!r}, {str(keep)!r}
        try:
            os.symlink(target, "link")
        except OSError:
            pass

        def via_symlink():
            if not os.path.islink("link"):
                raise PermissionError("no symlink to write through")
            open("link", "w").write("x")

        attempts = {{
            "open": lambda: open(target, "w").write("x"),
            "append": lambda: open(target, "a").write("x"),
            "os.open": lambda: os.close(os.open(target, os.O_WRONLY | os.O_CREAT)),
            "pathlib": lambda: pathlib.Path(target).write_text("x"),
            "FileIO": lambda: io.FileIO(target, "w").write(b"x"),
            "via symlink": via_symlink,
            "remove": lambda: os.remove(keep),
            "rename": lambda: os.rename(keep, target),
            "rmtree": lambda: shutil.rmtree(os.path.dirname(keep)),
        }}
        for name, attempt in attempts.items():
            try:
                attempt()
                print("WROTE", name)
            except OSError as e:
                print("blocked", name, type(e).__name__)
        open("inside.txt", "w").write("fine")
        print("inside ok")
    """)
    r = run_program(attacker)
    assert r.status == "passed", r
    assert "WROTE" not in r.stdout_tail and "inside ok" in r.stdout_tail, r.stdout_tail
    assert not target.exists() and keep.read_text() == "keep me"
    _assert_cleaned_up(r)
    isolation = run_program("pass", limits=UNGUARDED).isolation
    if "readonly-fs" not in isolation and not any(i.startswith("uid=") for i in isolation):
        pytest.skip(f"no OS-level write protection here (isolation: {isolation})")
    r = run_program(attacker, limits=UNGUARDED)
    assert "inside ok" in r.stdout_tail, r
    assert not target.exists() and keep.read_text() == "keep me", r.stdout_tail


def test_environment_secrets_are_invisible(monkeypatch):
    secret = "xft-secret-7f3a9c"
    monkeypatch.setenv("XFT_SECRET", secret)
    # another process started with the secret in its initial environment (/proc/PID/environ)
    holder = subprocess.Popen(["sleep", "30"], env={"PATH": "/usr/bin:/bin",
                                                   "XFT_SECRET": secret})
    snoop = textwrap.dedent("""
        import glob, os
        print(sorted(os.environ))
        print(os.environ.get("XFT_SECRET"))
        for path in glob.glob("/proc/[0-9]*/environ"):
            try:
                data = open(path, "rb").read()
            except OSError:
                continue
            if b"XFT_SECRET" in data:
                print(path, data)
    """)
    try:
        for limits in (SandboxLimits(), UNGUARDED):
            r = run_program(snoop, limits=limits)
            assert r.status == "passed", r
            assert r.stdout_tail.splitlines()[0] == "['HOME', 'LANG', 'PATH']"
            assert r.stdout_tail.splitlines()[1] == "None"
            if "proc" in r.isolation or any(i.startswith("uid=") for i in r.isolation):
                assert secret not in r.stdout_tail + r.stderr_tail, r.stdout_tail
    finally:
        holder.kill()
        holder.wait()


def test_network_is_unreachable():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    port = server.getsockname()[1]
    client = textwrap.dedent(f"""
        import socket
        for attempt in (lambda: socket.create_connection(("127.0.0.1", {port}), timeout=2),
                        lambda: socket.socket().connect(("127.0.0.1", {port}))):
            try:
                attempt()
                print("CONNECTED")
            except OSError as e:
                print("no connection:", e)
    """)
    try:
        r = run_program(client)
        assert r.status == "passed" and "CONNECTED" not in r.stdout_tail, r
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing reached the server
        if "netns" not in run_program("pass", limits=UNGUARDED).isolation:
            pytest.skip("no network namespace here: only the Python guards block sockets")
        r = run_program(client, limits=UNGUARDED)
        assert r.status == "passed" and "CONNECTED" not in r.stdout_tail, r
        with pytest.raises(BlockingIOError):
            server.accept()
    finally:
        server.close()


def test_program_cannot_kill_the_parent():
    canary = subprocess.Popen(["sleep", "30"])  # shares this test process's group
    killer = textwrap.dedent("""
        import os, signal, threading
        main_thread = threading.main_thread().ident
        for name, attempt in (("kill", lambda: os.kill(os.getppid(), 9)),
                              ("killpg", lambda: os.killpg(os.getpgid(os.getppid()), 9)),
                              ("pthread_kill", lambda: signal.pthread_kill(main_thread, 0))):
            try:
                attempt()
                print("SENT", name)
            except OSError as e:
                print("refused", name, e)
    """)
    try:
        r = run_program(killer)
        assert r.status == "passed" and "SENT" not in r.stdout_tail, r
        assert canary.poll() is None
        isolation = run_program("pass", limits=UNGUARDED).isolation
        if "pidns" in isolation or any(i.startswith("uid=") for i in isolation):
            # unguarded: the parent is invisible (PID namespace) or foreign (other uid)
            r = run_program(killer, limits=UNGUARDED)
            assert r.status in STATUSES
        assert canary.poll() is None
    finally:
        canary.kill()
        canary.wait()


def test_limits_are_validated():
    with pytest.raises(ValueError, match="memory_bytes"):
        SandboxLimits(memory_bytes=0)
    with pytest.raises(ValueError, match="timeout_s"):
        run_program("pass", timeout_s=0)
    missing = run_program("pass", limits=SandboxLimits(python="/nonexistent/python"))
    assert missing.status == "error" and missing.returncode is None
    assert "could not start" in missing.stderr_tail


# --- pass@k and HumanEval programs --------------------------------------------------------------

def test_pass_at_k_matches_brute_force_enumeration():
    for n in range(1, 8):
        for c in range(n + 1):
            outcomes = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(outcomes, k))
                brute = sum(any(s) for s in subsets) / len(subsets)
                assert math.isclose(pass_at_k(n, c, k), brute, rel_tol=1e-12, abs_tol=1e-12)
    assert math.isclose(pass_at_k(1000, 1, 1), 0.001)
    assert pass_at_k(200, 0, 100) == 0.0 and pass_at_k(200, 150, 100) == 1.0
    for bad in ((5, 6, 1), (5, 2, 0), (5, 2, 6)):
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_humaneval_problem_zero_canonical_passes_wrong_fails():
    problems = load_problems(limit=3)
    assert [p["task_id"] for p in problems] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    p0 = problems[0]
    program = build_program(p0, p0["canonical_solution"])
    assert program.endswith(f"\ncheck({p0['entry_point']})\n")
    assert run_program(program).status == "passed"
    assert run_program(build_program(p0, "    return False\n")).status == "failed"
    assert run_program(build_program(p0, "    import sys\n    sys.exit(0)\n")).status == "failed"
    assert len(load_problems()) == 164
    with pytest.raises(ValueError):
        load_problems(limit=0)


def test_truncate_completion_at_stop_sequences():
    body = "    return x + 1\n"
    for stop in ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"):
        assert truncate_completion(body + stop + "tail") == body
    assert truncate_completion(body) == body


# --- end to end on a tiny random model -----------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny_tokenizer import byte_bpe_tokenizer

    model_dir = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = byte_bpe_tokenizer(400)
    tokenizer.save_pretrained(model_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(model_dir)
    return str(model_dir)


def test_evaluate_humaneval_on_a_tiny_random_model(tiny_model_dir, tmp_path):
    out = tmp_path / "report" / "humaneval.json"
    report = evaluate_humaneval(tiny_model_dir, str(out), n=2, limit=2, temperature=0.8,
                                workers=2, timeout_s=5, max_new_tokens=8, batch_size=3)
    assert json.loads(out.read_text()) == report
    assert {"pass@1", "pass@k", "per_task", "model", "n", "limit"} <= set(report)
    assert report["n"] == 2 and report["limit"] == 2 and set(report["pass@k"]) == {"1"}
    assert 0.0 <= report["pass@1"] <= 1.0
    assert [t["task_id"] for t in report["per_task"]] == ["HumanEval/0", "HumanEval/1"]
    for task in report["per_task"]:
        assert task["n"] == 2 and len(task["results"]) == 2 and len(task["completions"]) == 2
        assert set(task["results"]) <= STATUSES
        assert task["passed"] == task["results"].count("passed")
    assert sum(report["status_counts"].values()) == 4


def test_greedy_generation_is_deterministic_and_model_dir_is_checked(tiny_model_dir, tmp_path):
    problems = load_problems(limit=1)
    first = generate_completions(tiny_model_dir, problems, n=1, max_new_tokens=6)
    again = generate_completions(tiny_model_dir, problems, n=3, temperature=0.0,
                                 max_new_tokens=6)
    assert list(first) == ["HumanEval/0"] and len(first["HumanEval/0"]) == 1
    assert again["HumanEval/0"] == first["HumanEval/0"] * 3
    with pytest.raises(FileNotFoundError, match="config.json"):
        evaluate_humaneval(str(tmp_path), str(tmp_path / "out.json"), limit=1)


# --- root and unprivileged attacks on the OS layer, with the Python guards bypassed -------------

# Every attack prints "contained NAME" or "ESCAPED NAME". The program first takes fresh copies
# of the modules the guards patch (posix, _socket, _posixsubprocess, subprocess, ctypes): with
# the guards on, that is the bypass; without them, nothing changes.
ATTACKS = r'''
import sys
def fresh(name):
    for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[loaded]
    return __import__(name)
posix, _socket, _posixsubprocess = fresh("posix"), fresh("_socket"), fresh("_posixsubprocess")
fresh("_ctypes"); ctypes = fresh("ctypes"); subprocess = fresh("subprocess")
TARGET, PORT, PARENT, SECRET = {target!r}, {port}, {parent}, {secret!r}
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_void_p]
NR = {{"x86_64": dict(mount_setattr=442, clone=56, process_vm_readv=310, open_by_handle_at=304,
                     io_uring_setup=425, bpf=321, keyctl=250),
      "aarch64": dict(mount_setattr=442, clone=220, process_vm_readv=270, open_by_handle_at=265,
                      io_uring_setup=425, bpf=280, keyctl=219)}}[posix.uname().machine]
NEWNS, NEWUSER, NEWPID, NEWNET = 0x20000, 0x10000000, 0x20000000, 0x40000000
results = []

def report(name, escaped):
    results.append(name)
    print("ESCAPED" if escaped else "contained", name, flush=True)

def attempt(name, action, escaped=lambda value: value == 0):
    try:
        value = action()
    except Exception as e:  # a refusal of any kind is containment
        value = e
    report(name, not isinstance(value, Exception) and escaped(value))

def write_target():
    try:
        fd = posix.open(TARGET, posix.O_WRONLY | posix.O_TRUNC)
        posix.write(fd, b"escaped")
        posix.close(fd)
        return True
    except OSError:
        return False

def secret_visible():
    found = False
    for entry in posix.listdir("/proc"):
        try:
            with open("/proc/%s/environ" % entry, "rb") as f:
                found = found or SECRET.encode() in f.read()
        except OSError:
            pass
    return found

class MountAttr(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in ("set", "clr", "propagation", "userns_fd")]

report("write a host file", write_target())
attempt("remount / read-write", lambda: libc.mount(None, b"/", None, 32 | 4096, None))
attempt("remount the target's mount read-write",
        lambda: libc.mount(None, TARGET.rsplit("/", 1)[0].encode(), None, 32 | 4096, None))
attempt("mount_setattr: clear read-only on / (recursive)", lambda: libc.syscall(
    NR["mount_setattr"], -100, b"/", 0x8000, ctypes.byref(MountAttr(0, 1, 0, 0)), 32))
report("write the host file after the remounts", write_target())
attempt("mount a tmpfs", lambda: libc.mount(b"tmpfs", b"/tmp", b"tmpfs", 0, None))
attempt("umount /proc", lambda: libc.umount2(b"/proc", 2))
report("read a host process's environment (parent's secret)", secret_visible())
for path in ("/proc/%d/environ" % PARENT, "/proc/1/environ"):
    attempt("read " + path, lambda: open(path, "rb").read(),
            escaped=lambda data: SECRET.encode() in data)
for path in ("/proc/1/ns/net", "/proc/%d/ns/net" % PARENT):
    attempt("setns into " + path, lambda: libc.setns(posix.open(path, posix.O_RDONLY), NEWNET))
def connect():
    s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
    s.settimeout(2)
    s.connect(("127.0.0.1", PORT))
    return 0
attempt("connect to a host port (fresh _socket)", connect)
for flags, name in ((NEWUSER, "user"), (NEWNS, "mount"), (NEWNET, "network"), (NEWPID, "pid")):
    attempt("unshare a %s namespace" % name, lambda: libc.unshare(flags))
def clone_userns():
    pid = libc.syscall(NR["clone"], NEWUSER | 17, 0, 0, 0, 0)
    if pid == 0:
        posix._exit(0)
    return pid
attempt("clone into a new user namespace", clone_userns, escaped=lambda pid: pid > 0)
attempt("ptrace-attach the parent", lambda: libc.ptrace(16, PARENT, 0, 0))
attempt("ptrace TRACEME", lambda: libc.ptrace(0, 0, 0, 0))
attempt("process_vm_readv of the parent",
        lambda: libc.syscall(NR["process_vm_readv"], PARENT, 0, 0, 0, 0, 0),
        escaped=lambda v: v >= 0)
attempt("signal the parent", lambda: posix.kill(PARENT, 0), escaped=lambda v: True)
attempt("setuid(0)", lambda: posix.setuid(0), escaped=lambda v: True)
attempt("sethostname", lambda: libc.sethostname(b"x", 1))
attempt("open_by_handle_at", lambda: libc.syscall(NR["open_by_handle_at"], 3, 0, 0),
        escaped=lambda v: v >= 0 or ctypes.get_errno() != 1)
for name in ("io_uring_setup", "bpf", "keyctl"):
    attempt(name, lambda: libc.syscall(NR[name], 1, 0, 0),
            escaped=lambda v: v >= 0 or ctypes.get_errno() != 1)
import os.path
def interpreter_write():
    path = os.path.dirname(os.path.realpath(sys.executable)) + "/xft-sandbox-escape-%d" % PORT
    posix.close(posix.open(path, posix.O_WRONLY | posix.O_CREAT | posix.O_EXCL))
    posix.unlink(path)  # do no harm if it escaped
attempt("write next to the interpreter", interpreter_write, escaped=lambda value: True)
try:
    status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
except OSError:
    status = dict()  # /proc is gone
for key, wanted in (("CapEff", 0), ("CapPrm", 0), ("CapBnd", 0), ("NoNewPrivs", 1),
                    ("Seccomp", 2)):
    value = int(status.get(key, "-1").strip(), 16 if key.startswith("Cap") else 10)
    report("%s is %d (it is %d)" % (key, wanted, value), value != wanted)
# the same through a shell, started by a fresh posix.system and a fresh _posixsubprocess
for command, name in (("mount -o remount,rw /", "shell: mount -o remount,rw /"),
                      ("umount -l /proc", "shell: umount -l /proc"),
                      ("unshare -U true", "shell: unshare -U"),
                      ("nsenter -t 1 -n true", "shell: nsenter the host network")):
    attempt(name, lambda: posix.system(command + " 2>/dev/null"))
attempt("shell: write the host file", lambda: posix.system("echo x > " + TARGET + " 2>/dev/null"))
attempt("subprocess (fresh _posixsubprocess): umount /proc and grep environments",
        lambda: subprocess.run(["/bin/sh", "-c", "umount -l /proc 2>/dev/null; "
                                "cat /proc/[0-9]*/environ 2>/dev/null"],
                               capture_output=True).stdout,
        escaped=lambda out: SECRET.encode() in out)
attempt("chroot", lambda: libc.chroot(b"/tmp"))  # last: it would change every path
print("attacks", len(results))
'''

# runs `run_program` in a process of its own, so that the sandbox's parent holds the secret in
# its initial environment (/proc/PID/environ) and can run under another uid
_DRIVER = r'''
import json, sys
sys.path.insert(0, sys.argv[1])
from xft_megatron.sandbox.runner import SandboxLimits, run_program
source, guards = sys.stdin.read(), sys.argv[2] == "guards"
r = run_program(source.replace("{parent}", str(__import__("os").getpid())), timeout_s=20,
                limits=SandboxLimits(python_guards=guards, output_bytes=1 << 16))
print(json.dumps({"status": r.status, "stdout": r.stdout_tail, "stderr": r.stderr_tail,
                  "isolation": r.isolation}))
'''
UNPRIVILEGED_UID = 4242  # the sandbox's parent in the unprivileged runs


@pytest.fixture
def public_tmp():
    """A directory every user can reach (pytest's tmp_path sits below a 0700 directory)."""
    import pathlib
    import shutil
    import tempfile
    path = pathlib.Path(tempfile.mkdtemp(prefix="xft-attack-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _package_copy(tmp_path) -> str:
    """The sandbox's files (and the error classes it raises) in a directory any user can
    read (the checkout may be private)."""
    import shutil
    root = tmp_path / "pkg"
    (root / "xft_megatron" / "sandbox").mkdir(parents=True)
    for init in ("xft_megatron/__init__.py", "xft_megatron/sandbox/__init__.py"):
        (root / init).write_text("")
    here = os.path.dirname(os.path.abspath(run_program.__code__.co_filename))
    for name in ("runner.py", "launcher.py", "guards.py"):
        shutil.copy(os.path.join(here, name), root / "xft_megatron" / "sandbox" / name)
    shutil.copy(os.path.join(os.path.dirname(here), "errors.py"), root / "xft_megatron")
    return str(root)


def _attack(tmp_path, python: str, package: str, guards: bool, user=None):
    """Run ATTACKS in the sandbox; returns (result dict, target file, lines)."""
    secret = "xft-parent-secret-51d2"
    target = tmp_path / f"host-{guards}-{user}" / "target.txt"
    target.parent.mkdir()
    target.parent.chmod(0o777)  # writable by anyone: only the read-only mounts protect it
    target.write_text("original")
    target.chmod(0o666)
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    source = ATTACKS.format(target=str(target), port=server.getsockname()[1], parent="{parent}",
                            secret=secret)
    try:
        driver = subprocess.run(
            [python, "-I", "-c", _DRIVER, package, "guards" if guards else "none"],
            input=source, capture_output=True, text=True, timeout=60, user=user, group=user,
            extra_groups=[] if user is not None else None,
            env={"PATH": "/usr/bin:/bin", "XFT_PARENT_SECRET": secret})
        assert driver.returncode == 0, driver.stderr
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing reached the host's port
    finally:
        server.close()
    result = json.loads(driver.stdout)
    assert target.read_text() == "original", result["stdout"]
    return result, result["stdout"].splitlines()


def _contained(result, lines):
    attacks = [line for line in lines if line.startswith(("contained ", "ESCAPED "))]
    assert result["status"] == "passed", result
    assert lines[-1] == f"attacks {len(attacks)}", result
    escaped = [line for line in attacks if line.startswith("ESCAPED")]
    return len(attacks) - len(escaped), len(attacks), escaped


@pytest.mark.skipif(os.geteuid() != 0, reason="root attacks need root")
def test_root_attacks_are_contained_with_and_without_the_guards(public_tmp):
    tmp_path = public_tmp
    package = os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(run_program.__code__.co_filename))))
    for guards in (False, True):
        result, lines = _attack(tmp_path, sys.executable, package, guards)
        assert {"uid=65534", "userns", "no-caps", "no-new-privs", "seccomp"} <= \
            set(result["isolation"]), result
        contained, total, escaped = _contained(result, lines)
        assert escaped == [] and total >= 40, result["stdout"]


@pytest.mark.skipif(os.geteuid() != 0, reason="runs the sandbox's parent as another uid")
def test_unprivileged_attacks_are_contained(public_tmp):
    tmp_path = public_tmp
    if not os.access(SYSTEM_PYTHON, os.X_OK) or SYSTEM_PYTHON == sys.executable:
        pytest.skip("no interpreter that another uid can run")
    package = _package_copy(tmp_path)
    for guards in (False, True):
        result, lines = _attack(tmp_path, SYSTEM_PYTHON, package, guards, user=UNPRIVILEGED_UID)
        assert {"no-caps", "no-new-privs", "seccomp", "nproc"} <= set(result["isolation"]), \
            result
        if "userns" not in result["isolation"]:
            pytest.skip(f"no user namespace for an unprivileged user here: the PID namespace "
                        f"that hides the parent is missing ({result['isolation']})")
        contained, total, escaped = _contained(result, lines)
        assert escaped == [] and total >= 40, result["stdout"]


@pytest.mark.skipif(os.geteuid() != 0, reason="the refusal is root's")
def test_root_refuses_rather_than_runs_a_program_with_privileges(public_tmp):
    marker = public_tmp / "ran"
    public_tmp.chmod(0o777)
    program = f"open({str(marker)!r}, 'w').write('ran')\n"
    for limits in (SandboxLimits(drop_to_uid=None), SandboxLimits(drop_to_uid=0),
                   SandboxLimits(drop_to_uid=None, python_guards=False)):
        r = run_program(program, limits=limits)
        assert r.status == "error" and r.returncode is None, r
        assert "refused" in r.stderr_tail and "non-zero uid" in r.stderr_tail, r
    from xft_megatron.sandbox.launcher import private_top
    if private_top(sys.executable):  # no mount namespace: no way to expose the interpreter
        r = run_program(program, limits=SandboxLimits(namespaces=False))
        assert r.status == "error" and "cannot execute" in r.stderr_tail, r
    assert not marker.exists()


def test_the_launcher_isolates_itself_without_a_preexec_fn(monkeypatch):
    from xft_megatron.sandbox import runner
    seen = []
    real_popen = subprocess.Popen

    def recording_popen(*args, **kwargs):
        seen.append(kwargs)
        return real_popen(*args, **kwargs)

    monkeypatch.setattr(runner.subprocess, "Popen", recording_popen)
    r = run_program("pass")
    assert r.status == "passed" and len(seen) == 1, r
    assert seen[0].get("preexec_fn") is None
    assert {"no-caps", "no-new-privs", "seccomp"} <= set(r.isolation), r


def test_seccomp_syscall_numbers_match_the_kernel_headers():
    from xft_megatron.sandbox.launcher import ARCHES, seccomp_program
    headers = {"x86_64": ["/usr/include/x86_64-linux-gnu/asm/unistd_64.h",
                          "/usr/include/asm/unistd_64.h"],
               "aarch64": ["/usr/include/asm-generic/unistd.h"]}
    checked = 0
    for arch, paths in headers.items():
        assert len(seccomp_program(ARCHES[arch])) % 8 == 0  # assembles, jumps in range
        path = next((p for p in paths if os.path.exists(p)), None)
        if path is None:
            continue
        text = open(path).read()
        table = dict(ARCHES[arch]["denied"], clone=ARCHES[arch]["clone"],
                     clone3=ARCHES[arch]["clone3"], socket=ARCHES[arch]["socket"])
        for name, number in table.items():
            m = re.search(rf"#define __NR(?:3264)?_{name}\s+(\d+)", text)
            if m is None:
                continue  # a call this header predates
            assert int(m.group(1)) == number, (arch, name, number, m.group(1))
            checked += 1
    if not checked:
        pytest.skip("no kernel headers to compare with")


def test_the_working_directory_has_a_total_bound():
    """Files under the per-file limit still cannot fill the disk or its inodes: the working
    directory is a tmpfs of SandboxLimits.workdir_bytes / workdir_files where a mount
    namespace is made (isolation "workdir-quota"); the program's writes beyond fail."""
    limits = SandboxLimits(workdir_bytes=8 * 1024 ** 2, workdir_files=64)
    program = textwrap.dedent("""
        n = 0
        try:
            while n < 10_000:
                with open(f"f{n}", "wb") as f:
                    f.write(b"x" * SIZE)
                n += 1
            print("unbounded", n)
        except OSError as e:
            print("stopped", n, e.errno)
    """)
    for guarded in (limits, dataclasses.replace(limits, python_guards=False)):
        got = {}
        for kind, size in (("bytes", 1_000_000), ("inodes", 0)):
            r = run_program(f"SIZE = {size}\n" + program, timeout_s=30, limits=guarded)
            if "workdir-quota" not in r.isolation:
                assert "readonly-fs" not in r.isolation, r  # a mount namespace gets the quota
                pytest.skip(f"no mount namespace here (isolation: {r.isolation})")
            got[kind] = r.stdout_tail.split()
        assert got["bytes"][0] == "stopped" and int(got["bytes"][1]) <= 8, got
        assert got["inodes"][0] == "stopped" and int(got["inodes"][1]) < 64, got
        assert got["bytes"][2] == got["inodes"][2] == str(errno.ENOSPC), got
