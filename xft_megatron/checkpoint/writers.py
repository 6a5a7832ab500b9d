"""Megatron's checkpoint writer processes end with the save that started them.

A torch_dist save (`dist_checkpointing.save`, synchronous here) forks one writer process per
write bucket (`FileSystemWriterAsync.write_preloaded_data_multiproc`, megatron-core 0.16.1)
and waits for them; for their results it also starts, once per process, a spawned
`multiprocessing.Manager` server. Left alone, Ctrl-C in the waiting parent ends in a
traceback and a parent still joining its writers at exit, and a parent killed by SIGKILL
leaves the writers and the manager running forever. Around each save, `guarded()`:
  - gives every process forked inside it a parent-death signal (prctl PR_SET_PDEATHSIG ->
    SIGKILL): a writer dies with the process that forked it, whatever kills that one; writers
    ignore SIGINT (a Ctrl-C in a terminal reaches the whole process group; the parent decides);
  - hands Megatron an in-process queue for the results instead of the manager's (the writers
    report to a queue of their own; only the parent, which runs the synchronous save, reads
    and writes this one), so no manager process exists;
  - on any exception (KeyboardInterrupt included) kills and reaps the writers it started
    before the exception goes on, so the caller can remove the partial folder and exit.
"""

import contextlib
import ctypes
import multiprocessing
import os
import queue
import signal

from megatron.core.dist_checkpointing.strategies import filesystem_async

_PR_SET_PDEATHSIG = 1
try:
    _libc = ctypes.CDLL(None, use_errno=True)  # loaded here: not in a freshly forked child
except OSError:  # not Linux/glibc: writers are then not tied to their parent
    _libc = None

_state = {"depth": 0, "parent": 0}


def _before_fork() -> None:
    _state["parent"] = os.getpid()


def _in_child() -> None:
    if not _state["depth"]:
        return
    with contextlib.suppress(Exception):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if _libc is not None and hasattr(_libc, "prctl"):
        _libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != _state["parent"]:  # the parent died before the line above
            os._exit(1)


os.register_at_fork(before=_before_fork, after_in_child=_in_child)


def _child_pids() -> set:
    """This process's direct children (Linux /proc), also those forked but not yet known to
    multiprocessing (a Ctrl-C in the middle of `Process.start`)."""
    out = set()
    with contextlib.suppress(OSError):
        for tid in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError), open(f"/proc/self/task/{tid}/children") as f:
                out.update(int(x) for x in f.read().split())
    return out


@contextlib.contextmanager
def guarded():
    """Run one checkpoint save: its writer processes die with this process, and are ended
    before any exception (e.g. KeyboardInterrupt) leaves the block."""
    before, pids_before = set(multiprocessing.active_children()), _child_pids()
    real = filesystem_async._get_write_results_queue
    filesystem_async._get_write_results_queue = queue.Queue
    _state["depth"] += 1
    try:
        yield
    except BaseException:
        for p in set(multiprocessing.active_children()) - before:
            with contextlib.suppress(Exception):
                p.kill()
                p.join(10)
        for pid in _child_pids() - pids_before:  # forked, not yet registered
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        raise
    finally:
        _state["depth"] -= 1
        filesystem_async._get_write_results_queue = real
