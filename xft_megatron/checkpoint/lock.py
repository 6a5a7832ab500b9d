"""One writer per output directory: an exclusive lock held for a run's life.

Every command that writes a checkpoint directory (`xft train` into checkpoint.save, `xft
convert`, `xft upcycle`, `xft merge` into --out) holds DIR/.xft-lock (an HF export, renamed
into place whole, holds PARENT/.DIR.xft-lock instead): an `fcntl.flock` on that file, which
records its holder as JSON (host, pid, start time, command). A second writer is refused at
start, before any expensive work, with a message naming the holder. The kernel
releases a flock when its process dies, so a lock left by a killed process on this host is
taken over (with a notice); a record left by a process on another host cannot be checked
from here and is refused with a message saying how to clear it. A clean release deletes the
file (and the directory, when the lock created it and nothing else was written).

Under torchrun rank 0 holds the lock; it decides and broadcasts the outcome, so all ranks
go on or fail together with the same message. `hold` is re-entrant within a process: the
training loop and each checkpoint save take it again at no cost.
"""

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
import time
from typing import Dict, Optional

from xft_megatron.checkpoint import ranks
from xft_megatron.errors import UserError

LOCK_FILE = ".xft-lock"
HOST = socket.gethostname()


class DirectoryInUse(UserError, OSError):
    """Another run holds the output directory (or may: a record from another host)."""


_held: Dict[str, "_Lock"] = {}  # realpath -> lock held by this process


def _key(directory: str) -> str:
    return os.path.realpath(directory)


def held(directory: str) -> bool:
    return _key(directory) in _held


def describe(record: Optional[dict]) -> str:
    """'host h, pid 12, started 2026-12-01 10:00:00 UTC (xft train ...)'."""
    if not record:
        return "an unknown process (its record is empty or unreadable)"
    start = record.get("start")
    when = datetime.datetime.fromtimestamp(start, datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M:%S UTC") if isinstance(start, (int, float)) else "?"
    return (f"host {record.get('host', '?')}, pid {record.get('pid', '?')}, started {when}"
            f" ({record.get('command', '?')})")


def _read_record(fd: int) -> Optional[dict]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = os.read(fd, 65536)
        return json.loads(data) if data.strip() else None
    except (OSError, ValueError):
        return None


def pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True
    return True


class _Lock:
    def __init__(self, directory: str, fd: int, path: str, created_dir: bool, since: float):
        self.directory, self.fd, self.path = directory, fd, path
        self.created_dir, self.since, self.depth = created_dir, since, 1

    def release(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # before unlocking: a waiter re-checks the inode (acquire)
        os.close(self.fd)
        if self.created_dir:
            with contextlib.suppress(OSError):
                os.rmdir(self.directory)  # only if nothing else was written


def lock_path(directory: str, beside: bool = False) -> str:
    """DIR/.xft-lock, or with `beside` PARENT/.DIR.xft-lock: for a directory that is written
    elsewhere and renamed into place whole (an HF export), so it must not exist before."""
    if not beside:
        return os.path.join(directory, LOCK_FILE)
    parent, name = os.path.split(os.path.abspath(directory).rstrip(os.sep))
    return os.path.join(parent, f".{name}{LOCK_FILE}")


def _acquire(directory: str, command: str, beside: bool) -> "_Lock":
    """Rank 0's side: raises DirectoryInUse naming the holder."""
    path = lock_path(directory, beside)
    home = os.path.dirname(path)
    for _ in range(50):  # retried when a holder released (and deleted) the file meanwhile
        created = not os.path.isdir(home) and not beside
        os.makedirs(home, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # the directory was removed by a releasing holder
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            record = _read_record(fd)
            os.close(fd)
            raise DirectoryInUse(
                f"'{directory}' is in use by another run ({describe(record)}), which holds "
                f"{path}; wait for it to end or stop it, or choose another directory") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # locked a file its holder deleted on release: take the new one
            os.close(fd)
            continue
        record = _read_record(fd)
        if record and record.get("host") != HOST:
            os.close(fd)
            raise DirectoryInUse(
                f"{path} names a run on another host ({describe(record)}) that did not "
                f"release it; this host ({HOST}) cannot check whether it still runs. If that "
                f"run has ended, delete {path} and start again")
        if record and record.get("pid") != os.getpid():
            alive = pid_alive(record.get("pid"))
            print(f"notice: took over the lock {path} left by {describe(record)}, which "
                  + ("no longer holds it (its pid now belongs to another process)" if alive
                     else "is no longer running"), file=sys.stderr, flush=True)
        since = time.time()
        text = json.dumps({"host": HOST, "pid": os.getpid(), "start": since,
                           "command": command}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, text, 0)
        os.fsync(fd)
        return _Lock(directory, fd, path, created, since)
    raise DirectoryInUse(f"could not take the lock {path}: it kept being replaced")


def _command() -> str:
    argv = [os.path.basename(sys.argv[0])] + sys.argv[1:] if sys.argv else ["?"]
    return " ".join(argv)[:500]


def acquire(directory: str, command: Optional[str] = None, beside: bool = False) -> None:
    """Take (or, when this process holds it, re-enter) the lock on `directory`; all ranks
    must call it. DirectoryInUse on every rank when another run holds it. `beside`: the
    lock file sits next to the directory (`lock_path`)."""
    key = _key(directory)
    if key in _held:
        _held[key].depth += 1
        return
    rank = ranks.world()[0]
    lock, error = None, None
    if rank == 0:
        try:
            lock = _acquire(directory, command or _command(), beside)
        except DirectoryInUse as e:
            error = str(e)
    error = ranks.broadcast(error)
    if error:
        raise DirectoryInUse(error)
    _held[key] = lock or _Lock(directory, -1, "", False, time.time())


def release(directory: str) -> None:
    key = _key(directory)
    lock = _held.get(key)
    if lock is None:
        return
    lock.depth -= 1
    if lock.depth == 0:
        del _held[key]
        if lock.fd >= 0:
            lock.release()


@contextlib.contextmanager
def hold(directory: Optional[str], command: Optional[str] = None, beside: bool = False):
    """`with hold(DIR):` the exclusive lock on DIR for the block (no-op for None)."""
    if not directory:
        yield
        return
    acquire(directory, command, beside)
    try:
        yield
    finally:
        release(directory)


def held_since(directory: str) -> Optional[float]:
    lock = _held.get(_key(directory))
    return lock.since if lock else None
