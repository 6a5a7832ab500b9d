"""What a training run reports: a progress bar with ETA and a TensorBoard log on rank 0, one
JSON line per step (`metrics.jsonl`), and a final `summary.json`.

Per step: loss (LM + router), LM loss, router loss, lr, grad norm, tokens/s, MFU (active
parameters), peak memory; with MoE layers the per-layer expert load and mean shared-expert
weight g_0, the routing diagnostics (`moe.routing.DIAGNOSTICS`) and, at every checkpoint and
at the end, the expert divergence (`moe.divergence`); in the merge stage the merge
coefficients per layer.
"""

import contextlib
import json
import math
import os
import threading
from typing import Dict, Optional

import psutil
import torch
from tqdm import tqdm

from xft_megatron.checkpoint import space
from xft_megatron.errors import UserError
from xft_megatron.model.moe.routing import DIAGNOSTICS


class LogWriteError(UserError, OSError):
    """The training log (metrics.jsonl, TensorBoard, summary.json) could not be written: the
    run stops there; its checkpoints are untouched."""


def peak_memory_gib() -> float:
    """Peak GPU memory allocated by this process, or its resident memory on the CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return psutil.Process().memory_info().rss / 2**30


class Metrics:
    def __init__(self, out_dir: Optional[str], rank0: bool, start_step: int, total_steps: int,
                 progress: bool = True):
        self.rank0 = rank0
        self.out_dir = out_dir if rank0 else None
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True,
                        disable=not (progress and rank0))
        self.writer, self.jsonl, self._hook = None, None, None
        if self.out_dir:
            os.makedirs(self.out_dir, exist_ok=True)
            path = os.path.join(self.out_dir, "metrics.jsonl")
            _keep_until(path, start_step)  # a resumed run logs its steps again from here
            self.jsonl = open(path, "a")
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(os.path.join(self.out_dir, "tensorboard"))
                self._hook = _QuietWriterThread.install()
            except ImportError:  # tensorboard is a dependency; tolerate its absence anyway
                self.writer = None

    @contextlib.contextmanager
    def _writing(self, step: Optional[int] = None):
        """A failed write of the log (disk full, ...) stops the run with what happened and
        what is kept, instead of a bare OSError and a traceback of TensorBoard's thread."""
        try:
            yield
        except OSError as e:
            where = f" at step {step}" if step is not None else ""
            raise LogWriteError(
                f"could not write the training log in '{self.out_dir}'{where} ({e}; its disk "
                f"has {space.human(space.free_bytes(self.out_dir))} free). The run stopped; "
                "its complete checkpoints are kept: make room, then run again with --resume"
            ) from None

    def log(self, step: int, stats: Dict) -> None:
        """`step` is the 1-based number of the optimizer step just finished."""
        if not self.rank0:
            return
        shown = {"loss": f"{stats['loss']:.4f}", "lr": f"{stats['lr']:.2e}"}
        if stats.get("moe_loss"):
            shown["moe"] = f"{stats['moe_loss']:.4f}"
        if "shared_weight" in stats:
            g0 = [g for g in stats["shared_weight"] if g > 0]
            if g0:
                shown["g0"] = f"{sum(g0) / len(g0):.3f}"
        kept = _mean_over_moe_layers(stats, "set_survives")
        if kept is not None:
            shown["kept"] = f"{kept:.2f}"  # routed sets that survive the noise
        if "tokens_per_s" in stats:
            shown["tok/s"] = f"{stats['tokens_per_s']:.0f}"
        self.bar.set_postfix(**shown, refresh=False)
        self.bar.update(1)
        with self._writing(step):
            self._write(step, stats)

    def _write(self, step: int, stats: Dict) -> None:
        if self.jsonl:
            self.jsonl.write(json.dumps({"step": step, **_jsonable(stats)}) + "\n")
            self.jsonl.flush()
        if self.writer:
            for key, value in stats.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) \
                        and math.isfinite(value):
                    self.writer.add_scalar(f"train/{key}", value, step)
            for i, row in enumerate(stats.get("expert_load", [])):
                if any(row):
                    for e, v in enumerate(row):
                        self.writer.add_scalar(f"expert_load/layer{i:02d}/expert{e}", v, step)
            for i, g in enumerate(stats.get("shared_weight", [])):
                if g:
                    self.writer.add_scalar(f"shared_weight/layer{i:02d}", g, step)
            moe_layers = [i for i, row in enumerate(stats.get("expert_load", [])) if any(row)]
            for key in DIAGNOSTICS:
                for i in moe_layers if key in stats else ():
                    self.writer.add_scalar(f"routing/{key}/layer{i:02d}", stats[key][i], step)
            for layer, d in stats.get("expert_divergence", {}).items():
                tag = f"divergence/layer{int(layer):02d}"
                self.writer.add_scalar(f"{tag}/between_routed", d["between_routed"], step)
                if d.get("to_shared"):
                    self.writer.add_scalar(f"{tag}/to_shared_mean",
                                           sum(d["to_shared"]) / len(d["to_shared"]), step)
            for layer, coeffs in stats.get("merge_coefficients", {}).items():
                for e, v in enumerate(coeffs):
                    self.writer.add_scalar(f"merge/layer{int(layer):02d}/expert{e}", v, step)

    def message(self, text: str) -> None:
        if self.rank0:
            self.bar.write(text)

    def close(self, summary: Optional[Dict] = None) -> None:
        self.bar.close()
        writer, jsonl, self.writer, self.jsonl = self.writer, self.jsonl, None, None
        try:
            with self._writing():
                if writer:
                    writer.close()
                if jsonl:
                    jsonl.close()
                if summary is not None and self.out_dir:
                    path = os.path.join(self.out_dir, "summary.json")
                    with open(path + ".tmp", "w") as f:
                        json.dump(_jsonable(summary), f, indent=1)
                    os.replace(path + ".tmp", path)
        finally:
            if self._hook:
                self._hook.remove()
                self._hook = None


class _QuietWriterThread:
    """While a TensorBoard writer is open: an OSError in its background thread (a full
    disk) is not printed as that thread's traceback; the writer raises it again on its next
    use, which `Metrics._writing` reports. Every other thread error goes to the previous hook."""

    def __init__(self):
        self.previous = threading.excepthook

    @classmethod
    def install(cls) -> "_QuietWriterThread":
        hook = cls()
        threading.excepthook = hook
        return hook

    def __call__(self, args) -> None:
        if isinstance(args.exc_value, OSError) and \
                type(args.thread).__name__ == "_AsyncWriterThread":
            return
        self.previous(args)

    def remove(self) -> None:
        if threading.excepthook is self:
            threading.excepthook = self.previous


def _keep_until(path: str, step: int) -> None:
    """Drop the lines of `path` past `step` (and any unreadable one, e.g. cut by a kill), so
    that a resumed run leaves one line per step; rewritten atomically."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if kept != lines:
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)


def _mean_over_moe_layers(stats: Dict, key: str) -> Optional[float]:
    moe_layers = [i for i, row in enumerate(stats.get("expert_load", [])) if any(row)]
    if key not in stats or not moe_layers:
        return None
    return sum(stats[key][i] for i in moe_layers) / len(moe_layers)


def _jsonable(d):
    if isinstance(d, dict):
        return {str(k): _jsonable(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_jsonable(v) for v in d]
    if isinstance(d, float) and not math.isfinite(d):
        return str(d)
    return d
