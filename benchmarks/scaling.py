"""Scaling study: sweep model size, number of experts, top-k and parallel layout; launch every
point with torchrun on its number of processes; one CSV row per point, plus plots.

    python -m benchmarks.scaling benchmarks/studies/h200.yaml --out runs/scaling [--devices N]
        [--sweeps experts,layout] [--dry-run]

Study file (YAML):
  name, description
  warmup, steps, breakdown_steps   steps per point: untimed, timed, instrumented (in that
                                   order; see benchmarks/scaling_point.py)
  data_files                       standard-library files whose bytes are the training text
  timeout_s                        per point
  peak_tflops                      MFU denominator per device (optional; default the H200's
                                   bf16 dense datasheet peak on GPUs, on CPUs a fp32 matmul
                                   measured in each point's processes)
  base                             a config in the `xft train` schema (model, moe, parallel,
                                   precision, train sections)
  sweeps                           a list of {name, set, axes | points}: `axes` maps dotted
                                   config keys to value lists (their cartesian product),
                                   `points` lists explicit settings; `set` applies to all of
                                   the sweep's points. The key `gpus` (default 1) is the
                                   number of processes, one per GPU (gloo processes on a CPU).
Points with the same resolved config and process count run once (listed under every sweep
they belong to). A point needing more devices than present is not launched and gets a row
with status `skipped`; one whose config does not validate gets `invalid`; a launch that fails
or times out gets `failed` (its log is in logs/).

Outputs in --out: scaling.csv (columns: COLUMNS below), summary.md (table, points not run,
plots), throughput_vs_gpus.png, mfu_vs_layout.png, memory_vs_experts.png (each skipped, with
the reason in summary.md, when no sweep varies its axis), logs/, points/.
"""

import argparse
import csv
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import yaml

from benchmarks.scaling_plots import label, write_plots
from xft_megatron.config import Config, ConfigError, deep_merge
from xft_megatron.training import flops, memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMNS = {
    "point": "point id (index and label)",
    "label": "what distinguishes the point from the study's others",
    "sweeps": "the sweeps the point belongs to",
    "status": "ok | skipped (more devices than present) | invalid (config) | failed",
    "reason": "why a point did not run, or failed",
    "gpus": "processes, one per GPU (gloo processes on CPU)",
    "tp": "tensor parallel", "pp": "pipeline parallel", "ep": "expert parallel",
    "dp": "data parallel (what the world size leaves)", "sp": "sequence parallel",
    "dispatcher": "MoE token dispatcher (alltoall | allgather; empty for dense)",
    "layers": "decoder layers", "hidden": "hidden size", "ffn": "FFN hidden size",
    "experts": "experts per MoE layer, shared included (0 = dense)",
    "topk": "experts per token, shared included (empty for dense)",
    "seq_length": "tokens per sequence", "micro_batch": "sequences per micro-batch",
    "global_batch": "sequences per optimizer step", "dtype": "parameter dtype",
    "params_total": "all parameters", "params_active": "parameters one token uses",
    "steps_timed": "timed steps (after the warm-up)",
    "step_s": "median step time of the timed steps (synchronized, nothing instrumented)",
    "step_s_min": "fastest timed step", "step_s_max": "slowest timed step",
    "tokens_per_s": "global_batch * seq_length / step_s (all devices)",
    "tokens_per_s_per_gpu": "tokens_per_s / gpus",
    "tflops_per_gpu": "flops.flops_per_token (active parameters) * tokens_per_s_per_gpu",
    "peak_tflops": "the MFU denominator per device", "peak_source": "where peak_tflops is from",
    "mfu": "tflops_per_gpu / peak_tflops",
    "peak_mem_gib": "GPU: max bytes allocated by torch; CPU: peak RSS; largest over ranks",
    "mem_estimate_gib": "training/memory.py estimate per rank (as `xft train --dry-run`)",
    "breakdown_step_s": "mean wall time of the instrumented steps (the parts below are their "
                        "means; benchmarks/step_timers.py says how each is timed)",
    "forward_s": "forward compute + loss, summed over micro-batches (Megatron's "
                 "forward-compute points; device-stream time)",
    "backward_s": "backward compute, summed over micro-batches (backward-compute points)",
    "pipeline_p2p_s": "pipeline send/receive outside compute (0 without pipelining)",
    "grad_sync_s": "finalize_model_grads: data-parallel gradient reduce(-scatter), "
                   "sequence-parallel norm all-reduce",
    "optimizer_s": "grad norm, clipping, Adam, distributed-optimizer parameter all-gather",
    "other_s": "breakdown_step_s minus the five parts above (zeroing grads, schedule, "
               "routing statistics, host gaps)",
    "moe_dispatch_s": "token_dispatch communication (all-to-all / all-gather), forward + "
                      "backward; lies INSIDE forward_s + backward_s",
    "moe_combine_s": "token_combine communication (all-to-all / reduce-scatter), forward + "
                     "backward; inside forward_s + backward_s",
    "loss_first": "training loss of the first step", "loss_last": "of the last step",
    "wall_s": "launch to exit of the point's torchrun", "device": "device name",
}
PARTS = ("forward_s", "backward_s", "pipeline_p2p_s", "grad_sync_s", "optimizer_s")


# ------------------------------------------------------------------------------ the study
@dataclass
class Study:
    name: str
    base: Dict[str, Any]
    sweeps: List[Dict[str, Any]]
    description: str = ""
    warmup: int = 2
    steps: int = 5
    breakdown_steps: int = 2
    data_files: int = 100
    timeout_s: float = 600.0
    peak_tflops: Optional[float] = None

    @classmethod
    def load(cls, path: str) -> "Study":
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{path}: unknown study keys {sorted(unknown)}; known: "
                             f"{sorted(known)}")
        study = cls(**data)
        for i, sweep in enumerate(study.sweeps):
            if not sweep.get("name") or not (sweep.get("axes") or sweep.get("points")):
                raise ValueError(f"{path}: sweep {i} needs a name and `axes` or `points`")
        if min(study.steps, study.breakdown_steps) < 1 or study.warmup < 0:
            raise ValueError(f"{path}: steps and breakdown_steps must be >= 1, warmup >= 0")
        return study


@dataclass
class Point:
    gpus: int
    settings: Dict[str, Any]  # dotted key -> value, as the sweep gave them
    config: Optional[Config]
    data: Dict[str, Any]  # the nested config handed to the worker
    error: Optional[str] = None
    sweeps: List[str] = field(default_factory=list)
    label_parts: Dict[str, str] = field(default_factory=dict)


def _nested(dotted: Dict[str, Any]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in dotted.items():
        node = out
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def sweep_settings(sweep: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The settings of each point of a sweep (dotted keys), `set` merged in."""
    fixed = dict(sweep.get("set") or {})
    if sweep.get("points"):
        return [{**fixed, **p} for p in sweep["points"]]
    axes = sweep["axes"]
    return [{**fixed, **dict(zip(axes, combo))}
            for combo in itertools.product(*axes.values())]


def make_point(study: Study, settings: Dict[str, Any]) -> Point:
    """Resolve and validate a point's config for its process count."""
    settings = dict(settings)
    gpus = int(settings.pop("gpus", 1))
    total = study.warmup + study.steps + study.breakdown_steps
    data = deep_merge(study.base, _nested(settings))
    data = deep_merge(data, {"train": {"train_steps": total}})
    point = Point(gpus, settings, None, data)
    try:
        cfg = Config.from_dict(data)
        dp = cfg.parallel.data_parallel_size(gpus)
        cfg.train.num_microbatches(dp)
        if cfg.model.vocab_size < 256:
            raise ConfigError(f"model.vocab_size={cfg.model.vocab_size}: the study trains on "
                              "UTF-8 bytes and needs >= 256")
        point.config = cfg
    except ConfigError as e:
        point.error = str(e)
    return point


def expand(study: Study) -> Tuple[List[Point], Dict[str, List[str]]]:
    """(unique points in sweep order, sweep name -> the keys it varies)."""
    points: Dict[str, Point] = {}
    varies: Dict[str, List[str]] = {}
    for sweep in study.sweeps:
        settings = sweep_settings(sweep)
        keys = sorted({k for s in settings for k in s})
        varies[sweep["name"]] = [k for k in keys
                                 if len({json.dumps(s.get(k)) for s in settings}) > 1]
        for s in settings:
            p = make_point(study, s)
            what = p.config.to_dict() if p.config else p.data
            key = json.dumps([p.gpus, what], sort_keys=True, default=str)
            points.setdefault(key, p).sweeps.append(sweep["name"])
    unique = list(points.values())
    _label(unique)
    return unique, varies


def _label(points: List[Point]) -> None:
    """Label parts of every point; parts equal across all points are left out."""
    for p in points:
        c = p.config
        if c is None:
            p.label_parts = {"settings": ",".join(f"{k}={v}" for k, v in p.settings.items())}
            continue
        pa, e, m = c.parallel, c.moe, c.model
        p.label_parts = {
            "gpus": f"{p.gpus}x", "tp": f"TP{pa.tensor}", "pp": f"PP{pa.pipeline}",
            "ep": f"EP{pa.expert}", "dp": f"DP{pa.data_parallel_size(p.gpus)}",
            "model": f"L{m.num_layers} h{m.hidden_size}",
            "experts": f"E{e.num_experts}" if e.enabled else "dense",
            "topk": f"k{e.topk}" if e.enabled else "",
            "dispatcher": e.dispatcher if e.enabled else "",
            "dtype": c.precision.dtype,
        }
    for key in {k for p in points for k in p.label_parts}:
        if len({p.label_parts.get(key) for p in points}) == 1 and len(points) > 1:
            for p in points:
                p.label_parts.pop(key, None)


# ------------------------------------------------------------------------------ running
def available_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else (os.cpu_count() or 1)


def launch(point: Point, study: Study, name: str, out_dir: str) -> Tuple[Optional[dict], str,
                                                                          float]:
    """Run the point under torchrun; (result or None, failure reason, wall seconds)."""
    import torch

    for sub in ("points", "logs"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    spec_path = os.path.join(out_dir, "points", f"{name}.json")
    result_path = os.path.join(out_dir, "points", f"{name}.result.json")
    if os.path.exists(result_path):
        os.remove(result_path)
    spec = {"config": point.data, "warmup": study.warmup, "steps": study.steps,
            "breakdown_steps": study.breakdown_steps, "data_files": study.data_files}
    with open(spec_path, "w") as f:
        json.dump(spec, f, indent=1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node", str(point.gpus), "-m", "benchmarks.scaling_point",
           "--point", spec_path, "--out", result_path]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    if not torch.cuda.is_available():
        env["OMP_NUM_THREADS"] = "1"  # one core per process: a CPU "device"
    log_path = os.path.join(out_dir, "logs", f"{name}.log")
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=study.timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None, f"timed out after {study.timeout_s:.0f} s (log: {log_path})", \
                time.perf_counter() - start
    wall = time.perf_counter() - start
    if rc != 0 or not os.path.exists(result_path):
        return None, f"exit status {rc}: {_last_error(log_path)} (log: {log_path})", wall
    with open(result_path) as f:
        return json.load(f), "", wall


def _last_error(log_path: str) -> str:
    with open(log_path, errors="replace") as f:
        lines = [ln.strip() for ln in f if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or "error" in ln]
    return (errors or lines or ["no output"])[-1][:300]


# ------------------------------------------------------------------------------ one row
def config_columns(point: Point) -> Dict[str, Any]:
    c = point.config
    if c is None:
        return {"gpus": point.gpus}
    m, e, pa, t = c.model, c.moe, c.parallel, c.train
    counts = memory.parameter_counts(m, e)
    return {
        "gpus": point.gpus, "tp": pa.tensor, "pp": pa.pipeline, "ep": pa.expert,
        "dp": pa.data_parallel_size(point.gpus), "sp": pa.sequence_parallel,
        "dispatcher": e.dispatcher if e.enabled else "", "layers": m.num_layers,
        "hidden": m.hidden_size, "ffn": m.ffn_hidden_size, "experts": e.num_experts,
        "topk": e.topk if e.enabled else "", "seq_length": t.seq_length,
        "micro_batch": t.micro_batch_size, "global_batch": t.global_batch_size,
        "dtype": c.precision.dtype, "params_total": counts["total"],
        "params_active": counts["active"],
        "mem_estimate_gib": memory.estimate(c, point.gpus).total / 2 ** 30,
    }


def peak_flops(study: Study, result: dict) -> Tuple[float, str]:
    """FLOP/s per device that MFU is measured against, and where the figure comes from."""
    if study.peak_tflops:
        return study.peak_tflops * 1e12, "study file"
    if result.get("cpu_matmul_flops"):
        return result["cpu_matmul_flops"], "measured fp32 matmul, one process (CPU)"
    return flops.H200_BF16_DENSE_PEAK, "H200 bf16 dense datasheet"


def measured_columns(point: Point, study: Study, result: dict) -> Dict[str, Any]:
    c = point.config
    tokens_per_s = c.train.global_batch_size * c.train.seq_length / result["step_s"]
    per_gpu = tokens_per_s / point.gpus
    achieved = flops.flops_per_token(c.model, c.train.seq_length, c.moe,
                                     merge=c.stage == "merge") * per_gpu
    peak, source = peak_flops(study, result)
    row = {k: result[k] for k in ("steps_timed", "step_s", "step_s_min", "step_s_max",
                                  "peak_mem_gib", "breakdown_step_s", "moe_dispatch_s",
                                  "moe_combine_s", "loss_first", "loss_last", "device")}
    row.update({k: result[k] for k in PARTS})
    row["other_s"] = result["breakdown_step_s"] - sum(result[k] for k in PARTS)
    row.update(tokens_per_s=tokens_per_s, tokens_per_s_per_gpu=per_gpu,
               tflops_per_gpu=achieved / 1e12, peak_tflops=peak / 1e12, peak_source=source,
               mfu=achieved / peak)
    return row


def run_point(index: int, point: Point, study: Study, devices: int, out_dir: str,
              dry: bool) -> Dict[str, Any]:
    name = f"p{index:02d}"
    row = {"point": f"{name} {label(point.label_parts)}", "label": label(point.label_parts),
           "sweeps": ",".join(point.sweeps), **config_columns(point)}
    if point.error:
        return {**row, "status": "invalid", "reason": point.error}
    if point.gpus > devices:
        return {**row, "status": "skipped",
                "reason": f"needs {point.gpus} devices, {devices} present"}
    if dry:
        return {**row, "status": "planned", "reason": ""}
    result, reason, wall = launch(point, study, name, out_dir)
    if result is None:
        return {**row, "status": "failed", "reason": reason, "wall_s": wall}
    return {**row, "status": "ok", "reason": "", "wall_s": wall,
            **measured_columns(point, study, result)}


# ------------------------------------------------------------------------------ outputs
def write_csv(rows: List[Dict[str, Any]], path: str) -> None:
    with open(path + ".tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k, "")) for k in COLUMNS})
    os.replace(path + ".tmp", path)


def _fmt(v):
    return f"{v:.6g}" if isinstance(v, float) else v


def summary_lines(study: Study, rows: List[Dict], plots: List[Tuple[str, Optional[str], str]]
                  ) -> List[str]:
    head = ("| point | status | tokens/s/GPU | MFU | peak mem GiB | step s | fwd | bwd | "
            "grad sync | optim | MoE dispatch+combine | loss first -> last |")
    lines = [f"# Scaling study `{study.name}`", "", study.description.strip(), "", head,
             "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if r["status"] != "ok":
            continue
        lines.append(
            f"| {r['point']} | ok | {r['tokens_per_s_per_gpu']:,.0f} | {r['mfu']:.1%} | "
            f"{r['peak_mem_gib']:.2f} | {r['step_s']:.3f} | {r['forward_s']:.3f} | "
            f"{r['backward_s']:.3f} | {r['grad_sync_s']:.3f} | {r['optimizer_s']:.3f} | "
            f"{r['moe_dispatch_s'] + r['moe_combine_s']:.3f} | "
            f"{r['loss_first']:.3f} -> {r['loss_last']:.3f} |")
    others = [r for r in rows if r["status"] != "ok"]
    lines += ["", "Points not run or failed:" if others else "Every point ran."]
    lines += [f"- {r['point']}: **{r['status']}**: {r['reason']}" for r in others]
    lines += ["", "Plots:"]
    lines += [f"- `{name}`: " + (f"written ({os.path.basename(path)})" if path else
                                 f"skipped: {why}") for name, path, why in plots]
    lines += ["", "Columns of scaling.csv:"] + [f"- `{k}`: {v}" for k, v in COLUMNS.items()]
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Scaling study (see the module docstring)")
    ap.add_argument("study", help="study YAML (benchmarks/studies/)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--devices", type=int, default=None,
                    help="devices present (default: GPUs, else CPU cores)")
    ap.add_argument("--sweeps", default=None, help="comma-separated sweep names to run")
    ap.add_argument("--dry-run", action="store_true", help="list the points, launch nothing")
    args = ap.parse_args(argv)
    study = Study.load(args.study)
    if args.sweeps:
        wanted = set(args.sweeps.split(","))
        study.sweeps = [s for s in study.sweeps if s["name"] in wanted]
    devices = args.devices or available_devices()
    os.makedirs(args.out, exist_ok=True)
    points, varies = expand(study)
    print(f"study {study.name}: {len(points)} points, {devices} devices present", flush=True)
    rows = []
    for i, point in enumerate(points):
        rows.append(run_point(i, point, study, devices, args.out, args.dry_run))
        _print_row(rows[-1])
    write_csv(rows, os.path.join(args.out, "scaling.csv"))

    plots = [] if args.dry_run else write_plots(rows, points, varies, args.out)
    text = "\n".join(summary_lines(study, rows, plots)) + "\n"
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(text)
    print(text)
    return 0 if all(r["status"] in ("ok", "skipped", "planned") for r in rows) else 1


def _print_row(r: Dict[str, Any]) -> None:
    if r["status"] != "ok":
        print(f"{r['point']}: {r['status']}: {r['reason']}", flush=True)
        return
    print(f"{r['point']}: {r['tokens_per_s_per_gpu']:,.0f} tok/s/GPU, MFU {r['mfu']:.1%}, "
          f"{r['peak_mem_gib']:.2f} GiB, step {r['step_s']:.3f} s, loss "
          f"{r['loss_first']:.3f} -> {r['loss_last']:.3f} ({r['wall_s']:.0f} s)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
