"""Checking a torch_dist checkpoint before and while it is read, with messages that name
the checkpoint, the file and the problem: the index and the data files it names (present,
long enough), the model's tensors against the stored names and shapes (another
architecture), the checksums recorded at save (checksums.py), and, after a failed read,
which file holds the bytes that do not deserialize.
"""

import io
import os
import pickle
import re
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.core import CheckpointingException
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import (ShardedObject, ShardedTensor,
                                                      ShardedTensorFactory)
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from xft_megatron.checkpoint import checksums
from xft_megatron.checkpoint.directory import CONFIG_FILE
from xft_megatron.errors import UserError


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be loaded as given (damaged, incomplete, or of another
    architecture); the message names the checkpoint, the file and the problem."""


DAMAGED = "restore the checkpoint from a copy, or use another iter_* folder"
# Megatron's non-tensor state: one stored object in the torch_dist files (megatron-core 0.19),
# or, in checkpoints of earlier releases, the file common.pt (which Megatron still reads)
COMMON_STATE_KEY = ShardedObject("common_state", None, (1,), (0,)).unique_key
LEGACY_COMMON_FILE = "common.pt"


def raise_damaged(folder: str, found: Optional[str]) -> None:
    if found:
        raise CheckpointError(f"checkpoint '{folder}' is damaged: {found}; {DAMAGED}")


def verify(folder: str, names: Optional[Sequence[str]] = None, collective: bool = True) -> None:
    """CheckpointError naming the file when a file of `folder` (or only `names`) differs from
    the checksum recorded at save (collective: every rank raises). See checksums.py."""
    raise_damaged(folder, checksums.problem(folder, names, collective=collective))


def one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:limit]}"


def read_index(ckpt: str):
    """(torch_dist metadata, None), or (None, what is wrong) when the index file is absent or
    unreadable, or a data file it names is missing or shorter than the index says."""
    if not os.path.isfile(os.path.join(ckpt, "metadata.json")):
        return None, (f"checkpoint '{ckpt}' is incomplete: {os.path.join(ckpt, 'metadata.json')} "
                      f"is missing, so this is not a torch_dist checkpoint; {DAMAGED}")
    index, common = os.path.join(ckpt, ".metadata"), os.path.join(ckpt, LEGACY_COMMON_FILE)
    if not os.path.isfile(index):
        return None, (f"checkpoint '{ckpt}' is incomplete: its tensor index {index} is "
                      f"missing; {DAMAGED}")
    try:
        metadata = FileSystemReader(ckpt).read_metadata()
        sizes = {}
        for item in metadata.storage_data.values():
            end = item.offset + item.length
            sizes[item.relative_path] = max(sizes.get(item.relative_path, 0), end)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged index
        return None, (f"checkpoint '{ckpt}' is damaged: its tensor index {index} cannot be "
                      f"read ({one_line(e, 120)}); {DAMAGED}")
    if COMMON_STATE_KEY not in metadata.state_dict_metadata and not os.path.isfile(common):
        return None, (f"checkpoint '{ckpt}' is incomplete: its non-tensor state (the object "
                      f"'{COMMON_STATE_KEY}' in its tensor index {index}) is missing; "
                      f"{DAMAGED}")
    for name, need in sorted(sizes.items()):
        file = os.path.join(ckpt, name)
        if not os.path.isfile(file):
            return None, (f"checkpoint '{ckpt}' is incomplete: data file {file} is missing "
                          f"(its index {index} names it); {DAMAGED}")
        have = os.path.getsize(file)
        if have < need:
            return None, (f"checkpoint '{ckpt}' is damaged: data file {file} is truncated "
                          f"({have} bytes, its index {index} needs {need}); {DAMAGED}")
    return metadata, None


def check_model_tensors(ckpt: str, request: Dict, metadata, problem: Optional[str]) -> None:
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


def unsafe_pickle(ckpt: str, what: str, error: BaseException) -> str:
    """The message for stored bytes that `torch.load(weights_only=True)` refuses: a pickled
    object other than tensors and plain values, which would run code when read."""
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    found = f" (it names {found.group(1)})" if found else ""
    return (f"checkpoint '{ckpt}' is refused: {what} holds a pickled object other than "
            f"tensors and plain values{found}; reading it could run code, so it was not "
            "read. xft-megatron never writes such objects: the checkpoint was altered. "
            "Restore it from a copy you trust, or use another iter_* folder")


def load_failure(ckpt: str, metadata, error: BaseException) -> str:
    """A message for a failed dist_checkpointing.load: a stored object that is not plain
    data, the file holding an unreadable tensor when one is found, else the underlying
    error."""
    if isinstance(error, CheckpointException) and error.failures:
        error = next(iter(error.failures.values()))[0]
    if isinstance(error, pickle.UnpicklingError):
        return unsafe_pickle(ckpt, getattr(error, "where", "a stored object"), error)
    if isinstance(error, CheckpointingException) and "mismatch" in str(error):
        return f"checkpoint '{ckpt}' does not fit the model: {one_line(error)}"
    bad = unreadable_file(ckpt, metadata) if metadata is not None else None
    if bad:
        return f"checkpoint '{ckpt}' is damaged: {bad}; {DAMAGED}"
    return f"checkpoint '{ckpt}' cannot be loaded ({one_line(error)}); {DAMAGED}"


def unreadable_file(ckpt: str, metadata) -> Optional[str]:
    """Where the first stored tensor (or the non-tensor state) whose bytes do not deserialize
    is (None if all do). Only run after a failed load: a healthy load reads the data once."""
    per_file: Dict[str, List] = {}
    for index, item in metadata.storage_data.items():
        if isinstance(metadata.state_dict_metadata.get(index.fqn), TensorStorageMetadata) or \
                index.fqn == COMMON_STATE_KEY:
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
                    what = "object" if fqn == COMMON_STATE_KEY else "tensor"
                    return (f"data file {file} holds unreadable bytes at offset {item.offset} "
                            f"({what} '{fqn}' does not deserialize: {type(e).__name__})")
    common = os.path.join(ckpt, LEGACY_COMMON_FILE)
    if not os.path.isfile(common):
        return None
    try:
        torch.load(common, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - reported with its location
        return f"{common} cannot be read ({type(e).__name__})"
    return None
