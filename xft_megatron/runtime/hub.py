"""Hugging Face Hub ids (`org/name[@revision]`) -> local snapshot folders, through the cache.

`HubSettings.from_env()` reads the environment once, at a command's entry point, the way
huggingface_hub and datasets read it: `HF_HOME` (default `$XDG_CACHE_HOME/huggingface`, i.e.
`~/.cache/huggingface`), `HF_HUB_CACHE` (default `$HF_HOME/hub`), `HF_DATASETS_CACHE` (default
`$HF_HOME/datasets`) and offline mode (`HF_HUB_OFFLINE`, `HF_DATASETS_OFFLINE` for datasets,
`TRANSFORMERS_OFFLINE`). Library code receives the settings; it reads no environment itself.

`snapshot(repo, revision, settings, repo_type)` is huggingface_hub's `snapshot_download`:
online it downloads what the cache lacks (and resolves a branch or tag to its commit);
offline it returns the cached snapshot of that revision (refs/<branch> -> snapshots/<commit>),
else raises HubError naming the id, the cache folder and the ways to fill it.

`resolve_model_dir(ref, settings)`: what every command taking an HF model directory calls.
An existing local directory always wins; a reference shaped like a Hub id is then resolved.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping, Optional, Tuple

from xft_megatron.errors import UserError


_TRUE = {"1", "ON", "YES", "TRUE"}
# org/name with an optional @revision (branch, tag or commit); no leading dot, no '..'
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")
# weights in formats no command here reads
_SKIPPED = ["*.msgpack", "*.h5", "*.ot", "*.onnx", "*.onnx_data", "*.gguf", "*.tflite",
            "*.mlmodel", "coreml/*", "onnx/*", "original/*"]


class HubError(UserError, FileNotFoundError):
    """A Hub id that is neither in the cache nor downloadable; the message says how to fix."""


@dataclass(frozen=True)
class HubSettings:
    """Where the Hugging Face caches are and whether the network may be used."""

    hub_cache: str  # huggingface_hub's repository cache (models--org--name/, datasets--...)
    datasets_cache: str  # datasets' prepared-arrow cache
    offline: bool = False  # models: HF_HUB_OFFLINE
    datasets_offline: bool = False  # datasets: HF_HUB_OFFLINE or HF_DATASETS_OFFLINE

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None) -> "HubSettings":
        env = os.environ if env is None else env

        def path(value: str) -> str:
            return os.path.expandvars(os.path.expanduser(value))

        xdg = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        home = path(env.get("HF_HOME") or os.path.join(xdg, "huggingface"))
        hub_cache = path(env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
                         or os.path.join(home, "hub"))
        datasets_cache = path(env.get("HF_DATASETS_CACHE") or os.path.join(home, "datasets"))

        def flag(name: str) -> bool:
            return (env.get(name) or "").strip().upper() in _TRUE

        offline = flag("HF_HUB_OFFLINE") or flag("TRANSFORMERS_OFFLINE")
        return cls(hub_cache=hub_cache, datasets_cache=datasets_cache, offline=offline,
                   datasets_offline=offline or flag("HF_DATASETS_OFFLINE"))


def parse_hub_id(ref: str) -> Optional[Tuple[str, Optional[str]]]:
    """'org/name@rev' -> ('org/name', 'rev'); None when `ref` cannot be a Hub id."""
    m = _HUB_ID.match(ref.strip())
    if not m or ".." in ref:
        return None
    return m.group("repo"), m.group("rev")


def cache_folder(settings: HubSettings, repo: str, repo_type: str = "model") -> str:
    """The cache folder huggingface_hub keeps `repo` in (models--org--name)."""
    return os.path.join(settings.hub_cache, f"{repo_type}s--{repo.replace('/', '--')}")


def snapshot(repo: str, revision: Optional[str], settings: HubSettings,
             repo_type: str = "model", offline: Optional[bool] = None) -> str:
    """The local snapshot folder of `repo` at `revision` (default: main); HubError if it is
    neither cached nor downloadable. `offline` defaults to the settings' flag for the type."""
    from huggingface_hub import snapshot_download

    if offline is None:
        offline = settings.datasets_offline if repo_type == "dataset" else settings.offline
    try:
        return snapshot_download(repo, repo_type=repo_type, revision=revision,
                                 cache_dir=settings.hub_cache, local_files_only=offline,
                                 ignore_patterns=_SKIPPED if repo_type == "model" else None)
    except Exception as e:  # noqa: BLE001 - every failure becomes the same actionable message
        raise HubError(_missing(repo, revision, settings, repo_type, offline, e)) from None


def _missing(repo: str, revision: Optional[str], settings: HubSettings, repo_type: str,
             offline: bool, error: Exception) -> str:
    what = "dataset" if repo_type == "dataset" else "model"
    at = f" at revision '{revision}'" if revision else ""
    folder = cache_folder(settings, repo, repo_type)
    flag = "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE" if repo_type == "dataset" else "HF_HUB_OFFLINE"
    fetch = (f"`hf download {repo}{' --repo-type dataset' if repo_type == 'dataset' else ''}"
             f"{f' --revision {revision}' if revision else ''}` (same HF_HOME)")
    if offline:
        why = (f"offline mode is on ({flag}) and the Hugging Face cache has no copy: "
               f"{folder} does not hold that snapshot")
        fix = f"run once with network access (unset {flag}), or fetch it elsewhere with {fetch}"
    else:
        detail = str(error).strip().splitlines()[0][:300] if str(error).strip() else \
            type(error).__name__
        why = (f"it is not in the Hugging Face cache ({folder}) and could not be downloaded: "
               f"{type(error).__name__}: {detail}")
        fix = (f"check the name{' and revision' if revision else ''} and the network (a gated "
               f"or private repository needs `hf auth login`), or fetch it with {fetch}")
    return (f"Hugging Face {what} '{repo}'{at}: {why} (HF_HUB_CACHE={settings.hub_cache}); "
            f"{fix}, or give a local folder instead")


def resolve_model_dir(ref: str, settings: Optional[HubSettings] = None,
                      flag: str = "--hf") -> str:
    """A local directory as given; else a Hub id's snapshot folder. Anything else is returned
    unchanged (the command's own check reports the missing directory)."""
    if os.path.isdir(ref):
        return ref
    parsed = parse_hub_id(ref)
    if parsed is None or os.path.exists(ref):
        return ref
    settings = settings or HubSettings.from_env()
    try:
        return snapshot(parsed[0], parsed[1], settings, "model")
    except HubError as e:
        raise HubError(f"{flag} '{ref}' is not a local directory; as a Hub id: {e}") from None
