"""Hugging Face `datasets` sources of training records, next to the plain files of records.py.

A data.path entry is one of these when it is
  hf:NAME    a dataset on the Hub (`hf:ise-uiuc/Magicoder-Evol-Instruct-110K`) at
             data.revision (default main), through the Hugging Face cache (xft_megatron/runtime/hub.py:
             downloaded when online, cache only under HF_HUB_OFFLINE / HF_DATASETS_OFFLINE);
  a folder   written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (read with
             `datasets.load_from_disk`), or laid out like a Hub dataset repository (parquet /
             jsonl / json / csv shards, optionally a README.md whose YAML `configs:` names the
             subsets and splits; read with `datasets.load_dataset`).
data.split picks the split (default train) and data.subset the configuration (Hub datasets and
Hub-layout folders). `datasets` is imported only when such a source is read.

Cache identity (`identity`): a saved dataset is keyed on its fingerprint (state.json) and its
files; a Hub dataset on the commit its revision resolved to (the snapshot folder); a Hub-layout
folder on its files (path, size, mtime). datasets' own fingerprint of a local folder does not
follow edits of its shards, so the folder is re-prepared (`force_redownload`, from the local
files) whenever it is read for tokenizing.

Records are the rows of the split as dicts (null columns count as absent, as for Parquet);
their location is `NAME split=SPLIT row=INDEX` (0-based), e.g. in the bad-record report.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

from xft_megatron.data.records import DataError
from xft_megatron.runtime.hub import HubError, HubSettings, snapshot

HF_PREFIX = "hf:"
_DISK_MARKERS = ("state.json", "dataset_dict.json")  # Dataset / DatasetDict.save_to_disk
_BATCH = 1024


@dataclass(frozen=True)
class HFSource:
    """One datasets source of data.path, resolved to a local folder."""

    name: str  # as written in data.path
    kind: str  # hub | disk | folder
    folder: str  # the save_to_disk folder, the Hub-layout folder or the Hub snapshot
    split: str
    subset: Optional[str] = None
    revision: Optional[str] = None  # hub: the commit the requested revision resolved to


def is_hf_entry(entry: str) -> bool:
    return entry.startswith(HF_PREFIX) or os.path.isdir(entry)


def resolve(entry: str, split: str, subset: Optional[str], revision: Optional[str],
            settings: HubSettings) -> HFSource:
    """The source of one data.path entry; DataError when it cannot be found or downloaded."""
    if entry.startswith(HF_PREFIX):
        repo = entry[len(HF_PREFIX):].strip()
        if not repo or repo.startswith(("/", ".")) or ".." in repo or repo.count("/") > 1:
            raise DataError(f"data.path entry '{entry}': expected hf:NAME with a Hub dataset "
                            "name such as hf:ise-uiuc/Magicoder-Evol-Instruct-110K")
        try:
            folder = snapshot(repo, revision, settings, repo_type="dataset")
        except HubError as e:
            raise DataError(f"data.path entry '{entry}': {e}") from None
        return HFSource(entry, "hub", folder, split, subset, os.path.basename(folder))
    if any(os.path.isfile(os.path.join(entry, m)) for m in _DISK_MARKERS):
        if subset:
            raise DataError(f"data.path entry '{entry}' is a save_to_disk folder, which has "
                            f"no subsets; remove data.subset={subset!r}")
        return HFSource(entry, "disk", entry, split)
    if not any(name.endswith(_DATA_SUFFIXES) for _, _, names in os.walk(entry) for name in names):
        raise DataError(f"data.path entry '{entry}' is a directory without a dataset: expected "
                        f"a datasets save_to_disk folder ({', '.join(_DISK_MARKERS)}) or a "
                        f"folder of data files ({', '.join(_DATA_SUFFIXES)}); to use one "
                        "file, give its path")
    return HFSource(entry, "folder", entry, split, subset)


_DATA_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv", ".arrow", ".jsonl.gz", ".json.gz")


def identity(src: HFSource) -> Dict[str, Any]:
    """What the records of `src` depend on (part of the tokenized cache key)."""
    out: Dict[str, Any] = {"kind": src.kind, "name": src.name, "split": src.split,
                           "subset": src.subset, "revision": src.revision}
    if src.kind == "disk":
        out["fingerprint"] = _saved_fingerprint(src)
    if src.kind != "hub":  # a Hub snapshot folder is immutable: its commit says it all
        out["files"] = _files(src.folder)
    return out


def rows(src: HFSource, settings: HubSettings,
         columns: Optional[Mapping[str, str]] = None) -> Iterator[Tuple[str, Any]]:
    """(location, row) for every row of the split; DataError if it cannot be loaded or lacks
    a column that data.columns maps."""
    ds = load(src, settings)
    missing = sorted(c for c in (columns or {}).values() if c not in ds.column_names)
    if missing:
        raise DataError(f"{_where(src)} has no column {', '.join(map(repr, missing))} (named "
                        f"in data.columns); its columns: {', '.join(ds.column_names)}")
    prefix = f"{src.name} split={src.split} row="
    row = 0
    for batch in ds.iter(batch_size=_BATCH):
        keys = list(batch)
        for values in zip(*(batch[k] for k in keys)):
            yield f"{prefix}{row}", {k: v for k, v in zip(keys, values) if v is not None}
            row += 1


def load(src: HFSource, settings: HubSettings):
    """The split of `src` as a `datasets.Dataset`."""
    import datasets

    if src.kind == "disk":
        try:
            ds = datasets.load_from_disk(src.folder)
        except Exception as e:  # noqa: BLE001 - damaged folders fail in many ways
            raise DataError(f"{_where(src)}: not a readable save_to_disk folder: "
                            f"{type(e).__name__}: {e}") from None
        if isinstance(ds, datasets.DatasetDict):
            if src.split not in ds:
                raise DataError(f"{_where(src)}: no split '{src.split}'; it has "
                                f"{', '.join(ds)} (set data.split)")
            ds = ds[src.split]
        return ds
    verification = "basic_checks" if src.kind == "hub" else "no_checks"  # edited folders
    try:
        ds = datasets.load_dataset(src.folder, name=src.subset, split=src.split,
                                   cache_dir=settings.datasets_cache,
                                   download_mode="force_redownload",
                                   verification_mode=verification)
    except Exception as e:  # noqa: BLE001 - unknown split/subset, no data files, bad shards
        detail = str(e).strip().splitlines()[0][:400] if str(e).strip() else ""
        raise DataError(f"{_where(src)}: datasets could not load it: {type(e).__name__}: "
                        f"{detail} (data.split and data.subset pick the split and the "
                        "configuration)") from None
    if isinstance(ds, datasets.DatasetDict):  # split=None never happens here; be safe
        ds = ds[src.split]
    return ds


def _where(src: HFSource) -> str:
    subset = f" subset={src.subset}" if src.subset else ""
    at = f" (snapshot {src.folder})" if src.kind == "hub" else ""
    return f"dataset '{src.name}'{subset} split={src.split}{at}"


def _saved_fingerprint(src: HFSource) -> Optional[str]:
    for state in (os.path.join(src.folder, "state.json"),
                  os.path.join(src.folder, src.split, "state.json")):
        if os.path.isfile(state):
            try:
                with open(state, encoding="utf-8") as f:
                    return json.load(f).get("_fingerprint")
            except (OSError, ValueError):
                return None
    return None


def _files(folder: str) -> List[List[Any]]:
    """[relative path, size, mtime_ns] of every file under `folder` (hidden entries skipped)."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = os.path.join(root, name)
            st = os.stat(path)
            out.append([os.path.relpath(path, folder), st.st_size, st.st_mtime_ns])
    return out
