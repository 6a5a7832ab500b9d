"""A code corpus from the Python source on this machine (no downloads): the standard library,
and optionally the installed packages (site-packages) or any other source tree.

Files are taken in sorted path order and deduplicated by content, so every machine with the
same Python version (and the same installed packages) builds the same corpus. Standard library
only (no torch): `xft`'s parser reads mine_code.py's arguments, and mine_code.py imports this.

Only regular files are read (`read_regular`), at most MAX_SOURCE_BYTES each: a `*.py` that is
a device (a symlink to /dev/zero), a named pipe or a socket is never opened, a larger file is
not read past the limit. A symlinked file is read when it leads to a regular file inside its
own source root (a link within the tree; its content is then deduplicated like any file); a
link leading out of the root is not followed (the target's folder can be given as a source
of its own). Symlinked directories are not entered (`os.walk` does not follow them). Each
skipped file is counted under its reason (SKIP_REASONS).
"""

import hashlib
import os
import site
import stat
import sysconfig
from typing import Dict, List, Optional, Sequence, Set, Tuple

SOURCES = ("stdlib", "site-packages")  # names `source_dirs` resolves; anything else is a path
_SKIPPED_DIRS = ("site-packages", "dist-packages", "test", "tests", "__pycache__", "idlelib",
                 "lib2to3", "turtledemo")
MAX_SOURCE_BYTES = 8 * 1024 ** 2
"""Largest source file read, in bytes; a larger one is skipped (the biggest .py of the
standard library is under 1 MiB, of common packages a few MiB)."""
SKIP_REASONS = {  # key: (what the file is, what to do about it)
    "not_regular": ("not a regular file (a device, named pipe or socket, possibly through a "
                    "symlink)", "remove it from the source tree"),
    "outside_root": ("a symlink to a file outside its source root",
                     "give the target's folder as a source of its own to mine it"),
    "too_large": ("larger than the per-file limit", "raise --max-file-bytes to mine it"),
    "unreadable": ("could not be read (a dangling symlink, no permission, an I/O error)",
                   "fix or remove it"),
}


class SkippedFile(OSError):
    """A source file that was not read; `reason` is a key of SKIP_REASONS."""

    def __init__(self, path: str, reason: str, detail: str = ""):
        what, fix = SKIP_REASONS[reason]
        super().__init__(f"'{path}' skipped: {what}{detail}; {fix}")
        self.path, self.reason = path, reason


def read_regular(path: str, max_bytes: int = MAX_SOURCE_BYTES,
                 root: Optional[str] = None) -> bytes:
    """The bytes of `path` if it is a regular file of at most `max_bytes` (and, with `root`,
    resolves to a file inside `root`); raises SkippedFile otherwise. Anything but a regular
    file is never opened (opening a device can have effects, a named pipe blocks), and no
    more than `max_bytes` + 1 bytes are read (a file may grow after it was measured)."""
    try:
        st = os.stat(path)  # through a symlink: what it leads to
    except OSError as e:
        raise SkippedFile(path, "unreadable", f": {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise SkippedFile(path, "not_regular")
    if root is not None:
        real, top = os.path.realpath(path), os.path.realpath(root)
        if not real.startswith(top.rstrip(os.sep) + os.sep):
            raise SkippedFile(path, "outside_root", f" (it leads to {real})")
    if st.st_size > max_bytes:
        raise SkippedFile(path, "too_large", f": {st.st_size} > {max_bytes} bytes")
    try:  # O_NONBLOCK: should the path have become a named pipe since, open does not wait
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as e:
        raise SkippedFile(path, "unreadable", f": {e.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SkippedFile(path, "not_regular")
        chunks, total = [], 0
        while total <= max_bytes:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except SkippedFile:
        raise
    except OSError as e:
        raise SkippedFile(path, "unreadable", f": {e.strerror}") from None
    finally:
        os.close(fd)
    if total > max_bytes:
        raise SkippedFile(path, "too_large", f": more than {max_bytes} bytes")
    return b"".join(chunks)


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def site_packages_dirs() -> List[str]:
    """This interpreter's existing site-packages folders (installed packages' source)."""
    paths = sysconfig.get_paths()
    candidates = list(site.getsitepackages()) + [paths["purelib"], paths["platlib"]]
    if site.ENABLE_USER_SITE:
        candidates.append(site.getusersitepackages())
    return _unique_dirs(candidates)


def source_dirs(sources: Sequence[str]) -> List[str]:
    """Source roots for `sources`: `stdlib`, `site-packages` (every such folder of this
    interpreter) or directory paths; in the given order, each folder once."""
    dirs = []
    for s in sources:
        if s == "stdlib":
            dirs.append(stdlib_dir())
        elif s == "site-packages":
            dirs += site_packages_dirs()
        elif os.path.isdir(s):
            dirs.append(s)
        else:
            raise FileNotFoundError(f"source directory '{s}' does not exist (or use one of "
                                    f"{', '.join(SOURCES)})")
    return _unique_dirs(dirs)


def _unique_dirs(paths: Sequence[str]) -> List[str]:
    out, seen = [], set()
    for p in paths:
        real = os.path.realpath(p)
        if os.path.isdir(real) and real not in seen:
            seen.add(real)
            out.append(p)
    return out


def python_files(root: str, limit: Optional[int] = None, seen: Optional[Set[str]] = None,
                 skipped: Optional[Dict[str, List[str]]] = None,
                 max_bytes: int = MAX_SOURCE_BYTES) -> List[str]:
    """Sorted .py files under `root` (tests and nested site-packages skipped), unique by
    content; at most `limit`. `seen` (content digests, updated) dedupes across roots. Files
    `read_regular` refuses are left out and, with `skipped`, listed under their reason."""
    out, seen = [], set() if seen is None else seen
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIPPED_DIRS)
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            try:
                digest = hashlib.sha1(read_regular(path, max_bytes, root)).hexdigest()
            except SkippedFile as e:
                if skipped is not None:
                    skipped.setdefault(e.reason, []).append(path)
                continue
            if digest not in seen:
                seen.add(digest)
                out.append(path)
            if limit and len(out) >= limit:
                return out
    return out


def split_by_file(files: List[str], heldout_every: int = 10) -> Tuple[List[str], List[str]]:
    """Train / held-out split by whole file (every n-th file held out): nothing leaks."""
    held = [f for i, f in enumerate(files) if i % heldout_every == heldout_every - 1]
    held_set = set(held)
    return [f for f in files if f not in held_set], held
