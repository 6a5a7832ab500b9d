"""`xft config` and `xft train` build a config the same way (config.load_config with the
checkpoint reader), so they accept and refuse the same arguments; `xft config` only names, on
stderr, what a run needs beyond a valid config (checkpoint.save, data.path)."""

import re

import yaml

from tests.common import run_cli
from xft_megatron.checkpoint import dist as ckpt
from xft_megatron.config import Config, load_config


def _said(run):
    """What a command said on stderr, without one-time notices (a checkpoint without
    checksums is noticed once per process)."""
    return [line for line in run.err.splitlines() if not line.startswith("notice:")]


def _stored(root, *overrides):
    """A checkpoint folder holding only its config (all `checkpoint.load` reads here)."""
    cfg = load_config(None, ["model.preset=tiny", *overrides])
    (root / "iter_0000002").mkdir(parents=True)
    (root / "iter_0000002" / ckpt.CONFIG_FILE).write_text(
        yaml.safe_dump({"iteration": 2, **cfg.to_dict()}, sort_keys=False))
    (root / ckpt.LATEST_FILE).write_text("iter_0000002")
    return str(root)


def test_config_and_train_accept_and_refuse_the_same_arguments(tmp_path):
    big = _stored(tmp_path / "big", "model.num_layers=6", "model.hidden_size=128",
                  "model.num_attention_heads=8", "model.max_position_embeddings=4096")
    long_yaml = tmp_path / "long.yaml"  # more positions than the default model has
    long_yaml.write_text("train:\n  seq_length: 4096\n")
    run = [f"checkpoint.save={tmp_path / 'out'}", "data.path=d.jsonl"]
    cases = {
        "valid": ["model.preset=tiny"],
        "bad layout": ["model.preset=tiny", "parallel.tensor=8"],
        "stored architecture": [f"checkpoint.load={big}"],
        "stored positions": [str(long_yaml), f"checkpoint.load={big}"],
        "positions without it": [str(long_yaml), "model.preset=tiny"],
        "clash with the stored": [f"checkpoint.load={big}", "model.preset=tiny"],
        "no such checkpoint": [f"checkpoint.load={tmp_path / 'none'}"],
        "unknown key": ["model.preset=tiny", "train.router_lr_mul=10"],
    }
    outcomes = {}
    for name, args in cases.items():
        shown = run_cli("config", *args, *run)
        planned = run_cli("train", "--dry-run", *args, *run)
        assert shown.code == planned.code, (name, shown, planned)
        assert _said(shown) == _said(planned), name  # the same refusal, or none
        outcomes[name] = shown.code
        if shown.code == 0:  # what was printed is the model the dry run plans
            total = Config.from_dict(yaml.safe_load(shown.out)).model.num_parameters()
            assert f"parameters   total {total:,}" in planned.out, (name, planned.out)
    # the checks above can fail: half of the cases are refusals, half acceptances
    assert outcomes == {"valid": 0, "bad layout": 2, "stored architecture": 0,
                        "stored positions": 0, "positions without it": 2,
                        "clash with the stored": 2, "no such checkpoint": 2,
                        "unknown key": 2}, outcomes
    stored = yaml.safe_load(run_cli("config", f"checkpoint.load={big}", *run).out)
    assert (stored["model"]["num_layers"], stored["model"]["hidden_size"]) == (6, 128)


def test_dry_run_says_where_the_shared_expert_runs(tmp_path):
    run = [f"checkpoint.save={tmp_path / 'out'}", "data.path=d.jsonl"]
    pool = run_cli("train", "--dry-run", "--world-size", "2", *run, "model.preset=tiny",
                   "moe.num_experts=4", "moe.topk=3", "parallel.expert=2")
    assert pool.code == 0, pool
    assert ("experts      1 shared + 3 routed, top-3 (2 routed per token); 2 dispatched per EP "
            "rank; shared expert expert 0 of the dispatched pool (moe.shared_expert_impl=pool): "
            "its EP rank also runs it for every token of its EP group") in pool.out, pool.out
    dense = run_cli("train", "--dry-run", "--world-size", "2", *run, "model.preset=tiny",
                    "moe.num_experts=5", "moe.topk=3", "parallel.expert=2",
                    "moe.shared_expert_impl=dense")
    assert dense.code == 0, dense
    assert ("1 shared + 4 routed, top-3 (2 routed per token); 2 dispatched per EP rank; shared "
            "expert off the dispatch path") in dense.out, dense.out


def test_config_names_what_a_run_still_needs(tmp_path):
    shown = run_cli("config", "model.preset=tiny", "train.stage=merge", "moe.num_experts=4",
                    "moe.topk=2")
    assert shown.code == 0 and "stage: merge" in shown.out
    assert "# xft train needs more: train.stage=merge starts from a trained XFT MoE" in shown.err
    planned = run_cli("train", "--dry-run", "model.preset=tiny", "train.stage=merge",
                      "moe.num_experts=4", "moe.topk=2")
    assert planned.code == 2 and "train.stage=merge starts from a trained XFT MoE" in planned.err
    shown = run_cli("config", "model.preset=tiny", f"checkpoint.save={tmp_path}")
    assert shown.code == 0 and "# xft train needs more: data.path is not set" in shown.err


def test_quickstart_checks_its_overrides_against_the_base_as_training_will(tmp_path):
    """`xft quickstart --base` validates the shared overrides before any step, against the
    base's architecture as every stage's `xft train` will see it (the conversion's stored
    config): a model key that disagrees with the base stops it up front."""
    import json

    import pytest

    from xft_megatron.config import ConfigError
    from xft_megatron.pipeline.quickstart import _check_config

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(dict(
        model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64,
        intermediate_size=176, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=384, max_position_embeddings=256,
        rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False)))
    _check_config(["train.lr=1e-4", "model.max_position_embeddings=512"], str(hf))
    with pytest.raises(ConfigError, match=r"model.num_layers=2 \(stored: 3\)"):
        _check_config(["model.num_layers=2"], str(hf))
    with pytest.raises(ConfigError, match="not divisible by parallel.tensor=8"):
        _check_config(["parallel.tensor=8"], str(hf))
    # the layers and FP8 asked for must run here (TE and a GPU), also before the data is mined
    from xft_megatron.model import builder

    for extra in (["model.spec=te"], ["model.spec=te", "precision.dtype=bf16",
                                      "precision.fp8=hybrid"]):
        try:
            builder.check_runnable(load_config(None, ["model.preset=tiny"] + extra))
        except ConfigError as e:  # CI and this machine: no TE, or no GPU
            with pytest.raises(ConfigError, match=re.escape(str(e))):
                _check_config(extra, str(hf))
            with pytest.raises(ConfigError, match=re.escape(str(e))):
                _check_config(extra, None)
        else:  # a machine where they run
            _check_config(extra, str(hf))
