"""Reading a configuration: YAML files and text (safe types, a key given twice refused, alias
bombs and deep nesting stopped before anything is built), `section.key=value` overrides, and
`load_config`, which merges both and validates them through the schema (schema.py).
"""

import os
from typing import Any, Callable, Dict, Optional, Sequence

import yaml

from xft_megatron.arch.families import preset_values
from xft_megatron.config.schema import Config, _as_float, _require
from xft_megatron.errors import ConfigError


def parse_overrides(items: Sequence[str]) -> Dict[str, Any]:
    """['model.hidden_size=128', 'train.lr=1e-4'] -> nested dict; values parsed as YAML."""
    out: Dict[str, Any] = {}
    for item in items:
        _require("=" in item, f"override '{item}' must look like section.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        _require(all(parts) and len(parts) >= 2,
                 f"override '{item}' must name a section and a key, e.g. model.num_layers=8")
        value = load_yaml(raw, f"the value of override '{key.strip()}'") if raw.strip() else ""
        if isinstance(value, str) and raw.strip()[:1] not in ("'", '"'):
            value = _as_float(value)  # 1e-3 (YAML 1.1 reads it as text); '1e-3' stays text
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            _require(isinstance(node, dict), f"override '{item}' conflicts with another one")
        node[parts[-1]] = value
    return out


def deep_merge(base: Dict[str, Any], update: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str) -> Dict[str, Any]:
    _require(os.path.isfile(path), f"config file '{path}' does not exist")
    _require(os.path.getsize(path) <= MAX_CONFIG_BYTES,
             f"config file '{path}' is {os.path.getsize(path):,} bytes; a config is at most "
             f"{MAX_CONFIG_BYTES:,} (is this the right file?)")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file '{path}' is not valid YAML: {e}") from None
    data = load_yaml(text, f"config file '{path}'")
    data = {} if data is None else data
    _require(isinstance(data, dict), f"config file '{path}' must hold a mapping at the top")
    return data


def load_yaml(text: str, where: str) -> Any:
    """A YAML document (safe types; a key given twice refused) read without ever expanding
    more than MAX_CONFIG_NODES values or nesting deeper than MAX_CONFIG_DEPTH: alias bombs
    and deep nesting stop with a ConfigError naming `where`, before anything is built."""
    _require(len(text) <= MAX_CONFIG_BYTES, f"{where} is {len(text):,} characters; a config "
             f"is at most {MAX_CONFIG_BYTES:,}")
    loader = None
    try:
        loader = _UniqueKeyLoader(text)  # its reader refuses control characters already
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node, where)
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where} is not valid YAML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{where} is nested too deeply to be a config") from None
    finally:
        if loader is not None:
            loader.dispose()


MAX_CONFIG_BYTES = 1 << 20  # a config file's size
MAX_CONFIG_NODES = 100_000  # values in a config with its aliases expanded
MAX_CONFIG_DEPTH = 32  # nesting of mappings and lists


def _check_expansion(root, where: str) -> None:
    """Refuse a YAML document whose aliases expand to more than MAX_CONFIG_NODES values
    ("billion laughs": a few lines of anchors that reference each other) or that nests deeper
    than MAX_CONFIG_DEPTH, before anything is built from it. Sizes are counted once per node
    (aliases share nodes), so the check itself stays linear in the file."""
    sizes = {}

    def size(node, depth):
        if depth > MAX_CONFIG_DEPTH:
            raise ConfigError(f"{where} nests deeper than {MAX_CONFIG_DEPTH} "
                              f"levels (line {node.start_mark.line + 1}); a config is a few "
                              "levels deep")
        key = id(node)
        if key not in sizes:
            sizes[key] = None  # an alias cycle meets this mark
            children = [c for pair in node.value for c in pair] \
                if isinstance(node, yaml.MappingNode) else \
                node.value if isinstance(node, yaml.SequenceNode) else []
            sizes[key] = 1 + sum(size(c, depth + 1) for c in children)
        elif sizes[key] is None:
            raise ConfigError(f"{where} has an alias that contains itself (line "
                              f"{node.start_mark.line + 1})")
        if sizes[key] > MAX_CONFIG_NODES:
            raise ConfigError(f"{where} expands to more than "
                              f"{MAX_CONFIG_NODES:,} values through its aliases (&anchor / "
                              "*alias); write the values out or use fewer aliases")
        return sizes[key]

    size(root, 0)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# the config stored with a checkpoint, by its path (checkpoint/dist.py read_config)
StoredConfig = Callable[[str], Dict[str, Any]]


def load_config(path: Optional[str] = None, overrides: Sequence[str] = (),
                read_stored: Optional[StoredConfig] = None) -> Config:
    """The one way a config is built: YAML (optional), then key=value overrides; with
    `checkpoint.load`, the model and moe sections stored with that checkpoint are the defaults
    (values given win; architecture keys that disagree with it are refused), so a stage never
    repeats the architecture; then validation. `read_stored` reads a checkpoint's stored
    config (every command passes the checkpoint reader, or, before the checkpoint exists, the
    config it will hold); without it the config is the one given, as when a config is rebuilt
    from what a checkpoint stored. Raises ConfigError.

    `xft config`, `xft train` (and --dry-run), the quickstart, the recipe's preflight and the
    benchmarks all build their configs here; `require_runnable` adds what a run needs."""
    data = read_yaml(path) if path else {}
    data = deep_merge(data, parse_overrides(overrides))
    load = (data.get("checkpoint") or {}).get("load")
    if load and read_stored is not None:
        try:
            stored = inheritable(read_stored(load))
        except FileNotFoundError as e:
            raise ConfigError(f"checkpoint.load: {e}") from None
        _check_stored_model(load, data.get("model") or {}, stored.get("model") or {})
        _check_stored_router(load, data.get("moe") or {}, stored.get("moe") or {})
        for section in ("model", "moe"):
            data[section] = deep_merge(stored.get(section) or {}, data.get(section) or {})
        _continue_merge_stage(data, stored)
    return Config.from_dict(data)


# what a stored config says only about how the run that saved it computed, and what a reader
# of the checkpoint sees instead: None drops the key (the reader's own value or default), a
# mapping reads a value as the one the tensors are stored as. The layer modules, FP8 GEMMs
# and TE's experts (stored in the grouped layout) leave the same tensors either way.
COMPUTE_ONLY = {("model", "spec"): None, ("precision", "fp8"): None,
                ("precision", "fp8_recipe"): None,
                ("moe", "experts_impl"): {"te_grouped": "grouped"}}


def inheritable(stored: dict) -> dict:
    """A checkpoint's stored config as runs and tools that read it take it: what only says how
    the run that saved it computed (`COMPUTE_ONLY`) dropped or read as what is stored."""
    out = dict(stored)
    for (section, key), stored_as in COMPUTE_ONLY.items():
        values = out.get(section)
        if not isinstance(values, dict) or key not in values:
            continue
        values = dict(values)
        if stored_as is None:
            del values[key]
        elif isinstance(values[key], str):  # anything else: the schema reports it
            values[key] = stored_as.get(values[key], values[key])
        out[section] = values
    return out


def require_runnable(cfg: Config) -> Config:
    """What a training run needs beyond a valid config: where it writes, what it reads, and
    for the merge stage the MoE it starts from."""
    if cfg.stage == "merge" and not cfg.checkpoint.load:
        raise ConfigError("train.stage=merge starts from a trained XFT MoE: set "
                          "checkpoint.load to its checkpoint")
    if not cfg.checkpoint.save:
        raise ConfigError("checkpoint.save is not set: give the directory this run writes "
                          "its checkpoints, metrics and data cache to")
    if not cfg.data.path:
        raise ConfigError("data.path is not set: give .jsonl/.json/.parquet files, hf:NAME "
                          "(a Hugging Face dataset) or dataset folders (comma-separated), or "
                          "builtin:stdlib")
    return cfg


def _continue_merge_stage(data: dict, stored: dict) -> None:
    """A merge-stage checkpoint holds that stage's layers (frozen experts and their alphas),
    not the MoE layers: loading one without train.stage continues the merge stage, as long as
    the model stays an MoE. (A stored config of the former layout says so in moe.stage, which
    the MoE section carries over and `Config.from_dict` reads the same way.)"""
    train = data.get("train")
    train = {} if train is None else train
    if not isinstance(train, dict) or train.get("stage") is not None:
        return
    if (stored.get("train") or {}).get("stage") == "merge" and \
            data["moe"].get("num_experts", 0) != 0:
        data["train"] = {**train, "stage": "merge"}


# model keys a run may change on a loaded checkpoint: positions and RoPE (context extension)
# and the init scale (nothing is initialized from it); any other architecture key is stored
# (model.spec is not inherited at all: `inheritable`)
ADJUSTABLE_MODEL_KEYS = ("max_position_embeddings", "rope_scaling_factor", "rope_theta",
                         "init_std")


def _check_stored_model(load: str, given: dict, stored: dict) -> None:
    """Refuse model keys (a preset's values included) that disagree with the architecture
    stored in checkpoint.load, which would otherwise be trained instead without a word."""
    wanted = preset_values(given["preset"]) if given.get("preset") else {}
    wanted.update({k: v for k, v in given.items() if k != "preset"})

    def same(a, b):
        try:
            return float(a) == float(b)
        except (TypeError, ValueError):
            return a == b

    clash = [f"model.{k}={v!r} (stored: {stored[k]!r})" for k, v in wanted.items()
             if k in stored and k not in ADJUSTABLE_MODEL_KEYS and not same(v, stored[k])]
    if clash:
        via = f" (model.preset={given['preset']})" if given.get("preset") else ""
        raise ConfigError(f"checkpoint.load={load} holds another architecture than the model "
                          f"keys given{via}: {', '.join(clash)}. Drop those model keys (the "
                          "stored architecture is used) or load a checkpoint of that "
                          "architecture")


def _check_stored_router(load: str, given: dict, stored: dict) -> None:
    """moe.router_init_std is used where router weights are drawn, at upcycling; a run that
    loads an MoE checkpoint reads its router, so another value would change nothing."""
    if not stored.get("num_experts") or "router_init_std" not in given or \
            "router_init_std" not in stored:
        return
    try:
        differs = float(given["router_init_std"]) != float(stored["router_init_std"])
    except (TypeError, ValueError):
        return  # a malformed value: the schema's type check reports it
    if differs:
        raise ConfigError(
            f"moe.router_init_std={given['router_init_std']!r} does nothing here: "
            f"checkpoint.load={load} already holds router weights (drawn at "
            f"{stored['router_init_std']!r} when it was upcycled). Upcycle the dense "
            f"checkpoint again with `xft upcycle --router-init-std "
            f"{given['router_init_std']}`, or drop the key")


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
