"""Tokenized training data: records -> samples (ids, loss_mask) in cached memory-mapped files.

`build_dataset` streams the records of `data.path` (records.py), turns each into samples
(samples.py) and appends them to flat binary files (`ids.bin` int32, `mask.bin` int8, and
`offsets.npy`, where sample i is [offsets[i], offsets[i+1])) that are memory mapped for
reading, so a dataset of any size costs no RAM and reading needs only numpy. The file lives in `cache_dir/<key>/`, where the key hashes everything the samples depend
on: the data files (path, size, mtime), the tokenizer (path, vocab size, hash of its files),
the template and its text, the format, seq_length and on_error. A later build with the same
inputs loads that folder without tokenizing anything (`report.from_cache` is then True).
A folder appears only once complete (written under a temporary name, then renamed), so
concurrent builds of the same key are safe; the first rename wins.

Hugging Face datasets in data.path (`hf:NAME`, save_to_disk and Hub-layout folders;
hf_source.py) key the cache on their fingerprint, resolved commit or files instead of the
file stats; `hub` (xft_megatron/runtime/hub.py HubSettings, from the environment at the entry point)
says where their caches are and whether the network may be used. data.columns renames
columns to record fields for every source. `check_sources` resolves every entry (a Hub
dataset: cached or downloaded) without reading records: the entry points call it before any
model is built, so a missing dataset stops a run at once.

`builtin:stdlib` in data.path stands for the Python standard library's source files
(code_corpus.python_files), one text record per non-blank file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import uuid
import zlib
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

from xft_megatron.config import DataConfig
from xft_megatron.data import hf_source
from xft_megatron.data.records import DataError, DataReport, RecordError, map_columns, \
    read_records, to_example
from xft_megatron.data.samples import example_samples
from xft_megatron.data.templates import PROMPTS
from xft_megatron.data.tokenizer import Tokenizer
from xft_megatron.errors import UsageError
from xft_megatron.runtime.hub import HubSettings

BUILTIN_STDLIB = "builtin:stdlib"
CACHE_VERSION = 3  # bump when the sample layout or the tokenization rules change
_IDS_FILE, _MASK_FILE, _OFFSETS_FILE = "ids.bin", "mask.bin", "offsets.npy"
_REPORT_FILE, _META_FILE = "report.json", "meta.json"
_WRITE_BATCH = 4096  # samples buffered per write


class TokenizedDataset:
    """Samples (ids, loss_mask) backed by memory-mapped flat files.

    `ds[i]` -> (ids int64 [n], loss_mask float32 [n]); `lengths` int64 [len(ds)]."""

    def __init__(self, directory: str, pad_id: int, from_cache: bool):
        self.directory, self.pad_id, self.from_cache = directory, pad_id, from_cache
        self.offsets = np.load(os.path.join(directory, _OFFSETS_FILE))
        self.lengths = np.diff(self.offsets).astype(np.int64)
        total = int(self.offsets[-1])
        self._ids = np.memmap(os.path.join(directory, _IDS_FILE), dtype=np.int32, mode="r",
                              shape=(total,)) if total else np.zeros(0, np.int32)
        self._mask = np.memmap(os.path.join(directory, _MASK_FILE), dtype=np.int8, mode="r",
                               shape=(total,)) if total else np.zeros(0, np.int8)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self._ids[a:b].astype(np.int64), self._mask[a:b].astype(np.float32)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())


def build_dataset(data_cfg: DataConfig, tokenizer: Tokenizer, seq_length: int,
                  cache_dir: Optional[str] = None, vocab_size: Optional[int] = None,
                  hub: Optional[HubSettings] = None) -> Tuple[TokenizedDataset, DataReport]:
    """Tokenized samples of `data_cfg.path` (cached) and the report of what was read/dropped.

    `vocab_size` (the model's) bounds `input_ids` records; default: the tokenizer's.
    Raises DataError: a source that cannot be found, bad records under on_error=fail (listing
    file:line or dataset/split/row of the first ones), or no usable sample at all.
    `cache_dir` defaults to data_cfg.cache_dir; `hub` to HubSettings.from_env()."""
    cache_dir = cache_dir or data_cfg.cache_dir
    if not cache_dir:
        raise UsageError("build_dataset needs a cache directory (data.cache_dir) to hold the "
                         "tokenized samples")
    if not data_cfg.paths:
        raise DataError(f"data.path is empty; give {_PATH_HELP}")
    if seq_length < 1:
        raise UsageError(f"seq_length={seq_length} must be >= 1")
    hub = hub or HubSettings.from_env()
    files = check_sources(data_cfg, hub)
    key_inputs = cache_key_inputs(files, tokenizer, data_cfg, seq_length)
    key_inputs["id_bound"] = vocab_size
    key = hashlib.sha256(json.dumps(key_inputs, sort_keys=True).encode()).hexdigest()[:20]
    directory = os.path.join(cache_dir, key)
    if os.path.isfile(os.path.join(directory, _REPORT_FILE)):
        damage = cache_damage(directory)
        if damage is None:
            return _load(directory, tokenizer, from_cache=True)
        print(f"data: the cached samples in '{directory}' are damaged ({damage}); they are "
              "tokenized again from the data", file=sys.stderr, flush=True)
        aside = f"{directory}.damaged-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(directory, aside)  # one process moves it; the others find it gone
        except OSError:
            pass
        shutil.rmtree(aside, ignore_errors=True)

    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{directory}.tmp-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)
    try:
        report = DataReport()
        stream = _samples(_records(files, hub, data_cfg.columns), data_cfg, tokenizer,
                          seq_length, report, vocab_size)
        _write_samples(tmp, stream)
        report.check(data_cfg.on_error)
        _write_json(os.path.join(tmp, _META_FILE), {"key": key, "inputs": key_inputs,
                                                    "pad_id": tokenizer.pad_id,
                                                    "files": _file_sums(tmp)})
        _write_json(os.path.join(tmp, _REPORT_FILE), report.to_dict())
        try:
            os.rename(tmp, directory)
        except OSError:  # another process finished the same key first
            if not os.path.isfile(os.path.join(directory, _REPORT_FILE)):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _load(directory, tokenizer, from_cache=False)


Source = Tuple[str, Any]  # ("records", data file) | ("source", code file) | ("hf", HFSource)
_PATH_HELP = ("comma-separated .jsonl/.json/.parquet files, hf:NAME (a Hugging Face Hub "
              f"dataset), dataset folders (save_to_disk or Hub layout) or {BUILTIN_STDLIB}")


def check_sources(data_cfg: DataConfig, hub: HubSettings) -> List[Source]:
    """data.path entries -> sources: files exist, Hugging Face datasets resolve (a Hub dataset
    is looked up in the cache, or downloaded when online), builtin:stdlib expands to the
    stdlib's .py files. Raises DataError / FileNotFoundError naming the entry."""
    from xft_megatron.data.code_corpus import python_files, stdlib_dir

    out: List[Source] = []
    for p in data_cfg.paths:
        if p == BUILTIN_STDLIB:
            out += [("source", f) for f in python_files(stdlib_dir())]
        elif p.startswith("builtin:"):
            raise DataError(f"data.path entry '{p}' is unknown; the built-in corpus is "
                            f"{BUILTIN_STDLIB}")
        elif hf_source.is_hf_entry(p):
            out.append(("hf", hf_source.resolve(p, data_cfg.split, data_cfg.subset,
                                                data_cfg.revision, hub)))
        elif not os.path.isfile(p):
            raise FileNotFoundError(f"data file '{p}' does not exist (data.path takes "
                                    f"{_PATH_HELP})")
        else:
            out.append(("records", p))
    return out


def cache_key_inputs(files: List[Source], tokenizer: Tokenizer, data_cfg: DataConfig,
                     seq_length: int) -> Dict[str, Any]:
    """Everything the tokenized samples depend on (hashed into the cache key)."""
    stats = []
    for kind, f in files:
        if kind == "hf":
            stats.append([kind, hf_source.identity(f)])
            continue
        st = os.stat(f)
        stats.append([kind, os.path.abspath(f), st.st_size, st.st_mtime_ns])
    return {"version": CACHE_VERSION, "files": stats, "tokenizer": tokenizer.identity,
            "template": data_cfg.template, "prompt": PROMPTS.get(data_cfg.template, ""),
            "format": data_cfg.format, "seq_length": seq_length, "on_error": data_cfg.on_error,
            "columns": dict(sorted(data_cfg.columns.items()))}


def _records(files: List[Source], hub: HubSettings,
             columns: Dict[str, str]) -> Iterator[Tuple[str, Any]]:
    for kind, f in files:
        if kind == "source":  # one text record per non-blank file
            with open(f, "rb") as fh:
                raw = fh.read()
            if not raw.strip():
                continue
            try:
                yield f, {"text": raw.decode("utf-8")}
            except UnicodeDecodeError as e:
                yield f, RecordError("not_utf8", f"byte offset {e.start}")
        elif kind == "hf":
            yield from hf_source.rows(f, hub, columns)
        else:
            yield from read_records(f)


def _samples(records: Iterator[Tuple[str, Any]], data_cfg: DataConfig, tok: Tokenizer,
             seq_length: int, report: DataReport, id_bound: Optional[int] = None
             ) -> Iterator[Tuple[List[int], List[int]]]:
    for location, value in records:
        report.read += 1
        try:
            if isinstance(value, RecordError):
                raise value
            value = map_columns(value, data_cfg.columns)
            pieces = example_samples(to_example(value, data_cfg.format), tok,
                                     data_cfg.template, seq_length, id_bound)
        except RecordError as e:
            report.add_error(location, e)
            continue
        report.kept += 1
        for ids, mask in pieces:
            report.samples += 1
            report.tokens += len(ids)
            report.targets += int(sum(mask[1:]))  # a sample's first token is never predicted
            yield ids, mask


def _write_samples(directory: str, samples: Iterator[Tuple[List[int], List[int]]]) -> None:
    """Append samples to ids.bin / mask.bin in batches; offsets.npy last."""
    offsets = [0]
    with open(os.path.join(directory, _IDS_FILE), "wb") as fi, \
            open(os.path.join(directory, _MASK_FILE), "wb") as fm:
        ids_buf, mask_buf = [], []

        def flush():
            if ids_buf:
                fi.write(np.concatenate(ids_buf).astype(np.int32).tobytes())
                fm.write(np.concatenate(mask_buf).astype(np.int8).tobytes())
                ids_buf.clear()
                mask_buf.clear()

        for ids, mask in samples:
            ids_buf.append(np.asarray(ids, dtype=np.int32))
            mask_buf.append(np.asarray(mask, dtype=np.int8))
            offsets.append(offsets[-1] + len(ids))
            if len(ids_buf) >= _WRITE_BATCH:
                flush()
        flush()
    np.save(os.path.join(directory, _OFFSETS_FILE), np.asarray(offsets, dtype=np.int64))


def _file_sums(directory: str) -> Dict[str, List[int]]:
    """{file: [size, crc32]} of a cache entry's sample files (crc32: gigabytes per second,
    enough to catch truncation and flipped bits)."""
    out = {}
    for name in (_IDS_FILE, _MASK_FILE, _OFFSETS_FILE):
        path, crc = os.path.join(directory, name), 0
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(16 << 20), b""):
                crc = zlib.crc32(block, crc)
        out[name] = [os.path.getsize(path), crc]
    return out


def cache_damage(directory: str) -> Optional[str]:
    """What is wrong with a finished cache entry (a missing, truncated or changed file), or
    None. Entries written before checksums were recorded get the size checks only."""
    try:
        with open(os.path.join(directory, _META_FILE)) as f:
            recorded = json.load(f).get("files")
        offsets = np.load(os.path.join(directory, _OFFSETS_FILE))
        total = int(offsets[-1]) if len(offsets) else -1
        sizes = {_IDS_FILE: total * 4, _MASK_FILE: total}
        for name, size in sizes.items():
            got = os.path.getsize(os.path.join(directory, name)) if total else 0
            if total and got != size:
                return f"{name} has {got} bytes where its offsets need {size}"
        if recorded:
            for name, (size, crc) in _file_sums(directory).items():
                if [size, crc] != recorded.get(name):
                    return f"{name} differs from what was written (size {size}, crc32 {crc})"
        if total < 0 or (len(offsets) > 1 and np.any(np.diff(offsets) < 0)):
            return f"{_OFFSETS_FILE} is not a list of offsets"
    except (OSError, ValueError, EOFError, KeyError, TypeError, AttributeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def _load(directory: str, tokenizer: Tokenizer,
          from_cache: bool) -> Tuple[TokenizedDataset, DataReport]:
    with open(os.path.join(directory, _REPORT_FILE)) as f:
        report = DataReport.from_dict(json.load(f), from_cache=from_cache)
    return TokenizedDataset(directory, tokenizer.pad_id, from_cache), report


def _write_json(path: str, value: Dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=1)
