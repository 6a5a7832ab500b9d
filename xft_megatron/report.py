"""Reports of a pipeline run (the quickstart's, the recipe's Report step): markdown tables of
the models' scores and the training stages, PNG plots (loss curves, per-layer expert load,
learned merge coefficients) from the stages' metrics files."""

import json
import os
from typing import Dict, List, Optional


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
