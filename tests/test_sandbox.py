"""Sandboxed execution of untrusted programs, pass@k, HumanEval programs, and the HumanEval
evaluation end to end on a tiny random HF model.

Hostile programs run twice where it matters: with the Python-level guards (the default) and
without them, to check the OS-enforced protections on their own. The unguarded checks that could
harm this machine run only where `isolation` reports the protection that makes them harmless.
"""

import glob
import itertools
import json
import math
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from xft_megatron.eval.humaneval import (build_program, evaluate_humaneval,
                                         generate_completions, load_problems, pass_at_k,
                                         truncate_completion)
from xft_megatron.eval.sandbox import SandboxLimits, run_program

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
