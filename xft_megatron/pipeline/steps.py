"""The kinds of pipeline step, one small dataclass each: its inputs, its output folder and its
settings are fields. Every step can run in this process (`run(dest)`, what the quickstart
does); the ones that are an `xft` command also give that command's argv (`argv()`, what the
recipe launches, `launcher` saying whether one process or torchrun runs it).

`folder` is where the step's result lives; a step with `partial` writes into FOLDER.partial
and is renamed when it finishes (a one-process tool never leaves a half-written folder that
looks complete). `complete(folder)` says whether a folder holds the finished result; the
completion scheme around it (settings digest, reuse, resume) is in completion.py.
"""

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from xft_megatron.config import MoEConfig, load_yaml
from xft_megatron.errors import Terminated

ONE, DIST = "ONE", "DIST"  # one process | every rank (torchrun, srun + torchrun)
MARKER = "DONE.json"  # a step folder's marker (completion.py writes it)
READS = ("checkpoint.load", "data.path", "data.tokenizer")  # the overrides naming inputs


def _is_file(*path: str) -> bool:
    return os.path.isfile(os.path.join(*path))


def read_marker(folder: str) -> Optional[Dict[str, Any]]:
    """The marker of a step folder (its settings digest, and once finished its result); None
    when there is none or it cannot be read."""
    try:
        with open(os.path.join(folder, MARKER)) as f:
            record = json.load(f)
        return record if isinstance(record, dict) else None
    except (OSError, ValueError):
        return None


def training_finished(root: str) -> bool:
    """Whether the newest checkpoint under `root` is at its run's final step."""
    try:
        with open(os.path.join(root, "latest")) as f:
            ckpt = os.path.join(root, f.read().strip())
        with open(os.path.join(ckpt, "xft_config.yaml")) as f:
            steps = load_yaml(f.read(), "xft_config.yaml")["train"]["train_steps"]
        with open(os.path.join(ckpt, "train_state.json")) as f:
            step = json.load(f)["step"]
    except (OSError, KeyError, TypeError, ValueError):  # ConfigError is a ValueError
        return False
    return step >= steps


@dataclass(frozen=True)
class Step:
    """What every kind has: a name, a description, the folder it writes."""

    name: str
    desc: str
    folder: str

    kind = "step"
    partial = False  # writes FOLDER.partial, renamed when finished
    resumable = False  # an unfinished folder is continued, not removed
    launcher = ONE  # None: runs only in this process (no `xft` command)

    def inputs(self) -> Tuple[str, ...]:
        """Paths (folders, files) this step reads; the steps writing them come first."""
        return ()

    def sources(self) -> Tuple[str, ...]:
        """Files and folders this step reads from outside the pipeline: their content is part
        of the step's digest, so a file replaced or edited at the same path reruns the step
        (completion.digests)."""
        return ()

    def complete(self, folder: str) -> Optional[bool]:
        """Whether `folder` holds this step's finished result (None: only the marker says)."""
        return _is_file(folder, "latest")

    def argv(self, dest: str) -> List[str]:
        """The `xft` command writing into `dest`."""
        raise NotImplementedError(f"step {self.name} ({self.kind}) has no `xft` command")

    def run(self, dest: str) -> Any:
        """Run in this process, writing into `dest`; returns a JSON-serializable result."""
        raise NotImplementedError

    def settings(self) -> Dict[str, Any]:
        """What the settings digest covers: every field but the description."""
        return {"kind": self.kind, **{k: v for k, v in asdict(self).items() if k != "desc"}}


@dataclass(frozen=True)
class Convert(Step):
    """HF directory -> Megatron checkpoint."""

    hf: str = ""
    dtype: str = "fp32"
    kind = "convert"
    partial = True

    def sources(self):  # a local model folder (a Hub id is pinned by its own revision)
        return (self.hf,) if os.path.isdir(self.hf) else ()

    def argv(self, dest):
        return ["convert", "hf-to-mcore", "--hf", self.hf, "--out", dest, "--dtype", self.dtype]

    def run(self, dest):
        from xft_megatron.hf.convert import hf_to_mcore

        hf_to_mcore(self.hf, dest, dtype=self.dtype)
        return {"checkpoint": self.folder}


@dataclass(frozen=True)
class Train(Step):
    """`xft train [CONFIG] OVERRIDES --resume` (pretrain, sft, moe or merge stage): done when
    the newest checkpoint is at the final step; an unfinished one resumes."""

    config: Optional[str] = None  # a recipe YAML
    overrides: Tuple[str, ...] = ()  # key=value, checkpoint.save = folder among them
    layout: Tuple[str, ...] = ()  # parallel.*, micro-batch: how it runs, not what it computes
    kind = "train"
    resumable = True
    launcher = DIST

    def inputs(self):
        return tuple(o.split("=", 1)[1] for o in self.overrides
                     if o.split("=", 1)[0] in READS)

    def sources(self):  # local data files and tokenizers (the pipeline's own are skipped)
        return tuple(path for path in self.inputs() if os.path.exists(path))

    def complete(self, folder):
        return training_finished(folder)

    def settings(self):  # a run resumes under another layout (same results, P5)
        return {k: v for k, v in super().settings().items() if k != "layout"}

    def argv(self, dest):
        return ["train"] + ([self.config] if self.config else []) + list(self.overrides) + \
            list(self.layout) + ["--resume"]

    def run(self, dest):
        from xft_megatron.training import run

        result = run.main(self.config, list(self.overrides + self.layout), resume=True)
        _release_device_memory()
        if result.stopped_early:  # SIGTERM: checkpointed; the pipeline stops, said as such
            raise Terminated(f"stage {self.name} stopped at step {result.steps_done} "
                             f"(checkpoint {result.checkpoint})")
        return {"losses": result.losses, "checkpoint": result.checkpoint,
                "tokens_per_s": result.tokens_per_s,
                "merge_coefficients": result.merge_coefficients}


@dataclass(frozen=True)
class Upcycle(Step):
    """Dense checkpoint -> MoE checkpoint (`moe.mode`: xft or an ablation), optionally with
    Drop-Upcycling (`drop_ratio` > 0)."""

    ckpt: str = ""
    moe: MoEConfig = field(default_factory=MoEConfig)
    seed: int = 0  # router initialization (and the Drop-Upcycling draws)
    drop_ratio: float = 0.0  # fraction of each routed expert's FFN neurons re-initialized
    kind = "upcycle"
    partial = True

    def inputs(self):
        return (self.ckpt,)

    def settings(self):  # ratio 0 leaves the digest of exact-copy runs as it was
        return {k: v for k, v in super().settings().items()
                if k != "drop_ratio" or self.drop_ratio != 0}

    def argv(self, dest):
        m = self.moe
        return ["upcycle", "--ckpt", self.ckpt, "--out", dest, "--num-experts",
                str(m.num_experts), "--topk", str(m.topk), "--mode", m.mode, "--router-gate",
                m.router_gate, "--layers", str(m.layer_freq), "--seed", str(self.seed)] + \
            ([] if m.router_noise else ["--no-router-noise"]) + \
            ([] if m.router_init_std == MoEConfig.router_init_std else
             ["--router-init-std", str(m.router_init_std)]) + \
            (["--drop-ratio", str(self.drop_ratio)] if self.drop_ratio else [])

    def run(self, dest):
        from xft_megatron.xft.checkpoints import upcycle_checkpoint

        return upcycle_checkpoint(self.ckpt, dest, self.moe, seed=self.seed,
                                  drop_ratio=self.drop_ratio)


@dataclass(frozen=True)
class Fold(Step):
    """MoE checkpoint -> dense checkpoint (`xft merge`), optionally also an HF directory
    (`hf`: a sub-folder name)."""

    ckpt: str = ""
    coefficients: str = "learned"
    shared_weight: float = 0.75
    hf: Optional[str] = None
    kind = "fold"
    partial = True

    def inputs(self):
        return (self.ckpt,)

    def argv(self, dest):
        return ["merge", "--ckpt", self.ckpt, "--out", dest, "--coefficients",
                self.coefficients, "--shared-weight", str(self.shared_weight)] + \
            (["--hf-out", os.path.join(dest, self.hf)] if self.hf else [])

    def run(self, dest):
        from xft_megatron.runtime.parallel import say
        from xft_megatron.xft.checkpoints import merge_checkpoint

        return merge_checkpoint(self.ckpt, dest, self.coefficients, self.shared_weight,
                                hf_out=os.path.join(dest, self.hf) if self.hf else None,
                                report=say)


@dataclass(frozen=True)
class ExportHF(Step):
    """Megatron checkpoint -> HF directory."""

    ckpt: str = ""
    dtype: Optional[str] = None  # None: the checkpoint's own precision
    kind = "export_hf"
    partial = True

    def inputs(self):
        return (self.ckpt,)

    def complete(self, folder):
        return _is_file(folder, "config.json")

    def argv(self, dest):
        return ["convert", "mcore-to-hf", "--ckpt", self.ckpt, "--out", dest] + \
            (["--dtype", self.dtype] if self.dtype else [])

    def run(self, dest):
        from xft_megatron.hf.convert import mcore_to_hf

        mcore_to_hf(self.ckpt, dest, dtype=self.dtype)
        return {"hf": self.folder}


@dataclass(frozen=True)
class HumanEval(Step):
    """HumanEval of one model (HF directory or Megatron checkpoint) into FOLDER/humaneval.json."""

    model: str = ""
    prompt: str = "magicoder"  # raw | magicoder | chat
    n: int = 1  # samples per task (1 = greedy pass@1)
    limit: Optional[int] = None  # the first problems only
    max_new_tokens: int = 512
    workers: int = 8
    kind = "humaneval"

    def inputs(self):
        return (self.model,)

    def complete(self, folder):
        return _is_file(folder, "humaneval.json")

    def argv(self, dest):
        return ["eval", "humaneval", "--model", self.model, "--out", dest, "--n", str(self.n),
                "--workers", str(self.workers), "--prompt", self.prompt, "--max-new-tokens",
                str(self.max_new_tokens)] + (["--limit", str(self.limit)] if self.limit else [])

    def run(self, dest):  # what `xft eval humaneval` with argv(dest) does
        from xft_megatron.eval.humaneval import run_humaneval
        from xft_megatron.runtime.parallel import say

        result, _ = run_humaneval(self.model, dest, n=self.n, limit=self.limit or None,
                                  max_new_tokens=self.max_new_tokens, workers=self.workers,
                                  prompt=self.prompt, report=say)
        return result["pass@1"]


@dataclass(frozen=True)
class EvalLoss(Step):
    """Held-out loss of several models on one data file (this process only)."""

    models: Tuple[Tuple[str, str], ...] = ()  # (label, checkpoint)
    data: str = ""
    cache_dir: str = ""
    tokenizer: Optional[str] = None
    seq_length: Optional[int] = None
    kind = "eval_loss"
    launcher = None

    def inputs(self):
        return tuple(path for _, path in self.models) + (self.data,)

    def complete(self, folder):
        return None

    def run(self, dest):
        from xft_megatron.eval.loss import evaluate_loss

        return {label: evaluate_loss(path, self.data, self.cache_dir, tokenizer=self.tokenizer,
                                     on_error="skip", seq_length=self.seq_length)
                for label, path in self.models}


@dataclass(frozen=True)
class HumanEvalTable(Step):
    """HumanEval pass@1 (greedy, magicoder protocol) of several models, each exported to HF
    first (an MoE with its own modeling file), in this process."""

    models: Tuple[Tuple[str, str], ...] = ()  # (label, checkpoint)
    limit: int = 164
    max_new_tokens: int = 512
    kind = "humaneval_table"
    launcher = None

    def inputs(self):
        return tuple(path for _, path in self.models)

    def complete(self, folder):
        return None

    def run(self, dest):
        from xft_megatron.eval.humaneval import evaluate_humaneval
        from xft_megatron.hf.convert import mcore_to_hf
        from xft_megatron.runtime.parallel import say

        scores = {}
        for i, (label, path) in enumerate(self.models):
            hf_dir = os.path.join(dest, f"model{i}")
            if not _is_file(hf_dir, "config.json"):
                mcore_to_hf(path, hf_dir)
            report = evaluate_humaneval(hf_dir, os.path.join(dest, f"model{i}.json"),
                                        limit=self.limit, protocol="magicoder", batch_size=64,
                                        max_new_tokens=self.max_new_tokens)
            scores[label] = report["pass@1"]
            say(f"humaneval: {label} pass@1 {scores[label]:.4f}")
        return scores


@dataclass(frozen=True)
class Report(Step):
    """FOLDER/report.md and results.json over what the other steps wrote (this process): per
    model its held-out loss (the EvalLoss step's result) and HumanEval pass@1 (each HumanEval
    step's humaneval.json), per training stage its steps, final loss, throughput and time
    (summary.json); the MoE stage's routing figures and verdict (`report.routing_section`);
    plots of the tuning losses, the MoE's per-layer expert load, routing diagnostics and
    expert divergence, and the learned merge coefficients."""

    title: str = "XFT report"
    heldout: Optional[str] = None  # the EvalLoss step's folder
    scores: Tuple[Tuple[str, str], ...] = ()  # (model label, HumanEval step folder)
    stages: Tuple[Tuple[str, str], ...] = ()  # (label, training step folder)
    moe_stage: Optional[str] = None  # its expert load is plotted
    merge_stage: Optional[str] = None  # its learned coefficients are plotted
    kind = "report"
    launcher = None

    def inputs(self):
        return tuple(f for f in (self.heldout, *(f for _, f in self.scores),
                                 *(f for _, f in self.stages)) if f)

    def complete(self, folder):
        return _is_file(folder, "report.md")

    def run(self, dest):
        from xft_megatron.pipeline import report

        os.makedirs(dest, exist_ok=True)
        models: Dict[str, Dict[str, float]] = {}
        held = (read_marker(self.heldout) or {}).get("result") if self.heldout else None
        for label, r in (held or {}).items():
            models.setdefault(label, {}).update(loss=r["loss"], perplexity=r["perplexity"])
        for label, folder in self.scores:
            with open(os.path.join(folder, "humaneval.json")) as f:
                models.setdefault(label, {})["humaneval_pass@1"] = json.load(f)["pass@1"]
        stages = {}
        for label, folder in self.stages:
            path = os.path.join(folder, "summary.json")
            if os.path.isfile(path):
                with open(path) as f:
                    stages[label] = json.load(f)
        curves = {label: report.read_metrics(folder) for label, folder in self.stages}
        merge = next((stages.get(lb) for lb, f in self.stages if f == self.merge_stage), None)
        routing, images = report.figures(
            dest, {"tuning_loss": curves},
            {label: folder for label, folder in self.stages if folder == self.moe_stage}
            if self.moe_stage else {}, (merge or {}).get("merge_coefficients"))
        sections = [("Scores (held-out instruction loss; HumanEval pass@1, greedy):\n\n" +
                     report.results_table(models)) if models else "No model scores yet.",
                    "Training stages:\n\n" + report.stages_table(stages),
                    *([routing] if routing else []), *images]
        report.write_markdown(os.path.join(dest, "report.md"), self.title, sections)
        result = {"models": models, "stages": {k: {f: s.get(f) for f in (
            "steps_done", "final_loss", "tokens_per_s", "seconds")} for k, s in stages.items()}}
        with open(os.path.join(dest, "results.json"), "w") as f:
            json.dump(result, f, indent=1)
        return result


@dataclass(frozen=True)
class Function(Step):
    """A Python function of this process writing into the folder (e.g. the quickstart's data
    mining); `params` are what its result depends on."""

    fn: Optional[Callable[[str], Any]] = field(default=None, compare=False)
    params: Tuple[Tuple[str, Any], ...] = ()
    read: Tuple[str, ...] = ()  # what sources() gives
    kind = "function"
    launcher = None

    def sources(self):
        return self.read

    def complete(self, folder):
        return None

    def run(self, dest):
        return self.fn(dest)

    def settings(self):
        return {"kind": self.kind, "name": self.name, "folder": self.folder,
                "params": dict(self.params)}


def _release_device_memory() -> None:
    """Hand the finished stage's cached GPU memory back, so that runs sharing a GPU see it
    (the stages of one quickstart run in one process)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
