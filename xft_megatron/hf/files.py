"""Hugging Face model directories: architecture from config.json, tensors from safetensors.

config.json is read by the model family its `model_type` names (`xft_megatron/arch/families/`),
as transformers 4.x writes it (`rope_scaling`, `rope_theta`) and as 5.x does
(`rope_parameters`). Anything this project does not implement exactly (sliding window
attention, rope types other than default/linear, other activations, MLP or output-projection
biases, unknown model types) is refused with a message, never approximated.
"""

import hashlib
import json
import math
import os
import shutil
import struct
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from xft_megatron.arch import families
from xft_megatron.checkpoint import checksums, directory, lock, ranks
from xft_megatron.config import ModelConfig
from xft_megatron.errors import ConfigError, HFFormatError, UserError


def read_hf_config(hf_dir: str) -> Dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise HFFormatError(f"'{hf_dir}' is not an HF model directory: {path} is missing; give "
                            "the directory holding the model's config.json and weights")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HFFormatError(f"{path} is not valid JSON: {e}; restore the model's config.json") \
            from None
    if not isinstance(cfg, dict):
        raise HFFormatError(f"{path} holds a JSON {type(cfg).__name__}, not an object; restore "
                            "the model's config.json")
    return cfg


class RemoteCodeError(UserError, ValueError):
    """An HF directory names Python code for transformers to import other than this project's
    own, unchanged modeling file; none of it is loaded."""


# keys of transformers' *config.json files (config, tokenizer, processor, preprocessor,
# generation, ...) that name Python classes or files for it to import from the model folder
_CODE_KEYS = ("auto_map", "custom_pipelines")


def _code_references(hf_dir: str) -> Dict[str, Dict[str, List[str]]]:
    """{file: {key: [what it names]}} for every top-level *config.json of `hf_dir` that names
    code to import (`_CODE_KEYS`). A file that is not a JSON object names nothing
    (transformers cannot read it either)."""
    found: Dict[str, Dict[str, List[str]]] = {}
    for name in sorted(os.listdir(hf_dir)):
        path = os.path.join(hf_dir, name)
        if not name.endswith("config.json") or not os.path.isfile(path):
            continue
        data = read_hf_config(hf_dir) if name == "config.json" else _json_object(path)
        for key in _CODE_KEYS:
            if data.get(key):
                found.setdefault(name, {})[key] = _names(data[key])
    return found


def _json_object(path: str) -> Dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError, OSError):
        return {}
    return data if isinstance(data, dict) else {}


def _names(value) -> List[str]:
    """Every string inside an auto_map-like value (strings, lists, nested mappings)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _names(v)]
    if isinstance(value, (list, tuple)):
        return [n for v in value for n in _names(v)]
    return [] if value is None else [repr(value)]


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def remote_code_trusted(hf_dir: str) -> bool:
    """Whether `hf_dir` is to be loaded with `trust_remote_code=True`: True only for an XFT
    MoE exported by this project (config.json's auto_map names this project's modeling file
    and nothing else, and the folder's copy of that file equals `hf/remote/`'s byte for
    byte); False when no file of the folder names code (a plain HF model). Any other code
    named (a tokenizer, processor or generation config's auto_map, another module, an edited
    or missing modeling file) raises RemoteCodeError: nothing else is ever imported.
    Tokenizers are loaded with `trust_remote_code=False` regardless (`load_hf_tokenizer`)."""
    from xft_megatron.hf.remote import MODELING_FILE

    refs = _code_references(hf_dir)
    if not refs:
        return False
    own_name = os.path.basename(MODELING_FILE)
    own = os.path.splitext(own_name)[0]
    for name, keys in refs.items():
        for key, targets in keys.items():
            foreign = [t for t in targets if name != "config.json" or key != "auto_map"
                       or t.rsplit(".", 1)[0] != own]
            if foreign:
                raise RemoteCodeError(
                    f"{os.path.join(hf_dir, name)} names Python code for transformers to run "
                    f"('{key}': {', '.join(foreign[:3])}); this project runs no code from a "
                    f"model folder except its own XFT MoE modeling file ({own_name}), so the "
                    f"folder is not loaded. Remove the '{key}' entry from that file if the "
                    "standard transformers classes fit the model, or use a model folder "
                    "without custom code")
    path = os.path.join(hf_dir, own_name)
    export = ("export the checkpoint again (xft convert mcore-to-hf --ckpt CHECKPOINT --out "
              "DIR)")
    if not os.path.isfile(path):
        raise RemoteCodeError(f"{os.path.join(hf_dir, 'config.json')} names {own_name}, which "
                              f"is not in '{hf_dir}'; the export is incomplete: {export}")
    got, want = _sha256(path), _sha256(MODELING_FILE)
    if got != want:
        raise RemoteCodeError(
            f"{path} differs from the modeling file this version of xft-megatron writes "
            f"(sha256 {got[:12]}, expected {want[:12]}): it was edited or comes from another "
            f"version, and an unknown modeling file is never run. To use the model, {export}, "
            f"or replace the file with {MODELING_FILE}")
    return True


def own_remote_code(hf_dir: str) -> bool:
    """Whether `hf_dir` is an XFT MoE written by this project with its modeling file
    unchanged (`remote_code_trusted` without raising). False for plain HF directories."""
    try:
        return remote_code_trusted(hf_dir)
    except RemoteCodeError:
        return False


def load_hf_model(hf_dir: str, **kwargs):
    """transformers' `AutoModelForCausalLM` of a local HF directory; remote code only for
    this project's own XFT MoE export (`remote_code_trusted`), RemoteCodeError for any other
    code the folder names."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, trust_remote_code=remote_code_trusted(hf_dir), **kwargs)


def load_hf_tokenizer(hf_dir: str, **kwargs):
    """transformers' `AutoTokenizer` of a local HF directory, never with remote code (a
    folder whose tokenizer config names code is refused, RemoteCodeError)."""
    import transformers

    config = None
    if remote_code_trusted(hf_dir):  # our export: its config class is our modeling file's
        config = transformers.AutoConfig.from_pretrained(hf_dir, trust_remote_code=True)
    return transformers.AutoTokenizer.from_pretrained(
        hf_dir, trust_remote_code=False, **({"config": config} if config else {}), **kwargs)


def model_config_from_hf(hf_dir: str) -> Tuple[ModelConfig, str]:
    """(ModelConfig, HF architecture name) of an HF directory of one of the model families."""
    cfg = read_hf_config(hf_dir)
    path = os.path.join(hf_dir, "config.json")
    family = families.for_model_type(cfg.get("model_type"), path)
    fields = family.model_fields(cfg, path)
    try:
        return ModelConfig(**fields), family.hf_architecture
    except ConfigError as e:  # a value the config refuses: the file's problem
        raise HFFormatError(f"{path}: {e}") from None


_INDEXES = (("model.safetensors.index.json", "model.safetensors"),
            ("pytorch_model.bin.index.json", "pytorch_model.bin"))


def weights_index(hf_dir: str) -> Dict[str, str]:
    """tensor name -> file, from safetensors (preferred) or PyTorch .bin weights, single file
    or sharded with an index; every file the index names must exist."""
    for index_name, single_name in _INDEXES:
        index, single = os.path.join(hf_dir, index_name), os.path.join(hf_dir, single_name)
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
                if not all(isinstance(k, str) and isinstance(v, str)
                           for k, v in weight_map.items()):
                    raise TypeError("weight_map must map tensor names to file names")
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError,
                    AttributeError) as e:
                raise HFFormatError(f"{index} is not a valid weights index ({type(e).__name__}: "
                                    f"{e}); it must hold {{\"weight_map\": {{tensor name: shard "
                                    "file}}: restore it from the model's source") from None
            missing = sorted({v for v in weight_map.values()
                              if not os.path.isfile(os.path.join(hf_dir, v))})
            if missing:
                raise HFFormatError(f"{index} names shard(s) that do not exist: "
                                    f"{', '.join(missing)}; the download is incomplete "
                                    "(download them again)")
            return {k: os.path.join(hf_dir, v) for k, v in weight_map.items()}
        if os.path.isfile(single):
            return {k: single for k in _open_weights(single).keys()}
    raise HFFormatError(f"no weights in '{hf_dir}' (expected model.safetensors[.index.json] "
                        "or pytorch_model.bin[.index.json])")


def _open_weights(path: str):
    """A handle with keys(), shape(name) and get_tensor(name): safetensors read with plain
    file reads (only the tensor asked for is in memory), .bin files memory-mapped."""
    if path.endswith(".safetensors"):
        return _SafetensorsFile(path)
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same to a user
        raise HFFormatError(f"cannot read PyTorch weights {path}: {e}; the file is damaged or "
                            "incomplete (download it again)") from None
    if not isinstance(state, dict):
        raise HFFormatError(f"{path} holds a {type(state).__name__}, not a state dict of named "
                            "tensors; use the model's own weights files")
    return _BinWeights(state)


class _SafetensorsFile:
    """One safetensors file: 8-byte little-endian header length, JSON header (dtype, shape,
    data offsets per tensor), raw data. Tensors are read with `readinto` into fresh memory;
    nothing is memory-mapped, so a conversion's resident memory is what it holds."""

    DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
              "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
              "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > size - 8:
                    raise ValueError(f"header length {n} exceeds the file size {size}")
                header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            self._check_layout(header, size - 8 - n)
        except Exception as e:  # noqa: BLE001 - struct/JSON/key errors: a damaged file
            raise HFFormatError(f"cannot read safetensors file {path}: {e}; the file is "
                                "damaged or incomplete (download it again)") from None
        self.header, self.base = header, 8 + n

    @classmethod
    def _check_layout(cls, header: Dict, data_bytes: int) -> None:
        """The safetensors format's own rules: every tensor's byte range holds exactly its
        shape times its dtype's width, and the ranges tile the data section one after the
        other, without overlap or gap, to its end. (Overlapping ranges would give several
        tensors the same bytes: wrong weights, read without a word.)"""
        spans = []
        for name, e in header.items():
            if e["dtype"] not in cls.DTYPES:
                raise ValueError(f"tensor '{name}' has unsupported dtype {e['dtype']}")
            start, end = (int(x) for x in e["data_offsets"])
            shape = [int(d) for d in e["shape"]]
            if any(d < 0 for d in shape):
                raise ValueError(f"tensor '{name}' has a negative dimension in {shape}")
            width = torch.empty((), dtype=cls.DTYPES[e["dtype"]]).element_size()
            need = math.prod(shape) * width
            if not 0 <= start <= end or end - start != need:
                raise ValueError(f"tensor '{name}' ({e['dtype']} {shape}, {need} bytes) has "
                                 f"the byte range [{start}, {end})")
            spans.append((start, end, name))
        at = 0
        for start, end, name in sorted(spans):
            if start != at:
                what = "overlaps the tensor before it" if start < at else "leaves a gap"
                raise ValueError(f"tensor '{name}' at bytes [{start}, {end}) {what} (the "
                                 f"previous one ends at {at})")
            at = end
        if at != data_bytes:
            raise ValueError(f"the tensors end at byte {at} of the data section, which has "
                             f"{data_bytes} bytes")

    def keys(self):
        return self.header.keys()

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def get_tensor(self, name: str) -> torch.Tensor:
        e = self.header[name]
        start, end = e["data_offsets"]
        raw = torch.empty(end - start, dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(self.base + start)
            if f.readinto(memoryview(raw.numpy())) != end - start:
                raise OSError(f"short read of '{name}'")
        return raw.view(self.DTYPES[e["dtype"]]).reshape(e["shape"])


class _BinWeights:
    def __init__(self, state):
        self.state = state

    def keys(self):
        return self.state.keys()

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self.state[name].shape)

    def get_tensor(self, name):
        return self.state[name]


class LazyTensors:
    """A read-only mapping name -> tensor that opens each shard once and reads tensors on
    access, so a conversion holds only what it is working on."""

    def __init__(self, index: Dict[str, str]):
        self.index = index
        self._handles, self._names = {}, {}

    def _handle(self, name: str):
        if name not in self.index:
            where = os.path.dirname(next(iter(self.index.values()), "")) or "the weights"
            raise HFFormatError(f"tensor '{name}' is missing from the weights in '{where}' (no "
                                "weights file or index entry holds it); the download is "
                                "incomplete or belongs to another model")
        path = self.index[name]
        if path not in self._handles:
            self._handles[path] = _open_weights(path)
            self._names[path] = set(self._handles[path].keys())
        if name not in self._names[path]:
            raise HFFormatError(f"{path} does not hold tensor '{name}', although the weights "
                                "index maps it there; the index or the shard is wrong (download "
                                "both again)")
        return self._handles[path], path

    def __getitem__(self, name: str) -> torch.Tensor:
        handle, path = self._handle(name)
        try:
            return handle.get_tensor(name)
        except Exception as e:  # noqa: BLE001 - a damaged shard
            raise HFFormatError(f"cannot read tensor '{name}' from {path}: {e}; the file is "
                                "damaged (download it again)") from None

    def shape(self, name: str) -> Tuple[int, ...]:
        """The tensor's shape, from the file's header where the format has one."""
        return self._handle(name)[0].shape(name)

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def keys(self) -> Iterator[str]:
        return iter(self.index)


def verify_weights(hf_dir: str) -> None:
    """Refuse an HF directory whose weight shards differ from the checksums this project
    recorded when it wrote them (checksums.json); silent for directories without one."""
    found = checksums.problem(hf_dir, collective=False, notice=False)
    if found:
        raise HFFormatError(f"HF directory '{hf_dir}' is damaged: {found}; export it again "
                            "or restore it from a copy")


def check_tensors(tensors: LazyTensors, expected: Dict[str, Tuple[int, ...]],
                  config_path: str) -> None:
    """Every tensor in `expected` (name -> shape, from config.json) is in the weights with that
    shape; HFFormatError naming the file and the tensor otherwise. Reads headers only."""
    for name, want in expected.items():
        have = tensors.shape(name)
        if have != tuple(want):
            raise HFFormatError(f"{tensors.index[name]}: tensor '{name}' has shape {have}, but "
                                f"{config_path} implies {tuple(want)}; the weights and the "
                                "config belong to different models")


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def write_hf_dir(shapes: Dict[str, Tuple[int, ...]], produce: Callable[[str], torch.Tensor],
                 config: Dict, out_dir: str, dtype: torch.dtype = torch.bfloat16,
                 shard_bytes: int = 2 * 2 ** 30, extra_files: Dict[str, str] = None,
                 json_files: Dict[str, Dict] = None,
                 before_commit: Optional[Callable[[], None]] = None) -> None:
    """Write config.json (`config` plus the dtype) and sharded safetensors with an index;
    `extra_files` (name -> source path) are copied along and `json_files` (name -> content,
    e.g. generation_config.json) written.
    `shapes` (name -> shape, in writing order) fixes every file's header up front, so each
    tensor is produced (`produce(name)`), written and dropped one at a time. Under torchrun
    the shards are spread over the ranks (collective). Written into a temporary sibling folder
    and renamed into place: never half a model. `before_commit()` (all ranks, after every
    shard is written) may still refuse it (e.g. the source's checksums). One writer per
    `out_dir`: a second one is refused at start (checkpoint/lock.py, the lock beside it)."""
    with lock.hold(out_dir, beside=True):
        if os.path.exists(out_dir) and os.listdir(out_dir):
            raise FileExistsError(f"'{out_dir}' exists and is not empty; choose a new --out")
        rank, world = ranks.world()
        tmp = ranks.broadcast(directory.sibling_tmp(out_dir) if rank == 0 else None)
        if rank == 0:
            directory.remove_dead_siblings(out_dir)  # what a killed export left
            os.makedirs(tmp)
        ranks.barrier()
        try:
            shards = _plan_shards(shapes, dtype, shard_bytes)
            names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                     for i in range(len(shards))]
            mine = list(range(rank, len(shards), world))
            for i in mine:
                _write_safetensors(os.path.join(tmp, names[i]), shards[i], shapes, produce,
                                   dtype)
            # the weight shards' checksums (checksums.json; `xft convert hf-to-mcore` verifies
            # them): only the shards, since users edit an HF directory's JSON files by hand
            hashed = ranks.all_gather(checksums.hash_files(tmp, [names[i] for i in mine]))
            if before_commit is not None:
                before_commit()
            if rank == 0:
                weight_map = {n: names[i] for i, shard in enumerate(shards) for n in shard}
                total = sum(torch.Size(s).numel() for s in shapes.values()) * dtype.itemsize
                cfg = {**config, "torch_dtype": str(dtype).replace("torch.", "")}
                for name, path in (extra_files or {}).items():
                    shutil.copy2(path, os.path.join(tmp, name))
                written = {**(json_files or {}), "config.json": cfg,
                           "model.safetensors.index.json": {"metadata": {"total_size": total},
                                                            "weight_map": weight_map}}
                for fname, content in written.items():
                    with open(os.path.join(tmp, fname), "w") as f:
                        json.dump(content, f, indent=2)
                checksums.write_manifest(
                    tmp, {k: v for part in hashed for k, v in part.items()}, everything=False)
                if os.path.exists(out_dir):
                    os.rmdir(out_dir)
                os.rename(tmp, out_dir)
            ranks.barrier()
        except BaseException:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise


def _plan_shards(shapes, dtype, shard_bytes) -> List[List[str]]:
    """Consecutive names, each shard at most `shard_bytes` (or one tensor larger than it)."""
    shards, size = [[]], 0
    for name, shape in shapes.items():
        n = torch.Size(shape).numel() * dtype.itemsize
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def _write_safetensors(path: str, names: List[str], shapes, produce, dtype) -> None:
    """A safetensors file written tensor by tensor: 8-byte header length, JSON header (offsets
    from the known shapes), then the raw little-endian data in header order."""
    header, offset = {}, 0
    for name in names:
        n = torch.Size(shapes[name]).numel() * dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shapes[name]),
                        "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in names:
            t = produce(name).detach().to("cpu", dtype).contiguous()
            if tuple(t.shape) != tuple(shapes[name]):
                raise ValueError(f"{name}: produced shape {tuple(t.shape)}, expected "
                                 f"{tuple(shapes[name])}")
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)
            del t
        f.flush()
        os.fsync(f.fileno())
