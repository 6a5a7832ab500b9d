"""Where a profiled step's GPU time goes, by the operator that launched each kernel.

torch.profiler ties every CUDA kernel to the innermost operator that launched it (aten::mm for
a GEMM, aten::add_ for an in-place addition, ...): an operator's self device time is the time
of its own kernels. `breakdown` sums that per operator and per category (`CATEGORIES`) in
milliseconds per profiled step; `table` puts several variants' categories side by side, so a
gap between two variants (the training path against the model alone) shows by kind of work.
GPU-busy time below the step's wall time is time the GPU waited for the host (launches,
synchronizations).

Without CUDA events (a CPU-only profile) operators' self CPU time stands in for device time.
"""

from typing import Callable, Dict, List, Sequence, Tuple

import torch

# (category, substrings of the lower-cased operator name); the first category that matches
# wins, so the specific ones come first
CATEGORIES: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("communication", ("nccl", "c10d", "all_reduce", "allreduce", "all_gather", "allgather",
                       "reduce_scatter", "all_to_all", "alltoall", "record_param_comms")),
    ("compiled (inductor)", ("triton", "compiled")),
    ("attention", ("scaled_dot_product", "flash", "efficient_attention", "cudnn_attention",
                   "fmha")),
    ("gemm", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul",
              "aten::linear", "grouped_mm", "aten::_scaled_mm", "gemm")),
    ("dispatch (sort, index, scatter, gather)",
     ("sort", "topk", "index", "scatter", "gather", "masked_select", "nonzero", "bincount", "histc",
      "cumsum", "repeat_interleave", "unique", "searchsorted")),
    ("in-place add (gradient accumulation)", ("aten::add_",)),
    ("copies and casts", ("aten::copy_", "aten::_to_copy", "aten::to", "aten::clone",
                          "aten::contiguous", "aten::cat", "aten::stack", "aten::fill_",
                          "aten::zero_", "memcpy", "memset")),
)
OTHER = "elementwise and other"
UNATTRIBUTED = "kernels without an operator"


def category(op: str) -> str:
    name = op.lower()
    for cat, keys in CATEGORIES:
        if any(k in name for k in keys):
            return cat
    return OTHER


def profile_steps(step: Callable[[], None], steps: int, top: int = 15) -> dict:
    """`breakdown` of `steps` calls of `step` under torch.profiler (CUDA kernels included
    where there is a GPU; the GPU is synchronized before and after)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    return breakdown(prof, steps, top)


def breakdown(prof, steps: int, top: int = 15) -> dict:
    """{busy_ms, categories: {category: ms}, ops: [[op, ms, calls], ...]} per step, from a
    finished torch.profiler.profile over `steps` steps."""
    events = list(prof.key_averages())
    cuda = any(e.device_type.name == "CUDA" for e in events)
    per_op: Dict[str, List[float]] = {}
    for e in events:
        if e.device_type.name != "CPU":  # kernels: counted through the operator launching them
            continue
        us = e.self_device_time_total if cuda else e.self_cpu_time_total
        if us > 0:
            per_op[e.key] = [us / 1e3 / steps, e.count / steps]
    cats = {cat: 0.0 for cat, _ in CATEGORIES}
    cats[OTHER] = 0.0
    for op, (ms, _) in per_op.items():
        cats[category(op)] += ms
    if cuda:  # kernels no operator launched (if any) still count as busy time
        kernel_ms = sum(e.self_device_time_total for e in events
                        if e.device_type.name == "CUDA") / 1e3 / steps
        cats[UNATTRIBUTED] = max(0.0, kernel_ms - sum(cats.values()))
    ops = sorted(([op, ms, calls] for op, (ms, calls) in per_op.items()), key=lambda r: -r[1])
    return dict(busy_ms=sum(cats.values()), categories=cats, ops=ops[:top],
                device="cuda" if cuda else "cpu")


def table(profiles: Dict[str, dict], wall_ms: Dict[str, float] = None) -> str:
    """Markdown: one row per category, one column per variant (ms per step), then GPU-busy
    and, where given, wall time and the host-bound remainder (wall - busy)."""
    names: Sequence[str] = list(profiles)
    cats = [cat for cat, _ in CATEGORIES] + [OTHER, UNATTRIBUTED]
    lines = ["| ms per step | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for cat in cats:
        values = [profiles[n]["categories"].get(cat, 0.0) for n in names]
        if any(v >= 0.05 for v in values):
            lines.append(f"| {cat} | " + " | ".join(f"{v:.1f}" for v in values) + " |")
    lines.append("| **busy** | " + " | ".join(f"{profiles[n]['busy_ms']:.1f}" for n in names)
                 + " |")
    if wall_ms:
        lines.append("| wall | " + " | ".join(
            f"{wall_ms[n]:.1f}" if n in wall_ms else "-" for n in names) + " |")
        lines.append("| wall - busy (GPU waits for the host) | " + " | ".join(
            f"{wall_ms[n] - profiles[n]['busy_ms']:.1f}" if n in wall_ms else "-"
            for n in names) + " |")
    return "\n".join(lines)
