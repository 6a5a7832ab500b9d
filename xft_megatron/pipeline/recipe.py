"""The deepseek-coder-1.3b XFT recipe (examples/deepseek_coder_1.3b_xft) as a PipelineSpec, and
what run.sh asks of it: the preflight (every training step through `xft train --dry-run`),
the step list with each step's state and command, and running the steps through run.sh's
launchers (ONE: one process, DIST: every rank), with the pipeline's one completion scheme.

  python -m xft_megatron.pipeline recipe {preflight,plan,run} --hf DIR --data DATA --out OUT
      --configs RECIPE_DIR --only all|xft|sft --world N [--layout STAGE OVERRIDE]...
      [--one 'LAUNCHER...'] [--dist 'LAUNCHER...'] [--commands] [--json]
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from xft_megatron.checkpoint import lock, space
from xft_megatron.config import Config, MoEConfig
from xft_megatron.errors import UsageError, UserError
from xft_megatron.pipeline.completion import DONE, digests, run_step, state
from xft_megatron.pipeline.steps import DIST, Convert, ExportHF, Fold, Step, Train, Upcycle
from xft_megatron.pipeline.xft import (EvalSpec, HFBase, HumanEvalSpec, Names, PipelineSpec,
                                       TrainSpec, build)

# Upcycling (XFT_SPEC.md section 1): 8 experts with expert 0 shared, top-6 counting the
# shared expert, MLP router gate, noisy gating, exact copies; router seed 0.
MOE = MoEConfig(num_experts=8, topk=6, router_gate="mlp")
NAMES = Names(upcycle=("upcycle", "upcycled"), moe=("moe", "moe"),
              merge=("merge_stage", "merge_stage"), fold=("fold", "xft"))
BRANCHES = {"all": ("xft", "sft"), "xft": ("xft",), "sft": ("sft",)}


class RecipeError(UsageError):
    """What run.sh was given does not make a runnable recipe (the base, the held-out data, a
    stage's config); reported as every UserError: `run.sh: error: ...`, exit 2."""


def recipe_spec(hf: str, data: str, out: str, configs: str, only: str = "all",
                layout: Dict[str, Sequence[str]] = None,
                heldout: Optional[str] = None) -> PipelineSpec:
    """The recipe: bf16 conversion, XFT and/or the SFT baseline from the recipe's YAML files
    with the layout's overrides, bf16 HF exports, HumanEval of every model, with `heldout`
    the held-out loss of every model on that file, and a report over all of it."""
    layout = layout or {}

    def stage(name: str) -> TrainSpec:
        return TrainSpec(os.path.join(configs, f"{name}.yaml"),
                         layout=tuple(layout.get(name, ())))

    return PipelineSpec(
        out=out, base=HFBase(hf, dtype="bf16"), moe=MOE,
        common=(f"data.path={data}", f"data.cache_dir={os.path.join(out, 'data_cache')}"),
        sft=stage("sft"), moe_train=stage("moe"), merge=stage("merge"), branches=BRANCHES[only],
        export_dtype="bf16", names=NAMES, report=True,
        evaluation=EvalSpec(heldout=heldout, cache_dir=os.path.join(out, "data_cache"),
                            humaneval=HumanEvalSpec(per_model=True,
                                                    evaluate_base=only == "all")))


def _dest(step: Step) -> str:
    return step.folder + ".partial" if step.partial else step.folder


def plan(steps: List[Step], one: Sequence[str], dist: Sequence[str]) -> List[Dict]:
    """Every step as {name, kind, desc, folder, launcher, argv, state, digest}; argv is empty
    for the steps the runner does itself (launcher None: held-out loss, report)."""
    digest = digests(steps)
    return [{"name": s.name, "kind": s.kind, "desc": s.desc, "folder": s.folder,
             "launcher": s.launcher, "state": state(s, digest[s.name]),
             "argv": [] if s.launcher is None else
             list(dist if s.launcher == DIST else one) + s.argv(_dest(s)),
             "digest": digest[s.name]} for s in steps]


def print_plan(rows: List[Dict], commands: bool) -> None:
    for r in rows:
        print(f"{r['name']:<12} {'done' if r['state'] == DONE else 'todo':<5} {r['desc']} -> "
              f"{r['folder']}")
        if commands:
            print(f"  $ {shlex.join(r['argv'])}" if r["argv"] else "  (in this process)")


def preflight(spec: PipelineSpec, steps: List[Step], world: int,
              check_disk: bool = False) -> None:
    """Every training step through `xft train --dry-run` at `world` ranks, its config built
    as `xft train` builds it. For an input checkpoint not written yet, the config it will
    hold stands in for the stored one: the model section read from the HF config.json (as the
    conversion reads it), the moe section of the upcycling (as `xft upcycle` writes it).
    Then what the steps not done yet will write under the output folder (`disk_plan`);
    with `check_disk`, refused when its disk has less free."""
    import warnings

    warnings.filterwarnings("ignore")
    from xft_megatron.checkpoint import dist as ckpt
    from xft_megatron.config import (Config, ConfigError, PrecisionConfig, load_config,
                                     require_runnable)
    from xft_megatron.errors import HFFormatError
    from xft_megatron.hf.files import model_config_from_hf
    from xft_megatron.training.run import dry_run

    try:
        model, _ = model_config_from_hf(spec.base.path)
    except (HFFormatError, OSError, ValueError) as e:
        raise RecipeError(e) from e
    held = spec.evaluation.heldout
    if held and not held.startswith("hf:") and not all(
            os.path.exists(p) for p in held.split(",")):
        raise RecipeError(f"--heldout {held}: no such file or folder")
    try:
        dense = Config(model=model, precision=PrecisionConfig(dtype=spec.base.dtype))
        upcycled = dense.replace(moe=spec.moe)
    except ConfigError as e:
        raise RecipeError(f"the upcycling settings do not fit {spec.base.path}: {e}") from e
    cfgs = {}
    for step in (s for s in steps if isinstance(s, Train)):
        values = dict(o.split("=", 1) for o in step.overrides)
        stage, load = values["train.stage"], values["checkpoint.load"]
        try:
            ckpt.resolve(load)
            written = True
        except FileNotFoundError:  # not written yet: the config it will hold
            written = False
        planned = (dense if stage == "sft" else upcycled).to_dict()
        read = ckpt.read_config if written else (lambda _path, planned=planned: planned)
        args = [o for o in step.overrides if not o.startswith("data.path=")]
        args += list(step.layout) + ["data.path=dry-run.jsonl"]
        name = os.path.basename(step.config or "")
        try:
            cfg = require_runnable(load_config(step.config, args, read_stored=read))
            text = dry_run(cfg, world)
        except (ConfigError, OSError, ValueError) as e:  # CheckpointError: a damaged input
            raise RecipeError(f"stage {stage} ({name} + layout "
                              f"{' '.join(step.layout)}): {e}") from e
        cfgs[step.name] = cfg
        print(f"--- {stage}: {name}, checkpoint.load "
              f"{'= ' + load if written else 'not written yet (its planned config)'}")
        print(text)
    need, lines = disk_plan(spec, steps, cfgs, dense, upcycled)
    free = space.free_bytes(spec.out)
    print(f"--- disk: the steps not done yet write ~{space.human(need)} under {spec.out} "
          f"(its disk has {space.human(free)} free)")
    print("\n".join(lines))
    if need > free and not check_disk:
        print("notice: that is more than its disk has free; `run.sh` without --plan stops "
              "here")
    elif need > free:
        raise RecipeError(f"the steps not done yet write ~{space.human(need)} under "
                          f"{spec.out} (at the most, during the largest save), but its disk has "
                          f"{space.human(free)} free; free space there, choose another output "
                          "folder, or keep fewer checkpoints (checkpoint.keep, "
                          "checkpoint.save_interval in the stage's YAML)")


def disk_plan(spec: PipelineSpec, steps: List[Step], cfgs: Dict[str, Config],
              dense: Config, upcycled: Config) -> Tuple[int, List[str]]:
    """(bytes, one line per step): the most the steps not done yet hold at once under the
    output folder: what each leaves there, plus the largest extra one training step holds
    during a save (the checkpoint being written next to those it keeps). Training steps from
    their configs (`training/disk.py`); conversions, upcycling, the fold and HF exports as
    their weights in their dtype; evaluations and the report write little and are left out."""
    from xft_megatron.config import PrecisionConfig
    from xft_megatron.training import disk
    from xft_megatron.training.memory import parameter_counts

    def weights(cfg, dtype=None) -> int:
        width = PrecisionConfig(dtype=dtype).width if dtype else cfg.precision.width
        return parameter_counts(cfg.model, cfg.moe)["total"] * width

    digest = digests(steps)
    merge_cfg = next((cfgs[s.name] for s in steps if isinstance(s, Train) and
                      cfgs[s.name].stage == "merge"), upcycled)
    kept, extra, lines = 0, 0, []
    for step in steps:
        if state(step, digest[step.name]) == DONE:
            continue
        if isinstance(step, Train):
            size = disk.run_bytes(cfgs[step.name])
            leaves, during = size["kept"], size["peak"] - size["kept"]
        elif isinstance(step, Convert):
            leaves, during = weights(dense, step.dtype), 0
        elif isinstance(step, Upcycle):
            leaves, during = weights(upcycled), 0
        elif isinstance(step, Fold):
            leaves, during = weights(dense, merge_cfg.precision.dtype) * (2 if step.hf else 1), 0
        elif isinstance(step, ExportHF):  # the SFT model or the fold: dense
            leaves, during = weights(dense, step.dtype), 0
        else:
            continue
        kept, extra = kept + leaves, max(extra, during)
        lines.append(f"  {step.name:<13} ~{space.human(leaves)}"
                     + (f" (~{space.human(leaves + during)} while it saves)"
                        if during else ""))
    return kept + extra, lines


def run(steps: List[Step], one: Sequence[str], dist: Sequence[str], logs: str) -> int:
    """Every step not done, launched as run.sh's launchers launch it, its output shown and
    appended to LOGS/<step>.log; 1 at the first failure (a rerun continues there)."""
    digest = digests(steps)
    os.environ["PYTHONUNBUFFERED"] = "1"  # logs and terminal follow the steps as they run

    def launch(step: Step, dest: str):
        if step.launcher is None:  # held-out loss, report: in this process, over the results
            return step.run(dest)
        log = os.path.join(logs, f"{step.name}.log")
        print(f"   log: {log}", flush=True)
        argv = list(dist if step.launcher == DIST else one) + step.argv(dest)
        with open(log, "a") as f, subprocess.Popen(argv, stdout=subprocess.PIPE,
                                                   stderr=subprocess.STDOUT, text=True) as p:
            for line in p.stdout:
                sys.stdout.write(line)
                f.write(line)
        if p.returncode:
            raise StepFailed(f"run.sh: step '{step.name}' failed (log: {log}); rerun the "
                             "same command to continue from here")

    for step in steps:
        try:
            run_step(step, digest[step.name], launch, say=lambda m: print(m, flush=True))
        except StepFailed as e:
            print(e, file=sys.stderr)
            return 1
        except RuntimeError as e:  # ended, but the folder is not complete
            print(f"run.sh: {e} (log: {os.path.join(logs, step.name + '.log')})",
                  file=sys.stderr)
            return 1
    return 0


class StepFailed(Exception):
    pass


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["preflight", "plan", "run"])
    p.add_argument("--hf", required=True, help="the HF base model directory")
    p.add_argument("--data", required=True, help="the instruction data (data.path)")
    p.add_argument("--out", required=True, help="where every step writes its folder")
    p.add_argument("--configs", required=True, help="folder of sft.yaml, moe.yaml, merge.yaml")
    p.add_argument("--only", choices=sorted(BRANCHES), default="all")
    p.add_argument("--world", type=int, default=1, help="ranks of the training steps")
    p.add_argument("--heldout", default=None,
                   help="held-out instruction data: every model's loss on it (eval step)")
    p.add_argument("--layout", nargs=2, action="append", default=[],
                   metavar=("STAGE", "OVERRIDE"), help="a layout override of sft|moe|merge")
    p.add_argument("--one", default="python -m xft_megatron.cli",
                   help="launcher of one-process steps (shell words)")
    p.add_argument("--dist", default="torchrun -m xft_megatron.cli",
                   help="launcher of training steps (shell words)")
    p.add_argument("--check-disk", action="store_true",
                   help="preflight: stop when the steps not done yet would not fit on the "
                   "output folder's disk")
    p.add_argument("--commands", action="store_true", help="plan: also print each command")
    p.add_argument("--json", action="store_true", help="plan: the steps as JSON")


def main(args: argparse.Namespace) -> int:
    layout: Dict[str, List[str]] = {}
    for stage, override in args.layout:
        layout.setdefault(stage, []).append(override)
    spec = recipe_spec(args.hf, args.data, args.out, args.configs, args.only, layout,
                       args.heldout)
    steps = build(spec)
    one, dist = shlex.split(args.one), shlex.split(args.dist)
    try:
        if args.action == "preflight":
            preflight(spec, steps, args.world, check_disk=args.check_disk)
        elif args.action == "plan":
            rows = plan(steps, one, dist)
            if args.json:
                print(json.dumps(rows, indent=1))
            else:
                print_plan(rows, args.commands)
        else:
            with lock.hold(args.out, command="run.sh run"):  # one recipe writes --out at a time
                return run(steps, one, dist, os.path.join(args.out, "logs"))
    except UserError as e:  # a recipe that cannot run, a held --out, a bad input file, ...
        print(f"run.sh: error: {e}", file=sys.stderr)
        return e.exit_code
    return 0
