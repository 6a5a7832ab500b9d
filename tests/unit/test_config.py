"""Config: YAML + overrides, presets, and up-front validation with actionable messages."""

import pytest

from xft_megatron.arch.families import PRESETS
from xft_megatron.config import (Config, ConfigError, config_keys, load_config,
                                 model_config_from_dict, parse_overrides)


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  preset: tiny\n  num_layers: 8\ntrain:\n  lr: 1e-4\n")
    cfg = load_config(str(path), ["model.hidden_size=128", "parallel.tensor=2",
                                  "train.lr=2e-4", "precision.dtype=bf16"])
    assert cfg.model.num_layers == 8  # YAML beats preset
    assert cfg.model.hidden_size == 128  # override beats YAML
    assert cfg.model.ffn_hidden_size == PRESETS["tiny"]["ffn_hidden_size"]  # preset fills
    assert cfg.train.lr == pytest.approx(2e-4)
    assert cfg.parallel.tensor == 2 and cfg.parallel.expert_tensor == 2
    assert cfg.precision.dtype == "bf16"
    # round trip through the dict form (what checkpoints store)
    assert Config.from_dict(cfg.to_dict()) == cfg


def test_override_parsing():
    assert parse_overrides(["a.b=1", "a.c=x", "d.e=[1, 2]", "f.g=1e-3"]) == \
        {"a": {"b": 1, "c": "x"}, "d": {"e": [1, 2]}, "f": {"g": 1e-3}}
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides(["nonsense"])
    with pytest.raises(ConfigError, match="name a section"):
        parse_overrides(["lr=1"])


@pytest.mark.parametrize("overrides, message", [
    (["model.preset=tiny", "parallel.tensor=8"],
     "num_attention_heads=4 is not divisible by parallel.tensor=8"),
    (["model.preset=tiny", "parallel.pipeline=3"], "num_layers=4 is not divisible by"),
    (["model.preset=nope"], "unknown model preset 'nope'; known presets: deepseek-coder-1.3b"),
    (["model.hiden_size=3"], "did you mean 'model.hidden_size'"),
    (["modle.hidden_size=3"], "unknown config key 'modle'"),
    (["model.num_layers=two"], "model.num_layers='two' has type str, expected int"),
    (["model.hidden_size=60", "model.num_attention_heads=8"], "hidden_size=60 is not divisible"),
    (["parallel.sequence_parallel=true"], "sequence_parallel=true needs parallel.tensor > 1"),
    (["precision.dtype=fp8"], "precision.dtype='fp8' must be one of"),
    (["train.global_batch_size=0"], "train.global_batch_size=0 must be a positive"),
    (["train.seq_length=4096", "model.preset=tiny"], "exceeds model.max_position_embeddings"),
    (["model.preset=tiny", "model.num_query_groups=3"], "not divisible by model.num_query"),
    (["train.lr_decay_style=exp"], "must be constant, linear or cosine"),
    # model families
    (["model.family=gpt2"], "model.family='gpt2' is not supported; supported: llama, mistral"),
    (["model.family=llama", "model.qk_norm=true"],
     "model.qk_norm=true contradicts model.family=llama, which has qk_norm=false: drop "
     "model.qk_norm (the family sets it), or set model.family to qwen3"),
    (["model.preset=qwen2-0.5b", "model.family=mistral", "model.qkv_bias=true"],
     "or set model.family to qwen2"),
    (["model.qkv_bias=true", "model.qk_norm=true"], "no supported family has model.qkv_bias="
                                                   "true together with model.qk_norm=true"),
    (["model.head_dim=15"], "model.head_dim=15 must be a positive even integer"),
    # MoE
    (["moe.num_experts=8", "parallel.expert=3"], "moe.num_experts=8 is not divisible by "
                                                 "parallel.expert=3"),
    (["moe.num_experts=4", "moe.topk=5"], "moe.topk=5 exceeds moe.num_experts=4"),
    (["moe.num_experts=1", "moe.topk=1"], "needs moe.num_experts >= 2"),
    (["moe.num_experts=4", "moe.topk=1"], "needs moe.topk >= 2"),
    (["moe.num_experts=4", "moe.topk=2", "parallel.tensor=2"],
     "MoE with parallel.tensor > 1 needs parallel.sequence_parallel=true"),
    (["parallel.expert=2"], "parallel.expert and parallel.expert_tensor apply to MoE models"),
    (["moe.num_experts=4", "moe.topk=2", "moe.mode=vanilla", "train.stage=merge"],
     "train.stage=merge needs an XFT MoE with a shared expert"),
    (["moe.num_experts=4", "moe.topk=2", "moe.merge_shared_weight=1.5"],
     "moe.merge_shared_weight=1.5 must be in [0, 1]"),
    (["moe.num_experts=4", "moe.router_gate=conv"], "moe.router_gate='conv' must be mlp or"),
    (["moe.num_experts=4", "moe.renorm=softmax"], "moe.renorm='softmax' must be probs or"),
    (["moe.num_experts=4", "moe.capacity_factor=0"], "moe.capacity_factor=0 must be > 0"),
    (["moe.num_experts=4", "moe.shared_expert_impl=side"],
     "moe.shared_expert_impl='side' must be pool or dense"),
    (["moe.num_experts=4", "moe.topk=2", "moe.mode=vanilla", "moe.shared_expert_impl=dense"],
     "moe.shared_expert_impl=dense needs a shared expert"),
    (["moe.num_experts=4", "moe.topk=2", "moe.experts_impl=sequential",
      "moe.shared_expert_impl=dense"],
     "moe.shared_expert_impl=dense needs moe.experts_impl=grouped"),
    (["moe.num_experts=8", "moe.shared_expert_impl=dense", "parallel.expert=2"],
     "the 7 routed experts are not divisible by parallel.expert=2; each expert-parallel rank "
     "must hold the same number of routed experts (e.g. moe.num_experts=9"),
    (["model.preset=tiny", "moe.num_experts=5", "moe.topk=3", "moe.shared_expert_impl=dense",
      "parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.expert_tensor=1"],
     "moe.shared_expert_impl=dense needs parallel.expert_tensor = parallel.tensor (got 1 and 2)"),
])
def test_validation_messages(overrides, message):
    pattern = message
    for ch in "()[]":
        pattern = pattern.replace(ch, "\\" + ch)
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, overrides)


def test_world_size_and_batch_checks():
    cfg = load_config(None, ["model.preset=tiny", "parallel.tensor=2", "parallel.pipeline=2"])
    assert cfg.parallel.data_parallel_size(8) == 2
    with pytest.raises(ConfigError, match="world size 6 is not divisible by parallel.tensor"):
        cfg.parallel.data_parallel_size(6)
    with pytest.raises(ConfigError, match="global_batch_size=8 is not divisible"):
        load_config(None, ["train.micro_batch_size=3"]).train.num_microbatches(1)
    assert load_config(None, []).train.num_microbatches(2) == 1


def test_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(str(bad))
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(str(top))


def test_model_family_resolution():
    """A config names its family or gets the one of its attention features; a family given
    fills the features it fixes (over a preset's values, under values given)."""
    fam = lambda *o: load_config(None, list(o)).model  # noqa: E731
    assert (fam().family, fam("model.qkv_bias=true").family,
            fam("model.qk_norm=true").family) == ("llama", "qwen2", "qwen3")
    m = fam("model.family=qwen3")
    assert (m.family, m.qk_norm, m.qkv_bias, m.head_dim) == ("qwen3", True, False, 16)
    m = fam("model.preset=qwen2-0.5b", "model.family=qwen3", "model.head_dim=128")
    assert (m.family, m.qkv_bias, m.qk_norm, m.head_dim) == ("qwen3", False, True, 128)
    assert fam("model.family=mistral").family == "mistral"  # never implied: Llama's features
    stored = fam("model.preset=qwen3-0.6b")
    assert model_config_from_dict(Config(model=stored).to_dict()["model"]) == stored


def test_presets_parameter_counts():
    # published sizes (rounded) of the architectures the presets reproduce
    expected = {"deepseek-coder-1.3b": 1.346e9, "deepseek-coder-6.7b": 6.74e9,
                "tinyllama-1.1b": 1.100e9, "llama-2-7b": 6.74e9, "qwen2-0.5b": 0.494e9,
                "qwen2-1.5b": 1.544e9, "qwen3-0.6b": 0.596e9, "qwen3-1.7b": 1.72e9}
    for name, count in expected.items():
        m = model_config_from_dict({"preset": name})
        assert abs(m.num_parameters() - count) / count < 0.01, (name, m.num_parameters())
    assert "model.hidden_size" in config_keys()


def test_optional_fields_are_type_checked():
    with pytest.raises(ConfigError, match="compile_layers='maybe' has type str, expected bool"):
        load_config(None, ["train.compile_layers=maybe"])
    assert load_config(None, ["train.compile_layers=false"]).train.compile_layers is False
    assert load_config(None, []).train.compile_layers is None


def test_checkpoint_commands_blame_what_the_user_gave(tmp_path):
    """A layout that does not fit a stored model names the layout, not the stored file; a
    data error of `xft eval loss` names that command's flags, not config keys."""
    from xft_megatron.checkpoint import dist as ckpt
    from xft_megatron.config import dump_config, load_config
    from xft_megatron.eval.loss import _with_flags

    (tmp_path / ckpt.CONFIG_FILE).write_text(dump_config(load_config(None, ["model.preset=tiny"])))
    with pytest.raises(ConfigError) as e:
        ckpt.load_config(str(tmp_path), parallel={"tensor": 3, "sequence_parallel": True})
    assert "the layout TP=3 (sequence parallel) does not fit the model stored in" in str(e.value)
    assert "is invalid" not in str(e.value)
    (tmp_path / ckpt.CONFIG_FILE).write_text("model:\n  num_layers: -1\n")
    with pytest.raises(ConfigError, match="is invalid.*fix that file"):
        ckpt.load_config(str(tmp_path), parallel={})
    hint = _with_flags("x.jsonl:1: too_long: 9 tokens > seq_length + 1 = 5; raise "
                       "train.seq_length or shorten the record\nfix them, or set "
                       "data.on_error=skip to drop them")
    assert "--seq-length" in hint and "--on-error skip" in hint
    assert "train.seq_length" not in hint and "data.on_error" not in hint


def test_optimizer_values_yaml_shapes_and_text_values(tmp_path):
    for overrides, message in [
            (["train.adam_beta1=1.5"], "train.adam_beta1=1.5 must be in [0, 1)"),
            (["train.adam_beta2=-0.1"], "train.adam_beta2=-0.1 must be in [0, 1)"),
            (["train.adam_eps=-1"], "train.adam_eps=-1 must be > 0"),
            (["train.weight_decay=-5"], "train.weight_decay=-5 must be >= 0"),
            (["train.seed=-1"], "train.seed=-1 must be an integer in [0, 2**32)"),
            (["checkpoint.save=20241201"], "quote it for a text value: "
                                           "checkpoint.save='20241201'")]:
        with pytest.raises(ConfigError) as e:
            load_config(None, overrides)
        assert message in str(e.value), (overrides, str(e.value))
    # a quoted number is text where a path is meant, in overrides and in files
    assert load_config(None, ["checkpoint.save='20241201'"]).checkpoint.save == "20241201"
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-3\ncheckpoint:\n  save: '0012'\n")
    cfg = load_config(str(path))
    assert (cfg.train.lr, cfg.checkpoint.save) == (1e-3, "0012")
    for text, message in [("train:\n  lr: 1e-3\n  lr: 2e-3\n", "key 'lr' is given twice"),
                          ("train:\n  seed: 1\ntrain:\n  lr: 1\n", "key 'train' is given twice"),
                          ("train: 0\n", "config section 'train' must be a mapping, got int")]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_config(str(path))


def test_a_model_too_big_for_the_machine_is_refused_naming_the_key():
    from xft_megatron.training import memory

    cfg = load_config(None, ["model.vocab_size=100000000"])
    with pytest.raises(ConfigError, match="model.vocab_size dominates"):
        memory.check_fits(cfg, 1, available=24 * 2 ** 30)
    deep = load_config(None, ["model.preset=tiny", "model.num_layers=10000"])
    with pytest.raises(ConfigError, match="model.num_layers dominates"):
        memory.check_fits(deep, 1, available=2 ** 30)
    # weights fit but the activations of this micro-batch cannot (no recomputation)
    est = memory.estimate(deep, 1)
    fixed = est.weights + est.gradients + est.optimizer
    with pytest.raises(ConfigError, match=r"activations dominate\). Lower train.micro_batch_size"):
        memory.check_fits(deep, 1, available=max(fixed, est.total / 2))
    memory.check_fits(deep, 1, available=est.total)  # the estimate is a planning figure
    memory.check_fits(load_config(None, []), 1, available=2 ** 30)  # the default fits


def test_type_checks_follow_the_annotations():
    """A new field is type-checked by its annotation alone (Optional unwrapped); mappings and
    unions of several types are left to the dataclass."""
    import dataclasses
    from typing import Dict, Optional, Union

    from xft_megatron.config import schema

    @dataclasses.dataclass
    class New:
        count: Optional[int] = None
        ratio: float = 0.5
        name: Optional[str] = None
        flag: bool = False
        table: Dict[str, str] = dataclasses.field(default_factory=dict)
        either: Union[int, str] = 0

    schema._check_types(New, {"count": 3, "ratio": 1, "name": "x", "flag": True,
                              "table": {"a": "b"}, "either": "y"}, "new")
    for values, message in [({"count": "3"}, "new.count='3' has type str, expected int"),
                            ({"count": True}, "new.count=True has type bool, expected int"),
                            ({"ratio": "fast"}, "new.ratio='fast' has type str, expected float"),
                            ({"ratio": float("nan")}, "new.ratio=nan must be a finite number"),
                            ({"flag": 1}, "new.flag=1 has type int, expected bool"),
                            ({"name": 7}, "quote it for a text value: new.name='7'")]:
        with pytest.raises(ConfigError) as e:
            schema._check_types(New, values, "new")
        assert message in str(e.value), (values, str(e.value))
    assert schema._numbers_for_float_fields(New, {"ratio": "1e-3", "name": "1e-3"}) == \
        {"ratio": 1e-3, "name": "1e-3"}


def test_a_run_whose_checkpoint_cannot_fit_on_disk_is_refused_before_anything(tmp_path, capsys,
                                                                              monkeypatch):
    from xft_megatron import cli
    from xft_megatron.checkpoint import space
    from xft_megatron.training import disk, memory

    base = ["model.preset=tiny", f"checkpoint.save={tmp_path}/run", "train.train_steps=10"]
    cfg = load_config(None, base)
    total = memory.parameter_counts(cfg.model, cfg.moe)["total"]
    size = disk.checkpoint_bytes(cfg)
    assert size == {"weights": 4 * total, "optimizer": 12 * total}  # fp32 + main copy, 2 moments
    full = size["weights"] + size["optimizer"]
    with pytest.raises(ConfigError, match=r"needs ~.* \(weights .*, optimizer state .*\), but its"
                       r" disk has .* free.*final_optimizer=false saves the weights alone"):
        disk.check_room(cfg, free=full - 1)
    lean = load_config(None, base + ["checkpoint.final_optimizer=false"])
    assert disk.check_room(lean, free=size["weights"]) == ""  # the weights alone fit
    merge = load_config(None, base + ["moe.num_experts=4", "moe.topk=2", "train.stage=merge"])
    assert disk.checkpoint_bytes(merge)["optimizer"] == 0  # only the coefficients train
    # interval saves: 10 steps / 2 = 5 saves; keep=2 -> 3 at once (2 kept + the one written)
    periodic = load_config(None, base + ["checkpoint.save_interval=2", "checkpoint.keep=2"])
    assert disk.saves_in_run(periodic) == 5
    assert disk.check_room(periodic, free=3 * full) == ""
    notice = disk.check_room(periodic, free=2 * full)
    assert "the 3 this run keeps at once need" in notice and "checkpoint.keep" in notice
    assert disk.saves_in_run(load_config(None, base + ["checkpoint.final=false"])) == 0
    # with train.epochs the step count comes from the data, read later: the interval saves are
    # taken to happen (the placeholder train_steps=10 < 100 would say only the final one)
    by_epochs = load_config(None, base + ["train.epochs=2", "checkpoint.save_interval=100",
                                          "checkpoint.keep=1", "checkpoint.final_optimizer=false"])
    assert disk.run_bytes(by_epochs) == {"first": full, "peak": full + size["weights"],
                                         "kept": size["weights"], "at_once": 2}
    with pytest.raises(ConfigError, match="needs ~"):
        disk.check_room(by_epochs, free=full - 1)
    assert space.human(1536) == "1.5 KiB" and space.human(3 * 2 ** 30) == "3.0 GiB"
    assert space.free_bytes(str(tmp_path / "not" / "yet")) > 0  # asks the nearest folder

    # through the command line: refused with exit 2 before the data or a model is touched
    monkeypatch.setattr(space, "free_bytes", lambda path: 4096)
    code = cli.main(["train", *base, "data.path=/nonexistent.jsonl"])
    err = capsys.readouterr().err
    assert code == 2 and "but its disk has 4.0 KiB free" in err, err
    assert not (tmp_path / "run").exists()


def test_the_former_moe_stage_key_is_read_as_train_stage(tmp_path):
    """The stage is one key, train.stage. Configs of the former layout, which carried moe.stage
    (moe | merge) next to it, as every saved xft_config.yaml did, still load, with a notice."""
    import warnings

    import yaml

    from xft_megatron.checkpoint import dist as ckpt
    from xft_megatron.config import dump_config
    from xft_megatron.config import require_runnable

    moe = ["moe.num_experts=4", "moe.topk=2"]
    with pytest.warns(FutureWarning, match="moe.stage=merge read as train.stage=merge"):
        cfg = load_config(None, moe + ["moe.stage=merge"])
    assert cfg.train.stage == "merge" == cfg.stage and "stage" not in cfg.to_dict()["moe"]
    with pytest.warns(FutureWarning, match="moe.stage=moe dropped"):
        assert load_config(None, moe + ["moe.stage=moe"]).stage == "moe"
    with pytest.warns(FutureWarning, match="train.stage=moe is given"):
        assert load_config(None, moe + ["moe.stage=merge", "train.stage=moe"]).stage == "moe"
    with pytest.warns(FutureWarning, match="the model is dense"):
        assert load_config(None, ["moe.stage=merge"]).stage == "pretrain"
    with pytest.raises(ConfigError, match="no longer a config key; the stage is train.stage"):
        load_config(None, moe + ["moe.stage=fold"])

    def saved(name, data):
        (tmp_path / name).mkdir()
        (tmp_path / name / ckpt.CONFIG_FILE).write_text(yaml.safe_dump(data, sort_keys=False))
        return str(tmp_path / name)

    def train(load, *overrides):
        return require_runnable(load_config(
            None, [f"checkpoint.load={load}", "checkpoint.save=out", "data.path=d.jsonl",
                   *overrides], read_stored=ckpt.read_config))

    merge_stage = load_config(None, moe + ["train.stage=merge"])
    before = merge_stage.to_dict()  # a merge-stage checkpoint's config as it was saved before
    before["moe"]["stage"], before["train"]["stage"] = "merge", None
    old = saved("old", before)
    with pytest.warns(FutureWarning, match="moe.stage=merge read as train.stage=merge"):
        assert ckpt.load_config(old, parallel={}).stage == "merge"
        assert train(old).stage == "merge"  # `xft train` continues the merge stage
    with pytest.warns(FutureWarning, match="train.stage=moe is given"):
        assert train(old, "train.stage=moe").stage == "moe"  # or runs the stage it is given
    new = saved("new", yaml.safe_load(dump_config(merge_stage)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # today's layout: no notice
        assert ckpt.load_config(new, parallel={}).stage == "merge"
        assert train(new).stage == "merge" and train(new, "train.stage=moe").stage == "moe"
        assert train(new, "moe.num_experts=0").stage == "pretrain"
    # the router's initial scale belongs to the upcycling: a loaded MoE holds its router
    assert train(new, "moe.router_init_std=0.02").moe.router_init_std == 0.02
    with pytest.raises(ConfigError, match=r"does nothing here.*xft upcycle --router-init-std 0.3"):
        train(new, "moe.router_init_std=0.3")
    dense = saved("dense", yaml.safe_load(dump_config(load_config(None, []))))
    assert train(dense, *moe, "moe.router_init_std=0.3").moe.router_init_std == 0.3


def test_shared_expert_dense_settings_and_memory():
    """Dense: Megatron dispatches the routed experts only (EP divides N-1, not N), and no rank
    does the shared expert's work for its whole expert-parallel group."""
    from xft_megatron.training import memory

    pool = load_config(None, ["moe.num_experts=9", "moe.topk=6", "parallel.expert=1"])
    dense = load_config(None, ["moe.num_experts=9", "moe.topk=6", "parallel.expert=8",
                               "moe.shared_expert_impl=dense"])
    assert (pool.moe.dispatched_experts, pool.moe.dispatched_topk) == (9, 6)
    assert (dense.moe.dispatched_experts, dense.moe.dispatched_topk) == (8, 5)
    ep8_pool = load_config(None, ["moe.num_experts=8", "moe.topk=6", "parallel.expert=8"])
    assert memory._expert_copies_per_token(ep8_pool.moe, 8, "moe") > 6
    assert memory._expert_copies_per_token(dense.moe, 8, "moe") == 6
    # the merge stage runs its merged FFN over all N experts: EP divides N there
    with pytest.raises(ConfigError, match="moe.num_experts=9 is not divisible by parallel.expert=8"):
        load_config(None, ["moe.num_experts=9", "moe.topk=6", "parallel.expert=8",
                           "moe.shared_expert_impl=dense", "train.stage=merge"])



def test_model_spec_is_checked_before_anything_and_not_inherited(tmp_path, capsys):
    """model.spec: local | te. Without Transformer Engine (or without a GPU) a te run stops
    before the data or a model is touched, saying why; `--dry-run` names the modules each
    spec builds; a checkpoint's stored spec is a record, not a default (either spec loads it)."""
    import yaml

    from xft_megatron import cli
    from xft_megatron.checkpoint import dist as ckpt
    from xft_megatron.model import builder

    with pytest.raises(ConfigError, match="model.spec='tex' must be local or te"):
        load_config(None, ["model.spec=tex"])
    base = ["model.preset=tiny", f"checkpoint.save={tmp_path}/run", "data.path=/missing.jsonl"]
    try:
        builder.check_spec("te")
        usable = True
    except ConfigError as e:
        usable, why = False, str(e)
    if not usable:  # CI and this machine: TE absent or no GPU
        assert "model.spec=te" in why and "model.spec=local" in why
        assert cli.main(["train", *base, "model.spec=te"]) == 2
        assert why in capsys.readouterr().err
        assert not (tmp_path / "run").exists()
    for spec, says, grads in (("local", "local: Megatron-Core's modules and this project's",
                               "added to the fp32 buffer apart"),
                              ("te", "te: Transformer Engine's norm+qkv, attention",
                               "accumulated into the fp32 buffer by the GEMM")):
        assert cli.main(["train", *base, f"model.spec={spec}", "--dry-run"]) == 0
        line = next(ln for ln in capsys.readouterr().out.splitlines()
                    if ln.startswith("modules "))
        assert line.startswith(f"modules      {says}") and line.endswith(grads), line

    stored = load_config(None, ["model.preset=tiny", "model.spec=te"]).to_dict()
    read = lambda path: stored  # noqa: E731  (a checkpoint saved by a te run)
    assert load_config(None, ["checkpoint.load=x"], read_stored=read).model.spec == "local"
    assert load_config(None, ["checkpoint.load=x", "model.spec=te"],
                       read_stored=read).model.spec == "te"
    # the tools' reader too (eval, verify, HumanEval's conversion build from it)
    folder = tmp_path / "ckpt" / "iter_0000000"
    folder.mkdir(parents=True)
    (folder / "xft_config.yaml").write_text(yaml.safe_dump({"iteration": 0, **stored}))
    (tmp_path / "ckpt" / "latest").write_text("iter_0000000")
    assert ckpt.read_config(str(tmp_path / "ckpt"))["model"]["spec"] == "te"
    assert ckpt.load_config(str(tmp_path / "ckpt")).model.spec == "local"


def test_fp8_is_checked_before_anything_and_not_inherited(tmp_path, capsys):
    """precision.fp8 (none | hybrid | e4m3) with a stateless recipe: refused with what to
    change when the layers are not TE's, the dtype is not bf16, or a GEMM's tokens or widths
    are not multiples of 16; handed to Megatron's TransformerConfig; named by `--dry-run`; a
    run stops before touching anything where TE or its FP8 GEMMs are missing; a checkpoint's
    stored fp8 is a record, not a default."""
    import yaml

    from xft_megatron import cli
    from xft_megatron.checkpoint import dist as ckpt
    from xft_megatron.model import builder

    te = ["model.preset=tiny", "model.spec=te", "precision.dtype=bf16"]
    for extra, says in (
            (["precision.fp8=fp16"], "precision.fp8='fp16' must be one of none, hybrid, e4m3"),
            (["precision.fp8=hybrid", "precision.fp8_recipe=delayed"],
             "must be one of tensorwise, blockwise, mxfp8; delayed scaling stores its amax "
             "history in checkpoints as a Python pickle"),
            (["precision.fp8=hybrid", "precision.dtype=fp32"], "needs precision.dtype=bf16"),
            (["precision.fp8=e4m3", "model.spec=local"],
             "precision.fp8=e4m3 runs in Transformer Engine's linears; set model.spec=te"),
            (["precision.fp8=hybrid", "train.seq_length=120"],
             "gives TE's linears 120 tokens per rank"),
            (["precision.fp8=hybrid", "train.seq_length=80", "parallel.tensor=2",
              "parallel.sequence_parallel=true", "model.ffn_hidden_size=192"],
             r"40 tokens per rank \(train.seq_length=80 / parallel.tensor=2\)"),
            (["precision.fp8=hybrid", "parallel.tensor=2"],
             "model.ffn_hidden_size per tensor-parallel rank is 88")):
        with pytest.raises(ConfigError, match=says):
            load_config(None, te + extra)
    # 128 tokens, widths 64 / 64 / 32 / 176: FP8 as asked, handed to Megatron
    tconfig = builder.transformer_config(load_config(None, te + ["precision.fp8=hybrid"]))
    assert (tconfig.fp8, tconfig.fp8_recipe) == ("hybrid", "tensorwise")
    assert builder.transformer_config(load_config(None, te)).fp8 is None
    load_config(None, te + ["precision.fp8=e4m3", "precision.fp8_recipe=blockwise",
                            "train.seq_length=96", "parallel.tensor=2",
                            "parallel.sequence_parallel=true", "model.ffn_hidden_size=192"])

    base = te + ["precision.fp8=hybrid", f"checkpoint.save={tmp_path}/run",
                 "data.path=/missing.jsonl"]
    assert cli.main(["train", *base, "--dry-run"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("modules "))
    assert line.endswith("; FP8 GEMMs in TE's linears (hybrid, tensorwise scaling)"), line
    try:
        builder.check_runnable(load_config(None, base))
        usable = True
    except ConfigError as e:
        usable, why = False, str(e)
    if not usable:  # CI and this machine: TE absent, no GPU, or a GPU without FP8
        assert "model.spec=local" in why or "precision.fp8=none" in why, why
        assert cli.main(["train", *base]) == 2
        assert why in capsys.readouterr().err
        assert not (tmp_path / "run").exists()

    stored = load_config(None, te + ["precision.fp8=hybrid"]).to_dict()
    folder = tmp_path / "ckpt" / "iter_0000000"
    folder.mkdir(parents=True)
    (folder / "xft_config.yaml").write_text(yaml.safe_dump({"iteration": 0, **stored}))
    (tmp_path / "ckpt" / "latest").write_text("iter_0000000")
    assert ckpt.read_config(str(tmp_path / "ckpt"))["precision"]["fp8"] == "hybrid"
    loaded = ckpt.load_config(str(tmp_path / "ckpt"))  # eval, verify, HumanEval's conversion
    assert (loaded.model.spec, loaded.precision.fp8) == ("local", "none")
    assert loaded.precision.dtype == "bf16"  # the rest of the section is kept
    run = load_config(None, ["checkpoint.load=x"], read_stored=lambda path: stored)
    assert (run.model.spec, run.precision.fp8) == ("local", "none")


def test_te_experts_need_the_te_spec_and_are_read_back_as_grouped(tmp_path):
    """moe.experts_impl=te_grouped: TE's grouped linears, stored in the grouped layout. It
    needs model.spec=te, refuses what it cannot do (the dense shared expert, Adafactor's
    per-half factoring), and what a checkpoint saved with it records reads back as grouped
    (runs and tools that load it build this project's experts unless they ask again); a meta
    build (the streaming tools) takes the grouped experts."""
    import torch

    from xft_megatron.model import builder
    from xft_megatron.model.moe.experts import GroupedExperts
    from xft_megatron.runtime import parallel

    moe = ["model.preset=tiny", "moe.num_experts=4", "moe.topk=2", "moe.experts_impl=te_grouped"]
    for extra, says in (
            ([], "moe.experts_impl=te_grouped takes Transformer Engine's grouped linears; set "
                 "model.spec=te"),
            (["model.spec=te", "train.optimizer=adafactor", "train.distributed_optimizer=false"],
             "train.optimizer=adafactor factors each expert's gate and up halves apart"),
            (["model.spec=te", "moe.shared_expert_impl=dense"],
             "moe.shared_expert_impl=dense needs moe.experts_impl=grouped"),
            (["moe.experts_impl=te"], "moe.experts_impl='te' must be one of grouped, "
                                      "sequential, te_grouped")):
        with pytest.raises(ConfigError, match=says):
            load_config(None, moe + extra)
    cfg = load_config(None, moe + ["model.spec=te"])
    stored = cfg.to_dict()
    run = load_config(None, ["checkpoint.load=x"], read_stored=lambda path: stored)
    assert (run.model.spec, run.moe.experts_impl) == ("local", "grouped")
    again = load_config(None, ["checkpoint.load=x", "model.spec=te",
                               "moe.experts_impl=te_grouped"], read_stored=lambda path: stored)
    assert again.moe.experts_impl == "te_grouped"
    parallel.initialize(cfg.parallel)
    (meta,) = builder.build_model(cfg, meta=True)
    experts = [m for m in meta.modules() if type(m).__name__.endswith("Experts")]
    assert experts and all(isinstance(m, GroupedExperts) for m in experts)
    assert all(p.device == torch.device("meta") for p in meta.parameters())
