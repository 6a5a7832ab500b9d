"""A code corpus from the Python source on this machine (no downloads): the standard library,
and optionally the installed packages (site-packages) or any other source tree.

Files are taken in sorted path order and deduplicated by content, so every machine with the
same Python version (and the same installed packages) builds the same corpus. Until a
trained tokenizer is in place, text is tokenized as UTF-8 bytes (ids 0..255), which any
vocabulary of >= 256 entries covers.
"""

import hashlib
import os
import site
import sysconfig
from typing import Iterator, List, Optional, Sequence, Set, Tuple

import torch

from xft_megatron.errors import UsageError

SOURCES = ("stdlib", "site-packages")  # names `source_dirs` resolves; anything else is a path
_SKIPPED_DIRS = ("site-packages", "dist-packages", "test", "tests", "__pycache__", "idlelib",
                 "lib2to3", "turtledemo")


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


def python_files(root: str, limit: Optional[int] = None,
                 seen: Optional[Set[str]] = None) -> List[str]:
    """Sorted .py files under `root` (tests and nested site-packages skipped), unique by
    content; at most `limit`. `seen` (content digests, updated) dedupes across roots."""
    out, seen = [], set() if seen is None else seen
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIPPED_DIRS)
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            try:
                with open(path, "rb") as f:
                    digest = hashlib.sha1(f.read()).hexdigest()
            except OSError:
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


def byte_tokens(files: List[str]) -> torch.Tensor:
    """Concatenated UTF-8 bytes of `files` as int64 token ids (files joined by a newline)."""
    chunks = []
    for path in files:
        with open(path, "rb") as f:
            chunks.append(f.read() + b"\n")
    data = b"".join(chunks)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)


class WindowBatches:
    """Global batches of `batch` windows of `seq + 1` tokens from a token stream, in an order
    fixed by `seed`; step `i` always yields the same batch (resumable, layout-independent)."""

    def __init__(self, tokens: torch.Tensor, seq: int, batch: int, seed: int):
        if tokens.numel() < seq + 2:
            raise UsageError(f"corpus has {tokens.numel()} tokens, fewer than one window of "
                             f"{seq + 1}")
        self.tokens, self.seq, self.batch, self.seed = tokens, seq, batch, seed
        self.num_windows = (tokens.numel() - 1) // seq

    def __getitem__(self, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, self.num_windows, (self.batch,), generator=g) * self.seq
        return torch.stack([self.tokens[s:s + self.seq + 1] for s in starts.tolist()])

    def __iter__(self) -> Iterator[torch.Tensor]:
        step = 0
        while True:
            yield self[step]
            step += 1
