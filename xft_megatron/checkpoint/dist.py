"""Megatron-Core distributed checkpoints (torch_dist), written atomically.

Layout of a checkpoint root:
    ROOT/iter_0000100/        a complete checkpoint (dist_checkpointing files + xft_config.yaml)
        train_state.json      (training checkpoints) step, consumed samples, data position
        rank_state/rank_N.pt  (training checkpoints) each rank's RNG states
        checksums.json        CRC-32 of every other file, verified by every load (checksums.py)
    ROOT/latest               text: the name of the newest complete checkpoint
    ROOT/.xft-lock            while a run writes ROOT: its holder (lock.py)
Training checkpoints also hold the distributed optimizer's state (in model space, so it
reshards like the weights) and the LR scheduler's state.
A save (under the directory lock) writes into ROOT/.tmp-iter_0000100-<host>-<pid>-<token>/,
records the checksums, then renames it into place and only then replaces `latest` (write to a
temporary file + os.replace). A crash at any moment leaves the previous checkpoint and pointer
untouched; leftover .tmp-* folders are ignored by readers and removed by a later save once
their writer is provably gone (a dead process of this host).
Sharded tensors carry global names, so a checkpoint loads under any other valid layout.
"""

import functools
import io
import json
import os
import shutil
import sys
import uuid
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
import yaml
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.core import CheckpointingException
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from xft_megatron.checkpoint import checksums, lock, ranks, space, writers
from xft_megatron.config import Config, ConfigError
from xft_megatron.errors import UserError

CONFIG_FILE = "xft_config.yaml"
LATEST_FILE = "latest"
TRAIN_STATE_FILE = "train_state.json"
RANK_STATE_DIR = "rank_state"


class CheckpointWriteError(UserError, OSError):
    """A checkpoint could not be written (disk full, file-size limit, ...); nothing of the
    previous checkpoints was touched."""


def iteration_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def unwrap(chunk):
    """The model inside DDP (or other wrappers exposing `.module`)."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _model_sharded_state_dict(chunks: List) -> Dict:
    chunks = [unwrap(c) for c in chunks]
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def _training_sharded_state_dict(chunks: List, optimizer, scheduler, is_loading: bool) -> Dict:
    state = _model_sharded_state_dict(chunks)
    if optimizer is not None:
        model_state = {}
        for sub in state.values():
            model_state.update(sub)
        # each rank writes its own shard of the optimizer state, in parallel: resharding is
        # possible over data parallel only, so a resume under another TP/PP/EP layout
        # restarts the optimizer state (see training/loop.py)
        state["optimizer"] = optimizer.sharded_state_dict(
            model_state, is_loading=is_loading,
            metadata={"distrib_optim_sharding_type": "dp_reshardable"})
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    return state


def save(chunks: List, root: str, iteration: int, cfg: Config,
         extra_files: Optional[Dict[str, str]] = None, optimizer=None, scheduler=None,
         train_state: Optional[Dict] = None, rank_state=None, keep: int = 0,
         write_tensors: Optional[Callable[[str], None]] = None) -> str:
    """Save the model chunks of every rank as ROOT/iter_N atomically; returns its path.
    All ranks must call it. `write_tensors(folder)`, when given, writes the torch_dist files
    in place of the chunks' own save (the streaming tools; `chunks` is then unused).
    `extra_files` maps file names to source paths (e.g. tokenizer) copied into the checkpoint
    by rank 0. A training checkpoint adds the optimizer and
    scheduler, `train_state` (JSON, from rank 0) and `rank_state` (per rank, e.g. RNG).
    `keep` > 0 removes all but the newest `keep` complete checkpoints afterwards."""
    with lock.hold(root):  # re-entrant: a run holds it already for its whole life
        return _save(chunks, root, iteration, cfg, extra_files, optimizer, scheduler,
                     train_state, rank_state, keep, write_tensors)


def _save(chunks, root, iteration, cfg, extra_files, optimizer, scheduler, train_state,
          rank_state, keep, write_tensors) -> str:
    name = iteration_dir_name(iteration)
    rank = ranks.world()[0]
    tmp = ranks.broadcast(os.path.join(root, _tmp_name(name)) if rank == 0 else None)
    if rank == 0:
        _remove_stale(root)
        os.makedirs(tmp)
    ranks.barrier()
    try:
        if write_tensors is None:
            write_tensors = functools.partial(_save_chunks, chunks, optimizer, scheduler)
        with writers.guarded():  # Megatron's writer processes: ended on Ctrl-C or our death
            _write(write_tensors, root, name, tmp, iteration, cfg, extra_files, train_state,
                   rank_state, keep)
    except BaseException as e:  # a failed write (disk full, Ctrl-C) leaves no partial folder
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (KeyboardInterrupt, SystemExit, CheckpointError)):
            raise  # CheckpointError: the source of a streaming tool is damaged
        # OSError from our writes; torch's CheckpointException (a BaseException) wrapping a
        # failed write in the dist_checkpointing writer: its last line names the cause
        cause = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        raise CheckpointWriteError(
            f"could not write checkpoint {name} in '{root}' ({cause}; its disk has "
            f"{space.human(space.free_bytes(root))} free: is it full, or a file-size limit "
            f"set?). Nothing was replaced: the previous checkpoint and "
            f"'{os.path.join(root, LATEST_FILE)}' are unchanged") from e
    return os.path.join(root, name)


def _moved_aside_name(name: str) -> str:
    """'.old-iter_0000003-1a2b3c4d' (a checkpoint a re-save moved aside) -> 'iter_0000003'."""
    return name[len(".old-"):].rsplit("-", 1)[0]


def _tmp_name(name: str) -> str:
    """'.tmp-iter_0000003-HOST-PID-1a2b3c4d': the writer of a partial folder is known."""
    return f".tmp-{name}-{lock.HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _tmp_writer(n: str):
    """(host, pid) of a '.tmp-iter_*' folder named by `_tmp_name`, else None (older names)."""
    parts = n.rsplit("-", 2)
    if len(parts) != 3:
        return None
    head, pid, token = parts
    prefix = head.split("-", 2)  # ['.tmp', 'iter_0000003', HOST]
    if len(prefix) < 3 or not pid.isdigit() or len(token) != 8:
        return None
    return prefix[2], int(pid)


def _remove_stale(root: str) -> None:
    """Leftovers of saves that were killed: partial `.tmp-*` folders (never read) whose
    writer is provably gone (this process, or a dead process of this host; a folder of a
    live process or of another host is left alone), and checkpoints a re-save moved aside
    once their replacement is complete."""
    for n in os.listdir(root):
        stale = False
        if n.startswith(".tmp-iter_"):
            writer = _tmp_writer(n)
            stale = writer is not None and writer[0] == lock.HOST and (
                writer[1] == os.getpid() or not lock.pid_alive(writer[1]))
        elif n.startswith(".old-iter_"):
            replaced = os.path.join(root, _moved_aside_name(n))
            stale = os.path.isfile(os.path.join(replaced, CONFIG_FILE))
        if stale:
            shutil.rmtree(os.path.join(root, n), ignore_errors=True)


def _save_chunks(chunks, optimizer, scheduler, folder: str) -> None:
    dist_checkpointing.save(
        _training_sharded_state_dict(chunks, optimizer, scheduler, is_loading=False), folder)


def _write(write_tensors, root, name, tmp, iteration, cfg, extra_files, train_state,
           rank_state, keep) -> None:
    write_tensors(tmp)
    if rank_state is not None:
        os.makedirs(os.path.join(tmp, RANK_STATE_DIR), exist_ok=True)
        path = os.path.join(tmp, RANK_STATE_DIR, f"rank_{ranks.world()[0]:05d}.pt")
        torch.save(rank_state, path)
        fsync_file(path)
    ranks.barrier()
    # each rank hashes and flushes the files it wrote, the two overlapping
    hashed = ranks.all_gather(checksums.hash_own_files(tmp, sync=fsync_file))
    if ranks.world()[0] == 0:
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            yaml.safe_dump({"iteration": iteration, **cfg.to_dict()}, f, sort_keys=False)
        if train_state is not None:
            with open(os.path.join(tmp, TRAIN_STATE_FILE), "w") as f:
                json.dump(train_state, f, indent=1)
        for fname, src in (extra_files or {}).items():
            shutil.copy2(src, os.path.join(tmp, fname))
        synced = {k: v for part in hashed for k, v in part.items()}
        checksums.write_manifest(tmp, synced)
        for dirpath, _, files in os.walk(tmp):  # what the ranks did not flush above
            for fname in files:
                path = os.path.join(dirpath, fname)
                if os.path.relpath(path, tmp) not in synced:
                    fsync_file(path)
            _fsync_dir(dirpath)
        final = os.path.join(root, name)
        if os.path.exists(final):  # re-save of the same iteration: keep old until swapped
            old = os.path.join(root, f".old-{name}-{uuid.uuid4().hex[:8]}")
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _write_atomic(os.path.join(root, LATEST_FILE), name + "\n")
        _fsync_dir(root)
        if keep:
            _prune(root, keep)
    ranks.barrier()


def _prune(root: str, keep: int) -> None:
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


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def require_empty_dir(out: str, flag: str = "--out") -> None:
    """Refuse an output directory that exists and holds anything (e.g. another run's
    checkpoints, which a new `latest` would silently replace)."""
    if os.path.exists(out) and (not os.path.isdir(out) or
                                set(os.listdir(out)) - {lock.LOCK_FILE}):
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
        fallback = _newest_complete(path)
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


def _newest_complete(root: str) -> Optional[str]:
    """The complete checkpoint with the highest step in `root` (iter_* first, then a folder a
    killed re-save had moved aside), or None."""
    found = []
    for n in os.listdir(root):
        base = _moved_aside_name(n) if n.startswith(".old-iter_") else n
        if base.startswith("iter_") and os.path.isfile(os.path.join(root, n, CONFIG_FILE)):
            try:
                found.append((int(base[len("iter_"):]), not n.startswith("."), n))
            except ValueError:
                continue
    return os.path.join(root, max(found)[2]) if found else None


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be loaded as given (damaged, incomplete, or of another
    architecture); the message names the checkpoint, the file and the problem."""


def read_config(path: str) -> Dict:
    """The config stored with a checkpoint (root or iter_* folder), iteration included."""
    folder = resolve(path)
    file = os.path.join(folder, CONFIG_FILE)
    verify(folder, [CONFIG_FILE], collective=False)
    try:
        with open(file, encoding="utf-8") as f:
            stored = yaml.safe_load(f)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid YAML ({_one_line(e)}); the checkpoint's "
                              "config is damaged: restore it from a copy or use another "
                              "iter_* folder") from None
    if not isinstance(stored, dict):
        raise CheckpointError(f"{file} holds {type(stored).__name__}, not a config mapping; "
                              "the checkpoint's config is damaged: restore it from a copy or "
                              "use another iter_* folder")
    for section, value in stored.items():
        if section != "iteration" and value is not None and not isinstance(value, dict):
            raise CheckpointError(f"{file}: section '{section}' holds "
                                  f"{type(value).__name__}, not a mapping; the checkpoint's "
                                  "config is damaged: restore it from a copy")
    if not isinstance(stored.get("iteration", 0), int):
        raise CheckpointError(f"{file}: iteration={stored['iteration']!r} is not an integer; "
                              "the checkpoint's config is damaged: restore it from a copy")
    return stored


def load_config(path: str, **sections) -> Config:
    """The Config stored with a checkpoint, with whole sections replaced by `sections`
    (e.g. parallel={} to read it in a single process). An invalid result is blamed on the
    stored file only when that file alone is invalid; otherwise on the sections given."""
    stored = read_config(path)
    stored.pop("iteration", None)
    file = os.path.join(resolve(path), CONFIG_FILE)
    try:
        Config.from_dict(stored)
    except ConfigError as e:
        raise ConfigError(f"the config stored in {file} is invalid: {e}; fix that file or "
                          "restore it from a copy") from None
    try:
        return Config.from_dict({**stored, **sections})
    except ConfigError as e:
        layout = sections.get("parallel")
        given = ", ".join(f"{k}: {v}" if k == "parallel" else k
                          for k, v in sections.items() if v)
        what = f"the layout {_layout_text(layout)}" if layout else "the settings given"
        raise ConfigError(f"{e}: {what} does not fit the model stored in {file} (this "
                          f"command set {given or 'nothing'}); choose settings that fit "
                          "it") from None


def _layout_text(parallel: Dict) -> str:
    """'TP=2 PP=1 EP=1 (sequence parallel)' for a parallel section."""
    names = (("tensor", "TP"), ("pipeline", "PP"), ("expert", "EP"), ("expert_tensor", "ETP"))
    text = " ".join(f"{short}={parallel[k]}" for k, short in names if k in parallel)
    return text + (" (sequence parallel)" if parallel.get("sequence_parallel") else "")


def load(chunks: List, path: str, may_lack: Sequence[str] = (), optimizer=None,
         scheduler=None) -> int:
    """Load model weights into `chunks` (any layout) from a checkpoint; returns its iteration.
    Tensors whose names end with one of `may_lack` keep their current values when the
    checkpoint has none (e.g. the merge stage's alphas, loading an MoE checkpoint); every
    other tensor must be there. With `optimizer`/`scheduler`, their states are restored too
    (a training checkpoint: resume). All ranks must call it.
    Before anything is read into the model, the checkpoint's files are checked against its
    index and the model's tensors against the stored names and shapes: CheckpointError
    (on every rank) naming the file or tensor that is wrong. Every file is checked against
    the checksums recorded at save on background threads while the load reads
    (checksums.py); a mismatch raises, naming the file, before the load returns."""
    ckpt = resolve(path)
    pending = checksums.start(ckpt)
    try:
        state, chunks, skipped, iteration = _load_state(chunks, ckpt, may_lack, optimizer,
                                                        scheduler)
    except BaseException:
        _raise_damaged(ckpt, pending.result(collective=False))  # the damaged file, named
        raise
    _raise_damaged(ckpt, pending.result())
    for i, c in enumerate(chunks):
        missing, unexpected = c.load_state_dict(
            state["model" if len(chunks) == 1 else f"model{i}"], strict=False)
        missing = [k for k in missing if k not in skipped and not k.endswith("_extra_state")]
        if missing or unexpected:
            raise CheckpointError(f"checkpoint '{ckpt}' does not fit the model: missing "
                                  f"{missing[:5]}, unexpected {unexpected[:5]}")
    if optimizer is not None:
        with torch.no_grad():  # main parameters may be views of the model's parameters
            optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    return iteration


def _raise_damaged(folder: str, found: Optional[str]) -> None:
    if found:
        raise CheckpointError(f"checkpoint '{folder}' is damaged: {found}; {_DAMAGED}")


def _load_state(chunks, ckpt, may_lack, optimizer, scheduler):
    """(the state read by dist_checkpointing, the unwrapped chunks, the names skipped as
    `may_lack`, the iteration), after the checks against the index."""
    iteration = read_config(ckpt).get("iteration", 0)
    chunks = [unwrap(c) for c in chunks]
    request = _training_sharded_state_dict(chunks, optimizer, scheduler, is_loading=True)
    metadata, problem = _read_index(ckpt)
    skipped = set()
    if may_lack and metadata is not None:
        stored = set(metadata.state_dict_metadata)
        for key, sub in request.items():
            if not key.startswith("model"):
                continue
            for name in [n for n, v in sub.items() if n.endswith(tuple(may_lack))
                         and getattr(v, "key", None) not in stored]:
                del sub[name]
                skipped.add(name)
    _check_model_tensors(ckpt, request, metadata, problem)
    try:
        state = dist_checkpointing.load(request, ckpt)
    except (CheckpointException, Exception) as e:  # torch's is a BaseException
        raise CheckpointError(_load_failure(ckpt, metadata, e)) from e
    return state, chunks, skipped, iteration


_DAMAGED = "restore the checkpoint from a copy, or use another iter_* folder"


def verify(folder: str, names: Optional[Sequence[str]] = None, collective: bool = True) -> None:
    """CheckpointError naming the file when a file of `folder` (or only `names`) differs from
    the checksum recorded at save (collective: every rank raises). See checksums.py."""
    _raise_damaged(folder, checksums.problem(folder, names, collective=collective))


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:limit]}"


def _read_index(ckpt: str):
    """(torch_dist metadata, None), or (None, what is wrong) when the index file is absent or
    unreadable, or a data file it names is missing or shorter than the index says."""
    if not os.path.isfile(os.path.join(ckpt, "metadata.json")):
        return None, (f"checkpoint '{ckpt}' is incomplete: {os.path.join(ckpt, 'metadata.json')} "
                      f"is missing, so this is not a torch_dist checkpoint; {_DAMAGED}")
    index, common = os.path.join(ckpt, ".metadata"), os.path.join(ckpt, "common.pt")
    for file, what in ((index, "tensor index"), (common, "non-tensor state")):
        if not os.path.isfile(file):
            return None, (f"checkpoint '{ckpt}' is incomplete: its {what} {file} is "
                          f"missing; {_DAMAGED}")
    try:
        metadata = FileSystemReader(ckpt).read_metadata()
        sizes = {}
        for item in metadata.storage_data.values():
            end = item.offset + item.length
            sizes[item.relative_path] = max(sizes.get(item.relative_path, 0), end)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged index
        return None, (f"checkpoint '{ckpt}' is damaged: its tensor index {index} cannot be "
                      f"read ({_one_line(e, 120)}); {_DAMAGED}")
    for name, need in sorted(sizes.items()):
        file = os.path.join(ckpt, name)
        if not os.path.isfile(file):
            return None, (f"checkpoint '{ckpt}' is incomplete: data file {file} is missing "
                          f"(its index {index} names it); {_DAMAGED}")
        have = os.path.getsize(file)
        if have < need:
            return None, (f"checkpoint '{ckpt}' is damaged: data file {file} is truncated "
                          f"({have} bytes, its index {index} needs {need}); {_DAMAGED}")
    return metadata, None


def _check_model_tensors(ckpt: str, request: Dict, metadata, problem: Optional[str]) -> None:
    """Raise CheckpointError on every rank when any rank found `problem` (a damaged index) or
    the model's tensors do not match the stored ones: names the checkpoint lacks or global
    shapes that differ (another architecture). Collective: no rank is left waiting in the load
    that follows. Stored tensors the model does not ask for are not an error (the merge stage
    loads an MoE checkpoint without its routers)."""
    missing, mismatched = [], []  # in the model's order
    if problem is None:
        stored = metadata.state_dict_metadata
        for key, sub in request.items():
            if not key.startswith("model"):
                continue
            for value in nested_values(sub):
                parts = value.build() if isinstance(value, ShardedTensorFactory) else value
                for t in nested_values(parts) if isinstance(parts, (dict, list)) else [parts]:
                    if not isinstance(t, ShardedTensor):
                        continue
                    entry = stored.get(t.key)
                    if not isinstance(entry, TensorStorageMetadata):
                        missing.append(t.key)
                    elif tuple(entry.size) != tuple(t.global_shape):
                        mismatched.append((t.key, tuple(entry.size), tuple(t.global_shape)))
    gathered = [(problem, missing, mismatched)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (problem, missing, mismatched))
    found = next((p for p, _, _ in gathered if p), None)
    if found:
        raise CheckpointError(found)
    missing = list(dict.fromkeys(k for _, ks, _ in gathered for k in ks))
    mismatched = list(dict.fromkeys(m for _, _, ms in gathered for m in ms))
    if not (missing or mismatched):
        return
    lines = [f"checkpoint '{ckpt}' does not fit the model (it holds another architecture; "
             f"{os.path.join(ckpt, CONFIG_FILE)} has the one it was saved with): load it into "
             "a model built from that config, or use a checkpoint of this architecture"]
    lines += [f"  tensor '{name}' has shape {have} in the checkpoint but {want} in the model"
              for name, have, want in mismatched[:5]]
    lines += [f"  tensor '{name}' is not in the checkpoint" for name in missing[:5]]
    raise CheckpointError("\n".join(lines))


def _load_failure(ckpt: str, metadata, error: BaseException) -> str:
    """A message for a failed dist_checkpointing.load: the file holding an unreadable tensor
    when one is found, else the underlying error."""
    if isinstance(error, CheckpointException) and error.failures:
        error = next(iter(error.failures.values()))[0]
    if isinstance(error, CheckpointingException) and "mismatch" in str(error):
        return f"checkpoint '{ckpt}' does not fit the model: {_one_line(error)}"
    bad = _unreadable_file(ckpt, metadata) if metadata is not None else None
    if bad:
        return f"checkpoint '{ckpt}' is damaged: {bad}; {_DAMAGED}"
    return f"checkpoint '{ckpt}' cannot be loaded ({_one_line(error)}); {_DAMAGED}"


def _unreadable_file(ckpt: str, metadata) -> Optional[str]:
    """Where the first stored tensor whose bytes do not deserialize is, or that common.pt does
    not (None if all do). Only run after a failed load: a healthy load reads the data once."""
    per_file: Dict[str, List] = {}
    for index, item in metadata.storage_data.items():
        if isinstance(metadata.state_dict_metadata.get(index.fqn), TensorStorageMetadata):
            per_file.setdefault(item.relative_path, []).append((item, index.fqn))
    for name, items in sorted(per_file.items()):
        file = os.path.join(ckpt, name)
        with open(file, "rb") as f:
            for item, fqn in sorted(items, key=lambda x: x[0].offset):
                f.seek(item.offset)
                try:
                    torch.load(io.BytesIO(f.read(item.length)), map_location="cpu",
                               weights_only=True)
                except Exception as e:  # noqa: BLE001 - reported with its location
                    return (f"data file {file} holds unreadable bytes at offset {item.offset} "
                            f"(tensor '{fqn}' does not deserialize: {type(e).__name__})")
    common = os.path.join(ckpt, "common.pt")
    try:
        torch.load(common, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - reported with its location
        return f"{common} cannot be read ({type(e).__name__})"
    return None


def is_training_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(resolve(path), TRAIN_STATE_FILE))


def read_train_state(path: str) -> Dict:
    """The trainer's position stored with a training checkpoint."""
    folder = resolve(path)
    verify(folder, [TRAIN_STATE_FILE], collective=False)
    with open(os.path.join(folder, TRAIN_STATE_FILE)) as f:
        return json.load(f)


def read_rank_state(path: str, rank: Optional[int] = None):
    """This rank's saved per-rank state, or None when the checkpoint has none for it (e.g.
    it was written by a different number of ranks)."""
    rank = ranks.world()[0] if rank is None else rank
    folder = resolve(path)
    name = os.path.join(RANK_STATE_DIR, f"rank_{rank:05d}.pt")
    if not os.path.isfile(os.path.join(folder, name)):
        return None
    verify(folder, [name], collective=False)
    return torch.load(os.path.join(folder, name), weights_only=False)


def saved_world_size(path: str) -> int:
    d = os.path.join(resolve(path), RANK_STATE_DIR)
    return len(os.listdir(d)) if os.path.isdir(d) else 0


def gather_full_state_dict(chunks: List) -> Dict[str, torch.Tensor]:
    """Plain (unwrapped) state dict of a single-rank model: names without wrappers, no extra
    state. For TP=PP=1 layouts only (tests, conversions)."""
    out = {}
    for c in chunks:
        for k, v in unwrap(c).state_dict().items():
            if not k.endswith("_extra_state"):
                out[k] = v
    return out
