"""The one skip-if-done scheme of every pipeline (the quickstart's and the recipe's).

Each step's folder holds a marker, DONE.json: the digest of the step's settings and of the
steps it reads from (so a changed setting reruns the step and everything after it), and,
once the step has finished, its time and result. A step is

  done    when its folder is complete (steps.py: a checkpoint's `latest`, a training run at
          its final step, an HF directory's config.json, humaneval.json; marker-only kinds:
          the finished marker) and the marker, if any, is finished with the same digest;
          a complete folder without a marker (written by hand or by an earlier version) is
          taken as it is;
  resume  when it is a training run not done with the same (or no) digest: `--resume`
          continues from its newest checkpoint;
  todo    otherwise: the folder is removed and the step runs from scratch.

One-process tools write FOLDER.partial and rename it (marker inside) when they finish, so an
interrupted one never looks complete; a training run's marker is written before it starts,
so a run stopped midway keeps its digest. Markers are written atomically, on rank 0.
"""

import hashlib
import json
import os
import shutil
import time
from typing import Any, Callable, Dict, Sequence

import torch.distributed as dist

from xft_megatron.pipeline.steps import MARKER, Step, read_marker

DONE, RESUME, TODO = "done", "resume", "todo"
Execute = Callable[[Step, str], Any]  # (step, destination folder) -> result


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def digests(steps: Sequence[Step]) -> Dict[str, str]:
    """{step name: digest of its settings and of the digests of the steps it reads}."""
    out: Dict[str, str] = {}
    for i, s in enumerate(steps):
        upstream = [out[u.name] for u in steps[:i] if any(_inside(p, u.folder)
                                                          for p in s.inputs())]
        content = {path: content_digest(path) for path in s.sources()
                   if not any(_inside(path, u.folder) for u in steps)}  # outside inputs only
        out[s.name] = _hash({"settings": s.settings(), "inputs": upstream,
                             **({"content": content} if content else {})})
    return out


def content_digest(path: str) -> str:
    """Digest of the names and bytes of `path` (a file) or of the regular files under it, in
    sorted order (data.tokenizer.files_digest). What a pipeline's outside inputs are keyed
    on: replacing a model's weights or editing a source file at the same path changes it."""
    from xft_megatron.data.tokenizer import files_digest

    if os.path.isfile(path):
        return files_digest([path])
    files = []
    for root, dirs, names in os.walk(path):
        dirs.sort()
        files += [os.path.join(root, n) for n in sorted(names)]
    return files_digest([f for f in files if os.path.isfile(f)])  # not dangling links, pipes


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.normpath(path), os.path.normpath(folder)
    return path == folder or path.startswith(folder + os.sep)


def _write_marker(folder: str, record: Dict[str, Any]) -> None:
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, MARKER + ".tmp")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1, default=str)
    os.replace(tmp, os.path.join(folder, MARKER))


def state(step: Step, digest: str) -> str:
    """DONE, RESUME or TODO (see the module docstring)."""
    record = read_marker(step.folder)
    if record is not None and record.get("params") != digest:
        return TODO
    finished = record is not None and "seconds" in record
    complete = step.complete(step.folder)
    if complete is None:  # a kind whose only sign of completion is the marker
        complete = finished
    if complete and (record is None or finished):
        return DONE
    return RESUME if step.resumable else TODO


def in_process(step: Step, dest: str) -> Any:
    return step.run(dest)


def run_step(step: Step, digest: str, execute: Execute = in_process,
             say: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run `step` (every rank) unless it is done; returns its record {name, params, seconds,
    result, reused}. `execute(step, dest)` writes the step's result into `dest`."""
    now = state(step, digest)
    if now == DONE:
        record = read_marker(step.folder) or {"name": step.name, "params": digest,
                                               "seconds": 0.0, "result": None}
        when = f"finished earlier in {record['seconds']:.0f}s" if "started" in record \
            else "complete"
        say(f"== {step.name}: {step.desc}: reusing {step.folder} ({when})")
        return {**record, "reused": True}
    say(f"== {step.name}: {step.desc}" + (" (resuming)" if os.path.isdir(step.folder) and
                                          now == RESUME else ""))
    dest = step.folder + ".partial" if step.partial else step.folder
    started = {"name": step.name, "params": digest, "started": time.time()}
    if _rank0():
        stale = ([step.folder] if now == TODO else []) + ([dest] if step.partial else [])
        for path in filter(os.path.exists, stale):
            shutil.rmtree(path)
        if not step.partial:
            _write_marker(step.folder, started)
    _barrier()
    start = time.perf_counter()
    result = execute(step, dest)
    record = {**started, "seconds": time.perf_counter() - start, "result": result}
    if _rank0():
        _write_marker(dest, record)
        if step.partial:
            os.rename(dest, step.folder)
    _barrier()
    if step.complete(step.folder) is False:
        raise RuntimeError(f"step {step.name} ended but {step.folder} is not complete")
    return {**record, "reused": False}


def run_steps(steps: Sequence[Step], execute: Execute = in_process,
              say: Callable[[str], None] = print) -> Dict[str, Dict[str, Any]]:
    """Every step in order, each through `run_step`; {name: record}."""
    digest = digests(steps)
    return {s.name: run_step(s, digest[s.name], execute, say) for s in steps}
