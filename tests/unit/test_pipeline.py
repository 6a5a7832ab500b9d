"""The one XFT pipeline (xft_megatron/pipeline): the quickstart and the deepseek-coder recipe
get their steps from the same definition; each step's `xft` command says what its in-process
run does; the one skip-if-done scheme (settings digest, reuse, resume, partial folders).
No training runs here: steps are executed by stand-ins that write what the real ones write."""

import json
import os
import shlex
import sys

import pytest
import yaml

from tests.e2e.test_recipes import HF_CONFIG, RECIPE
from xft_megatron.pipeline import completion as c
from xft_megatron.pipeline.steps import (Convert, ExportHF, Fold, Function, HumanEval, Train,
                                         Upcycle)
from xft_megatron.pipeline.xft import build


@pytest.fixture
def hf(tmp_path):
    path = tmp_path / "hf"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(HF_CONFIG))
    return str(path)


def _quickstart(out, hf, overrides=(), **settings):
    from xft_megatron.pipeline import quickstart

    settings.setdefault("ablations", quickstart.ABLATIONS)  # every kind of step
    s = quickstart.Settings(base=hf, **settings)
    return build(quickstart.pipeline_spec(out, s, overrides))


def _recipe(out, hf, only="all"):
    from xft_megatron.pipeline.recipe import recipe_spec

    return build(recipe_spec(hf, "data.jsonl", out, RECIPE, only,
                             {"moe": ["parallel.expert=8"]}))


def _xft_chain(steps):
    """(kind, train stage, the kinds of what it reads) of every step of the XFT chain."""
    by_folder = {s.folder: s for s in steps}
    chain = []
    for s in steps:
        ablation = any(mode in s.name for mode in ("vanilla", "none"))
        if isinstance(s, (Convert, Upcycle, Fold, Train)) and not ablation:
            stage = dict(o.split("=", 1) for o in getattr(s, "overrides", ())).get("train.stage")
            chain.append((s.kind, stage, tuple(by_folder[p].kind for p in s.inputs()
                                               if p in by_folder)))
    return chain


def test_quickstart_and_recipe_build_the_same_xft_chain(tmp_path, hf):
    qs = _quickstart(str(tmp_path / "qs"), hf)
    rc = _recipe(str(tmp_path / "rc"), hf)
    want = [("convert", None, ()), ("train", "sft", ("convert",)), ("upcycle", None, ("convert",)),
            ("train", "moe", ("upcycle",)), ("train", "merge", ("train",)),
            ("fold", None, ("train",))]
    assert sorted(_xft_chain(qs)) == sorted(_xft_chain(rc)) == sorted(want)
    assert [s.name for s in qs] == ["base", "sft", "upcycle", "xft_moe", "merge", "fold",
                                    "upcycle_vanilla", "vanilla_moe", "upcycle_none", "none_moe",
                                    "eval"]
    assert [s.name for s in rc] == ["base", "eval_base", "upcycle", "moe", "merge_stage", "fold",
                                    "xft_hf", "eval_xft", "sft", "sft_hf", "eval_sft", "report"]
    (qs_up,), (rc_up,) = ([s for s in x if s.name == "upcycle"] for x in (qs, rc))
    assert qs_up.moe == rc_up.moe  # MoEConfig, the same settings
    assert [s.name for s in _recipe(str(tmp_path / "rc"), hf, "xft")] == \
        ["base", "upcycle", "moe", "merge_stage", "fold", "xft_hf", "eval_xft", "report"]
    # with held-out data: every model's loss, then the report over the scores
    from xft_megatron.pipeline.recipe import recipe_spec

    held = build(recipe_spec(hf, "data.jsonl", str(tmp_path / "rh"), RECIPE,
                             heldout="held.jsonl"))
    assert [s.name for s in held][-2:] == ["eval", "report"]
    assert [label for label, _ in held[-2].models] == ["base", "xft moe", "xft merged (dense)",
                                                       "sft (dense)"]
    assert held[-1].heldout == held[-2].folder and held[-1].launcher is None


def test_recipe_plan_is_the_pipeline(tmp_path, hf, capsys):
    """What run.sh launches (`python -m xft_megatron.pipeline recipe plan`) is the built
    pipeline's steps with run.sh's launchers in front."""
    from xft_megatron.pipeline.__main__ import main

    out = str(tmp_path / "rc")
    assert main(["recipe", "plan", "--json", "--hf", hf, "--data", "data.jsonl", "--out", out,
                 "--configs", RECIPE, "--layout", "moe", "parallel.expert=8",
                 "--one", "python -m xft_megatron.cli", "--dist",
                 "torchrun --nproc-per-node 8 -m xft_megatron.cli"]) == 0
    rows = json.loads(capsys.readouterr().out)
    steps = _recipe(out, hf)
    digest = c.digests(steps)
    assert [r["name"] for r in rows] == [s.name for s in steps]
    for r, s in zip(rows, steps):
        assert (r["folder"], r["digest"]) == (s.folder, digest[s.name])
        if s.launcher is None:  # the runner's own: the report
            assert r["argv"] == [] and s.kind == "report"
            continue
        launcher = ["torchrun", "--nproc-per-node", "8"] if isinstance(s, Train) else ["python"]
        dest = s.folder + ".partial" if s.partial else s.folder
        assert r["argv"] == launcher + ["-m", "xft_megatron.cli"] + s.argv(dest)
        assert r["state"] == (c.RESUME if isinstance(s, Train) else c.TODO)  # nothing written


def test_quickstart_command_parses_back_to_its_settings(tmp_path, hf):
    """`xft quickstart`'s flags are the Settings fields (quickstart.add_arguments): the command
    line Settings.command() writes parses back to the same Settings, every field changed."""
    from dataclasses import fields

    from xft_megatron.cli import build_parser
    from xft_megatron.pipeline import quickstart

    changed = dict(steps=7, sft_steps=5, ablations=("none",), sources=("site-packages", "a b"),
                   max_files=9, vocab=1000, preset="qwen2-0.5b", seq_length=64, seed=3,
                   router_seed=4, drop_ratio=0.25, pretrain_lr=2e-3, tune_lr=5e-4, base=hf,
                   experts=4, topk=2, moe_every=2, merge_steps=11, humaneval=3,
                   humaneval_tokens=32)
    assert set(changed) == {f.name for f in fields(quickstart.Settings)}
    parser = build_parser()
    for s in (quickstart.Settings(**changed), quickstart.Settings(ablations=()),
              quickstart.Settings()):
        argv = shlex.split(s.command("OUT", ["train.lr=1"]))
        assert argv[:2] == ["xft", "quickstart"]
        args = parser.parse_args(argv[1:])
        assert (args.out, args.overrides) == ("OUT", ["train.lr=1"])
        assert quickstart.settings_from_args(args) == s
    assert all(getattr(quickstart.Settings(**changed), k) != f.default
               for k, f in quickstart.Settings.__dataclass_fields__.items())


def test_recipe_errors_are_user_errors_reported_with_their_exit_code(tmp_path, hf, capsys,
                                                                    monkeypatch):
    """The one error policy (errors.py) covers the recipe: a RecipeError is a UsageError, and
    the runner reports any UserError as `run.sh: error: ...` with its exit code."""
    from xft_megatron.errors import UsageError, UserError
    from xft_megatron.pipeline import recipe
    from xft_megatron.pipeline.__main__ import main
    from xft_megatron.training.loop import NonFiniteLoss

    assert issubclass(recipe.RecipeError, UsageError) and issubclass(recipe.RecipeError,
                                                                     ValueError)
    argv = ["recipe", "preflight", "--hf", str(tmp_path / "missing"), "--data", "d.jsonl",
            "--out", str(tmp_path / "rc"), "--configs", RECIPE]
    assert main(argv) == 2  # the base cannot be read: a RecipeError
    assert capsys.readouterr().err.startswith("run.sh: error: ")
    for exc in (UsageError("--world must be >= 1"), NonFiniteLoss("NaN at step 3")):
        def fail(*args, exc=exc, **kwargs):
            raise exc

        monkeypatch.setattr(recipe, "preflight", fail)
        assert isinstance(exc, UserError) and main(argv) == exc.exit_code
        assert capsys.readouterr().err == f"run.sh: error: {exc}\n"


def test_every_command_says_what_the_step_runs(tmp_path, hf):
    """Each step's argv, parsed by the real CLI, carries the step's own fields."""
    from xft_megatron.cli import build_parser

    parser = build_parser()
    steps = _recipe(str(tmp_path / "rc"), hf) + _quickstart(str(tmp_path / "qs"), hf,
                                                            moe_every=2, router_seed=3) + \
        _quickstart(str(tmp_path / "wide"), hf, ("moe.router_init_std=0.3",
                                                 "moe.router_noise=false"))
    seen = set()
    for s in steps:
        if s.launcher is None:
            continue
        a = parser.parse_args(s.argv("DEST"))
        seen.add(type(s))
        if isinstance(s, Convert):
            assert (a.direction, a.hf, a.out, a.dtype) == ("hf-to-mcore", s.hf, "DEST", s.dtype)
        elif isinstance(s, Upcycle):
            m = s.moe
            assert (a.ckpt, a.out, a.num_experts, a.topk, a.mode, a.router_gate, a.layer_freq,
                    a.seed, not a.no_router_noise, a.router_init_std) == (
                        s.ckpt, "DEST", m.num_experts, m.topk, m.mode, m.router_gate,
                        m.layer_freq, s.seed, m.router_noise, m.router_init_std)
        elif isinstance(s, Train):
            if a.config and not a.config.endswith(".yaml"):  # as cli.main reads it
                a.config, a.overrides = None, [a.config] + a.overrides
            assert a.resume and (a.config, tuple(a.overrides)) == \
                (s.config, s.overrides + s.layout)
        elif isinstance(s, Fold):
            assert (a.ckpt, a.out, a.coefficients, a.shared_weight) == \
                (s.ckpt, "DEST", s.coefficients, s.shared_weight)
            assert a.hf_out == (os.path.join("DEST", s.hf) if s.hf else None)
        elif isinstance(s, ExportHF):
            assert (a.ckpt, a.out, a.dtype) == (s.ckpt, "DEST", s.dtype)
        elif isinstance(s, HumanEval):
            assert (a.model, a.out, a.prompt, a.n) == (s.model, "DEST", s.prompt, s.n)
    assert seen == {Convert, Upcycle, Train, Fold, ExportHF, HumanEval}


def test_a_changed_setting_reruns_the_step_and_what_reads_it(tmp_path, hf):
    out = str(tmp_path / "qs")
    base = c.digests(_quickstart(out, hf))
    tuned = c.digests(_quickstart(out, hf, sft_steps=151))  # every tuning, not the upcycling
    assert {k for k in base if base[k] != tuned[k]} == {
        "sft", "xft_moe", "merge", "fold", "vanilla_moe", "none_moe", "eval"}
    router = c.digests(_quickstart(out, hf, router_seed=1))
    assert {k for k in base if base[k] != router[k]} == {
        "upcycle", "xft_moe", "merge", "fold", "upcycle_vanilla", "vanilla_moe",
        "upcycle_none", "none_moe", "eval"}
    assert c.digests(_quickstart(out, hf)) == base  # deterministic
    # overrides that shape the upcycled weights reach the upcycling (and what follows it);
    # the others only the training stages
    wide = c.digests(_quickstart(out, hf, ("moe.router_init_std=0.3",)))
    assert {k for k in base if base[k] != wide[k]} == {
        "upcycle", "xft_moe", "merge", "fold", "upcycle_vanilla", "vanilla_moe",
        "upcycle_none", "none_moe", "eval", "sft"}  # sft: every stage gets the overrides
    balance = c.digests(_quickstart(out, hf, ("moe.balance_coeff=0.1",)))
    assert {k for k in base if base[k] != balance[k]} == {
        "sft", "xft_moe", "merge", "fold", "vanilla_moe", "none_moe", "eval"}
    # the recipe: another layout resumes the same runs, another data file redoes them
    from xft_megatron.pipeline.recipe import recipe_spec

    def recipe(data="data.jsonl", layout=()):
        return c.digests(build(recipe_spec(hf, data, out, RECIPE, "all", {"moe": layout})))

    assert recipe(layout=["parallel.expert=4"]) == recipe(layout=["parallel.expert=8"])
    changed = recipe(data="other.jsonl")
    assert {k for k in changed if changed[k] != recipe()[k]} == {
        "moe", "merge_stage", "fold", "xft_hf", "eval_xft", "sft", "sft_hf", "eval_sft",
        "report"}


def _checkpoint(folder, step, steps):
    """What a training run leaves in checkpoint.save after `step` of `steps`."""
    it = os.path.join(folder, f"iter_{step:07d}")
    os.makedirs(it)
    with open(os.path.join(it, "xft_config.yaml"), "w") as f:
        yaml.safe_dump({"train": {"train_steps": steps}}, f)
    with open(os.path.join(it, "train_state.json"), "w") as f:
        json.dump({"step": step}, f)
    with open(os.path.join(folder, "latest"), "w") as f:
        f.write(os.path.basename(it))


def test_training_step_done_resumed_or_restarted(tmp_path):
    folder = str(tmp_path / "moe")
    step = Train("moe", "tune", folder, overrides=(f"checkpoint.save={folder}",))
    calls = []

    def train(s, dest, until=4):  # a stand-in for `xft train --resume`: continues from latest
        calls.append(sorted(os.listdir(dest)) if os.path.isdir(dest) else None)
        _checkpoint(dest, until, 4)
        return {"step": until}

    rec = c.run_step(step, "d1", train, say=lambda m: None)
    assert not rec["reused"] and c.state(step, "d1") == c.DONE
    assert c.run_step(step, "d1", train, say=lambda m: None)["reused"] and len(calls) == 1
    assert c.state(step, "d2") == c.TODO  # other settings: start again
    c.run_step(step, "d2", train, say=lambda m: None)
    assert calls[-1] == [c.MARKER]  # the old run was removed first (the new marker only)

    # stopped midway (marker written at the start, checkpoint before the final step): resume
    half = str(tmp_path / "half")
    step = Train("half", "tune", half)
    _checkpoint(half, 2, 4)
    with open(os.path.join(half, c.MARKER), "w") as f:
        json.dump({"name": "half", "params": "d1", "started": 0}, f)
    assert c.state(step, "d1") == c.RESUME
    c.run_step(step, "d1", train, say=lambda m: None)
    assert calls[-1] == [c.MARKER, "iter_0000002", "latest"]  # kept, continued
    assert c.state(step, "d1") == c.DONE

    # a run at its final step without a marker (by hand, an earlier version) is taken as is
    legacy = str(tmp_path / "legacy")
    _checkpoint(legacy, 4, 4)
    assert c.state(Train("legacy", "tune", legacy), "d") == c.DONE
    _checkpoint(str(tmp_path / "short"), 3, 4)
    assert c.state(Train("short", "tune", str(tmp_path / "short")), "d") == c.RESUME


def test_one_process_tools_write_partial_folders(tmp_path):
    folder = str(tmp_path / "upcycled")
    step = Upcycle("upcycle", "upcycle", folder, ckpt=str(tmp_path / "base"))
    os.makedirs(folder + ".partial")  # an interrupted earlier attempt
    (tmp_path / "upcycled.partial" / "junk").write_text("x")
    seen = []

    def upcycle(s, dest):
        seen.append(os.listdir(dest) if os.path.isdir(dest) else None)
        os.makedirs(dest)
        (tmp_path / "upcycled.partial" / "latest").write_text("iter_0000000")
        return dest

    assert c.state(step, "d") == c.TODO
    c.run_step(step, "d", upcycle, say=lambda m: None)
    assert seen == [None] and not os.path.exists(folder + ".partial")
    assert sorted(os.listdir(folder)) == [c.MARKER, "latest"]
    assert c.state(step, "d") == c.DONE and c.state(step, "other") == c.TODO

    def broken(s, dest):
        os.makedirs(dest)

    with pytest.raises(RuntimeError, match="not complete"):
        c.run_step(step, "other", broken, say=lambda m: None)


def test_function_steps_are_done_by_their_marker(tmp_path):
    calls = []
    step = Function("data", "mine", str(tmp_path / "data"), fn=lambda d: calls.append(d) or 7,
                    params=(("files", 3),))
    [digest] = c.digests([step]).values()
    assert c.run_step(step, digest, say=lambda m: None)["result"] == 7
    again = c.run_step(step, digest, say=lambda m: None)
    assert again["reused"] and again["result"] == 7 and len(calls) == 1
    other = Function("data", "mine", step.folder, fn=step.fn, params=(("files", 4),))
    assert c.digests([other])["data"] != digest


FAKE_XFT = r'''
import json, os, sys
import yaml
a = sys.argv[1:]
opt = lambda name: a[a.index(name) + 1]
if a[0] == "train":  # a run at its final step, in checkpoint.save
    save = dict(o.split("=", 1) for o in a if "=" in o)["checkpoint.save"]
    os.makedirs(os.path.join(save, "iter_0000003"), exist_ok=True)
    yaml.safe_dump({"train": {"train_steps": 3}},
                   open(os.path.join(save, "iter_0000003", "xft_config.yaml"), "w"))
    json.dump({"step": 3}, open(os.path.join(save, "iter_0000003", "train_state.json"), "w"))
    open(os.path.join(save, "latest"), "w").write("iter_0000003")
elif a[:2] == ["eval", "humaneval"]:
    os.makedirs(opt("--out"), exist_ok=True)
    json.dump({"pass@1": 0.5}, open(os.path.join(opt("--out"), "humaneval.json"), "w"))
else:  # convert, upcycle, merge: a new folder
    os.makedirs(opt("--out"))
    name = "config.json" if "mcore-to-hf" in a else "latest"
    open(os.path.join(opt("--out"), name), "w").write("{}")
print("ran", " ".join(a[:2]))
'''


def test_recipe_runs_every_step_once_through_its_launchers(tmp_path, hf, capsys):
    """`recipe run` (what run.sh ends with) launches each step's command through the launchers
    given, logs it, and a rerun reuses every step; stand-in `xft` commands write what the real
    ones write."""
    from xft_megatron.pipeline.__main__ import main

    fake = tmp_path / "fake_xft.py"
    fake.write_text(FAKE_XFT)
    out = str(tmp_path / "rc")
    args = ["recipe", "run", "--hf", hf, "--data", "data.jsonl", "--out", out, "--configs",
            RECIPE, "--one", f"{shlex.quote(sys.executable)} {fake}", "--dist",
            f"{shlex.quote(sys.executable)} {fake}"]
    os.makedirs(os.path.join(out, "logs"))
    assert main(args) == 0
    first = capsys.readouterr().out
    steps = _recipe(out, hf)
    launched = [s for s in steps if s.launcher is not None]
    assert first.count("ran ") == len(launched) == 11 and steps[-1].kind == "report"
    for s in steps:
        if s.launcher is not None:
            assert "ran " in open(os.path.join(out, "logs", f"{s.name}.log")).read()
        assert c.state(s, c.digests(steps)[s.name]) == c.DONE, s.name
    assert not [p for p in os.listdir(out) if p.endswith(".partial")]
    # the report (in the runner's process) gathers every HumanEval step's score
    results = json.load(open(os.path.join(out, "report", "results.json")))
    assert results["models"] == {m: {"humaneval_pass@1": 0.5}
                                 for m in ("base", "xft merged (dense)", "sft (dense)")}
    assert "| xft merged (dense) |           0.5000 |" in \
        open(os.path.join(out, "report", "report.md")).read()
    assert main(args) == 0
    again = capsys.readouterr().out
    assert "ran " not in again and again.count("reusing") == 12


def test_one_report_writer_for_the_recipe_and_the_quickstart(tmp_path, monkeypatch):
    """Both report.md writers (the recipe's Report step, the quickstart's) get their routing
    section and plots from report.figures: a loss plot per curve set with rows, the first MoE
    stage's expert load, the merge coefficients, as image links after the tables (the
    quickstart's report: tests/e2e/test_cli.py)."""
    from xft_megatron.pipeline import report
    from xft_megatron.pipeline.steps import Report

    def stage(name, moe=False, **summary):
        folder = tmp_path / name
        folder.mkdir()
        rows = [{"step": s, "lm_loss": 5.0 - s, **({"expert_load": [[1.0, 0.5, 0.5]]} if moe
                                                     else {})} for s in (1, 2, 3)]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / "summary.json").write_text(json.dumps({"steps_done": 3, **summary}))
        return str(folder)

    stages = (("sft (dense)", stage("sft")), ("xft moe", stage("moe", moe=True)),
              ("merge", stage("merge", merge_coefficients={"0": [0.75, 0.125, 0.125]})))
    calls = []
    figures = report.figures
    monkeypatch.setattr(report, "figures", lambda *a: calls.append(a) or figures(*a))
    dest = str(tmp_path / "report")
    Report("report", "", dest, stages=stages, moe_stage=stages[1][1],
           merge_stage=stages[2][1]).run(dest)
    text = open(os.path.join(dest, "report.md")).read()
    images = [f"![{n}.png]({n}.png)" for n in ("tuning_loss", "expert_load",
                                                "merge_coefficients")]
    assert text.endswith("\n\n".join(images) + "\n") and len(calls) == 1
    assert all(os.path.getsize(os.path.join(dest, f"{n}.png")) > 1000
               for n in ("tuning_loss", "expert_load", "merge_coefficients"))
    # a curve set without rows (the quickstart's pretraining, from a converted base) is left out
    routing, links = figures(str(tmp_path), {"pretrain_loss": {"base": []}}, {}, None)
    assert (routing, links) == (None, [])


def test_outside_inputs_are_keyed_on_their_content(tmp_path, hf):
    """A base model replaced, a source file edited or a recipe's data file rewritten at the
    same path reruns what reads it; touching a file (same bytes) or a file the step does not
    read changes nothing."""
    out = str(tmp_path / "qs")
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "a.py").write_text('def f():\n    """Say one."""\n    return 1\n')
    (src / "notes.txt").write_text("not read")

    def quick():
        from xft_megatron.pipeline import quickstart

        s = quickstart.Settings(base=hf, sources=(str(src),))
        return c.digests([quickstart.data_step(out, [str(src)], s)] +
                         build(quickstart.pipeline_spec(out, s)))

    base = quick()
    os.utime(src / "pkg" / "a.py", (1, 1))  # same bytes, another time
    (src / "notes.txt").write_text("still not read")
    assert quick() == base
    (src / "pkg" / "a.py").write_text('def f():\n    """Say two."""\n    return 2\n')
    edited = quick()
    assert edited["data"] != base["data"] and edited["sft"] != base["sft"]
    assert edited["upcycle"] == base["upcycle"]  # reads the converted base, not the data
    with open(os.path.join(hf, "model.safetensors"), "wb") as f:  # the base's weights replaced
        f.write(b"other weights")
    replaced = quick()
    assert replaced["base"] != edited["base"] and replaced["upcycle"] != edited["upcycle"]
    assert replaced["data"] == edited["data"]
    from xft_megatron.pipeline.recipe import recipe_spec

    data = tmp_path / "data.jsonl"
    data.write_text('{"instruction": "a", "response": "b"}\n')
    recipe = lambda: c.digests(build(recipe_spec(hf, str(data), out, RECIPE, "all", {})))  # noqa
    first = recipe()
    data.write_text('{"instruction": "a", "response": "c"}\n')
    rewritten = recipe()
    assert rewritten["sft"] != first["sft"] and rewritten["moe"] != first["moe"]
    assert rewritten["base"] == first["base"]


def test_quickstart_upcycles_the_moe_its_overrides_describe(tmp_path):
    """`xft quickstart ... moe.router_init_std=0.3` upcycles with that router scale (the
    training stages read the router from the upcycled checkpoint, so an override that missed
    the upcycling would change nothing without a word); a bad value is a ConfigError before
    any step."""
    from xft_megatron.config import ConfigError, MoEConfig
    from xft_megatron.pipeline import quickstart

    s = quickstart.Settings()
    plain = quickstart.pipeline_spec(str(tmp_path), s).moe
    assert plain == MoEConfig(num_experts=s.experts, topk=s.topk, mode="xft",
                              layer_freq=s.moe_every)
    spec = quickstart.pipeline_spec(str(tmp_path), s, [
        "moe.router_init_std=0.3", "moe.router_gate=linear", "moe.router_noise=false",
        "moe.balance_coeff=0.5", "train.lr=1e-4"])
    assert (spec.moe.router_init_std, spec.moe.router_gate, spec.moe.router_noise) == \
        (0.3, "linear", False)
    assert spec.moe.balance_coeff == plain.balance_coeff  # training only: not the upcycling's
    ups = [st for st in build(spec) if isinstance(st, Upcycle)]
    assert ups and all(u.moe.router_init_std == 0.3 for u in ups)  # the ablations' too
    with pytest.raises(ConfigError, match="router_init_std"):
        quickstart.pipeline_spec(str(tmp_path), s, ["moe.router_init_std=wide"])
    with pytest.raises(ConfigError, match="router_init_std"):
        quickstart.pipeline_spec(str(tmp_path), s, ["moe.router_init_std=0"])



def test_recipe_preflight_plans_the_disk_and_a_run_stops_before_a_step_when_it_cannot_fit(
        tmp_path, hf, capsys, monkeypatch):
    """`run.sh`'s preflight says what each step not done yet leaves under OUT and the most all
    of them hold at once, here checked against the parameter counts by hand
    (test_recipes._expected_counts) and the stage YAMLs' checkpoint settings. A run
    (--check-disk) stops there, exit 2, when OUT's disk has less free; --plan only says so."""
    from tests.e2e.test_recipes import _expected_counts
    from xft_megatron.checkpoint import space
    from xft_megatron.pipeline.__main__ import main

    n = _expected_counts()
    dense, moe = n["dense"], n["moe_total"]
    # bf16 weights: 2 bytes a parameter; a checkpoint with the optimizer state: 2 + 12. The
    # pipeline's final checkpoints hold weights only. The step counts come from the data
    # (train.epochs): long enough for the interval saves. sft (keep 2): the last interval
    # checkpoint and the final one stay, one more while saving; moe (keep 1): the final one,
    # one full checkpoint more while saving; merge (only the coefficients train: weights
    # alone, keep 2): two, three while saving. (kept, extra while saving) per step:
    want = {"base": (2 * dense, 0), "upcycle": (2 * moe, 0), "moe": (2 * moe, 14 * moe),
            "merge_stage": (4 * moe, 2 * moe), "fold": (2 * dense, 0),
            "xft_hf": (2 * dense, 0), "sft": (16 * dense, 14 * dense),
            "sft_hf": (2 * dense, 0)}
    total = sum(k for k, _ in want.values()) + max(e for _, e in want.values())
    out = str(tmp_path / "rc")
    argv = ["recipe", "preflight", "--hf", hf, "--data", "d.jsonl", "--out", out, "--configs",
            RECIPE, "--world", "8", "--layout", "moe", "parallel.expert=8"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    disk = text[text.index("--- disk: "):].splitlines()
    assert disk[0].startswith(f"--- disk: the steps not done yet write ~{space.human(total)} "
                              f"under {out} (its disk has ")
    rows = {line.split()[0]: line.split(None, 1)[1] for line in disk[1:] if line.startswith("  ")}
    assert set(rows) == set(want), rows
    for name, (kept, extra) in want.items():
        assert rows[name] == f"~{space.human(kept)}" + (
            f" (~{space.human(kept + extra)} while it saves)" if extra else ""), name
    assert 170 * 2**30 < total < 180 * 2**30  # the paper's recipe: ~174 GiB

    monkeypatch.setattr(space, "free_bytes", lambda path: 100 * 2**30)
    assert main(argv) == 0  # --plan: said, not refused
    assert "notice: that is more than its disk has free" in capsys.readouterr().out
    assert main(argv + ["--check-disk"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"run.sh: error: the steps not done yet write ~{space.human(total)} "
                          f"under {out}") and "has 100.0 GiB free" in err and \
        "checkpoint.keep" in err
    # steps already done are not counted: the converted base is there
    os.makedirs(os.path.join(out, "base"))
    with open(os.path.join(out, "base", "latest"), "w") as f:
        f.write("iter_0000000")
    monkeypatch.setattr(space, "free_bytes", lambda path: total - 2 * dense)
    assert main(argv + ["--check-disk"]) == 0, capsys.readouterr().err
    assert "  base " not in capsys.readouterr().out
