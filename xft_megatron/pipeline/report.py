"""Reports of a pipeline run (the quickstart's, the recipe's Report step): markdown tables of
the models' scores and the training stages, the MoE stages' routing (figures, a one-line
verdict), PNG plots (loss curves, per-layer expert load, routing diagnostics, expert
divergence, learned merge coefficients) from the stages' metrics files."""

import json
import os
from typing import Dict, List, Optional, Tuple


def read_metrics(stage_dir: str) -> List[Dict]:
    path = os.path.join(stage_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(curves: Dict[str, List[Dict]], path: str) -> str:
    """One line per run: LM loss per step."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, rows in curves.items():
        if rows:
            ax.plot([r["step"] for r in rows], [r["lm_loss"] for r in rows], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training LM loss (per token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_expert_load(rows: List[Dict], path: str, last: int = 10) -> Optional[str]:
    """Heatmap of the fraction of tokens per expert and MoE layer, averaged over the last
    `last` steps (expert 0 is the shared expert: every token)."""
    rows = [r for r in rows if "expert_load" in r][-last:]
    if not rows:
        return None
    import numpy as np

    load = np.mean([r["expert_load"] for r in rows], axis=0)  # [layers, experts]
    layers = [i for i in range(load.shape[0]) if load[i].any()]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 0.5 * len(layers) + 1.5))
    im = ax.imshow(load[layers], aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(load.shape[1]))
    ax.set_xticklabels(["shared"] + [str(e) for e in range(1, load.shape[1])])
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels([f"layer {i}" for i in layers])
    ax.set_xlabel("expert")
    ax.set_title("fraction of tokens per expert")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_merge_coefficients(coefficients: Dict[str, List[float]], path: str) -> Optional[str]:
    """Per MoE layer, the merge coefficient of each expert (shared = lambda)."""
    if not coefficients:
        return None
    import numpy as np

    layers = sorted(coefficients, key=int)
    table = np.array([coefficients[k] for k in layers])  # [layers, experts]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / table.shape[0]
    for i, layer in enumerate(layers):
        ax.bar(np.arange(1, table.shape[1]) + i * width, table[i, 1:], width,
               label=f"layer {layer}")
    ax.axhline((1 - table[0, 0]) / (table.shape[1] - 1), color="gray", ls="--", lw=1,
               label="uniform")
    ax.set_xlabel("routed expert")
    ax.set_ylabel("merge coefficient")
    ax.set_title(f"learned merge coefficients (shared expert: {table[0, 0]:.2f})")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _mean(values) -> Optional[float]:
    values = list(values)
    return sum(values) / len(values) if values else None


def routing_figures(summary: Dict) -> Optional[Dict[str, float]]:
    """Means over the MoE layers of an MoE stage's summary.json (its last steps' routing and
    the final expert divergence), or None without routing diagnostics."""
    routing = summary.get("routing") or {}
    if "set_survives" not in routing:
        return None
    layers = [i for i, g in enumerate(routing.get("shared_weight", [])) if g] or \
        [i for i, v in enumerate(routing["clean_entropy"]) if v]
    fig = {key: _mean(routing[key][i] for i in layers) for key in routing}
    if not any(routing.get("shared_weight", [])):
        fig["shared_weight"] = None  # no shared expert (mode vanilla)
    div = summary.get("expert_divergence") or {}
    fig["to_shared"] = _mean(x for d in div.values() for x in d.get("to_shared", []))
    fig["between_routed"] = _mean(d["between_routed"] for d in div.values())
    return fig


def routing_verdict(fig: Dict[str, float]) -> str:
    """One line on whether the router routes by content or by its noise (`routing_figures`)."""
    moved = ""
    if fig.get("to_shared") is not None:
        moved = (f"; the routed experts moved {fig['to_shared']:.2e} (relative) from the "
                 f"shared one, {fig['between_routed']:.2e} from each other")
    elif fig.get("between_routed") is not None:
        moved = f"; the experts moved {fig['between_routed']:.2e} (relative) from each other"
    noise, spread = fig.get("noise_scale") or 0.0, fig["clean_spread"]
    if noise > 0 and fig["set_survives"] < 0.5:
        return (f"noise-dominated routing: the clean gate logits spread {spread:.2g} against a "
                f"noise scale of {noise:.2g}, and only {fig['set_survives']:.0%} of the tokens "
                "keep their routed set under the noise, so each routed expert sees near-random "
                "tokens" + moved)
    if fig["clean_entropy"] > 0.99:
        return (f"near-uniform routing: the clean routing distribution is almost flat (entropy "
                f"{fig['clean_entropy']:.3f} of the maximum), the router barely prefers an "
                "expert" + moved)
    return (f"content-dependent routing: {fig['set_survives']:.0%} of the tokens keep their "
            f"routed set under the noise, clean routing entropy {fig['clean_entropy']:.3f} of "
            "the maximum" + moved)


def routing_section(stages: Dict[str, str], out_dir: str) -> Tuple[Optional[str], List[str]]:
    """Markdown on the MoE stages' routing (label -> stage folder): a table of the routing
    figures and a verdict per stage, and plots of the first stage's diagnostics over the
    steps and of its expert divergence over its checkpoints. (None, []) without
    diagnostics."""
    rows = {}
    for label, folder in stages.items():
        path = os.path.join(folder, "summary.json")
        if os.path.isfile(path):
            with open(path) as f:
                fig = routing_figures(json.load(f))
            if fig:
                rows[label] = fig
    if not rows:
        return None, []
    fmt = lambda v, f: "-" if v is None else f.format(v)  # noqa: E731
    lines = ["| stage | g0 | sets kept under noise | clean spread | noise scale | "
             "clean entropy | to shared | between routed |", "|---" * 8 + "|"]
    for label, f in rows.items():
        lines.append(f"| {label} | {fmt(f.get('shared_weight'), '{:.3f}')} | "
                     f"{f['set_survives']:.2f} | {f['clean_spread']:.3g} | "
                     f"{f.get('noise_scale', 0):.3g} | {f['clean_entropy']:.3f} | "
                     f"{fmt(f.get('to_shared'), '{:.2e}')} | "
                     f"{fmt(f.get('between_routed'), '{:.2e}')} |")
    text = ("Routing (means over the MoE layers and the last steps; expert distances relative "
            "to the shared expert's norm, at the end):\n\n" + "\n".join(lines) + "\n\n" +
            "\n".join(f"- {label}: {routing_verdict(f)}" for label, f in rows.items()))
    first = next(iter(rows))
    metrics = read_metrics(stages[first])
    plots = [plot_routing(metrics, os.path.join(out_dir, "routing.png"), first),
             plot_divergence(metrics, os.path.join(out_dir, "expert_divergence.png"), first)]
    return text, [p for p in plots if p]


def figures(out_dir: str, losses: Dict[str, Dict[str, List[Dict]]], moe: Dict[str, str],
            merge_coefficients: Optional[Dict[str, List[float]]]
            ) -> Tuple[Optional[str], List[str]]:
    """What follows a run's tables in its report.md (the quickstart's and the recipe's): the
    MoE stages' routing section (`routing_section` of `moe`, label -> stage folder; None
    without diagnostics) and a markdown image link per plot written into `out_dir`: a loss
    plot per entry of `losses` (file name -> label -> metrics rows; one without rows is left
    out), the first MoE stage's expert load, the learned merge coefficients, the routing
    plots."""
    here = lambda name: os.path.join(out_dir, name)  # noqa: E731
    plots = [plot_losses(curves, here(f"{name}.png")) for name, curves in losses.items()
             if any(curves.values())]
    if moe:
        plots.append(plot_expert_load(read_metrics(next(iter(moe.values()))),
                                      here("expert_load.png")))
    plots.append(plot_merge_coefficients(merge_coefficients, here("merge_coefficients.png")))
    routing, routing_plots = routing_section(moe, out_dir) if moe else (None, [])
    return routing, [f"![{os.path.basename(p)}]({os.path.basename(p)})"
                     for p in plots + routing_plots if p]


def plot_routing(rows: List[Dict], path: str, label: str = "moe") -> Optional[str]:
    """Per MoE layer over the steps: sets kept under noise, clean spread vs noise scale,
    clean entropy, g_0."""
    rows = [r for r in rows if "set_survives" in r]
    if not rows:
        return None
    layers = [i for i, row in enumerate(rows[-1]["expert_load"]) if any(row)]
    steps = [r["step"] for r in rows]
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 6), sharex=True)
    panels = (("set_survives", "routed sets kept under the noise"),
              ("clean_spread", "clean logit spread (dashed: noise scale)"),
              ("clean_entropy", "clean routing entropy / max"),
              ("shared_weight", "mean shared-expert weight g0"))
    for ax, (key, title) in zip(axes.flat, panels):
        for i in layers:
            line, = ax.plot(steps, [r[key][i] for r in rows], lw=1, label=f"layer {i}")
            if key == "clean_spread":
                ax.plot(steps, [r["noise_scale"][i] for r in rows], lw=1, ls="--",
                        color=line.get_color())
        if key == "clean_spread":
            ax.set_yscale("log")
        else:
            ax.set_ylim(0, 1.02)  # fractions, normalized entropy, weights
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[1, 0].set_xlabel("step")
    axes[1, 1].set_xlabel("step")
    axes[0, 0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"routing diagnostics: {label}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_divergence(rows: List[Dict], path: str, label: str = "moe") -> Optional[str]:
    """Per MoE layer, the mean relative distance of the routed experts to the shared one (or,
    without a shared expert, between experts) at each checkpoint."""
    rows = [r for r in rows if r.get("expert_divergence")]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for layer in sorted(rows[-1]["expert_divergence"], key=int):
        pts = [(r["step"], r["expert_divergence"][layer]) for r in rows
               if layer in r["expert_divergence"]]
        ys = [_mean(d["to_shared"]) if d.get("to_shared") else d["between_routed"]
              for _, d in pts]
        ax.plot([s for s, _ in pts], ys, marker="o", lw=1, label=f"layer {layer}")
    ax.set_xlabel("step")
    ax.set_ylabel("relative distance of routed experts\nto the shared expert")
    ax.set_title(f"expert divergence: {label}")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# score columns of `results_table`: key -> (header, format)
SCORES = {"loss": ("held-out loss", "{:.4f}"), "perplexity": ("perplexity", "{:.2f}"),
          "humaneval_pass@1": ("HumanEval pass@1", "{:.4f}")}


def results_table(rows: Dict[str, Dict]) -> str:
    """A markdown table, one row per model, one column per score any model has (SCORES);
    a model without that score shows '-'."""
    keys = [k for k in SCORES if any(k in r for r in rows.values())]
    width = max([len("model")] + [len(k) for k in rows])
    cols = [SCORES[k][0] for k in keys]
    lines = ["| " + "model".ljust(width) + " | " + " | ".join(cols) + " |",
             "|" + "-" * (width + 2) + "|" + "|".join("-" * (len(c) + 2) for c in cols) + "|"]
    for name, r in rows.items():
        cells = [(SCORES[k][1].format(r[k]) if k in r else "-").rjust(len(c))
                 for k, c in zip(keys, cols)]
        lines.append("| " + name.ljust(width) + " | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def stages_table(summaries: Dict[str, Dict]) -> str:
    """A markdown table of training stages from their summary.json: steps, final loss,
    throughput, time."""
    lines = ["| stage | steps | final loss | tokens/s | seconds |", "|---|---|---|---|---|"]
    for name, s in summaries.items():
        loss = s.get("final_loss")
        loss = f"{loss:.4f}" if isinstance(loss, (int, float)) else "-"
        lines.append(f"| {name} | {s.get('steps_done', '-')} | {loss} | "
                     f"{s.get('tokens_per_s', 0):,.0f} | {s.get('seconds', 0):,.0f} |")
    return "\n".join(lines)


def write_markdown(path: str, title: str, sections: List[str]) -> str:
    with open(path + ".tmp", "w") as f:
        f.write(f"# {title}\n\n" + "\n\n".join(sections) + "\n")
    os.replace(path + ".tmp", path)
    return path
