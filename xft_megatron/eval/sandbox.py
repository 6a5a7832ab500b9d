"""Run untrusted Python (a generated completion plus its tests) in a throw-away sandbox.

`run_program(source)` writes the source to `main.py` in a fresh temporary directory, runs it in
one child interpreter and removes the directory afterwards. The result says which protections
were in force (`SandboxResult.isolation`), because what the OS allows differs between machines.

OS-enforced protections (the hard boundary; none needs Python's cooperation). They are applied
by a small launcher (`sandbox_launcher.py`), started without a `preexec_fn`, which isolates
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
  seccomp       a seccomp filter (sandbox_launcher.py lists it) refusing mount, umount, setns,
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

Python-level guards (`python-guards`; installed by a prelude before the program runs, on every
machine): fork/exec/spawn/system/popen, subprocess, multiprocessing, kill/killpg/setsid, signal
sending, sockets, ctypes, file deletion/renaming/chmod/chown, and opening files for writing
outside the working directory all raise PermissionError. These turn ordinary mistakes and naive
attacks into clean failures, but a determined program can get around them (the original
functions stay reachable through the interpreter's internals); only the OS-enforced entries
above are a boundary.

Statuses: "passed" (exit 0; with the guards also: the program ran to its last statement, so
sys.exit(0) or os._exit(0) before the tests ran is "failed"), "failed" (non-zero exit: an
exception, a failed assert, sys.exit(n)), "timeout" (wall clock or CPU limit reached),
"error" (the program could not be started, or was terminated by any other signal).
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
from xft_megatron.eval import sandbox_launcher  # noqa: F401  (caches its bytecode)

LAUNCHER_DIR = os.path.dirname(os.path.abspath(__file__))
LAUNCHER = ("import sys; sys.path.insert(0, sys.argv.pop(1)); import sandbox_launcher; "
            "sandbox_launcher.main()")  # run with -c LAUNCHER_DIR PLAN
SANDBOX_PATH = "/usr/bin:/bin"
PROGRAM_FILE = "main.py"
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
        for name in ("memory_bytes", "file_bytes", "processes", "open_files", "output_bytes"):
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


def _run_in(workdir: str, source: str, timeout_s: float, limits: SandboxLimits) -> SandboxResult:
    program = os.path.join(workdir, PROGRAM_FILE)
    with open(program, "w", encoding="utf-8") as f:
        f.write(source)
    os.chmod(program, 0o644)
    root = os.geteuid() == 0
    if root and limits.drop_to_uid:
        os.chown(workdir, limits.drop_to_uid, limits.drop_to_uid)
    cpu = limits.cpu_seconds or math.ceil(timeout_s) + 1
    start = time.monotonic()
    report_r, report_w = os.pipe()  # the launcher's list of applied protections
    end_r, end_w = os.pipe()  # the runner's word that the program reached its end
    os.set_blocking(end_r, False)
    try:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            plan = _launch_plan(limits, workdir, cpu, report_w, end_w, root)
            try:  # no preexec_fn: the launcher isolates itself, then execs the interpreter
                proc = subprocess.Popen(
                    [limits.python, "-I", "-S", "-B", "-c", LAUNCHER, LAUNCHER_DIR,
                     marshal.dumps(plan).hex()],
                    cwd=workdir, env=_environment(workdir), stdin=subprocess.DEVNULL,
                    stdout=out, stderr=err, close_fds=True, pass_fds=(report_w, end_w),
                    start_new_session=True)
            except (OSError, subprocess.SubprocessError) as e:
                return SandboxResult("error", None, "", f"the sandbox could not start "
                                     f"{limits.python}: {e}", time.monotonic() - start)
            finally:
                os.close(report_w)
                os.close(end_w)
            report = _read_until_eof(report_r)
            exited = _wait_exit(proc.pid, timeout_s)
            _kill_group(proc.pid)
            _, wait_status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(wait_status)
            seconds = time.monotonic() - start
            applied, _, refusal = report.partition("!")
            if refusal or "rlimits" not in applied.split():
                why = refusal or "the launcher failed:\n" + _tail(err, limits.output_bytes)
                return SandboxResult("error", None, "", f"the sandbox refused to run the "
                                     f"program: {why}", seconds, tuple(applied.split()))
            status = _status(exited, proc.returncode, usage.ru_utime + usage.ru_stime, cpu)
            stderr_tail = _tail(err, limits.output_bytes)
            if status == "passed" and limits.python_guards and not _reached_end(end_r):
                status, stderr_tail = "failed", stderr_tail + EARLY_EXIT
            return SandboxResult(
                status=status, returncode=proc.returncode,
                stdout_tail=_tail(out, limits.output_bytes), stderr_tail=stderr_tail,
                seconds=seconds, isolation=tuple(applied.split()) + (
                    ("python-guards",) if limits.python_guards else ()))
    finally:
        os.close(report_r)
        os.close(end_r)


def _launch_plan(limits: SandboxLimits, workdir: str, cpu: int, report_fd: int, end_fd: int,
                 root: bool) -> dict:
    """What the launcher applies to itself before it execs `argv` (sandbox_launcher.py)."""
    argv = [limits.python, "-I", "-S", "-B"]
    argv += ["-c", _PRELUDE, str(end_fd)] if limits.python_guards else [PROGRAM_FILE]
    return {"workdir": workdir, "argv": argv, "rlimits": list(_rlimits(limits, cpu)),
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

_PRELUDE = r'''
import builtins, io, os, sys, types


def _install_guards():
    import _io, _posixsubprocess, _socket, posix, shutil, signal, socket, subprocess
    import multiprocessing.process

    root = os.path.realpath(os.getcwd())
    real_open, real_os_open, fsdecode, realpath = _io.open, os.open, os.fsdecode, os.path.realpath

    def refuse(what):
        def refused(*args, **kwargs):
            raise PermissionError(f"sandbox: {what} is not allowed")
        return refused

    def check_inside(path, action):
        if isinstance(path, int):
            return  # an already open descriptor
        resolved = realpath(fsdecode(path))
        if resolved != root and not resolved.startswith(root + os.sep):
            raise PermissionError(f"sandbox: {action} outside the working directory is not "
                                  f"allowed: {path!r}")

    def writes(mode):
        return isinstance(mode, str) and any(flag in mode for flag in "wax+")

    def open_guarded(file, mode="r", *args, **kwargs):
        if writes(mode):
            check_inside(file, "writing")
        return real_open(file, mode, *args, **kwargs)

    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def os_open_guarded(path, flags, mode=0o777, *, dir_fd=None):
        if flags & write_flags:
            if dir_fd is not None:
                raise PermissionError("sandbox: os.open for writing with dir_fd is not allowed")
            check_inside(path, "writing")
        return real_os_open(path, flags, mode, dir_fd=dir_fd)

    real_mkdir = os.mkdir

    def mkdir_guarded(path, mode=0o777, *, dir_fd=None):
        if dir_fd is not None:
            raise PermissionError("sandbox: os.mkdir with dir_fd is not allowed")
        check_inside(path, "creating directories")
        return real_mkdir(path, mode)

    class FileIOGuarded(_io.FileIO):
        def __init__(self, file, mode="r", *args, **kwargs):
            if writes(mode):
                check_inside(file, "writing")
            super().__init__(file, mode, *args, **kwargs)

    class SocketRefused(socket.socket):
        def __init__(self, *args, **kwargs):
            raise PermissionError("sandbox: network access is not allowed")

    builtins.open = io.open = _io.open = open_guarded
    io.FileIO = _io.FileIO = FileIOGuarded
    os.open = posix.open = os_open_guarded
    os.mkdir = posix.mkdir = mkdir_guarded
    for name in ("fork", "forkpty", "system", "popen", "execv", "execve", "execl", "execle",
                 "execlp", "execlpe", "execvp", "execvpe", "spawnl", "spawnle", "spawnlp",
                 "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "posix_spawn",
                 "posix_spawnp", "kill", "killpg", "setsid", "setpgid", "setpgrp", "remove",
                 "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "truncate",
                 "chmod", "lchmod", "chown", "lchown", "fchown", "link", "symlink", "mkfifo",
                 "mknod", "chroot", "pidfd_open"):
        for module in (os, posix):
            if hasattr(module, name):
                setattr(module, name, refuse(f"os.{name}"))
    for name in ("rmtree", "move", "chown"):
        setattr(shutil, name, refuse(f"shutil.{name}"))
    for name in ("pthread_kill", "pidfd_send_signal"):
        if hasattr(signal, name):
            setattr(signal, name, refuse(f"signal.{name}"))
    subprocess.Popen = refuse("subprocess")
    _posixsubprocess.fork_exec = refuse("starting processes")
    multiprocessing.process.BaseProcess.start = refuse("multiprocessing")
    socket.socket = SocketRefused
    _socket.socket = SocketRefused
    for module, name in ((socket, "socketpair"), (_socket, "socketpair"), (socket, "fromfd"),
                         (socket, "create_connection"), (socket, "create_server")):
        if hasattr(module, name):
            setattr(module, name, refuse("network access"))
    sys.modules["ctypes"] = None
    sys.modules["_ctypes"] = None


_end_fd = int(sys.argv[1])
_install_guards()
del _install_guards
with open("main.py", "rb") as _f:
    _code = compile(_f.read(), "main.py", "exec")
_main = types.ModuleType("__main__")
_main.__file__ = "main.py"
_main.__builtins__ = builtins
sys.modules["__main__"] = _main
sys.argv = ["main.py"]
exec(_code, _main.__dict__)
os.write(_end_fd, b"end")
'''
