"""Megatron-Core distributed checkpoints (torch_dist): what a checkpoint holds, saved and
loaded under any layout.

    ROOT/iter_0000100/        a complete checkpoint (directory.py: the protocol around it)
        torch_dist files      the model's sharded tensors (global names: any layout loads them)
        xft_config.yaml       the Config it was saved with, and the iteration
        train_state.json      (training checkpoints) step, consumed samples, skipped steps
        rank_state/rank_N.pt  (training checkpoints) each rank's RNG states
        checksums.json        CRC-32 of every other file, verified by every load (checksums.py)
Training checkpoints also hold the distributed optimizer's state (in model space, so it
reshards over data parallel like the weights) and the LR scheduler's state.
A save (under the directory lock) writes everything into a temporary folder, flushes it and
records the checksums, then `directory.commit` renames it into place and replaces `latest`.
A load checks the files against the index, the model's tensors against the stored ones, and
the checksums while it reads (validate.py): a damaged checkpoint is refused by name.
"""

import functools
import json
import os
import shutil
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import yaml
from megatron.core import dist_checkpointing
from torch.distributed.checkpoint.api import CheckpointException

from xft_megatron.checkpoint import checksums, directory, lock, ranks, space, writers
from xft_megatron.checkpoint.directory import (CONFIG_FILE, LATEST_FILE, RANK_STATE_DIR,
                                               TRAIN_STATE_FILE, resolve)
from xft_megatron.checkpoint.validate import (CheckpointError, check_model_tensors,
                                              load_failure, one_line, raise_damaged,
                                              read_index, unsafe_pickle, verify)
from xft_megatron.config import Config, ConfigError, inheritable, load_yaml
from xft_megatron.errors import UserError
from xft_megatron.runtime.compat.patches import plain_data_loads


class CheckpointWriteError(UserError, OSError):
    """A checkpoint could not be written (disk full, file-size limit, ...); nothing of the
    previous checkpoints was touched."""


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
        # the optimizer's state of a parameter is stored like the parameter, or as the
        # entry's `optimizer_entry` where it names one (model/moe/experts: a layer whose
        # shared expert is a module of its own)
        model_state = {}
        for sub in state.values():
            model_state.update({k: getattr(v, "optimizer_entry", v) for k, v in sub.items()})
        # each rank writes its own shard of the optimizer state, in parallel: resharding is
        # possible over data parallel only, so a resume under another TP/PP/EP layout
        # restarts the optimizer state (see training/loop.py)
        state["optimizer"] = optimizer.sharded_state_dict(
            model_state, is_loading=is_loading,
            metadata={"distrib_optim_sharding_type": "dp_reshardable"})
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    return state


@dataclass
class TrainingState:
    """What a training checkpoint holds besides the weights."""

    optimizer: Any = None  # Megatron's distributed optimizer: its state, sharded per rank
    scheduler: Any = None  # the LR scheduler
    train_state: Optional[Dict] = None  # TRAIN_STATE_FILE: JSON, from rank 0
    rank_state: Any = None  # RANK_STATE_DIR/rank_N.pt: per rank (RNG streams)


def save(chunks: List, root: str, iteration: int, cfg: Config,
         extra_files: Optional[Dict[str, str]] = None,
         training: Optional[TrainingState] = None, keep: int = 0) -> str:
    """Save the model chunks of every rank (and `training`'s state) as ROOT/iter_N
    atomically; returns its path. All ranks must call it. `extra_files` maps file names to
    source paths (e.g. tokenizer) copied into the checkpoint by rank 0. `keep` > 0 removes
    all but the newest `keep` complete checkpoints afterwards."""
    t = training or TrainingState()
    write = functools.partial(_save_chunks, chunks, t.optimizer, t.scheduler)
    return _save(write, root, iteration, cfg, extra_files, t.train_state, t.rank_state, keep)


def save_streamed(write_tensors: Callable[[str], None], root: str, iteration: int,
                  cfg: Config, extra_files: Optional[Dict[str, str]] = None) -> str:
    """`save` for the streaming tools (convert, upcycle, merge): `write_tensors(folder)`
    writes the torch_dist files (stream.write) in place of a model's own save."""
    return _save(write_tensors, root, iteration, cfg, extra_files, None, None, 0)


def _save(write_tensors, root, iteration, cfg, extra_files, train_state, rank_state,
          keep) -> str:
    with lock.hold(root):  # re-entrant: a run holds it already for its whole life
        name = directory.iteration_dir_name(iteration)
        rank = ranks.world()[0]
        tmp = ranks.broadcast(os.path.join(root, directory.tmp_name(name)) if rank == 0
                              else None)
        if rank == 0:
            directory.remove_stale(root)
            os.makedirs(tmp)
        ranks.barrier()
        try:
            with writers.guarded():  # no helper process of Megatron's writer
                _write(write_tensors, tmp, iteration, cfg, extra_files, train_state,
                       rank_state)
                if rank == 0:
                    directory.commit(tmp, root, name, keep)
                ranks.barrier()
        except BaseException as e:  # a failed write (disk full, Ctrl-C): no partial folder
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, (KeyboardInterrupt, SystemExit, CheckpointError)):
                raise  # CheckpointError: the source of a streaming tool is damaged
            stop = _interruption(e)  # Ctrl-C inside torch's writer comes wrapped in its error
            if stop is not None:
                raise type(stop)() from e
            # OSError from our writes; torch's CheckpointException (a BaseException) wrapping
            # a failed write in the dist_checkpointing writer: its last line names the cause
            cause = (str(e).strip().splitlines() or [type(e).__name__])[-1]
            unchanged = (f"Nothing was replaced: the previous checkpoint and "
                         f"'{os.path.join(root, LATEST_FILE)}' are unchanged")
            if _not_the_disk(e):
                raise CheckpointWriteError(  # not the disk: don't send the user to look at it
                    f"could not write checkpoint {name} in '{root}': the writer failed with "
                    f"{type(e).__name__} ({cause}), not a file-system error. {unchanged}"
                ) from e
            raise CheckpointWriteError(
                f"could not write checkpoint {name} in '{root}' ({cause}; its disk has "
                f"{space.human(space.free_bytes(root))} free: is it full, or a file-size "
                f"limit set?). {unchanged}") from e
        return os.path.join(root, name)


def _causes(e: BaseException):
    """`e` and every exception it wraps: its cause/context chain and, for torch's
    CheckpointException, the per-rank failures it collected."""
    seen, todo = set(), [e]
    while todo:
        x = todo.pop()
        if not isinstance(x, BaseException) or id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        todo += [x.__cause__, x.__context__]
        failures = getattr(x, "failures", None)  # {rank: (exception, stack summary)}
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) and f else f for f in failures.values()]


def _interruption(e: BaseException) -> Optional[KeyboardInterrupt]:
    return next((x for x in _causes(e) if isinstance(x, KeyboardInterrupt)), None)


_STATE_ERRORS = (AssertionError, TypeError, AttributeError, KeyError, NameError)


def _not_the_disk(e: BaseException) -> bool:
    """A failed save whose cause is a program or state error (e.g. an optimizer assertion),
    with no OSError anywhere in it: reported as such, not as a full disk. Everything else
    (OSError, torch's zip writer failing on a short write with a RuntimeError, ...) may be
    the disk."""
    causes = list(_causes(e))
    return not any(isinstance(x, OSError) for x in causes) and \
        any(isinstance(x, _STATE_ERRORS) for x in causes)


def _save_chunks(chunks, optimizer, scheduler, folder: str) -> None:
    dist_checkpointing.save(
        _training_sharded_state_dict(chunks, optimizer, scheduler, is_loading=False), folder)


def _write(write_tensors, tmp, iteration, cfg, extra_files, train_state, rank_state) -> None:
    """Everything of a checkpoint into `tmp`, flushed, with its checksum manifest."""
    write_tensors(tmp)
    if rank_state is not None:
        os.makedirs(os.path.join(tmp, RANK_STATE_DIR), exist_ok=True)
        path = os.path.join(tmp, RANK_STATE_DIR, f"rank_{ranks.world()[0]:05d}.pt")
        torch.save(rank_state, path)
    ranks.barrier()
    # each rank hashes and flushes the files it wrote, the two overlapping
    hashed = ranks.all_gather(checksums.hash_own_files(tmp, sync=directory.fsync_file))
    if ranks.world()[0] != 0:
        return
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
                directory.fsync_file(path)
        directory.fsync_dir(dirpath)


def read_config(path: str) -> Dict:
    """The config stored with a checkpoint (root or iter_* folder), iteration included."""
    folder = resolve(path)
    file = os.path.join(folder, CONFIG_FILE)
    verify(folder, [CONFIG_FILE], collective=False)
    try:
        with open(file, encoding="utf-8") as f:
            stored = load_yaml(f.read(), file)
    except (ConfigError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid YAML ({one_line(e)}); the checkpoint's "
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
    stored = inheritable(read_config(path))
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
        raise_damaged(ckpt, pending.result(collective=False))  # the damaged file, named
        raise
    raise_damaged(ckpt, pending.result())
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


def _load_state(chunks, ckpt, may_lack, optimizer, scheduler):
    """(the state read by dist_checkpointing, the unwrapped chunks, the names skipped as
    `may_lack`, the iteration), after the checks against the index."""
    iteration = read_config(ckpt).get("iteration", 0)
    chunks = [unwrap(c) for c in chunks]
    request = _training_sharded_state_dict(chunks, optimizer, scheduler, is_loading=True)
    metadata, problem = read_index(ckpt)
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
    check_model_tensors(ckpt, request, metadata, problem)
    try:
        with plain_data_loads():  # stored objects are read as data, never as code
            state = dist_checkpointing.load(request, ckpt)
    except (CheckpointException, Exception) as e:  # torch's is a BaseException
        raise CheckpointError(load_failure(ckpt, metadata, e)) from e
    return state, chunks, skipped, iteration


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
    return read_plain_data(os.path.join(folder, name), folder)


def read_plain_data(path: str, ckpt: str):
    """A file written with `torch.save` read back without running code: tensors and plain
    values only (`weights_only=True`; NumPy arrays too, as checkpoints written before RNG
    states were stored as tensors hold them). Anything else is refused, CheckpointError."""
    import pickle

    import numpy as np

    legacy = [np.ndarray, np.dtype, type(np.dtype(np.uint32)),
              getattr(np, "_core", getattr(np, "core", None)).multiarray._reconstruct]
    try:
        with torch.serialization.safe_globals(legacy):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(unsafe_pickle(ckpt, path, e)) from None


def saved_world_size(path: str) -> int:
    d = os.path.join(resolve(path), RANK_STATE_DIR)
    return len(os.listdir(d)) if os.path.isdir(d) else 0


def local_state_dict(chunks: List) -> Dict[str, torch.Tensor]:
    """This rank's tensors as a plain state dict: names without wrappers, no extra state. The
    whole model only in a single-rank layout (tests); nothing is gathered."""
    out = {}
    for c in chunks:
        for k, v in unwrap(c).state_dict().items():
            if not k.endswith("_extra_state"):
                out[k] = v
    return out
