"""Resumable pipeline stages: a stage whose output folder holds a DONE marker with the same
parameters is reused on a rerun; anything else (missing, partial, other parameters) is
removed and run again. Markers are written last and atomically, so a crash mid-stage never
leaves a stage that looks finished."""

import hashlib
import json
import os
import shutil
import time
from typing import Any, Callable, Dict

import torch.distributed as dist

MARKER = "DONE.json"


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _digest(params: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()


def is_done(out: str, params: Dict[str, Any]) -> bool:
    try:
        with open(os.path.join(out, MARKER)) as f:
            return json.load(f).get("params") == _digest(params)
    except (OSError, ValueError):
        return False


def run_stage(name: str, out: str, params: Dict[str, Any], fn: Callable[[], Any],
              say: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run `fn()` (every rank) unless `out` already holds this stage's result; returns the
    stage record {name, seconds, result, reused}. `fn` writes into `out` (created empty) and
    returns something JSON-serializable, kept in the marker."""
    if is_done(out, params):
        with open(os.path.join(out, MARKER)) as f:
            record = json.load(f)
        say(f"== {name}: reusing {out} (finished earlier in {record['seconds']:.0f}s)")
        return {**record, "reused": True}
    say(f"== {name}")
    if _rank0() and os.path.exists(out):
        shutil.rmtree(out)
    _barrier()
    start = time.perf_counter()
    result = fn()
    record = {"name": name, "params": _digest(params), "seconds": time.perf_counter() - start,
              "result": result}
    if _rank0():
        os.makedirs(out, exist_ok=True)
        tmp = os.path.join(out, MARKER + ".tmp")
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1, default=str)
        os.replace(tmp, os.path.join(out, MARKER))
    _barrier()
    return {**record, "reused": False}
