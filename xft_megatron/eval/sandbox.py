"""Run untrusted Python (a generated completion plus its tests) in a throw-away sandbox.

`run_program(source)` writes the source to `main.py` in a fresh temporary directory, runs it in
one child interpreter and removes the directory afterwards. The result says which protections
were in force (`SandboxResult.isolation`), because what the OS allows differs between machines.

OS-enforced protections (the hard boundary; each is tried and reported, none needs Python's
cooperation):
  session       the child leads a new session and process group; the parent SIGKILLs the whole
                group on the wall-clock timeout and again after a normal exit (stray children).
  rlimits       RLIMIT_CPU, RLIMIT_AS (memory), RLIMIT_FSIZE (file size), RLIMIT_NOFILE,
                RLIMIT_NPROC, RLIMIT_CORE = 0; set in the child before exec.
  nproc         RLIMIT_NPROC only binds a non-root user: the kernel exempts uid 0. Reported only
                when the program runs under a non-zero uid.
  netns         a new network namespace (unshare CLONE_NEWNET): no interfaces but a loopback
                that is down, so nothing, not even 127.0.0.1, can be reached.
  pidns         a new PID namespace (CLONE_NEWPID) in which the program is pid 1: it can neither
                see nor signal the parent or any other host process, and when it exits (or is
                killed, which also happens when it leaves the process group: PDEATHSIG) the
                kernel kills everything it started.
  proc          a private /proc for that namespace (in a private mount namespace): other
                processes' environments and command lines are out of sight.
  readonly-fs   every mount read-only (mount_setattr, AT_RECURSIVE) except the working
                directory, which is bind-mounted writable; mounts never propagate to the host.
  uid=N         when the parent is root and the interpreter is reachable by other users, the
                program runs as uid N (default 65534, nobody): it cannot signal root's
                processes, write root's files, or exceed RLIMIT_NPROC.
  env           the environment is only PATH, HOME (= the working directory) and LANG.
Namespaces need root (CAP_SYS_ADMIN); without them, or when the interpreter lives in a private
directory such as /root, the corresponding entries are simply absent from `isolation`.
Reading is not restricted beyond file permissions: a program running as root can read any file.

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

import ctypes
import functools
import math
import os
import platform
import resource
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import List, Optional, Tuple

CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 8, 4096, 16384, 1 << 18
AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY = -100, 0x8000, 1
PR_SET_PDEATHSIG = 1
MOUNT_SETATTR = {"x86_64": 442, "aarch64": 442, "arm64": 442}  # syscall number per machine
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
    """Try new network, PID and mount namespaces (needs root)."""
    drop_to_uid: Optional[int] = 65534
    """Run as this uid when the parent is root and the interpreter is reachable by others."""
    python_guards: bool = True
    """Install the Python-level guards; turning them off leaves only the OS protections
    (for testing those on their own)."""
    python: str = sys.executable
    """Interpreter that runs the program (started with -I -S -B: no site-packages)."""

    def __post_init__(self):
        for name in ("memory_bytes", "file_bytes", "processes", "open_files", "output_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"SandboxLimits.{name} must be >= 1, got {getattr(self, name)}")
        if self.cpu_seconds is not None and self.cpu_seconds < 1:
            raise ValueError(f"SandboxLimits.cpu_seconds must be >= 1 or None, "
                             f"got {self.cpu_seconds}")
        if not self.python:
            raise ValueError("SandboxLimits.python must name an interpreter (empty: "
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


@dataclass(frozen=True)
class _ChildPlan:
    """Everything the child needs between fork and exec, computed in the parent."""

    libc: ctypes.CDLL
    workdir: bytes
    rlimits: Tuple[Tuple[int, int, int], ...]  # (resource, soft, hard)
    namespaces: bool
    mount_setattr: Optional[int]
    uid: Optional[int]
    max_fd: int


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def run_program(source: str, timeout_s: float = 10.0,
                limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run `source` as `__main__` in a sandbox; never raises for anything the program does."""
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
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
    uid = _sandbox_uid(limits)
    if uid is not None:
        os.chown(workdir, uid, uid)
    cpu = limits.cpu_seconds or math.ceil(timeout_s) + 1
    plan = _ChildPlan(libc=_load_libc(), workdir=os.fsencode(workdir),
                      rlimits=_rlimits(limits, cpu), namespaces=limits.namespaces,
                      mount_setattr=MOUNT_SETATTR.get(platform.machine()), uid=uid,
                      max_fd=_descriptor_bound())
    start = time.monotonic()
    report_r, report_w = os.pipe()  # the child's list of applied protections
    end_r, end_w = os.pipe()  # the runner's word that the program reached its end
    os.set_blocking(end_r, False)
    try:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            try:
                proc = subprocess.Popen(
                    _command(limits, end_w), cwd=workdir, env=_environment(workdir),
                    stdin=subprocess.DEVNULL, stdout=out, stderr=err, close_fds=True,
                    pass_fds=(end_w,) if limits.python_guards else (),
                    start_new_session=True,
                    preexec_fn=functools.partial(_prepare_child, plan, report_w))
            except (OSError, subprocess.SubprocessError) as e:
                return SandboxResult("error", None, "", f"the sandbox could not start "
                                     f"{limits.python}: {e}", time.monotonic() - start)
            finally:
                os.close(report_w)
                os.close(end_w)
            report = _read_until_eof(report_r).split()
            exited = _wait_exit(proc.pid, timeout_s)
            _kill_group(proc.pid)
            _, wait_status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(wait_status)
            seconds = time.monotonic() - start
            status = _status(exited, proc.returncode, usage.ru_utime + usage.ru_stime, cpu)
            stderr_tail = _tail(err, limits.output_bytes)
            if status == "passed" and limits.python_guards and not _reached_end(end_r):
                status, stderr_tail = "failed", stderr_tail + EARLY_EXIT
            return SandboxResult(
                status=status, returncode=proc.returncode,
                stdout_tail=_tail(out, limits.output_bytes), stderr_tail=stderr_tail,
                seconds=seconds, isolation=tuple(report) + (
                    ("python-guards",) if limits.python_guards else ()))
    finally:
        os.close(report_r)
        os.close(end_r)


def _command(limits: SandboxLimits, end_fd: int) -> List[str]:
    base = [limits.python, "-I", "-S", "-B"]
    return base + (["-c", _PRELUDE, str(end_fd)] if limits.python_guards else [PROGRAM_FILE])


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


def _sandbox_uid(limits: SandboxLimits) -> Optional[int]:
    """The uid to drop to, or None (not root, disabled, or the interpreter is private)."""
    if limits.drop_to_uid is None or os.geteuid() != 0:
        return None
    return limits.drop_to_uid if _reachable_by_others(limits.python) else None


def _reachable_by_others(path: str) -> bool:
    """True when users other than the owner may execute `path` (every directory above it
    searchable, the file executable); the interpreter's own library is assumed to follow."""
    real = os.path.realpath(path)
    try:
        if not os.stat(real).st_mode & stat.S_IXOTH:
            return False
        parent = os.path.dirname(real)
        while True:
            if not os.stat(parent).st_mode & stat.S_IXOTH:
                return False
            if parent == os.path.dirname(parent):
                return True
            parent = os.path.dirname(parent)
    except OSError:
        return False


def _descriptor_bound() -> int:
    """One past the highest descriptor this process can have open."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft if 0 < soft < 1 << 20 else 1 << 20


def _load_libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.unshare.argtypes = [ctypes.c_int]
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                           ctypes.c_void_p]
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                           ctypes.c_ulong]
    libc.syscall.restype = ctypes.c_long
    return libc


# --- in the child, between fork and exec -------------------------------------------------------

def _prepare_child(plan: _ChildPlan, report_fd: int) -> None:
    """preexec_fn: isolate, limit, drop privileges; write what was applied to `report_fd`.

    Best-effort steps (namespaces, mounts, uid) are reported; limits that cannot be set raise,
    which makes the run an "error" rather than an unlimited program."""
    applied = ["session", "env"]
    if plan.namespaces and plan.libc.unshare(CLONE_NEWNET) == 0:
        applied.append("netns")
    namespace_init = plan.namespaces and plan.libc.unshare(CLONE_NEWPID | CLONE_NEWNS) == 0
    if namespace_init:
        _become_namespace_init(plan.max_fd)
        applied.append("pidns")
        applied += _private_mounts(plan)
    for which, soft, hard in plan.rlimits:
        resource.setrlimit(which, (soft, hard))
    applied.append("rlimits")
    if plan.uid is not None:
        os.setgroups([])
        os.setgid(plan.uid)
        os.setuid(plan.uid)
        applied.append(f"uid={plan.uid}")
    if namespace_init and plan.libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError("cannot tie the program to the process the parent waits on")
    if os.getuid() != 0:
        applied.append("nproc")
    os.write(report_fd, " ".join(applied).encode())


def _become_namespace_init(max_fd: int) -> None:
    """Fork once more so the program becomes pid 1 of the new PID namespace. The forking
    process stays behind as the one the parent waits on and exits as its child did; the
    program gets SIGKILL when that process dies (PR_SET_PDEATHSIG, set after the uid drop,
    which would clear it), so leaving the process group does not escape the parent's kill."""
    pid = os.fork()
    if pid == 0:
        return
    os.closerange(3, max_fd)  # let the parent see the exec (and the report) of the child
    _, wait_status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(wait_status)
    if code < 0:
        try:
            signal.signal(-code, signal.SIG_DFL)
        except (OSError, ValueError):
            pass  # SIGKILL/SIGSTOP: no handler to reset
        os.kill(os.getpid(), -code)
    os._exit(code & 0xFF)


def _private_mounts(plan: _ChildPlan) -> List[str]:
    """A /proc of the new PID namespace and a read-only filesystem except the working dir."""
    libc = plan.libc
    if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        return []  # mounts could propagate to the host: mount nothing
    applied = []
    if libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None) == 0:
        applied.append("proc")
    if plan.mount_setattr is None or _mount_setattr(plan, b"/", AT_RECURSIVE,
                                                    set_flags=MOUNT_ATTR_RDONLY) != 0:
        return applied
    if (libc.mount(plan.workdir, plan.workdir, None, MS_BIND, None) != 0
            or _mount_setattr(plan, plan.workdir, 0, clear_flags=MOUNT_ATTR_RDONLY) != 0):
        raise OSError("the filesystem was made read-only but the working directory could not "
                      "be made writable again")
    os.chdir(plan.workdir)  # the old cwd is the read-only mount under the new bind mount
    applied.append("readonly-fs")
    return applied


def _mount_setattr(plan: _ChildPlan, path: bytes, flags: int, set_flags: int = 0,
                   clear_flags: int = 0) -> int:
    attr = _MountAttr(set_flags, clear_flags, 0, 0)
    return plan.libc.syscall(ctypes.c_long(plan.mount_setattr), ctypes.c_int(AT_FDCWD),
                             ctypes.c_char_p(path), ctypes.c_uint(flags), ctypes.byref(attr),
                             ctypes.c_size_t(ctypes.sizeof(attr)))


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
