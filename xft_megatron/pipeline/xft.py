"""The XFT stage list, built from one `PipelineSpec`: the base (an HF model converted, or
pretrained), the dense SFT baseline, and XFT: upcycle -> MoE instruction tuning -> learnable
merge (only the merge coefficients train) -> fold into a dense model; the upcycling
ablations tuned like XFT; HF exports, held-out loss and HumanEval. The quickstart and the
deepseek-coder recipe are two specs of this one definition (quickstart.py, recipe.py).
"""

import os
from dataclasses import dataclass, field, replace
from typing import List, Optional, Tuple, Union

from xft_megatron.config import MoEConfig
from xft_megatron.pipeline.steps import (Convert, EvalLoss, ExportHF, Fold, HumanEval,
                                         HumanEvalTable, Report, Step, Train, Upcycle)

Role = Tuple[str, str]  # (step name, folder relative to the output directory)
FINAL_WEIGHTS_ONLY = "checkpoint.final_optimizer=false"


@dataclass(frozen=True)
class TrainSpec:
    """One training stage: a YAML file and/or its own key=value overrides (after the
    pipeline's common ones; the pipeline adds train.stage and the checkpoint paths), and the
    layout's (parallel.*, train.micro_batch_size: not part of the settings digest, so a
    stopped run resumes under another layout)."""

    config: Optional[str] = None
    overrides: Tuple[str, ...] = ()
    layout: Tuple[str, ...] = ()


@dataclass(frozen=True)
class HFBase:
    """Start from a Hugging Face model directory (converted to a Megatron checkpoint)."""

    path: str
    dtype: str = "fp32"


@dataclass(frozen=True)
class PretrainBase:
    """Pretrain the base in the pipeline."""

    train: TrainSpec
    desc: str = "pretrain the base model"


@dataclass(frozen=True)
class HumanEvalSpec:
    """HumanEval pass@1 (greedy). `per_model`: one `xft eval humaneval` step per HF export
    (and the HF base, raw completion); otherwise one table step over every model."""

    limit: Optional[int] = None  # the first problems only (None: all 164)
    max_new_tokens: int = 512
    per_model: bool = False
    evaluate_base: bool = True
    workers: int = 8


@dataclass(frozen=True)
class EvalSpec:
    heldout: Optional[str] = None  # held-out loss of every model on this file
    cache_dir: str = ""
    tokenizer: Optional[str] = None
    seq_length: Optional[int] = None
    humaneval: Optional[HumanEvalSpec] = None


@dataclass(frozen=True)
class Names:
    """Step name and folder of every role (two layouts exist: the quickstart's, the recipe's)."""

    base: Role = ("base", "base")
    sft: Role = ("sft", "sft")
    upcycle: Role = ("upcycle", "upcycle")
    moe: Role = ("xft_moe", "xft_moe")
    merge: Role = ("merge", "merge")
    fold: Role = ("fold", "xft_merged")
    xft_hf: Role = ("xft_hf", "xft_hf")
    sft_hf: Role = ("sft_hf", "sft_hf")
    eval_base: Role = ("eval_base", "eval/base")
    eval_xft: Role = ("eval_xft", "eval/xft")
    eval_sft: Role = ("eval_sft", "eval/sft")
    eval: Role = ("eval", "eval")
    humaneval: Role = ("humaneval", "humaneval")
    report: Role = ("report", "report")


@dataclass(frozen=True)
class PipelineSpec:
    out: str
    base: Union[HFBase, PretrainBase]
    moe: MoEConfig = field(default_factory=lambda: MoEConfig(num_experts=8, topk=6))
    common: Tuple[str, ...] = ()  # overrides of every training stage
    sft: TrainSpec = TrainSpec()  # the dense baseline
    moe_train: TrainSpec = TrainSpec()  # the MoE (XFT and the ablations)
    merge: TrainSpec = TrainSpec()  # the learnable merge
    router_seed: int = 0
    drop_ratio: float = 0.0  # Drop-Upcycling at every upcycling (XFT and the ablations)
    shared_weight: float = 0.75  # lambda of the merge and the fold
    ablations: Tuple[str, ...] = ()  # upcycling modes tuned like XFT: vanilla, none
    branches: Tuple[str, ...] = ("sft", "xft")  # which branches, in this order
    fold_hf: Optional[str] = None  # the fold also writes an HF directory FOLDER/<fold_hf>
    export_dtype: Optional[str] = None  # HF exports of the SFT and XFT models in this dtype
    report: bool = False  # a last step writes report.md over every result (steps.Report)
    evaluation: EvalSpec = EvalSpec()
    names: Names = Names()

    def __post_init__(self):
        unknown = set(self.branches) - {"sft", "xft"}
        if unknown or not self.branches:
            raise ValueError(f"branches must be among sft, xft, got {self.branches}")
        if not 0.0 <= self.drop_ratio < 1.0:  # refused before any step runs
            raise ValueError(f"drop_ratio must be in [0, 1), got {self.drop_ratio}")

    def path(self, role: Role) -> str:
        return os.path.join(self.out, role[1])


def build(spec: PipelineSpec) -> List[Step]:
    """The ordered steps of the XFT pipeline described by `spec`."""
    n, p = spec.names, spec.path
    he = spec.evaluation.humaneval
    export = spec.export_dtype is not None
    base = p(n.base)

    def train(role: Role, stage: str, load: str, t: TrainSpec, desc: str, extra=()) -> Train:
        # a finished stage is read for its weights only (the next stage, the fold, the
        # evaluation): its final checkpoint goes without the optimizer state (a quarter of the
        # size in bf16); the pipeline's or a stage's overrides may ask for it back
        overrides = (FINAL_WEIGHTS_ONLY,) + spec.common + t.overrides + tuple(extra) + (
            f"train.stage={stage}", f"checkpoint.load={load}", f"checkpoint.save={p(role)}")
        return Train(role[0], desc, p(role), config=t.config, overrides=overrides,
                     layout=t.layout)

    def humaneval(role: Role, model: str, label: str, prompt: str) -> HumanEval:
        return HumanEval(role[0], f"HumanEval of {label} (greedy pass@1, {prompt} prompt)",
                         p(role), model=model, prompt=prompt, limit=he.limit,
                         max_new_tokens=he.max_new_tokens, workers=he.workers)

    scores: List[Role] = []  # (model label, HumanEval step folder), for the report
    if isinstance(spec.base, HFBase):
        steps: List[Step] = [Convert(n.base[0], f"convert the HF model {spec.base.path} -> "
                                     f"Megatron ({spec.base.dtype})", base, hf=spec.base.path,
                                     dtype=spec.base.dtype)]
        if he and he.per_model and he.evaluate_base:
            steps.append(humaneval(n.eval_base, spec.base.path, "the base model", "raw"))
            scores.append(("base", p(n.eval_base)))
    else:
        t = spec.base.train
        steps = [Train(n.base[0], spec.base.desc, base, config=t.config,
                       overrides=(FINAL_WEIGHTS_ONLY,) + spec.common + t.overrides +
                       (f"checkpoint.save={base}",),
                       layout=t.layout)]
    models = [("base", base)]
    stages: List[Role] = []  # (label, training step folder), for the report
    m = spec.moe
    drop = f", Drop-Upcycling r={spec.drop_ratio:g}" if spec.drop_ratio else ""
    for branch in spec.branches:
        if branch == "sft":
            steps.append(train(n.sft, "sft", base, spec.sft,
                               "SFT baseline: instruction-tune the dense model"))
            models.append(("sft (dense)", p(n.sft)))
            stages.append(("sft (dense)", p(n.sft)))
            if export:
                steps.append(ExportHF(n.sft_hf[0], f"export the SFT baseline to HF "
                                      f"({spec.export_dtype})", p(n.sft_hf), ckpt=p(n.sft),
                                      dtype=spec.export_dtype))
                if he and he.per_model:
                    steps.append(humaneval(n.eval_sft, p(n.sft_hf), "the SFT baseline",
                                           "magicoder"))
                    scores.append(("sft (dense)", p(n.eval_sft)))
            continue
        steps.append(Upcycle(n.upcycle[0], f"dense -> XFT MoE ({m.num_experts} experts, "
                             f"top-{m.topk}{drop})", p(n.upcycle), ckpt=base, moe=m,
                             seed=spec.router_seed, drop_ratio=spec.drop_ratio))
        steps.append(train(n.moe, "moe", p(n.upcycle), spec.moe_train,
                           "instruction-tune the MoE"))
        steps.append(train(n.merge, "merge", p(n.moe), spec.merge,
                           "learn the merge coefficients (only alpha trains)",
                           (f"moe.merge_shared_weight={spec.shared_weight}",)))
        steps.append(Fold(n.fold[0], "fold the experts into a dense model (learned "
                          "coefficients)", p(n.fold), ckpt=p(n.merge), coefficients="learned",
                          shared_weight=spec.shared_weight, hf=spec.fold_hf))
        models += [("xft moe", p(n.moe)), ("xft merged (dense)", p(n.fold))]
        stages += [("xft moe", p(n.moe)), ("xft merge (coefficients)", p(n.merge))]
        if export:
            steps.append(ExportHF(n.xft_hf[0], f"export the XFT model to HF "
                                  f"({spec.export_dtype})", p(n.xft_hf), ckpt=p(n.fold),
                                  dtype=spec.export_dtype))
            if he and he.per_model:
                steps.append(humaneval(n.eval_xft, p(n.xft_hf), "the XFT model", "magicoder"))
                scores.append(("xft merged (dense)", p(n.eval_xft)))
    for mode in spec.ablations:
        upcycled = (f"upcycle_{mode}", f"upcycle_{mode}")
        tuned = (f"{mode}_moe", f"{mode}_moe")
        ablation = replace(m, mode=mode)
        steps.append(Upcycle(upcycled[0], f"dense -> {mode} MoE (ablation, {m.num_experts} "
                             f"experts, top-{m.topk}{drop})", p(upcycled), ckpt=base,
                             moe=ablation, seed=spec.router_seed, drop_ratio=spec.drop_ratio))
        steps.append(train(tuned, "moe", p(upcycled), spec.moe_train,
                           f"instruction-tune the {mode} MoE (ablation)"))
        models.append((f"{mode} moe (ablation)", p(tuned)))
        stages.append((f"{mode} moe (ablation)", p(tuned)))
    e = spec.evaluation
    if e.heldout:
        steps.append(EvalLoss(n.eval[0], "held-out instruction loss", p(n.eval),
                              models=tuple(models), data=e.heldout, cache_dir=e.cache_dir,
                              tokenizer=e.tokenizer, seq_length=e.seq_length))
    if he and not he.per_model:
        steps.append(HumanEvalTable(n.humaneval[0], f"pass@1 on {he.limit} problems "
                                    "(magicoder)", p(n.humaneval), models=tuple(models),
                                    limit=he.limit, max_new_tokens=he.max_new_tokens))
    if spec.report:
        xft = "xft" in spec.branches
        steps.append(Report(n.report[0], "report: every model's scores and every training "
                            "stage", p(n.report), heldout=p(n.eval) if e.heldout else None,
                            scores=tuple(scores), stages=tuple(stages),
                            moe_stage=p(n.moe) if xft else None,
                            merge_stage=p(n.merge) if xft else None))
    return steps


def models(steps: List[Step]) -> Tuple[Tuple[str, str], ...]:
    """The (label, checkpoint) pairs the evaluation step of `steps` scores."""
    for s in steps:
        if isinstance(s, (EvalLoss, HumanEvalTable)):
            return s.models
    return ()
