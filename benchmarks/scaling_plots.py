"""The scaling study's plots, from its CSV rows. Each plot uses the successful points of the
sweeps that vary its axis, and is skipped (with the reason returned) when there are none:

  throughput_vs_gpus.png  tokens/s per GPU and aggregate vs GPUs; one line per setting that
                          differs other than the GPU count (sweeps varying `gpus`)
  mfu_vs_layout.png       MFU per point (sweeps varying `gpus`, `parallel.*` or
                          `moe.dispatcher`)
  memory_vs_experts.png   peak memory (solid) and the memory estimate (dashed) vs experts;
                          one line per other setting (sweeps varying `moe.num_experts`)
"""

import os
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

Row = Dict
Plot = Tuple[str, Optional[str], str]  # (file name, path written or None, why skipped)
# the study keys that make up a parallel layout (what mfu_vs_layout.png compares)
LAYOUT_KEYS = ("gpus", "parallel.tensor", "parallel.pipeline", "parallel.virtual_pipeline",
               "parallel.expert", "parallel.expert_tensor", "parallel.sequence_parallel",
               "moe.dispatcher")


def label(parts: Dict[str, str], without: Tuple[str, ...] = ()) -> str:
    """A point's label from its label parts (scaling.py sets them), leaving out `without`."""
    return " ".join(v for k, v in parts.items() if v and k not in without) or "base"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(rows: List[Row], parts: Dict[str, Dict], without: Tuple[str, ...]):
    """label without the plotted axis -> rows, in row order (dense points named so)."""
    out = defaultdict(list)
    for r in rows:
        name = label(parts[r["point"]], without)
        out[f"{name} dense" if str(r["experts"]) == "0" and "experts" in without
            else name].append(r)
    return out


def throughput_vs_gpus(rows: List[Row], parts: Dict[str, Dict], path: str) -> Optional[str]:
    if len({r["gpus"] for r in rows}) < 2:
        return None
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, rs in _series(rows, parts, ("gpus", "dp")).items():
        rs = sorted(rs, key=lambda r: r["gpus"])
        x = [r["gpus"] for r in rs]
        ax1.plot(x, [r["tokens_per_s_per_gpu"] for r in rs], "o-", label=name)
        ax2.plot(x, [r["tokens_per_s"] for r in rs], "o-", label=name)
    gpus = sorted({r["gpus"] for r in rows})
    for ax, what in ((ax1, "tokens/s per GPU"), (ax2, "tokens/s (aggregate)")):
        ax.set_xlabel("GPUs")
        ax.set_xticks(gpus)
        ax.set_ylabel(what)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=7)
    return _save(fig, plt, path)


def mfu_vs_layout(rows: List[Row], parts: Dict[str, Dict], path: str) -> Optional[str]:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows) + 2), 4.5))
    names = [label(parts[r["point"]]) for r in rows]
    bars = ax.bar(range(len(rows)), [100 * r["mfu"] for r in rows], color="tab:blue")
    for b, r in zip(bars, rows):
        ax.annotate(f"{r['mfu']:.1%}", (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(f"MFU, % of {rows[0]['peak_tflops']:.4g} TFLOP/s per device")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, plt, path)


def memory_vs_experts(rows: List[Row], parts: Dict[str, Dict], path: str) -> Optional[str]:
    if len({r["experts"] for r in rows}) < 2:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, rs) in enumerate(_series(rows, parts, ("experts",)).items()):
        rs = sorted(rs, key=lambda r: r["experts"])
        x = [r["experts"] for r in rs]
        color = f"C{i % 10}"
        ax.plot(x, [r["peak_mem_gib"] for r in rs], "o-", color=color, label=f"{name} measured")
        ax.plot(x, [r["mem_estimate_gib"] for r in rs], "x--", color=color,
                label=f"{name} estimate")
    ax.set_xlabel("experts per MoE layer (0 = dense)")
    ax.set_ylabel("peak memory per device, GiB")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, plt, path)


def _save(fig, plt, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


PLOTS = (
    ("throughput_vs_gpus.png", ("gpus",), throughput_vs_gpus, "the GPU count"),
    ("mfu_vs_layout.png", LAYOUT_KEYS, mfu_vs_layout, "the parallel layout"),
    ("memory_vs_experts.png", ("moe.num_experts",), memory_vs_experts, "the number of experts"),
)


def write_plots(rows: List[Row], points: Sequence, varies: Dict[str, List[str]],
                out_dir: str) -> List[Plot]:
    """Every plot of PLOTS written into `out_dir`, or skipped with the reason; `points` are
    scaling.py's Points of the rows (their `label_parts`)."""
    parts = {r["point"]: p.label_parts for r, p in zip(rows, points)}
    done = []
    for name, keys, plot, axis in PLOTS:
        sweeps = {s for s, vs in varies.items() if set(vs) & set(keys)}
        if not sweeps:
            done.append((name, None, f"no sweep varies {axis}"))
            continue
        chosen = [r for r in rows if r["status"] == "ok" and set(r["sweeps"].split(",")) & sweeps]
        path = plot(chosen, parts, os.path.join(out_dir, name)) if chosen else None
        why = "" if path else (f"fewer than two successful points with different values of "
                               f"{axis} in sweeps {', '.join(sorted(sweeps))}")
        done.append((name, path, why))
    return done
