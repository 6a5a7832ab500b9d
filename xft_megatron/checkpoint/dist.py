"""Megatron-Core distributed checkpoints (torch_dist), written atomically.

Layout of a checkpoint root:
    ROOT/iter_0000100/        a complete checkpoint (dist_checkpointing files + xft_config.yaml)
        train_state.json      (training checkpoints) step, consumed samples, data position
        rank_state/rank_N.pt  (training checkpoints) each rank's RNG states
    ROOT/latest               text: the name of the newest complete checkpoint
Training checkpoints also hold the distributed optimizer's state (in model space, so it
reshards like the weights) and the LR scheduler's state.
A save writes into ROOT/.tmp-iter_0000100-<token>/, then renames it into place and only then
replaces `latest` (write to a temporary file + os.replace). A crash at any moment leaves the
previous checkpoint and pointer untouched; leftover .tmp-* folders are ignored by readers.
Sharded tensors carry global names, so a checkpoint loads under any other valid layout.
"""

import json
import os
import shutil
import uuid
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
import yaml
from megatron.core import dist_checkpointing

from xft_megatron.config import Config

CONFIG_FILE = "xft_config.yaml"
LATEST_FILE = "latest"
TRAIN_STATE_FILE = "train_state.json"
RANK_STATE_DIR = "rank_state"


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


def _broadcast_str(value: Optional[str]) -> str:
    obj = [value]
    if dist.is_initialized():
        dist.broadcast_object_list(obj, src=0)
    return obj[0]


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


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
         train_state: Optional[Dict] = None, rank_state=None, keep: int = 0) -> str:
    """Save the model chunks of every rank as ROOT/iter_N atomically; returns its path.
    All ranks must call it. `extra_files` maps file names to source paths (e.g. tokenizer)
    copied into the checkpoint by rank 0. A training checkpoint adds the optimizer and
    scheduler, `train_state` (JSON, from rank 0) and `rank_state` (per rank, e.g. RNG).
    `keep` > 0 removes all but the newest `keep` complete checkpoints afterwards."""
    os.makedirs(root, exist_ok=True)
    name = iteration_dir_name(iteration)
    tmp = _broadcast_str(os.path.join(root, f".tmp-{name}-{uuid.uuid4().hex[:8]}")
                         if _rank() == 0 else None)
    if _rank() == 0:
        os.makedirs(tmp)
    _barrier()
    dist_checkpointing.save(
        _training_sharded_state_dict(chunks, optimizer, scheduler, is_loading=False), tmp)
    if rank_state is not None:
        os.makedirs(os.path.join(tmp, RANK_STATE_DIR), exist_ok=True)
        path = os.path.join(tmp, RANK_STATE_DIR, f"rank_{_rank():05d}.pt")
        torch.save(rank_state, path)
        _fsync_file(path)
    _barrier()
    if _rank() == 0:
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            yaml.safe_dump({"iteration": iteration, **cfg.to_dict()}, f, sort_keys=False)
        if train_state is not None:
            with open(os.path.join(tmp, TRAIN_STATE_FILE), "w") as f:
                json.dump(train_state, f, indent=1)
        for fname, src in (extra_files or {}).items():
            shutil.copy2(src, os.path.join(tmp, fname))
        for dirpath, _, files in os.walk(tmp):
            for fname in files:
                _fsync_file(os.path.join(dirpath, fname))
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
    _barrier()
    return os.path.join(root, name)


def _prune(root: str, keep: int) -> None:
    """Remove complete checkpoints older than the newest `keep` (never the `latest` one)."""
    names = sorted(n for n in os.listdir(root) if n.startswith("iter_")
                   and os.path.isfile(os.path.join(root, n, CONFIG_FILE)))
    with open(os.path.join(root, LATEST_FILE)) as f:
        latest = f.read().strip()
    for n in names[:-keep]:
        if n != latest:
            shutil.rmtree(os.path.join(root, n), ignore_errors=True)


def _fsync_file(path: str) -> None:
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


def resolve(path: str) -> str:
    """A checkpoint directory from either a root (follows `latest`) or an iter_* folder.
    Raises FileNotFoundError with a message saying what was looked for."""
    if os.path.isfile(os.path.join(path, CONFIG_FILE)):
        return path
    latest = os.path.join(path, LATEST_FILE)
    if os.path.isfile(latest):
        with open(latest) as f:
            name = f.read().strip()
        ckpt = os.path.join(path, name)
        if os.path.isfile(os.path.join(ckpt, CONFIG_FILE)):
            return ckpt
        raise FileNotFoundError(f"'{latest}' points to '{name}', which is not a complete "
                                f"checkpoint (no {CONFIG_FILE} in {ckpt})")
    raise FileNotFoundError(f"'{path}' is not a checkpoint: expected {CONFIG_FILE} in it or a "
                            f"'{LATEST_FILE}' file naming one")


def read_config(path: str) -> Dict:
    """The config stored with a checkpoint (root or iter_* folder), iteration included."""
    with open(os.path.join(resolve(path), CONFIG_FILE)) as f:
        return yaml.safe_load(f)


def load_config(path: str, **sections) -> Config:
    """The Config stored with a checkpoint, with whole sections replaced by `sections`
    (e.g. parallel={} to read it in a single process)."""
    stored = read_config(path)
    stored.pop("iteration", None)
    return Config.from_dict({**stored, **sections})


def load(chunks: List, path: str, may_lack: Sequence[str] = (), optimizer=None,
         scheduler=None) -> int:
    """Load model weights into `chunks` (any layout) from a checkpoint; returns its iteration.
    Tensors whose names end with one of `may_lack` keep their current values when the
    checkpoint has none (e.g. the merge stage's alphas, loading an MoE checkpoint); every
    other tensor must be there. With `optimizer`/`scheduler`, their states are restored too
    (a training checkpoint: resume). All ranks must call it."""
    ckpt = resolve(path)
    chunks = [unwrap(c) for c in chunks]
    request = _training_sharded_state_dict(chunks, optimizer, scheduler, is_loading=True)
    skipped = set()
    if may_lack:
        stored = set(dist_checkpointing.load_tensors_metadata(ckpt))
        for key, sub in request.items():
            if not key.startswith("model"):
                continue
            for name in [n for n, v in sub.items() if n.endswith(tuple(may_lack))
                         and getattr(v, "key", None) not in stored]:
                del sub[name]
                skipped.add(name)
    state = dist_checkpointing.load(request, ckpt)
    for i, c in enumerate(chunks):
        missing, unexpected = c.load_state_dict(
            state["model" if len(chunks) == 1 else f"model{i}"], strict=False)
        missing = [k for k in missing if k not in skipped and not k.endswith("_extra_state")]
        if missing or unexpected:
            raise RuntimeError(f"checkpoint '{ckpt}' does not fit the model: missing "
                               f"{missing[:5]}, unexpected {unexpected[:5]}")
    if optimizer is not None:
        with torch.no_grad():  # main parameters may be views of the model's parameters
            optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    return int(read_config(ckpt).get("iteration", 0))


def is_training_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(resolve(path), TRAIN_STATE_FILE))


def read_train_state(path: str) -> Dict:
    """The trainer's position stored with a training checkpoint."""
    with open(os.path.join(resolve(path), TRAIN_STATE_FILE)) as f:
        return json.load(f)


def read_rank_state(path: str, rank: Optional[int] = None):
    """This rank's saved per-rank state, or None when the checkpoint has none for it (e.g.
    it was written by a different number of ranks)."""
    f = os.path.join(resolve(path), RANK_STATE_DIR, f"rank_{_rank() if rank is None else rank:05d}.pt")
    return torch.load(f, weights_only=False) if os.path.isfile(f) else None


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
