"""Streaming torch_dist checkpoints: read and write model tensors a few at a time.

The conversion tools (`xft convert`, `xft upcycle`, `xft merge`) never build the model with
storage. `layout_of(cfg)` builds it on the meta device for one rank (TP=PP=EP=1) and asks
Megatron for its sharded state dict: which torch_dist key, global shape and chunk holds each
parameter. `write` then produces the parameters one group (a decoder layer) at a time through
`torch.distributed.checkpoint` with a planner that resolves each chunk on demand, one file per
chunk, so nothing but the current group is held; the files are those a single-rank Megatron
save writes, so they load under any layout. Under torchrun the groups are spread over the
ranks, each writing its own files. `Reader` fetches named parameters from any torch_dist
checkpoint (written by Megatron under any layout, or by `write`) chunk by chunk, while its
files are checked against their recorded checksums; a tool calls `Reader.verified()` before
it commits an output made from them.
"""

import contextlib
import dataclasses
import io
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, Hashable, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed.checkpoint as dcp
from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
from megatron.core.dist_checkpointing.mapping import (ShardedObject, ShardedTensor,
                                                      ShardedTensorFactory)
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import create_default_global_save_plan
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, MetadataIndex,
                                                   TensorProperties, TensorStorageMetadata)
from torch.distributed.checkpoint.planner import (LoadPlan, LoadPlanner, SavePlan, SavePlanner,
                                                  TensorWriteData, WriteItem, WriteItemType)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from xft_megatron.arch.names import layer_of
from xft_megatron.checkpoint import checksums, ranks
from xft_megatron.checkpoint.directory import resolve
from xft_megatron.checkpoint.validate import (COMMON_STATE_KEY, CheckpointError, load_failure,
                                              raise_damaged, read_index)
from xft_megatron.config import Config, ParallelConfig

Tensor = torch.Tensor


@dataclasses.dataclass(frozen=True)
class Part:
    """One stored chunk of a parameter: torch_dist `key` (global shape `global_shape`) at
    `offset` with `size`, holding the view (shape, stride, start) of the contiguous parameter."""
    key: str
    global_shape: Tuple[int, ...]
    offset: Tuple[int, ...]
    size: Tuple[int, ...]
    shape: Tuple[int, ...]
    stride: Tuple[int, ...]
    start: int

    def of(self, value: Tensor) -> Tensor:
        """This chunk of the parameter `value`, shaped as stored."""
        return value.as_strided(self.shape, self.stride, self.start).reshape(self.size)


@dataclasses.dataclass(frozen=True)
class Param:
    shape: Tuple[int, ...]
    dtype: torch.dtype
    parts: Tuple[Part, ...]


@dataclasses.dataclass
class Layout:
    """How a model of one config is stored: parameters (single-rank names, in model order) and
    the non-tensor objects Megatron saves beside them (unique key -> value)."""
    params: Dict[str, Param]
    objects: Dict[str, object]

    def groups(self) -> Dict[Hashable, List[str]]:
        """Parameter names by group, in model order: a decoder layer's index, or the name
        itself for the embedding, final norm and output layer."""
        out: Dict[Hashable, List[str]] = {}
        for name in self.params:
            out.setdefault(group_of(name), []).append(name)
        return out


def group_of(name: str) -> Hashable:
    layer = layer_of(name)
    return name if layer is None else layer


def layout_of(cfg: Config) -> Layout:
    """The storage layout of `cfg`'s model (any parallel section: the one-rank model is used).
    Needs Megatron's parallel state with TP=PP=EP=1 (see `initialize_single_rank_layout`)."""
    from xft_megatron.model.builder import build_model

    # one rank, and the shared expert in the routed pool: every layout stores the same tensors
    one_rank = cfg.replace(parallel=ParallelConfig(),
                           moe=dataclasses.replace(cfg.moe, shared_expert_impl="pool"))
    (model,) = build_model(one_rank, meta=True)
    params: Dict[str, Param] = {}
    objects: Dict[str, object] = {}
    own = dict(model.named_parameters())
    own.update(dict(model.named_buffers()))
    for name, entry in model.sharded_state_dict().items():
        if isinstance(entry, ShardedObject):
            objects[entry.unique_key] = entry.data
            continue
        if isinstance(entry, ShardedTensorFactory):
            built = entry.build()
            tensors = list(built.values()) if isinstance(built, dict) else \
                list(built) if isinstance(built, (list, tuple)) else [built]
        elif isinstance(entry, ShardedTensor):
            tensors = [entry]
        else:
            raise TypeError(f"unexpected entry {name} ({type(entry).__name__}) in the sharded "
                            "state dict")
        value = own[name]
        params[name] = Param(tuple(value.shape), value.dtype,
                             tuple(_part(t, value) for t in tensors))
    # Megatron's non-tensor state, stored as one more object: empty for a model's own entries
    objects[COMMON_STATE_KEY] = {}
    return Layout(params, objects)


def _part(t: ShardedTensor, param: Tensor) -> Part:
    if t.flattened_range is not None:
        raise ValueError(f"{t.key}: flattened sharded tensors are not supported")
    pre = (1,) * t.prepend_axis_num
    start = t.data.storage_offset() - param.storage_offset()
    return Part(t.key, tuple(t.global_shape), tuple(t.global_offset), pre + tuple(t.local_shape),
                tuple(t.data.shape), tuple(t.data.stride()), start)


def initialize_single_rank_layout() -> None:
    """Process group (torchrun's, or one process) + Megatron state with TP=PP=EP=1: every rank
    holds the whole (meta) model, which is what `layout_of` needs."""
    from xft_megatron.runtime import parallel

    parallel.initialize(ParallelConfig())


def assign(groups: Sequence[Hashable], size: Callable[[Hashable], int], ranks: int
           ) -> Dict[Hashable, int]:
    """group -> rank: greedy by bytes (largest first to the least loaded rank), so every
    rank writes a similar share; deterministic."""
    load = [0] * ranks
    owner = {}
    for g in sorted(groups, key=lambda g: (-size(g), str(g))):
        r = min(range(ranks), key=lambda i: (load[i], i))
        owner[g] = r
        load[r] += size(g)
    return owner


class GroupCache:
    """produce(name) for `write`: builds a whole group (`build(group) -> {name: tensor}`) when
    one of its names is first asked for and keeps only the latest group.

    With `prefetch`, once the writer has said in which order it will ask (`plan`), the next
    group is built on a background thread while the current one is written, so reading the
    source overlaps writing the output (two groups in memory). `build` then runs on that
    thread, one call at a time; use it only when `build` needs no collectives."""

    def __init__(self, build: Callable[[Hashable], Dict[str, Tensor]], prefetch: bool = False):
        self.build = build
        self.group, self.values = None, {}
        self.after: Dict[Hashable, Hashable] = {}  # group -> the one asked for next
        self.pending = None  # (group, future) being built ahead
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch") if prefetch else None

    def plan(self, order: Sequence[Hashable]) -> None:
        """The groups in the order `__call__` will ask for them."""
        self.after = dict(zip(order, list(order)[1:]))

    def __call__(self, name: str) -> Tensor:
        g = group_of(name)
        if g != self.group:
            self.values = {}  # drop the previous group before building the next
            self.values = self._take(g)
            self.group = g
            self._ahead(g)
        return self.values[name]

    def _take(self, g: Hashable) -> Dict[str, Tensor]:
        pending, self.pending = self.pending, None
        if pending is not None:
            group, future = pending
            values = future.result()  # also waits before building another group here
            if group == g:
                return values
        return self.build(g)

    def _ahead(self, g: Hashable) -> None:
        if self.pool is not None and g in self.after:
            self.pending = (self.after[g], self.pool.submit(self.build, self.after[g]))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def write(folder: str, layout: Layout, produce: Callable[[str], Tensor]) -> None:
    """Write the torch_dist files of `layout` into `folder` (collective under torchrun: the
    groups are spread over the ranks). `produce(name)` returns the full parameter; it is
    called group after group, each name once per rank that owns it, and cast to the layout's
    dtype (a value of another shape is an error)."""
    rank, size = ranks.world()
    groups = layout.groups()
    owner = assign(list(groups), lambda g: sum(_nbytes(layout.params[n]) for n in groups[g]),
                   size)
    mine = [n for g, names in groups.items() if owner[g] == rank for n in names]
    if hasattr(produce, "plan"):
        produce.plan([g for g in groups if owner[g] == rank])
    planner = _WritePlanner(layout, mine, produce, objects=rank == 0)
    # files are flushed once all are written, by the save (dist.save_streamed: each rank its
    # own, while it hashes them); one fsync per file as it closes would make the disk flush
    # ~10 files per layer one by one
    writer = FileSystemWriter(folder, single_file_per_rank=False, sync_files=False,
                              thread_count=1, per_thread_copy_ahead=0)
    with _without_zip_checksums():
        dcp.save({}, storage_writer=writer, planner=planner, no_dist=size == 1)

    if rank == 0:
        save_config(CheckpointingConfig("torch_dist", 1), folder)


@contextlib.contextmanager
def _without_zip_checksums():
    """torch.save computes a CRC-32 of every record it writes, about half the cost of saving
    a large tensor; torch.load does not check it. Off while streaming, restored after."""
    get = getattr(torch.serialization, "get_crc32_options", None)
    if get is None:
        yield
        return
    before = get()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(before)


def _nbytes(p: Param) -> int:
    return torch.Size(p.shape).numel() * p.dtype.itemsize


class _WritePlanner(SavePlanner):
    """Plans the chunks of the given parameters (and the objects) and resolves each chunk
    from `produce` only when the storage writer asks for it."""

    def __init__(self, layout: Layout, names: Iterable[str], produce, objects: bool):
        self.layout, self.produce = layout, produce
        self.current: Tuple[Optional[str], Optional[Tensor]] = (None, None)  # cast value
        self.items: List[WriteItem] = []
        self.by_index: Dict[Tuple[str, Tuple[int, ...]], Tuple[str, Part]] = {}
        for name in names:
            p = layout.params[name]
            for part in p.parts:
                index = MetadataIndex(part.key, torch.Size(part.offset))
                self.by_index[(part.key, tuple(part.offset))] = (name, part)
                self.items.append(WriteItem(index=index, type=WriteItemType.SHARD,
                                            tensor_data=TensorWriteData(
                                                chunk=ChunkStorageMetadata(
                                                    torch.Size(part.offset),
                                                    torch.Size(part.size)),
                                                properties=TensorProperties(dtype=p.dtype),
                                                size=torch.Size(part.global_shape))))
        if objects:
            for key in layout.objects:
                self.items.append(WriteItem(index=MetadataIndex(key),
                                            type=WriteItemType.BYTE_IO))

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=False) -> None:
        self.is_coordinator = is_coordinator

    def create_local_plan(self) -> SavePlan:
        return SavePlan(self.items)

    def create_global_plan(self, all_plans):
        return create_default_global_save_plan(all_plans)

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        return new_plan

    def resolve_data(self, write_item: WriteItem):
        if write_item.type == WriteItemType.BYTE_IO:
            buf = io.BytesIO()
            torch.save([self.layout.objects[write_item.index.fqn]], buf)  # as Megatron does
            buf.seek(0)
            return buf
        name, part = self.by_index[(write_item.index.fqn, tuple(write_item.index.offset))]
        if self.current[0] != name:  # a parameter's chunks come one after another
            want = self.layout.params[name]
            value = self.produce(name)
            if tuple(value.shape) != want.shape:
                raise ValueError(f"{name}: produced shape {tuple(value.shape)}, the model's is "
                                 f"{want.shape}")
            self.current = (None, None)  # drop the previous value first
            self.current = (name, value.detach().to("cpu", want.dtype).contiguous())
        return part.of(self.current[1])


class Reader:
    """Reads full parameters of `layout` from a torch_dist checkpoint (root or iter_* folder;
    any layout it was saved in: stored chunks are cut and pasted as needed). Validates the
    index and the tensor names and shapes once, up front."""

    def __init__(self, path: str, layout: Layout):
        folder = resolve(path)
        # every file against the checksums recorded at save, on background threads while
        # the tool reads; `verified()` (before the tool commits its output) waits for it
        self.pending = checksums.start(folder)
        metadata, problem = read_index(folder)
        if problem:
            self._raise_if_damaged(collective=False)
            raise CheckpointError(problem)
        self.folder, self.layout, self.metadata = folder, layout, metadata
        stored = metadata.state_dict_metadata
        bad = []
        for name, p in layout.params.items():
            for part in p.parts:
                entry = stored.get(part.key)
                if not isinstance(entry, TensorStorageMetadata):
                    bad.append(f"{part.key} is missing")
                elif tuple(entry.size) != part.global_shape:
                    bad.append(f"{part.key} has shape {tuple(entry.size)}, the model needs "
                               f"{part.global_shape}")
        if bad:
            raise CheckpointError(
                f"checkpoint '{folder}' does not hold the model its config describes: "
                f"{'; '.join(sorted(set(bad))[:4])}; the tensors and xft_config.yaml belong "
                "to different models")

    def _raise_if_damaged(self, collective: bool = True) -> None:
        raise_damaged(self.folder if hasattr(self, "folder") else self.pending.folder,
                       self.pending.result(collective=collective))

    def verified(self) -> None:
        """Wait for the checksum verification: CheckpointError (on every rank) naming the
        damaged file. Call on all ranks before committing anything made from the values."""
        self._raise_if_damaged()

    def stored_dtype(self, name: str) -> torch.dtype:
        key = self.layout.params[name].parts[0].key
        return self.metadata.state_dict_metadata[key].properties.dtype

    def read(self, names: Sequence[str]) -> Dict[str, Tensor]:
        """{name: full parameter} in the stored dtype, for the given parameter names. Treat
        the values as read-only (some map the checkpoint's files)."""
        try:
            out = {n: self._mapped(n) for n in names}
            rest = [n for n in names if out[n] is None]
            out.update({n: torch.empty(self.layout.params[n].shape, dtype=self.stored_dtype(n))
                        for n in rest})
            if rest:
                self._read_chunks(rest, out)
        except Exception as e:  # noqa: BLE001 - damaged data: say which file holds it
            self._raise_if_damaged(collective=False)
            raise CheckpointError(load_failure(self.folder, self.metadata, e)) from None
        return out

    def _mapped(self, name: str) -> Optional[Tensor]:
        """The parameter memory-mapped from its file (no copy) when one stored chunk, alone
        in its file, is exactly the whole parameter (as `write` stores them); else None."""
        p = self.layout.params[name]
        part = p.parts[0]
        whole = len(p.parts) == 1 and part.start == 0 and part.shape == p.shape and \
            torch.empty(p.shape, device="meta").stride() == part.stride
        info = self.metadata.storage_data.get(MetadataIndex(part.key, torch.Size(part.offset)))
        chunks = self.metadata.state_dict_metadata[part.key].chunks
        if not whole or info is None or info.offset != 0 or \
                getattr(info, "transform_descriptors", None) or \
                not any(tuple(c.offsets) == part.offset and tuple(c.sizes) == part.size
                        for c in chunks):
            return None
        path = os.path.join(self.folder, info.relative_path)
        if os.path.getsize(path) != info.length:
            return None
        value = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        return value.reshape(p.shape)

    def _read_chunks(self, names: Sequence[str], out: Dict[str, Tensor]) -> None:
        """Fill `out[name]` from the stored chunks overlapping each part (any chunking)."""
        targets, items = {}, []
        for n in names:
            for part in self.layout.params[n].parts:
                targets[(part.key, tuple(part.offset))] = part.of(out[n])
                chunk = ChunkStorageMetadata(torch.Size(part.offset), torch.Size(part.size))
                items += create_read_items_for_chunk_list(
                    part.key, self.metadata.state_dict_metadata[part.key], [chunk])
        reader = FileSystemReader(self.folder)
        reader.set_up_storage_reader(self.metadata, True)
        plan = reader.prepare_global_plan([reader.prepare_local_plan(LoadPlan(items))])[0]
        reader.read_data(plan, _ReadPlanner(targets)).wait()

    def read_one(self, name: str) -> Tensor:
        return self.read([name])[name]


class _ReadPlanner(LoadPlanner):
    """Hands the storage reader the destination view of each requested chunk."""

    def __init__(self, targets: Dict[Tuple[str, Tuple[int, ...]], Tensor]):
        self.targets = targets

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        pass

    def create_local_plan(self) -> LoadPlan:
        raise NotImplementedError

    def create_global_plan(self, global_plan):
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item, value) -> None:
        raise NotImplementedError("objects are not read by the streaming reader")

    def resolve_tensor(self, read_item) -> Tensor:
        dest = self.targets[(read_item.dest_index.fqn, tuple(read_item.dest_index.offset))]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            dest = dest.narrow(dim, start, length)
        return dest

    def commit_tensor(self, read_item, tensor: Tensor) -> None:
        pass  # written in place
