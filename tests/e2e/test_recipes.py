"""The deepseek-coder-1.3b XFT recipe (examples/deepseek_coder_1.3b_xft): every training stage
at every layout through `xft train --dry-run`, exactly as run.sh launches it.

`run.sh --plan` prints the commands of every step; the test parses them with the real CLI
parser and dry-runs each training command in this process at the world size its torchrun
line launches. A dry-run reads from `checkpoint.load` only the config stored with the
checkpoint (`xft_config.yaml`: model and moe sections; no tensor is opened), so the input
checkpoints are stand-ins holding exactly that file, written the way the producing step
writes it: the converted base from deepseek-coder-1.3b-base's published HF config.json (read
as `xft convert hf-to-mcore` reads it), the upcycled MoE from the plan's `xft upcycle` flags,
the tuned MoE from the MoE stage's own config. Checked: the wiring of the steps, the recipe
against XFT_SPEC.md section 5, the layouts (world size, DP/EP fit, global batch 64), parameter
counts against independent arithmetic and the real Megatron modules (built on the meta
device), the memory estimates against the H200, skip-if-done, and the early failures.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.common import REPO
from tests.harness import run_ranks

RECIPE = os.path.join(REPO, "examples", "deepseek_coder_1.3b_xft")
RUN_SH = os.path.join(RECIPE, "run.sh")
LAYOUTS = ("1x8", "2x8", "4x8")
GIB = 2 ** 30
# H200: ~140 GiB of HBM, of which the CUDA context, NCCL buffers and allocator fragmentation
# take a few; the estimate is documented as within 5% of measured peaks.
H200_GIB = 139.0
RESERVED_GIB = 5.0
ESTIMATE_ERROR = 1.05

# deepseek-ai/deepseek-coder-1.3b-base config.json, as published
HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
    "hidden_size": 2048, "intermediate_size": 5504, "num_hidden_layers": 24,
    "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 32256,
    "max_position_embeddings": 16384, "rope_theta": 100000,
    "rope_scaling": {"type": "linear", "factor": 4.0}, "rms_norm_eps": 1e-06,
    "initializer_range": 0.02, "tie_word_embeddings": False, "bos_token_id": 32013,
    "eos_token_id": 32014, "torch_dtype": "bfloat16", "pretraining_tp": 1,
}
TRAIN_STEPS = ("moe", "merge_stage", "sft")


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["XFT_PYTHON"] = sys.executable
    return env


def _run_sh(*args, env=None):
    return subprocess.run(["bash", RUN_SH, *args], capture_output=True, text=True, timeout=120,
                          env=env or _env())


def _parse_plan(stdout):
    """({step: (state, folder, argv)}, {stage: dry-run text}) from `run.sh --plan` output."""
    steps, dry, current, stage = {}, {}, None, None
    for line in stdout.splitlines():
        m = re.match(r"^(\w+)\s+(done|todo)\s+.* -> (\S+)$", line)
        if m:
            current = m.group(1)
            steps[current] = [m.group(2), m.group(3), None]
            stage = None
            continue
        if line.startswith("  $ ") and current:
            steps[current][2] = shlex.split(line[4:])
            continue
        if line.startswith("--- disk: "):  # what the steps write (test_pipeline checks it)
            stage = None
            continue
        m = re.match(r"^--- (\w+): ", line)
        if m:
            stage = m.group(1)
            dry[stage] = []
            continue
        if line.startswith("=="):
            stage = None
        elif stage:
            dry[stage].append(line)
    return {k: tuple(v) for k, v in steps.items()}, {k: "\n".join(v) for k, v in dry.items()}


def _split_launcher(argv):
    """(launcher argv, world size, xft CLI argv) of a planned command: one process, torchrun
    on this node, or srun starting one torchrun per node."""
    i = argv.index("-m")
    assert argv[i + 1] == "xft_megatron.cli", argv
    launcher, cli_args = argv[:i], argv[i + 2:]
    names = [os.path.basename(a) for a in launcher]
    if "torchrun" not in names:
        return launcher, 1, cli_args
    srun, torchrun = launcher[:names.index("torchrun")], launcher[names.index("torchrun"):]

    def opt(args, name, default):
        return int(args[args.index(name) + 1]) if name in args else default

    nnodes = opt(torchrun, "--nnodes", 1)
    if srun:
        assert srun[0] == "srun" and opt(srun, "--nodes", 0) == nnodes and \
            opt(srun, "--ntasks-per-node", 0) == 1, launcher
    else:
        assert nnodes == 1, launcher
    return launcher, nnodes * opt(torchrun, "--nproc-per-node", 1), cli_args


def _write_ckpt_config(folder, cfg, train_state=None):
    """A checkpoint folder holding what `xft train --dry-run` reads from it: the stored config
    (the layout `checkpoint/dist.py` writes: ROOT/latest -> iter_*/xft_config.yaml)."""
    it = "iter_0000000" if train_state is None else f"iter_{train_state['step']:07d}"
    os.makedirs(os.path.join(folder, it))
    with open(os.path.join(folder, it, "xft_config.yaml"), "w") as f:
        yaml.safe_dump({"iteration": 0 if train_state is None else train_state["step"],
                        **cfg.to_dict()}, f, sort_keys=False)
    if train_state is not None:
        with open(os.path.join(folder, it, "train_state.json"), "w") as f:
            json.dump(train_state, f)
    with open(os.path.join(folder, "latest"), "w") as f:
        f.write(it)


def _expected_counts():
    """Parameter counts from the published shape, by hand (XFT_SPEC.md sections 1 and 4)."""
    c = HF_CONFIG
    h, f, n, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    attention = 4 * h * h  # q, k, v, o (16 heads, no GQA, no bias)
    ffn = 3 * h * f  # gate, up, down
    dense = n * (attention + ffn + 2 * h) + 2 * v * h + h  # untied embeddings, final norm
    experts, k = 8, 6
    routed = experts - 1
    router = routed * h + routed * routed + routed * h  # mlp gate W1, W2; noise projection
    return {
        "dense": dense,
        "moe_total": dense + n * ((experts - 1) * ffn + router),
        "moe_active": dense + n * ((k - 1) * ffn + router),  # shared + 5 routed experts
        "experts": n * experts * ffn,
        "merge_trainable": n * routed,  # alpha: one per routed expert per layer
        "routers": n * router,
    }


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("recipe"))
    hf = os.path.join(root, "deepseek-coder-1.3b-base")
    os.makedirs(hf)
    with open(os.path.join(hf, "config.json"), "w") as f:
        json.dump(HF_CONFIG, f)
    data = os.path.join(root, "evol.jsonl")
    with open(data, "w") as f:
        f.write(json.dumps({"instruction": "Reverse a string.",
                            "response": "def rev(s):\n    return s[::-1]\n"}) + "\n")
    # a copy of the recipe whose 1x8 layout cannot work (parallel.expert=3 for 8 experts)
    broken = os.path.join(root, "broken_recipe")
    shutil.copytree(RECIPE, broken)
    path = os.path.join(broken, "layouts", "1x8.yaml")
    with open(path) as f:
        spec = yaml.safe_load(f)
    spec["stages"]["moe"] = ["parallel.expert=3", "train.micro_batch_size=8"]
    with open(path, "w") as f:
        yaml.safe_dump(spec, f)
    procs = {}
    for layout in LAYOUTS:
        out = os.path.join(root, f"out_{layout}")
        procs[layout] = (out, subprocess.Popen(
            ["bash", RUN_SH, "--plan", hf, data, out, layout], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env=_env()))
    broken_run = subprocess.Popen(  # all plans at once: they are independent
        ["bash", os.path.join(broken, "run.sh"), "--plan", "--only", "xft", hf, data,
         os.path.join(root, "out_broken"), "1x8"], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env=_env())
    plans = {}
    for layout, (out, p) in procs.items():
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr
        assert not os.path.exists(out), "--plan must not write anything"
        assert "--- disk: the steps not done yet write ~" in stdout
        steps, dry = _parse_plan(stdout)
        plans[layout] = {"out": out, "steps": steps, "dry": dry, "stderr": stderr}
    stdout, stderr = broken_run.communicate(timeout=120)
    broken_result = subprocess.CompletedProcess(broken_run.args, broken_run.returncode, stdout,
                                                stderr)
    return {"root": root, "hf": hf, "data": data, "plans": plans, "broken": broken_result}


@pytest.fixture(scope="module")
def dry_runs(recipe):
    """{layout: {step: (cfg, world size, dry-run text, parsed CLI args)}}: every planned
    training command dry-run in this process against stand-in input checkpoints at the
    planned paths."""
    from xft_megatron.cli import build_parser
    from xft_megatron.config import Config, MoEConfig, ParallelConfig, PrecisionConfig
    from xft_megatron.hf.files import model_config_from_hf
    from xft_megatron.checkpoint.dist import read_config
    from xft_megatron.config import load_config, require_runnable
    from xft_megatron.training.run import dry_run

    parser = build_parser()
    results = {}
    for layout, plan in recipe["plans"].items():
        steps = plan["steps"]
        # converted base: the config `xft convert hf-to-mcore` stores
        conv = parser.parse_args(_split_launcher(steps["base"][2])[2])
        model, _ = model_config_from_hf(conv.hf)
        dense = Config(model=model, precision=PrecisionConfig(dtype=conv.dtype or "fp32"))
        _write_ckpt_config(steps["base"][1], dense)
        # upcycled MoE: the config `xft upcycle` stores (cli._upcycle, upcycle_checkpoint)
        up = parser.parse_args(_split_launcher(steps["upcycle"][2])[2])
        moe = MoEConfig(num_experts=up.num_experts, topk=up.topk, router_gate=up.router_gate,
                        layer_freq=up.layer_freq, router_noise=not up.no_router_noise)
        _write_ckpt_config(steps["upcycle"][1], dense.replace(moe=moe, parallel=ParallelConfig()))
        results[layout] = {}
        for name in ("sft", "moe", "merge_stage"):  # merge_stage loads what moe saves
            _, world, cli_args = _split_launcher(steps[name][2])
            args = parser.parse_args(cli_args)
            assert args.command == "train" and args.resume, cli_args
            cfg = require_runnable(load_config(args.config, args.overrides,
                                               read_stored=read_config))
            results[layout][name] = (cfg, world, dry_run(cfg, world), args)
            if name == "moe":  # the tuned MoE's stored config: the MoE stage's own
                _write_ckpt_config(cfg.checkpoint.save, cfg, {"step": cfg.train.train_steps})
    return results


def test_plan_wires_every_step_to_the_previous_one(recipe):
    """Each step reads what the step before it wrote; every command parses with the CLI."""
    from xft_megatron.cli import build_parser

    parser = build_parser()
    for layout, plan in recipe["plans"].items():
        steps, out = plan["steps"], plan["out"]
        assert list(steps) == ["base", "eval_base", "upcycle", "moe", "merge_stage", "fold",
                               "xft_hf", "eval_xft", "sft", "sft_hf", "eval_sft", "report"], layout
        assert all(state == "todo" for state, _, _ in steps.values())
        assert steps["report"][2] is None  # run by the runner itself, after every score
        a = {name: parser.parse_args(_split_launcher(argv)[2])
             for name, (_, _, argv) in steps.items() if argv}
        folder = {name: f for name, (_, f, _) in steps.items()}
        for name in folder:
            assert os.path.dirname(folder[name]).startswith(out), (name, folder[name])
        assert a["base"].direction == "hf-to-mcore" and a["base"].hf == recipe["hf"]
        assert a["base"].out == folder["base"] + ".partial"  # renamed when complete
        assert a["eval_base"].what == "humaneval" and a["eval_base"].model == recipe["hf"]
        assert a["upcycle"].ckpt == folder["base"]
        assert a["upcycle"].out == folder["upcycle"] + ".partial"
        load = {n: dict(o.split("=", 1) for o in a[n].overrides) for n in TRAIN_STEPS}
        assert load["moe"]["checkpoint.load"] == folder["upcycle"]
        assert load["merge_stage"]["checkpoint.load"] == load["moe"]["checkpoint.save"] \
            == folder["moe"]
        assert load["merge_stage"]["checkpoint.save"] == folder["merge_stage"]
        assert load["sft"]["checkpoint.load"] == folder["base"]
        assert load["sft"]["checkpoint.save"] == folder["sft"]
        for n in TRAIN_STEPS:
            assert load[n]["data.path"] == recipe["data"]
            assert load[n]["data.cache_dir"] == os.path.join(out, "data_cache")  # tokenized once
        assert a["fold"].ckpt == folder["merge_stage"] and a["fold"].coefficients == "learned"
        assert a["fold"].out == folder["fold"] + ".partial"
        assert a["xft_hf"].direction == "mcore-to-hf" and a["xft_hf"].ckpt == folder["fold"]
        assert a["xft_hf"].out == folder["xft_hf"] + ".partial" and a["xft_hf"].dtype == "bf16"
        assert a["eval_xft"].model == folder["xft_hf"] and a["eval_xft"].out == folder["eval_xft"]
        assert a["sft_hf"].ckpt == folder["sft"] and a["sft_hf"].out == folder["sft_hf"] + ".partial"
        assert a["eval_sft"].model == folder["sft_hf"] and a["eval_sft"].out == folder["eval_sft"]
        for n in ("eval_base", "eval_xft", "eval_sft"):
            assert a[n].n == 1  # greedy pass@1, as reported in the paper


def test_recipe_settings_follow_the_spec(recipe, dry_runs):
    """XFT_SPEC.md sections 1, 4 and 5 (DeepSeek-Coder-1.3B-Base reference settings)."""
    from xft_megatron.cli import build_parser

    up = build_parser().parse_args(
        _split_launcher(recipe["plans"]["1x8"]["steps"]["upcycle"][2])[2])
    assert (up.num_experts, up.topk, up.router_gate) == (8, 6, "mlp")
    assert not up.no_router_noise and up.noise == 0.0 and up.layer_freq == 1  # exact copies
    expected = {"moe": dict(epochs=4, lr=5e-5, lr_warmup_steps=500),
                "merge_stage": dict(epochs=1, lr=1e-5, lr_warmup_steps=125),
                "sft": dict(epochs=5, lr=5e-5, lr_warmup_steps=625)}
    for layout, runs in dry_runs.items():
        for name, (cfg, _, _, _) in runs.items():
            t = cfg.train
            for key, value in expected[name].items():
                assert getattr(t, key) == value, (layout, name, key)
            assert (t.global_batch_size, t.seq_length) == (64, 1024)
            assert t.lr_decay_style == "linear" and t.min_lr == 0.0 and t.weight_decay == 0.0
            assert cfg.precision.dtype == "bf16"
            d = cfg.data
            assert (d.format, d.template, d.packing) == ("instruction", "magicoder", False)
            assert cfg.model.num_layers == 24 and cfg.model.rope_scaling_factor == 4.0
        sft, moe, merge = runs["sft"][0], runs["moe"][0], runs["merge_stage"][0]
        assert sft.stage == "sft" and not sft.moe.enabled
        assert moe.stage == "moe" and merge.stage == "merge"
        for cfg in (moe, merge):
            e = cfg.moe
            assert (e.num_experts, e.topk, e.mode, e.router_gate, e.renorm) == \
                (8, 6, "xft", "mlp", "probs")
            assert e.router_noise and e.capacity_factor is None
        assert (moe.moe.balance_loss, moe.moe.balance_coeff) == ("cv", 0.01)
        assert merge.moe.merge_shared_weight == 0.75


def test_model_shape_is_deepseek_coder_1_3b(dry_runs):
    from xft_megatron.config import model_config_from_dict

    preset = model_config_from_dict({"preset": "deepseek-coder-1.3b"})
    for runs in dry_runs.values():
        for cfg, _, _, _ in runs.values():
            got = cfg.model
            for field in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                          "num_query_groups", "vocab_size", "max_position_embeddings",
                          "rope_theta", "rope_scaling_factor", "norm_eps", "qkv_bias",
                          "tie_embeddings"):
                assert getattr(got, field) == getattr(preset, field), field


def test_layouts_fit_and_reach_global_batch_64(recipe, dry_runs):
    for layout, runs in dry_runs.items():
        with open(os.path.join(RECIPE, "layouts", f"{layout}.yaml")) as f:
            spec = yaml.safe_load(f)
        nodes, gpus = (int(x) for x in layout.split("x"))
        assert (spec["nodes"], spec["gpus_per_node"]) == (nodes, gpus)
        for name, (cfg, world, text, _) in runs.items():
            assert world == nodes * gpus, (layout, name)
            p, t = cfg.parallel, cfg.train
            assert world % (p.tensor * p.pipeline) == 0
            dp = world // (p.tensor * p.pipeline)
            assert p.data_parallel_size(world) == dp
            assert p.tensor == 1 and p.pipeline == 1  # memory does not call for TP/PP
            accumulation = t.num_microbatches(dp)
            assert t.micro_batch_size * dp * accumulation == 64, (layout, name)
            assert f"global 64 = micro {t.micro_batch_size} x DP {dp} x {accumulation} " \
                   "micro-batches" in text
            if cfg.moe.enabled:
                assert cfg.moe.num_experts % p.expert == 0
                assert world % (p.expert * p.expert_tensor * p.pipeline) == 0
                assert gpus % p.expert == 0  # an expert-parallel group stays inside a node
        assert runs["moe"][0].parallel.expert == 8  # one expert per GPU
        assert runs["merge_stage"][0].parallel.expert == 1  # experts local: no merge all-reduce


def test_parameter_counts(dry_runs):
    """The dry-run's counts equal the arithmetic from the shape and the real Megatron modules
    of each stage built at full size on the meta device (no memory, no initialization)."""
    from xft_megatron.training import memory

    want = _expected_counts()
    assert 1.34e9 < want["dense"] < 1.35e9 and 7.02e9 < want["moe_total"] < 7.04e9
    for runs in dry_runs.values():
        for name, (cfg, _, text, _) in runs.items():
            total = want["dense"] if name == "sft" else want["moe_total"]
            active = want["dense"] if name == "sft" else want["moe_active"]
            assert f"total {total:,}  active {active:,}" in text, (name, text)
            if name != "sft":
                assert f"(experts {want['experts']:,})" in text
    runs = dry_runs["1x8"]
    names = ("sft", "moe", "merge_stage")
    built = run_ranks(1, _meta_model_counts, [runs[n][0] for n in names])[0]
    for name, (n_all, n_trained, n_experts) in zip(names, built):
        cfg = runs[name][0]
        counts = memory.parameter_counts(cfg.model, cfg.moe)
        if name == "sft":
            assert n_all == n_trained == counts["total"] == want["dense"]
        elif name == "moe":
            assert n_all == n_trained == counts["total"] == want["moe_total"]
            assert n_experts == counts["expert"] == want["experts"]
        else:  # learnable merge: the frozen experts, no router, alpha the only trained tensor
            assert n_experts == want["experts"]
            assert n_trained == want["merge_trainable"]
            assert n_all == want["moe_total"] - want["routers"] + want["merge_trainable"]


def _meta_model_counts(rank, world, cfgs):
    """(all, trained, expert) parameter counts of each config's one-rank model built on the
    meta device (in a child process: it initializes a process group)."""
    from xft_megatron.config import ParallelConfig
    from xft_megatron.model.builder import build_model
    from xft_megatron.runtime import parallel

    parallel.initialize(ParallelConfig())
    out = []
    for cfg in cfgs:
        (model,) = build_model(cfg.replace(parallel=ParallelConfig()), meta=True)
        params = dict(model.named_parameters())
        out.append((sum(p.numel() for p in params.values()),
                    sum(p.numel() for p in params.values() if p.requires_grad),
                    sum(p.numel() for k, p in params.items() if ".experts." in k)))
    return out


def _busiest_rank_activations(cfg):
    """Activation bytes of the busiest rank, derived here from the shape: attention block
    16 h per token and layer, plus (h + 3 F) per expert copy; with EP the rank holding the
    shared expert (expert 0) processes every token of its EP group once for it plus the
    routed experts it holds: top-(k-1) of N-1 -> EP * (1 + (E_local - 1)(k-1)/(N-1)) copies
    per local token (at least k); the merge stage runs one FFN; plus fp32 logits + grad."""
    m, e, p, t = cfg.model, cfg.moe, cfg.parallel, cfg.train
    if not e.enabled or cfg.stage == "merge":
        copies = 1.0
    else:
        local = e.num_experts // p.expert
        copies = max(e.topk, p.expert * (1 + (local - 1) * e.routed_topk / e.num_routed))
    tokens = t.micro_batch_size * t.seq_length
    per_layer = 2 * (16 * m.hidden_size + copies * (m.hidden_size + 3 * m.ffn_hidden_size))
    return per_layer * tokens * m.num_layers + 2 * 4 * tokens * m.vocab_size


def test_memory_estimates_fit_an_h200(dry_runs):
    from xft_megatron.training import memory

    for layout, runs in dry_runs.items():
        for name, (cfg, world, text, _) in runs.items():
            est = memory.estimate(cfg, world)
            printed = float(re.search(r"memory/rank\s+~([\d.]+) GiB", text).group(1))
            assert abs(printed - est.total / GIB) < 0.051
            need = est.total * ESTIMATE_ERROR / GIB + RESERVED_GIB
            assert need < H200_GIB, (layout, name, need)
            assert est.activations == pytest.approx(_busiest_rank_activations(cfg)), \
                (layout, name)
            if name == "merge_stage":  # frozen experts: weights only, no grads or optimizer
                assert est.gradients == 0 and est.optimizer == 0
    # more GPUs, smaller per-GPU footprint: the micro-batch shrinks as DP grows
    for name in ("sft", "moe", "merge_stage"):
        totals = [memory.estimate(dry_runs[L][name][0], dry_runs[L][name][1]).total
                  for L in LAYOUTS]
        assert totals[0] > totals[1] > totals[2], name


def test_plan_dry_runs_equal_the_real_stage_inputs(recipe, dry_runs):
    """run.sh's preflight (the planned configs before the inputs exist) prints the same
    dry-run as the commands give against the configs the producing steps store."""
    for layout, plan in recipe["plans"].items():
        assert set(plan["dry"]) == {"sft", "moe", "merge"}
        for stage, step in (("sft", "sft"), ("moe", "moe"), ("merge", "merge_stage")):
            assert plan["dry"][stage] == dry_runs[layout][step][2], (layout, stage)


def test_steps_already_done_are_skipped(recipe, dry_runs, tmp_path):
    """Skip-if-done: a checkpoint folder with `latest`, a training run at its final step, an
    HF export with config.json, a HumanEval with humaneval.json; a training run stopped
    before its last step and a `.partial` tool output are not done. --only selects steps."""
    out = str(tmp_path / "out")
    runs = dry_runs["1x8"]
    moe, merge = runs["moe"][0], runs["merge_stage"][0]
    shutil.copytree(os.path.join(recipe["plans"]["1x8"]["out"], "base"), f"{out}/base")
    _write_ckpt_config(f"{out}/upcycled.partial", moe)  # an interrupted upcycle
    _write_ckpt_config(f"{out}/moe", moe, {"step": moe.train.train_steps})
    _write_ckpt_config(f"{out}/merge_stage", merge, {"step": merge.train.train_steps - 1})
    os.makedirs(f"{out}/eval/xft")
    with open(f"{out}/eval/xft/humaneval.json", "w") as f:
        f.write("{}")
    r = _run_sh("--plan", "--only", "xft", recipe["hf"], recipe["data"], out, "1x8")
    assert r.returncode == 0, r.stderr
    steps, dry = _parse_plan(r.stdout)
    state = {name: s for name, (s, _, _) in steps.items()}
    assert state == {"base": "done", "upcycle": "todo", "moe": "done", "merge_stage": "todo",
                     "fold": "todo", "xft_hf": "todo", "eval_xft": "done", "report": "todo"}
    # inputs that exist are dry-run as they are, missing ones with the config they will hold
    assert f"--- merge: merge.yaml, checkpoint.load = {out}/moe" in r.stdout
    assert "--- moe: moe.yaml, checkpoint.load not written yet (its planned config)" in r.stdout
    assert set(dry) == {"moe", "merge"}  # --only xft: the SFT baseline is left out
    assert dry["merge"] == runs["merge_stage"][2]


def test_fails_early_with_clear_messages(recipe, tmp_path):
    hf, data = recipe["hf"], recipe["data"]
    out = str(tmp_path / "out")

    def fails(args, *needles, env=None):
        r = _run_sh(*args, env=env)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        for needle in needles:
            assert needle in r.stderr, (needle, r.stderr)
        return r

    fails([], "usage: run.sh", "expected 4 arguments")
    fails([hf, data, out, "8"], "layout '8' must look like NODESxGPUS")
    fails([hf, data, out, "3x8"], "no layout file layouts/3x8.yaml; available: 1x8 2x8 4x8")
    fails(["--only", "moe", hf, data, out, "1x8"], "--only must be all, xft or sft")
    fails([str(tmp_path), data, out, "1x8"], "is not a Hugging Face model directory")
    # the full run checks its inputs before anything starts
    fails([hf, str(tmp_path / "missing.jsonl"), out, "1x8"],
              "data file", "does not exist", "has no weights")
    # inputs present, but this machine has no 8 GPUs / is not inside a 2-node allocation
    full = str(tmp_path / "hf_full")
    shutil.copytree(hf, full)
    for name in ("model.safetensors", "tokenizer.json"):
        open(os.path.join(full, name), "wb").close()
    bin_dir = tmp_path / "bin"  # a node with 2 GPUs, whatever this machine has
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200'\n"
                                        "echo 'GPU 1: NVIDIA H200'\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    env = _env()
    env["PATH"] = os.pathsep.join([str(bin_dir), os.path.dirname(sys.executable), env["PATH"]])
    fails([full, data, out, "1x8"], "layout 1x8 needs 8 GPUs on this node; nvidia-smi lists 2",
          env=env)
    fails([full, data, out, "2x8"], "spans 2 nodes", "Slurm allocation", "slurm/xft.sbatch",
          "slurm/README.md", env=env)
    slurm = dict(env, SLURM_JOB_ID="7", SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="n1")
    fails([full, data, out, "2x8"], "layout 2x8 needs 2 nodes; this Slurm job has 1", env=slurm)
    env_bad = dict(_env(), XFT_PYTHON="/nonexistent/python")
    fails([hf, data, out, "1x8"], "not found", env=env_bad)
    assert not os.path.exists(os.path.join(out, "base"))  # nothing ran


def test_a_layout_that_does_not_fit_stops_before_any_step(recipe):
    """A copy of the recipe with a broken layout: the preflight names the stage and the fix."""
    r = recipe["broken"]
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "stage moe" in r.stderr and "parallel.expert=3" in r.stderr
    assert "moe.num_experts=8 is not divisible by parallel.expert=3" in r.stderr
    assert "== steps" not in r.stdout
    assert not os.path.exists(os.path.join(recipe["root"], "out_broken"))


def test_readme_memory_table_matches_the_dry_runs(dry_runs):
    """The per-GPU figures documented in the recipe's README are the dry-run's."""
    from xft_megatron.training import memory

    with open(os.path.join(RECIPE, "README.md")) as f:
        rows = re.findall(r"^\| (\dx\d) \| (sft|moe|merge) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| "
                          r"([\d.]+) \| ([\d.]+) \|$", f.read(), re.M)
    assert len(rows) == len(LAYOUTS) * 3
    step = {"sft": "sft", "moe": "moe", "merge": "merge_stage"}
    wrong = []
    for layout, stage, *figures in rows:
        cfg, world = dry_runs[layout][step[stage]][:2]
        est = memory.estimate(cfg, world)
        want = [round(x / GIB, 1) for x in (est.total, est.weights, est.gradients,
                                             est.optimizer, est.activations)]
        if [float(x) for x in figures] != want:
            wrong.append(f"| {layout} | {stage} | " + " | ".join(map(str, want)) + " |")
    assert not wrong, "README rows should read:\n" + "\n".join(wrong)


def test_data_by_name_from_the_hugging_face_cache(recipe, tmp_path):
    """Without DATA the recipe reads hf:ise-uiuc/Magicoder-Evol-Instruct-110K; offline, from a
    cache laid out as huggingface_hub lays it, the plan passes; a cache without it warns."""
    home = tmp_path / "hf_home"
    repo = home / "hub" / "datasets--ise-uiuc--Magicoder-Evol-Instruct-110K"
    snap = repo / "snapshots" / ("e" * 40)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("e" * 40)
    (snap / "data-evol_instruct-decontaminated.jsonl").write_text(
        json.dumps({"instruction": "Reverse a string.", "response": "s[::-1]"}) + "\n")
    env = dict(_env(), HF_HOME=str(home), HF_HUB_OFFLINE="1")
    out = str(tmp_path / "out")
    r = _run_sh("--plan", "--only", "sft", recipe["hf"], out, "1x8", env=env)
    assert r.returncode == 0, r.stderr
    assert "Magicoder" not in r.stderr, r.stderr  # found in the cache: no warning
    steps, _ = _parse_plan(r.stdout)
    assert "data.path=hf:ise-uiuc/Magicoder-Evol-Instruct-110K" in steps["sft"][2]
    env["HF_HOME"] = str(tmp_path / "empty")
    r = _run_sh("--plan", "--only", "sft", recipe["hf"], out, "1x8", env=env)
    assert r.returncode == 0 and "warning: data.path entry 'hf:ise-uiuc/Magicoder-Evol-" \
        "Instruct-110K'" in r.stderr and "offline mode is on" in r.stderr, r.stderr
