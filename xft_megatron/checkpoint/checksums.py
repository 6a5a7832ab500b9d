"""Content checksums of every file of a checkpoint: recorded at save, verified at load.

A save writes ITER/checksums.json before the folder is renamed into place:
    {"algorithm": "crc32", "block": 67108864,
     "files": {"__0_0.distcp": [size, [crc of block 0, crc of block 1, ...]], ...},
     "self": crc of the canonical JSON of "files"}
Blocks of 64 MiB are hashed independently, so one large file is checked on several threads
(zlib's CRC-32 releases the GIL; ~2 GB/s per core here) and a mismatch names its byte range.
CRC-32 detects every error burst up to 32 bits and a random change with probability
1 - 2^-32; it guards against storage damage, not against deliberate tampering.
Each rank hashes the files it wrote (its `__R_*.distcp` shards, its rank state), rank 0 the
rest; a load splits the blocks over its ranks and all of them fail together when one finds
a mismatch. A checkpoint without the manifest (older, or written by Megatron itself) loads
with a notice.
"""

import json
import os
import re
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch.distributed as dist

from xft_megatron.checkpoint import ranks

MANIFEST = "checksums.json"
ALGORITHM = "crc32"
BLOCK = 64 * 2 ** 20
_READ = 8 * 2 ** 20
THREADS = max(1, min(4, os.cpu_count() or 1))

_noticed = set()  # folders already reported as lacking a manifest


def _block_crc(path: str, start: int, length: int, buf: Optional[bytearray] = None) -> int:
    crc = 0
    view = memoryview(buf if buf is not None else bytearray(min(_READ, max(length, 1))))
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        left = length
        while left > 0:
            n = f.readinto(view[:min(len(view), left)])
            if not n:
                break
            crc = zlib.crc32(view[:n], crc)
            left -= n
    return crc


def _blocks(size: int) -> List[Tuple[int, int]]:
    return [(s, min(BLOCK, size - s)) for s in range(0, size, BLOCK)] or [(0, 0)]


def _hash_units(units: Sequence[Tuple[str, int, int]]) -> List[int]:
    """CRC of each (path, start, length), on THREADS threads."""
    if len(units) <= 1:
        return [_block_crc(*u) for u in units]
    with ThreadPoolExecutor(THREADS, thread_name_prefix="xft-crc") as pool:
        return list(pool.map(lambda u: _block_crc(*u), units))


def hash_files(folder: str, names: Sequence[str]) -> Dict[str, list]:
    """{relative path: [size, [block crcs]]} of the given files."""
    units, owners = [], []
    sizes = {}
    for name in names:
        path = os.path.join(folder, name)
        sizes[name] = os.path.getsize(path)
        for start, length in _blocks(sizes[name]):
            units.append((path, start, length))
            owners.append(name)
    crcs = _hash_units(units)
    out = {name: [sizes[name], []] for name in names}
    for name, crc in zip(owners, crcs):
        out[name][1].append(crc)
    return out


def list_files(folder: str) -> List[str]:
    out = []
    for dirpath, _, files in os.walk(folder):
        for f in files:
            rel = os.path.relpath(os.path.join(dirpath, f), folder)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


_RANK_FILE = re.compile(r"^(?:__(\d+)_\d+\.distcp|rank_state/rank_(\d+)\.pt)$")


def writer_rank(name: str, world: int) -> int:
    """The rank that wrote (and hashes) a file: its own shards and rank state; rank 0 the
    rest (index, common state, config, tokenizer files)."""
    m = _RANK_FILE.match(name.replace(os.sep, "/"))
    r = int(m.group(1) or m.group(2)) if m else 0
    return r if r < world else 0


def hash_own_files(folder: str, sync: Optional[Callable[[str], None]] = None
                   ) -> Dict[str, list]:
    """This rank's part of the manifest: the files of `folder` it wrote (collective: call
    on every rank once they are all written). With `sync` (e.g. an fsync), each of those
    files is also passed to it, on a thread of its own while the hash threads read: the
    flush waits on the disk, the hash is CPU on the cached pages, so the two overlap."""
    rank, world = ranks.world()
    names = [n for n in list_files(folder) if writer_rank(n, world) == rank]
    if sync is None:
        return hash_files(folder, names)
    with ThreadPoolExecutor(1, thread_name_prefix="xft-sync") as syncer:
        pending = [syncer.submit(sync, os.path.join(folder, n)) for n in names]
        hashed = hash_files(folder, names)
        for p in pending:
            p.result()
    return hashed


def _self_crc(files: Dict[str, list]) -> int:
    return zlib.crc32(json.dumps(files, sort_keys=True, separators=(",", ":")).encode())


def write_manifest(folder: str, files: Dict[str, list], everything: bool = True) -> None:
    """Rank 0: the manifest over `files` plus (with `everything`) whatever else `folder`
    holds now."""
    files = dict(files)
    if everything:
        rest = [n for n in list_files(folder) if n not in files]
        files.update(hash_files(folder, rest))
    body = {"algorithm": ALGORITHM, "block": BLOCK, "files": dict(sorted(files.items())),
            "self": _self_crc(files)}
    with open(os.path.join(folder, MANIFEST), "w") as f:
        json.dump(body, f, separators=(",", ":"))


def read_manifest(folder: str):
    """(manifest dict, None), (None, None) when there is none, or (None, problem)."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return None, None
    try:
        with open(path, "rb") as f:
            body = json.loads(f.read())
        files = body["files"]
        ok = body.get("algorithm") == ALGORITHM and isinstance(body.get("block"), int) and \
            body.get("self") == _self_crc(files)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        ok = False
    if not ok:
        return None, (f"its checksum manifest {path} is damaged (it does not match its own "
                      "checksum)")
    return body, None


def _mismatch(folder: str, name: str, entry, block: int, have_size: Optional[int],
              index: Optional[int] = None) -> str:
    path = os.path.join(folder, name)
    if have_size is None:
        return f"{path} is missing (the checksum manifest {MANIFEST} lists it)"
    if have_size != entry[0]:
        return (f"{path} has {have_size} bytes, {entry[0]} were written (recorded in "
                f"{MANIFEST})")
    start = index * block
    end = min(start + block, entry[0])
    return (f"the content of {path} does not match the checksum recorded at save (bytes "
            f"{start}-{end} differ; {MANIFEST})")


class Pending:
    """A verification running on background threads (`start`); `result()` waits for it.
    The threads only read and hash; the one collective (every rank's finding) is in
    `result`, on the calling thread, so a load's own collectives may run meanwhile."""

    def __init__(self, folder: str, names: Optional[Sequence[str]], collective: bool,
                 notice: bool = True):
        self.folder, self.collective, self.found, self.future = folder, collective, None, None
        self.pool = None
        body, bad = read_manifest(folder)
        if body is None:
            self.found = bad
            if bad is None and notice and folder not in _noticed:
                _noticed.add(folder)
                if ranks.world()[0] == 0:
                    print(f"notice: checkpoint '{folder}' has no {MANIFEST} (written by an "
                          "older version or by Megatron itself): its files are loaded without "
                          "a content check", file=sys.stderr, flush=True)
            return
        files, block = body["files"], body["block"]
        wanted = sorted(files) if names is None else [n for n in names if n in files]
        rank, world = ranks.world() if collective else (0, 1)
        units, where = [], []
        for name in wanted:
            entry = files[name]
            path = os.path.join(folder, name)
            size = os.path.getsize(path) if os.path.isfile(path) else None
            if size != entry[0]:
                self.found = self.found or _mismatch(folder, name, entry, block, size)
                continue
            for i, (start, length) in enumerate(_blocks(size)):
                units.append((path, start, length))
                where.append((name, i))
        mine = [k for k in range(len(units)) if k % world == rank]
        self.files, self.block, self.where = files, block, [where[k] for k in mine]
        work = [units[k] for k in mine]
        if len(work) > 1:
            self.pool = ThreadPoolExecutor(THREADS, thread_name_prefix="xft-crc")
            self.future = [self.pool.submit(_block_crc, *u) for u in work]
        else:
            self.crcs = [_block_crc(*u) for u in work]

    def _local(self) -> Optional[str]:
        if self.future is not None:
            self.crcs = [f.result() for f in self.future]
            self.pool.shutdown()
            self.future = None
        for (name, i), crc in zip(getattr(self, "where", []), getattr(self, "crcs", [])):
            if self.files[name][1][i] != crc and self.found is None:
                self.found = _mismatch(self.folder, name, self.files[name], self.block,
                                       self.files[name][0], i)
        return self.found

    def result(self, collective: Optional[bool] = None) -> Optional[str]:
        """None when every checked file holds its recorded content, else what is wrong
        (naming the file); the same on every rank when collective."""
        found = self._local()
        collective = self.collective if collective is None else collective
        if collective and dist.is_initialized() and dist.get_world_size() > 1:
            found = next((g for g in ranks.all_gather(found) if g), None)
        return found


def start(folder: str, names: Optional[Sequence[str]] = None,
          collective: bool = True, notice: bool = True) -> Pending:
    """Begin checking every file the manifest lists (or only `names`) on background threads.
    Without a manifest: a notice, and nothing to check. With `collective` (all ranks call
    it, and later `result()`) the blocks are split over the ranks."""
    return Pending(folder, names, collective, notice)


def problem(folder: str, names: Optional[Sequence[str]] = None,
            collective: bool = True, notice: bool = True) -> Optional[str]:
    """`start(...).result()`: what is wrong with the files of `folder`, or None. `notice`:
    say so when it has no manifest (off for folders where none is the rule: HF models)."""
    return start(folder, names, collective, notice).result()
