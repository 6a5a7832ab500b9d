"""Run untrusted Python in a throw-away sandbox, and score generated code against its tests.

`run_program(source)` writes the source to `main.py` in a fresh temporary directory, runs it in
one child interpreter and removes the directory afterwards. `run_tests(code, test, entry_point)`
scores generated code: the code runs in one sandboxed interpreter, the test in another, and
only the second one's word counts (see "Scoring" below). The result says which protections
were in force (`SandboxResult.isolation`), because what the OS allows differs between machines.

OS-enforced protections (the hard boundary; none needs Python's cooperation). They are applied
by a small launcher (`launcher.py`), started without a `preexec_fn`, which isolates
itself and then execs the interpreter; each is tried and reported:
  session       the launcher leads a new session and process group; the parent SIGKILLs the
                whole group on the wall-clock timeout and again after a normal exit.
  userns        a user namespace of the program's own in which only its uid and gid exist. As
                root it is created after the uid drop, so the other namespaces below stay owned
                by the host's (no capability inside can administer them); as a user it is
                created first and makes the other namespaces possible without privileges.
  netns         a new network namespace: no interfaces but a loopback that is down, so nothing,
                not even 127.0.0.1, can be reached.
  pidns         a new PID namespace in which the program is pid 1: it can neither see nor signal
                the parent or any other host process, and when it exits (or is killed, which
                also happens when it leaves the process group: PDEATHSIG) the kernel kills
                everything it started.
  proc          a private /proc for that namespace (in a private mount namespace): other
                processes' environments and command lines are out of sight.
  private-dirs-hidden  (root) a directory others cannot search above the interpreter (a 0700
                home) is replaced by a tmpfs holding only the interpreter's installation, so the
                program can run as an unprivileged uid and sees nothing else of that home.
  readonly-fs   every mount read-only (mount_setattr, AT_RECURSIVE) except the working
                directory, which is bind-mounted writable; mounts never propagate to the host.
  rlimits       RLIMIT_CPU, RLIMIT_AS (memory), RLIMIT_FSIZE (file size), RLIMIT_NOFILE,
                RLIMIT_NPROC, RLIMIT_CORE = 0.
  uid=N         (root) the program runs as uid N (default 65534, nobody), supplementary groups
                cleared: it cannot signal root's processes or write root's files.
  no-caps       no capability left: bounding, ambient, permitted, effective and inheritable
                sets empty (read back from /proc/self/status).
  no-new-privs  PR_SET_NO_NEW_PRIVS: no set-uid binary or file capability can give any back.
  seccomp       a seccomp filter (launcher.py lists it) refusing mount, umount, setns,
                unshare, namespace clones, ptrace, process_vm_*, keyctl, bpf, io_uring,
                module loading, kexec, reboot and the like with EPERM, and sockets other than
                AF_UNIX.
  nproc         RLIMIT_NPROC only binds a non-root user: the kernel exempts uid 0. Reported only
                when the program runs under a non-zero uid.
  env           the environment is only PATH, HOME (= the working directory) and LANG.
As root, a non-zero uid, no-caps, no-new-privs and seccomp must hold: where any cannot be
applied the run is an "error" naming it, and the program never starts. Elsewhere what the
kernel refuses is simply absent from `isolation`. Reading is not restricted beyond file
permissions: the program can read what its uid (nobody, as root) can read.

Python-level guards (`python-guards`; guards.py, its text run by a prelude before the program
runs, on every machine): fork/exec/spawn/system/popen, subprocess, multiprocessing,
kill/killpg/setsid, signal sending, sockets, ctypes, file deletion/renaming/chmod/chown, and
opening files for writing outside the working directory all raise PermissionError. These turn
ordinary mistakes and naive attacks into clean failures, but a determined program can get around
them (the original functions stay reachable through the interpreter's internals); only the
OS-enforced entries above are a boundary.

Statuses of run_program: "passed" (exit 0; with the guards also: the program ran to its last
statement, so sys.exit(0) or os._exit(0) before the tests ran is "failed"), "failed" (non-zero
exit: an exception, a failed assert, sys.exit(n)), "timeout" (wall clock or CPU limit reached),
"error" (the program could not be started, or was terminated by any other signal). That status
is the program's own account: whatever marks its end runs in the program's interpreter, after
its code, so a hostile program can claim it (write the mark itself, then os._exit(0)). Never
score untrusted code with run_program; use run_tests.

Scoring (run_tests). In one interpreter, a score cannot be protected from the code it scores:
the candidate runs before and inside `check(candidate)`, so it can write any mark the runner
waits for and exit 0 (directly, from atexit, from sys.excepthook), patch the builtins the test
uses (`abs`), return an object whose `__eq__` is always true, or jump over the test's asserts
through the check's frame (`f_trace`, `f_lineno`). A nonce revealed "after the check" does not
help either: anything the trusted tail can read, the program can read first. So the test and
the candidate never share an interpreter:
  tester    a sandboxed interpreter (same launcher and limits) that runs only trusted text: the
            problem's prompt (for the helpers a test calls, e.g. `poly`), its test, and
            `check(candidate)` where `candidate` is a stub that sends each call's arguments to
            the program and returns its answer. It makes itself undumpable (PR_SET_DUMPABLE 0:
            no process of its uid can open its /proc/PID/mem or ptrace it), reads its files,
            then says "ready" to the runner; only then is the program started.
  program   a second sandboxed interpreter (its own working directory, PID and mount namespace)
            runs the generated code as `__main__`, then answers calls of `entry_point`. Answers
            are one JSON line each, decoded by the tester into plain data only (None, bool, int,
            float, complex, str, bytes, list, tuple, dict, set, frozenset): no object of the
            program's, hence none of its methods, ever reaches the tester. An exception comes
            back by class name (a builtin Exception class, else RuntimeError; never
            StopIteration or a BaseException). A dead program, a malformed or unusable answer
            (a generator, a custom object) raises a BaseException in the tester (a test's
            `except Exception` cannot take it) and fails the run even if the test swallows it.
  verdict   the tester writes "passed" to a pipe only the runner holds (created by the runner,
            passed to the tester alone, closed in the runner before the program starts; the
            program is started with its two pipe ends only). "passed" = that word and exit 0.
            The program's exit status and output are never read for the verdict: only its CPU
            time, to report a program stopped by RLIMIT_CPU as "timeout". The result's
            `isolation` is the program's, plus "tests-apart"; its stderr is the program's, then
            the tester's after a "[tests]" line; its returncode is the tester's.
The program has no channel to the verdict but its answers, and those are data the trusted
test judges. Differences from running the test in the candidate's interpreter: arguments and
results are copies (an in-place change the function makes to an argument is not seen by the
test); results must be plain data (a dict or str subclass arrives as dict or str); a test that
passes a non-data argument (a function, a custom object) gets "error", as does a test that
does not run or defines no `check`. A prompt that does not run on its own is skipped with a
note (its helpers are then missing). Residual risk: the tester's integrity rests on the OS
layer, and holds in full where the result's `isolation` has "pidns" and "readonly-fs" (root;
a user with user namespaces). Without a PID namespace the program sees the tester's pid and
can signal it (a kill or stop is "failed" or "timeout", never "passed"); the tester's memory
stays closed (undumpable, and the program starts only after that). Without the read-only
mounts and the uid drop (a user without user namespaces: the program runs as that user) it
can write whatever the user can, including an interpreter installation the user owns from
which the tester later imports a module, and where kernel.yama.ptrace_scope is 0 it can open
the runner's own /proc/PID/mem: there a determined program can forge any result, "passed"
included. A bug in the JSON decoder or in the interpreter's comparison of plain values is
not defended against.
"""

import marshal
import math
import os
import platform
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import List, Optional, Tuple

from xft_megatron.errors import UsageError
from xft_megatron.sandbox import launcher  # noqa: F401  (caches its bytecode)

LAUNCHER_DIR = os.path.dirname(os.path.abspath(__file__))
LAUNCHER = ("import sys; sys.path.insert(0, sys.argv.pop(1)); import launcher; "
            "launcher.main()")  # run with -c LAUNCHER_DIR PLAN
GUARDS_FILE = os.path.join(LAUNCHER_DIR, "guards.py")
SANDBOX_PATH = "/usr/bin:/bin"
PROGRAM_FILE = "main.py"
PROMPT_FILE, TEST_FILE = "prompt.py", "test.py"  # the tester's files (run_tests)
TESTS_HEADER = "[tests]\n"  # separates the tester's stderr from the program's in a result
END_MARK = b"end"  # written by the last line of _PRELUDE
EARLY_EXIT = ("\n[sandbox] the program exited with status 0 before reaching its end "
              "(sys.exit/os._exit): counted as failed\n")


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits and isolation switches for one sandboxed program."""

    cpu_seconds: Optional[int] = None
    """RLIMIT_CPU; None: the wall-clock timeout rounded up, plus one second."""
    memory_bytes: int = 2 * 1024 ** 3
    """RLIMIT_AS (address space) of the program."""
    file_bytes: int = 10 * 1000 ** 2
    """RLIMIT_FSIZE: the largest file the program may write (stdout/stderr included)."""
    processes: int = 32
    """RLIMIT_NPROC; counts every process of the program's user, and binds only non-root."""
    open_files: int = 128
    """RLIMIT_NOFILE."""
    workdir_bytes: int = 64 * 1024 ** 2
    """The most the working directory may hold in all (a tmpfs of this size, where a mount
    namespace is made: isolation "workdir-quota"); the program's writes beyond it fail."""
    workdir_files: int = 1024
    """The most files and directories the working directory may hold (its inode limit)."""
    output_bytes: int = 4096
    """How much of the end of stdout and stderr is kept in the result."""
    namespaces: bool = True
    """Try new user, network, PID and mount namespaces (as a user, they need a kernel that
    allows unprivileged user namespaces)."""
    drop_to_uid: Optional[int] = 65534
    """The uid (and gid) the program runs as when the parent is root; None or 0: as root the
    sandbox refuses to run (a program never runs with root's privileges)."""
    python_guards: bool = True
    """Install the Python-level guards; turning them off leaves only the OS protections
    (for testing those on their own)."""
    python: str = sys.executable
    """Interpreter that runs the program (started with -I -S -B: no site-packages)."""

    def __post_init__(self):
        for name in ("memory_bytes", "file_bytes", "processes", "open_files", "output_bytes",
                     "workdir_bytes", "workdir_files"):
            if getattr(self, name) < 1:
                raise UsageError(f"SandboxLimits.{name} must be >= 1, got {getattr(self, name)}")
        if self.cpu_seconds is not None and self.cpu_seconds < 1:
            raise UsageError(f"SandboxLimits.cpu_seconds must be >= 1 or None, "
                             f"got {self.cpu_seconds}")
        if not self.python:
            raise UsageError("SandboxLimits.python must name an interpreter (empty: "
                             "sys.executable is unknown in this process; pass one explicitly)")


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one program; `isolation` names the protections that were in force."""

    status: str  # "passed" | "failed" | "timeout" | "error"
    returncode: Optional[int]  # negative: killed by that signal; None: never started
    stdout_tail: str
    stderr_tail: str
    seconds: float
    isolation: Tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run_program(source: str, timeout_s: float = 10.0,
                limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run `source` as `__main__` in a sandbox; never raises for anything the program does."""
    if not timeout_s > 0:
        raise UsageError(f"timeout_s must be > 0, got {timeout_s}")
    workdir = tempfile.mkdtemp(prefix="xft-sandbox-")
    try:
        return _run_in(workdir, source, timeout_s, limits)
    finally:
        _remove_tree(workdir)


def run_tests(code: str, test: str, entry_point: str, prompt: str = "",
              timeout_s: float = 10.0, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Score `code` against `test` (which defines `check(candidate)`): the verdict comes from a
    tester process that the program cannot reach, never from the program (module docstring,
    "Scoring"). `prompt`'s definitions (helpers a test may call) are run in the tester first.
    Never raises for anything the program or the test does."""
    if not timeout_s > 0:
        raise UsageError(f"timeout_s must be > 0, got {timeout_s}")
    if not entry_point.isidentifier():
        raise UsageError(f"entry_point must be a Python identifier, got {entry_point!r}")
    program_dir = tempfile.mkdtemp(prefix="xft-sandbox-")
    try:
        tests_dir = tempfile.mkdtemp(prefix="xft-sandbox-tests-")
        try:
            return _run_tests_in(program_dir, tests_dir, code, test, entry_point, prompt,
                                 timeout_s, limits)
        finally:
            _remove_tree(tests_dir)
    finally:
        _remove_tree(program_dir)


def _run_in(workdir: str, source: str, timeout_s: float, limits: SandboxLimits) -> SandboxResult:
    root = os.geteuid() == 0
    _write_files(workdir, {PROGRAM_FILE: source}, limits, root)
    cpu = limits.cpu_seconds or math.ceil(timeout_s) + 1
    start = time.monotonic()
    end_r, end_w = os.pipe()  # the runner's word that the program reached its end
    os.set_blocking(end_r, False)
    try:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            tail = ["-c", _PRELUDE, str(end_w)] if limits.python_guards else [PROGRAM_FILE]
            try:
                child = _launch(limits, workdir, tail, (end_w,), cpu, root, out, err)
            finally:
                os.close(end_w)
            if child.proc is None:
                return SandboxResult("error", None, "", child.refusal, time.monotonic() - start)
            exited = _wait_exit(child.proc.pid, timeout_s)
            code, cpu_used = _reap(child.proc)
            seconds = time.monotonic() - start
            if child.refusal:
                return _refused(child, seconds)
            status = _status(exited, code, cpu_used, cpu)
            stderr_tail = _tail(err, limits.output_bytes)
            if status == "passed" and limits.python_guards and not _reached_end(end_r):
                status, stderr_tail = "failed", stderr_tail + EARLY_EXIT
            return SandboxResult(
                status=status, returncode=code, stdout_tail=_tail(out, limits.output_bytes),
                stderr_tail=stderr_tail, seconds=seconds, isolation=child.applied + (
                    ("python-guards",) if limits.python_guards else ()))
    finally:
        os.close(end_r)


def _run_tests_in(program_dir: str, tests_dir: str, code: str, test: str, entry_point: str,
                  prompt: str, timeout_s: float, limits: SandboxLimits) -> SandboxResult:
    root = os.geteuid() == 0
    _write_files(program_dir, {PROGRAM_FILE: code}, limits, root)
    _write_files(tests_dir, {PROMPT_FILE: prompt, TEST_FILE: test}, limits, root)
    cpu = limits.cpu_seconds or math.ceil(timeout_s) + 1
    guards = "1" if limits.python_guards else "0"
    start = time.monotonic()
    deadline = start + timeout_s
    call_r, call_w = os.pipe()  # tester -> program: the calls
    answer_r, answer_w = os.pipe()  # program -> tester: the answers (plain data)
    verdict_r, verdict_w = os.pipe()  # tester -> this process only
    parent_ends = [call_r, answer_w, verdict_r]
    try:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
                tempfile.TemporaryFile() as tests_out, tempfile.TemporaryFile() as tests_err:
            try:  # first the tester: undumpable, its files read, before the program exists
                tester = _launch(limits, tests_dir, ["-c", _TESTER, str(verdict_w), str(call_w),
                                                     str(answer_r), entry_point, guards],
                                 (verdict_w, call_w, answer_r), cpu, root, tests_out, tests_err)
            finally:
                for fd in (verdict_w, call_w, answer_r):
                    os.close(fd)
            if tester.proc is None:
                return SandboxResult("error", None, "", tester.refusal, time.monotonic() - start)
            words = _read_line(verdict_r, deadline) if not tester.refusal else b""
            program = None
            if words.startswith(b"ready\n"):
                try:
                    program = _launch(limits, program_dir, ["-c", _SERVER, str(call_r),
                                                            str(answer_w), entry_point, guards],
                                      (call_r, answer_w), cpu, root, out, err)
                finally:
                    for fd in (call_r, answer_w):
                        os.close(fd)
                        parent_ends.remove(fd)
            exited = program is not None and program.proc is not None and not \
                program.refusal and _wait_exit(tester.proc.pid,
                                               max(0.0, deadline - time.monotonic()))
            if program is not None and program.proc is not None:
                if exited:  # the tester is done: the program reads the end of its calls and
                    # exits, writing out what it buffered (its output is part of the result);
                    # one that does not exit within the grace is killed with its group
                    _wait_exit(program.proc.pid, min(PROGRAM_EXIT_GRACE_S,
                                                     max(0.0, deadline - time.monotonic())))
                program_code, program_cpu = _reap(program.proc)
            tester_code, tester_cpu = _reap(tester.proc)
            seconds = time.monotonic() - start
            if tester.refusal:
                return _refused(tester, seconds)
            if program is None:
                if time.monotonic() >= deadline:
                    return SandboxResult("timeout", tester_code, "", "the test process was not "
                                         "ready before the timeout", seconds, tester.applied)
                return SandboxResult("error", tester_code, "", "the test process failed before "
                                     "the program started:\n" + _tail(tests_err,
                                                                      limits.output_bytes),
                                     seconds, tester.applied)
            if program.proc is None:
                return SandboxResult("error", None, "", program.refusal, seconds)
            if program.refusal:
                return _refused(program, seconds)
            said = (words + _read_available(verdict_r)).decode("ascii", "replace").splitlines()
            verdict = said[1] if len(said) > 1 else ""  # after "ready"
            if not exited:
                status = "timeout"
            elif verdict == "passed" and tester_code == 0:
                status = "passed"
            elif verdict.startswith("error"):
                status = "error"
            elif _status(True, program_code, program_cpu, cpu) == "timeout" or \
                    _status(True, tester_code, tester_cpu, cpu) == "timeout":
                status = "timeout"
            elif tester_code > 0:
                status = "failed"
            else:
                status = "error"
            stderr_tail = _tail(err, limits.output_bytes)
            tests_said = _tail(tests_err, limits.output_bytes)
            if tests_said:
                stderr_tail += ("" if not stderr_tail or stderr_tail.endswith("\n") else "\n") \
                    + TESTS_HEADER + tests_said
            return SandboxResult(
                status=status, returncode=tester_code,
                stdout_tail=_tail(out, limits.output_bytes), stderr_tail=stderr_tail,
                seconds=seconds, isolation=program.applied + (
                    ("python-guards",) if limits.python_guards else ()) + ("tests-apart",))
    finally:
        for fd in parent_ends:
            os.close(fd)


@dataclass
class _Child:
    """A started launcher: `applied` protections, or `refusal` (why it did not run)."""

    proc: Optional[subprocess.Popen]
    applied: Tuple[str, ...]
    refusal: str


def _write_files(workdir: str, files: dict, limits: SandboxLimits, root: bool) -> None:
    for name, text in files.items():
        path = os.path.join(workdir, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(path, 0o644)
    if root and limits.drop_to_uid:
        os.chown(workdir, limits.drop_to_uid, limits.drop_to_uid)


def _launch(limits: SandboxLimits, workdir: str, tail: List[str], fds: Tuple[int, ...],
            cpu: int, root: bool, out, err) -> _Child:
    """Start the launcher on `python -I -S -B *tail` in `workdir`, passing it `fds`; returns
    once it has exec'd the interpreter or given up (its report ends there)."""
    report_r, report_w = os.pipe()  # the launcher's list of applied protections
    try:
        plan = _launch_plan(limits, workdir, cpu, report_w, tail, root)
        try:  # no preexec_fn: the launcher isolates itself, then execs the interpreter
            proc = subprocess.Popen(
                [limits.python, "-I", "-S", "-B", "-c", LAUNCHER, LAUNCHER_DIR,
                 marshal.dumps(plan).hex()],
                cwd=workdir, env=_environment(workdir), stdin=subprocess.DEVNULL,
                stdout=out, stderr=err, close_fds=True, pass_fds=(report_w,) + tuple(fds),
                start_new_session=True)
        except (OSError, subprocess.SubprocessError) as e:
            return _Child(None, (), f"the sandbox could not start {limits.python}: {e}")
        finally:
            os.close(report_w)
        report = _read_until_eof(report_r)
    finally:
        os.close(report_r)
    applied, _, refusal = report.partition("!")
    if not refusal and "rlimits" not in applied.split():
        refusal = "the launcher failed:\n" + _tail(err, limits.output_bytes)
    return _Child(proc, tuple(applied.split()), refusal)


# seconds a program gets to exit on its own once the tester has finished (run_tests)
PROGRAM_EXIT_GRACE_S = 2.0


def _reap(proc: subprocess.Popen) -> Tuple[int, float]:
    """Kill what is left of the child's process group and reap the child: (exit code, CPU
    seconds used)."""
    _kill_group(proc.pid)
    _, wait_status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(wait_status)
    return proc.returncode, usage.ru_utime + usage.ru_stime


def _refused(child: _Child, seconds: float) -> SandboxResult:
    return SandboxResult("error", None, "", f"the sandbox refused to run the program: "
                         f"{child.refusal}", seconds, child.applied)


def _launch_plan(limits: SandboxLimits, workdir: str, cpu: int, report_fd: int,
                 tail: List[str], root: bool) -> dict:
    """What the launcher applies to itself before it execs `argv` (launcher.py)."""
    argv = [limits.python, "-I", "-S", "-B"] + list(tail)
    return {"workdir": workdir, "workdir_bytes": limits.workdir_bytes,
            "workdir_files": limits.workdir_files, "argv": argv,
            "rlimits": list(_rlimits(limits, cpu)),
            "namespaces": limits.namespaces, "uid": limits.drop_to_uid if root else None,
            "expose": _interpreter_dirs(limits.python) if root else [],
            "report_fd": report_fd, "max_fd": _descriptor_bound(),
            "machine": platform.machine()}


def _interpreter_dirs(python: str) -> List[str]:
    """Directories the interpreter reads when it starts: its installation prefix (and, for
    this process's own interpreter, sys.base_prefix / base_exec_prefix) and a venv's root."""
    real = os.path.realpath(python)
    dirs = [os.path.dirname(os.path.dirname(real))]
    if real == os.path.realpath(sys.executable):
        dirs += [sys.base_prefix, sys.base_exec_prefix]
    venv = os.path.dirname(os.path.dirname(os.path.abspath(python)))
    if os.path.exists(os.path.join(venv, "pyvenv.cfg")):
        dirs.append(venv)
    return sorted({os.path.realpath(d) for d in dirs if os.path.isdir(d)})


def _environment(workdir: str) -> dict:
    """The whole environment of the program: nothing of the parent's is passed on."""
    return {"PATH": SANDBOX_PATH, "HOME": workdir, "LANG": "C.UTF-8"}


def _rlimits(limits: SandboxLimits, cpu: int) -> Tuple[Tuple[int, int, int], ...]:
    """(resource, soft, hard) for the child, never above this process's own hard limits."""
    r = resource
    wanted = ((r.RLIMIT_CPU, cpu, cpu + 1),
              (r.RLIMIT_AS, limits.memory_bytes, limits.memory_bytes),
              (r.RLIMIT_FSIZE, limits.file_bytes, limits.file_bytes),
              (r.RLIMIT_NOFILE, limits.open_files, limits.open_files),
              (r.RLIMIT_NPROC, limits.processes, limits.processes),
              (r.RLIMIT_CORE, 0, 0))
    capped = []
    for which, soft, hard in wanted:
        ceiling = r.getrlimit(which)[1]
        if ceiling != r.RLIM_INFINITY:
            soft, hard = min(soft, ceiling), min(hard, ceiling)
        capped.append((which, soft, hard))
    return tuple(capped)


def _descriptor_bound() -> int:
    """One past the highest descriptor this process can have open."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft if 0 < soft < 1 << 20 else 1 << 20


# --- in the parent, after the start ------------------------------------------------------------

def _read_until_eof(fd: int) -> str:
    chunks = []
    while chunk := os.read(fd, 4096):
        chunks.append(chunk)
    return b"".join(chunks).decode("ascii", "replace")


def _reached_end(end_r: int) -> bool:
    try:
        return os.read(end_r, len(END_MARK)) == END_MARK
    except BlockingIOError:
        return False


def _read_line(fd: int, deadline: float) -> bytes:
    """What `fd` delivers up to its first newline, EOF or `deadline`."""
    data = b""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not poller.poll(math.ceil(left * 1000)):
            break
        chunk = os.read(fd, 256)
        if not chunk:
            break
        data += chunk
    return data


def _read_available(fd: int, limit: int = 1 << 16) -> bytes:
    """What `fd` holds now, without waiting (its writer is dead or killed)."""
    os.set_blocking(fd, False)
    data = b""
    try:
        while len(data) < limit and (chunk := os.read(fd, 4096)):
            data += chunk
    except BlockingIOError:
        pass
    return data


def _wait_exit(pid: int, timeout_s: float) -> bool:
    """Wait up to `timeout_s` for the child to exit, without reaping it."""
    deadline = time.monotonic() + timeout_s
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    if pidfd is not None:
        try:
            poller = select.poll()  # not select.select: pidfd may exceed FD_SETSIZE
            poller.register(pidfd, select.POLLIN)
            return bool(poller.poll(math.ceil(timeout_s * 1000)))
        finally:
            os.close(pidfd)
    while time.monotonic() < deadline:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        time.sleep(0.01)
    return False


def _kill_group(pgid: int, settle_s: float = 2.0) -> None:
    """SIGKILL the program's process group until no live member is left (delivery is not
    instantaneous). The leader is still an unreaped zombie, so `pgid` cannot be reused."""
    deadline = time.monotonic() + settle_s
    while True:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return
        if not _live_members(pgid) or time.monotonic() > deadline:
            return
        time.sleep(0.005)


def _live_members(pgid: int) -> List[int]:
    """Processes of group `pgid` that are not zombies (from /proc; empty where it is absent)."""
    members = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return members
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue  # exited meanwhile
        fields = raw[raw.rfind(b")") + 2:].split()  # state ppid pgrp ...
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            members.append(int(entry))
    return members


def _status(exited: bool, code: int, cpu_used: float, cpu_limit: int) -> str:
    if not exited:
        return "timeout"
    if code == 0:
        return "passed"
    if code > 0:
        return "failed"
    if -code in (signal.SIGXCPU, signal.SIGKILL) and cpu_used >= cpu_limit - 0.1:
        return "timeout"
    return "error"


def _tail(f, limit: int) -> str:
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - limit))
    return f.read().decode("utf-8", "replace")


def _remove_tree(path: str) -> None:
    """Remove the working directory even if the program took permissions away inside it."""
    def retry(func, target, _exc):
        try:
            os.chmod(os.path.dirname(target), 0o700)
            if os.path.isdir(target) and not os.path.islink(target):
                os.chmod(target, 0o700)
                shutil.rmtree(target, ignore_errors=True)
            else:
                func(target)
        except OSError:
            pass
    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=retry)
    else:
        shutil.rmtree(path, onerror=retry)


# --- the Python-level guards, run by the child interpreter before the program ------------------

def _read_guards() -> str:
    """guards.py's text: the guards run in the sandboxed interpreter (where this package is not
    importable) as the start of the code given to it with -c."""
    with open(GUARDS_FILE, encoding="utf-8") as f:
        return f.read()


_GUARDS = _read_guards()

# main.py run as __main__ (the program's code), in the guarded interpreter
_RUN_MAIN = r"""
with open("main.py", "rb") as _f:
    _code = compile(_f.read(), "main.py", "exec")
_main = types.ModuleType("__main__")
_main.__file__ = "main.py"
_main.__builtins__ = builtins
sys.modules["__main__"] = _main
sys.argv = ["main.py"]
exec(_code, _main.__dict__)
"""

# the program as __main__, then the end mark (run_program)
_PRELUDE = _GUARDS + r"""
_end_fd = int(sys.argv[1])
_install_guards()
del _install_guards
""" + _RUN_MAIN + r"""
os.write(_end_fd, b"end")
"""

# values between the program and its tester: one JSON document a line; lists are JSON arrays,
# other containers and types a one-key object ({"tuple": [...]}, {"dict": [[k, v], ...]}, ...)
_CODEC = r"""
import json


def _plain(value, depth=0):
    if depth > 500:
        raise ValueError("the value is nested too deeply")
    if value is None or type(value) in (bool, str, int, float):
        return value
    inner = lambda items: [_plain(v, depth + 1) for v in items]  # noqa: E731
    for kind, convert in ((bool, bool), (int, int.__index__), (float, float.__float__),
                          (str, str.__str__), (list, inner)):
        if isinstance(value, kind):
            return convert(value)
    if isinstance(value, tuple):
        return {"tuple": inner(value)}
    if isinstance(value, dict):
        return {"dict": [[_plain(k, depth + 1), _plain(v, depth + 1)] for k, v in value.items()]}
    if isinstance(value, frozenset):
        return {"frozenset": inner(value)}
    if isinstance(value, set):
        return {"set": inner(value)}
    if isinstance(value, (bytes, bytearray)):
        return {"bytes": bytes(value).hex()}
    if isinstance(value, complex):
        return {"complex": [complex.__complex__(value).real, complex.__complex__(value).imag]}
    raise TypeError(f"a {type(value).__name__} is not plain data (None, bool, int, float, "
                    f"complex, str, bytes, list, tuple, dict, set, frozenset)")


def _value(data, depth=0):
    kind = type(data)
    if data is None or kind in (bool, int, float, str):
        return data
    if depth > 500:
        raise ValueError("nested too deeply")
    if kind is list:
        return [_value(v, depth + 1) for v in data]
    if kind is dict and len(data) == 1:
        (tag, items), = data.items()
        if tag == "bytes" and type(items) is str:
            return bytes.fromhex(items)
        if type(items) is not list:
            raise ValueError(f"{tag} holds a {type(items).__name__}")
        if tag == "complex" and len(items) == 2 and all(type(x) in (int, float) for x in items):
            return complex(items[0], items[1])
        if tag == "dict" and all(type(p) is list and len(p) == 2 for p in items):
            return {_value(k, depth + 1): _value(v, depth + 1) for k, v in items}
        convert = {"tuple": tuple, "set": set, "frozenset": frozenset}.get(tag)
        if convert is not None:
            return convert(_value(v, depth + 1) for v in items)
    raise ValueError(f"not a value: {str(data)[:80]}")


def _line(message):
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


if hasattr(sys, "set_int_max_str_digits"):
    sys.set_int_max_str_digits(0)  # integers of any size cross
"""

# the program's side of run_tests: run main.py, then answer calls of its entry point until the
# tester closes the pipe. Nothing here is trusted: the program can replace all of it.
_SERVER = _GUARDS + _CODEC + r"""
_calls, _answers, _entry = os.fdopen(int(sys.argv[1]), "rb"), int(sys.argv[2]), sys.argv[3]
if sys.argv[4] == "1":
    _install_guards()
del _install_guards


def _send(message):
    data = _line(message)
    while data:
        data = data[os.write(_answers, data):]


""" + _RUN_MAIN + r"""
_function = _main.__dict__.get(_entry)
if not callable(_function):
    raise SystemExit(f"the program defines no function {_entry}")
_send({"ready": True})
for _request in _calls:
    _request = json.loads(_request)
    _args, _kwargs = _value(_request["args"]), _value(_request["kwargs"])
    try:
        _result = _function(*_args, **_kwargs)
    except Exception as _e:
        _send({"raised": type(_e).__name__, "message": str(_e)[:2000]})
        continue
    try:
        _send({"value": _plain(_result)})
    except (TypeError, ValueError, RecursionError) as _e:
        _send({"unusable": f"{type(_e).__name__}: {_e}"})
"""

# the tester of run_tests: trusted code only (the problem's prompt and test, this file). The
# program's answers reach it as plain data; its verdict goes to a pipe only the runner holds.
_TESTER = r"""
import builtins, os, sys, traceback, types
try:
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: no one
    del ctypes  # of our uid can open /proc/PID/mem of this process (or ptrace it)
except (ImportError, OSError, AttributeError):
    pass
""" + _GUARDS + _CODEC + r"""
_verdict, _calls, _answers = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
_entry = sys.argv[4]
_sources = {}
for _name in ("prompt.py", "test.py"):
    with open(_name, encoding="utf-8") as _f:
        _sources[_name] = _f.read()
if sys.argv[5] == "1":
    _install_guards()
del _install_guards
_BaseException, _Exception, _RuntimeError, _ValueError = (BaseException, Exception,
                                                         RuntimeError, ValueError)
_write, _read, _exit, _loads = os.write, os.read, os._exit, json.loads
_write(_verdict, b"ready\n")  # the runner starts the program only now


def _say(word, code):
    if word.startswith("error "):
        print(word[len("error "):], file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    _write(_verdict, word.encode("ascii", "replace") + b"\n")
    _exit(code)


class ProgramLost(_BaseException):
    # not an Exception: a test's `except Exception` cannot take it for the function's own
    pass


class TestUnsupported(_BaseException):
    pass


_pending = b""
_lost = []


def _receive():
    global _pending
    while b"\n" not in _pending:
        if len(_pending) > (1 << 24):
            _lost.append("an answer longer than 16 MiB")
            raise ProgramLost(_lost[-1])
        chunk = _read(_answers, 1 << 16)
        if not chunk:
            _lost.append("the program ended (an exception or an exit: see its stderr above)")
            raise ProgramLost(_lost[-1])
        _pending += chunk
    line, _pending = _pending.split(b"\n", 1)
    try:
        message = _loads(line)
        if type(message) is not dict or len(message) not in (1, 2):
            raise _ValueError("not a message")
        return message
    except (_ValueError, RecursionError, MemoryError) as e:
        _lost.append(f"the program sent a malformed answer ({type(e).__name__})")
        raise ProgramLost(_lost[-1]) from None


def _raised(name, message):
    cls = getattr(builtins, str(name), None)
    if isinstance(cls, type) and issubclass(cls, _Exception) and \
            cls not in (StopIteration, StopAsyncIteration):
        try:
            return cls(str(message))
        except _BaseException:
            pass
    return _RuntimeError(f"{name}: {message}")


def candidate(*args, **kwargs):
    if _lost:
        raise ProgramLost(_lost[0])
    try:
        request = _line({"args": _plain(list(args)), "kwargs": _plain(kwargs)})
    except (TypeError, _ValueError, RecursionError) as e:
        raise TestUnsupported(f"the test calls {_entry} with {e}; only plain data can be "
                              f"passed to the program") from None
    try:
        while request:
            request = request[_write(_calls, request):]
    except OSError:
        _lost.append("the program ended (an exception or an exit: see its stderr above)")
        raise ProgramLost(_lost[-1]) from None
    answer = _receive()
    if "value" in answer and len(answer) == 1:
        try:
            return _value(answer["value"])
        except (_ValueError, TypeError, RecursionError, MemoryError) as e:
            _lost.append(f"the program sent a malformed value ({type(e).__name__}: {e})")
            raise ProgramLost(_lost[-1]) from None
    if "raised" in answer and "message" in answer:
        raise _raised(answer["raised"], answer["message"])
    _lost.append(f"{_entry} returned what cannot be compared outside the program: "
                 f"{str(answer.get('unusable', answer))[:200]}")
    raise ProgramLost(_lost[-1])


candidate.__name__ = candidate.__qualname__ = _entry
_tests = types.ModuleType("__main__")
_tests.__builtins__ = builtins
sys.modules["__main__"] = _tests
sys.argv = ["test.py"]
try:
    exec(compile(_sources["prompt.py"], "prompt.py", "exec"), _tests.__dict__)
except _Exception as e:
    print(f"the problem's prompt does not run on its own ({type(e).__name__}: {e}); the test "
          f"runs without its definitions", file=sys.stderr)
try:
    exec(compile(_sources["test.py"], "test.py", "exec"), _tests.__dict__)
except _BaseException as e:
    _say(f"error the problem's test does not run ({type(e).__name__}: {e}): fix the problems "
         f"file", 3)
_check = _tests.__dict__.get("check")
if not callable(_check):
    _say("error the problem's test defines no check(candidate): fix the problems file", 3)
_tests.__dict__[_entry] = candidate
try:
    if _receive() != {"ready": True}:
        raise ProgramLost("the program did not start as expected")
    _check(candidate)
except TestUnsupported as e:
    _say(f"error {e}", 3)
except _BaseException:
    traceback.print_exc()
    _say("failed", 1)
if _lost:
    print(f"the program was lost during the test: {_lost[0]}", file=sys.stderr)
    _say("failed", 1)
_say("passed", 0)
"""
