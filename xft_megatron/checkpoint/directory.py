"""The checkpoint directory protocol: names, atomic commit, `latest`, clean-up.

    ROOT/iter_0000100/        a complete checkpoint (it holds CONFIG_FILE)
    ROOT/latest               text: the name of the newest complete checkpoint
    ROOT/.tmp-iter_0000100-<host>-<pid>-<token>/   a save in progress (never read)
    ROOT/.old-iter_0000100-<token>/                a checkpoint a re-save of its step moved aside
    ROOT/.xft-lock            while a run writes ROOT: its holder (lock.py)

A save writes into its temporary folder, which `commit` renames into place; only then is
`latest` replaced (a temporary file + os.replace), and every step is fsync'd. A crash at any
moment leaves the previous checkpoint and pointer untouched: readers (`resolve`) never see a
partial folder, and `remove_stale` deletes leftovers once their writer is provably gone.
What a checkpoint folder holds is the business of dist.py (torch_dist files, state) and
checksums.py (the manifest).
"""

import os
import shutil
import sys
import uuid
from typing import List, Optional

from xft_megatron.checkpoint import lock, ranks

CONFIG_FILE = "xft_config.yaml"
LATEST_FILE = "latest"
TRAIN_STATE_FILE = "train_state.json"
RANK_STATE_DIR = "rank_state"


def iteration_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def moved_aside_name(name: str) -> str:
    """'.old-iter_0000003-1a2b3c4d' (a checkpoint a re-save moved aside) -> 'iter_0000003'."""
    return name[len(".old-"):].rsplit("-", 1)[0]


def tmp_name(name: str) -> str:
    """'.tmp-iter_0000003-HOST-PID-1a2b3c4d': the writer of a partial folder is known."""
    return f".tmp-{name}-{lock.HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def tmp_writer(n: str):
    """(host, pid) of a '.tmp-iter_*' folder named by `tmp_name`, else None (older names)."""
    prefix = n.split("-", 2)  # ['.tmp', 'iter_0000003', 'HOST-PID-TOKEN']
    return _host_pid(prefix[2]) if len(prefix) == 3 else None


def _host_pid(tail: str):
    """(host, pid) of 'HOST-PID-TOKEN' (a writer-named folder's tail), else None."""
    parts = tail.rsplit("-", 2)
    if len(parts) != 3 or not parts[0] or not parts[1].isdigit() or len(parts[2]) != 8:
        return None
    return parts[0], int(parts[1])


def _gone(writer, own_ok: bool = False) -> bool:
    """Whether the writer (host, pid) of a folder is provably dead: a process of this host
    that is not running (`own_ok`: this process counts as done with it too)."""
    return writer is not None and writer[0] == lock.HOST and (
        (own_ok and writer[1] == os.getpid()) or
        (writer[1] != os.getpid() and not lock.pid_alive(writer[1])))


def sibling_tmp(path: str) -> str:
    """'PATH.tmp-HOST-PID-1a2b3c4d': a folder written next to PATH (then renamed to it, or
    used and removed) whose writer is known, so `remove_dead_siblings` can clear it."""
    return f"{path.rstrip('/')}.tmp-{lock.HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def remove_dead_siblings(path: str) -> List[str]:
    """Remove the `sibling_tmp(path)` folders of killed writers of this host (a live
    writer's, or another host's, are left alone); returns what was removed."""
    parent, base = os.path.split(os.path.abspath(path.rstrip("/")))
    prefix = base + ".tmp-"
    removed = [os.path.join(parent, n) for n in (os.listdir(parent) if os.path.isdir(parent)
                                                 else ()) if n.startswith(prefix) and
               _gone(_host_pid(n[len(prefix):]))]
    for folder in removed:
        shutil.rmtree(folder, ignore_errors=True)
    return removed


def _dead_writers_leftover(root: str, n: str) -> bool:
    """A partial checkpoint folder in ROOT whose writer (this host) is gone."""
    return n.startswith(".tmp-iter_") and _gone(tmp_writer(n)) and \
        os.path.isdir(os.path.join(root, n))


def commit(tmp: str, root: str, name: str, keep: int = 0) -> str:
    """Rank 0: the complete folder `tmp` becomes ROOT/NAME (an existing one of that name is
    moved aside until the swap is done), then `latest` names it; `keep` > 0 then removes all
    but the newest `keep` complete checkpoints. Returns the new folder."""
    final = os.path.join(root, name)
    if os.path.exists(final):  # re-save of the same iteration: keep old until swapped
        old = os.path.join(root, f".old-{name}-{uuid.uuid4().hex[:8]}")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    write_atomic(os.path.join(root, LATEST_FILE), name + "\n")
    fsync_dir(root)
    if keep:
        prune(root, keep)
    return final


def remove_stale(root: str) -> None:
    """Leftovers of saves that were killed: partial `.tmp-*` folders (never read) whose
    writer is provably gone (this process, or a dead process of this host; a folder of a
    live process or of another host is left alone), and checkpoints a re-save moved aside
    once their replacement is complete."""
    for n in os.listdir(root):
        stale = False
        if n.startswith(".tmp-iter_"):
            stale = _gone(tmp_writer(n), own_ok=True)
        elif n.startswith(".old-iter_"):
            replaced = os.path.join(root, moved_aside_name(n))
            stale = os.path.isfile(os.path.join(replaced, CONFIG_FILE))
        if stale:
            shutil.rmtree(os.path.join(root, n), ignore_errors=True)


def prune(root: str, keep: int) -> None:
    """Remove complete checkpoints older than the newest `keep` (never the `latest` one)."""
    names = sorted(n for n in os.listdir(root) if n.startswith("iter_")
                   and os.path.isfile(os.path.join(root, n, CONFIG_FILE)))
    with open(os.path.join(root, LATEST_FILE)) as f:
        latest = f.read().strip()
    for n in names[:-keep]:
        if n != latest:
            shutil.rmtree(os.path.join(root, n), ignore_errors=True)


def fsync_file(path: str) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def require_empty_dir(out: str, flag: str = "--out") -> None:
    """Refuse an output directory that exists and holds anything (e.g. another run's
    checkpoints, which a new `latest` would silently replace)."""
    if os.path.exists(out) and (not os.path.isdir(out) or any(
            n != lock.LOCK_FILE and not _dead_writers_leftover(out, n)
            for n in os.listdir(out))):  # a killed run of this command may be rerun
        raise FileExistsError(f"'{out}' exists and is not empty; choose a new {flag} (a "
                              "checkpoint tool never writes into another run's directory)")
    parent = os.path.dirname(os.path.abspath(out))
    while parent != os.path.dirname(parent):
        if os.path.isfile(os.path.join(parent, CONFIG_FILE)):
            raise FileExistsError(f"'{out}' is inside the checkpoint '{parent}'; choose a "
                                  f"{flag} outside it (a checkpoint's folder holds only what "
                                  "its save wrote and checksummed)")
        parent = os.path.dirname(parent)


def resolve(path: str) -> str:
    """A checkpoint directory from either a root (follows `latest`) or an iter_* folder.
    Raises FileNotFoundError with a message saying what was looked for."""
    if os.path.isfile(os.path.join(path, CONFIG_FILE)):
        return path
    latest = os.path.join(path, LATEST_FILE)
    if os.path.isfile(latest):
        with open(latest, "rb") as f:  # a damaged pointer is reported below, not raised on
            name = f.read(4096).decode("utf-8", "replace").replace("\x00", "?").strip()
        ckpt = os.path.join(path, name)
        if os.path.isfile(os.path.join(ckpt, CONFIG_FILE)):
            return ckpt
        fallback = newest_complete(path)
        if fallback:  # a save was killed while replacing a checkpoint of the same step
            if (latest, fallback) not in _fallbacks_said:
                _fallbacks_said.add((latest, fallback))
                if ranks.world()[0] == 0:
                    print(f"notice: '{latest}' names '{name}', which is not a complete "
                          f"checkpoint; using {fallback}, the newest complete one in "
                          f"'{path}'", file=sys.stderr, flush=True)
            return fallback
        raise FileNotFoundError(f"'{latest}' points to '{name}', which is not a complete "
                                f"checkpoint (no {CONFIG_FILE} in {ckpt}); write the name of "
                                "a complete iter_* folder into it")
    raise FileNotFoundError(f"'{path}' is not a checkpoint: expected {CONFIG_FILE} in it or a "
                            f"'{LATEST_FILE}' file naming one")


_fallbacks_said = set()


def newest_complete(root: str) -> Optional[str]:
    """The complete checkpoint with the highest step in `root` (iter_* first, then a folder a
    killed re-save had moved aside), or None."""
    found = []
    for n in os.listdir(root):
        base = moved_aside_name(n) if n.startswith(".old-iter_") else n
        if base.startswith("iter_") and os.path.isfile(os.path.join(root, n, CONFIG_FILE)):
            try:
                found.append((int(base[len("iter_"):]), not n.startswith("."), n))
            except ValueError:
                continue
    return os.path.join(root, max(found)[2]) if found else None
