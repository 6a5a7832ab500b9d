"""Reliability of inputs: corrupt or mismatched checkpoints, HF directories and tokenizers are
refused with a message naming the file and the problem, leaving every source file and the
output directory untouched; fuzzed data files and configs only ever raise our own errors.

Every injected case is counted; the module prints a table (category, cases injected, refused
cleanly, other outcome) at the end and writes it as JSON under pytest's temporary directory.
"""

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tests.harness import run_ranks

# category -> {"injected", "refused", "other": Counter of other outcomes}
FIGURES = {}


def tally(category, injected, refused, **other):
    row = FIGURES.setdefault(category, {"injected": 0, "refused": 0, "other": Counter()})
    row["injected"] += injected
    row["refused"] += refused
    row["other"].update({k: v for k, v in other.items() if v})


@pytest.fixture(scope="module", autouse=True)
def figures_table(request, tmp_path_factory):
    yield
    rows = [(c, r["injected"], r["refused"],
             ", ".join(f"{k} {v}" for k, v in sorted(r["other"].items())) or "-")
            for c, r in FIGURES.items()]
    path = tmp_path_factory.mktemp("reliability") / "reliability_inputs.json"
    path.write_text(json.dumps([dict(category=c, injected=i, refused_cleanly=r, other=o)
                                for c, i, r, o in rows], indent=1))
    width = max([len(r[0]) for r in rows] + [8])
    lines = [f"reliability inputs ({path})",
             f"{'category':<{width}}  {'injected':>8}  {'refused':>7}  other outcome"]
    lines += [f"{c:<{width}}  {i:>8}  {r:>7}  {o}" for c, i, r, o in rows]
    plugins = request.config.pluginmanager
    capture = plugins.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print("\n" + "\n".join(lines), flush=True)


def tree_digest(path):
    """sha256 over the relative names and contents of every file under `path`."""
    h = hashlib.sha256()
    for dirpath, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(dirpath, name)
            h.update(os.path.relpath(full, path).encode())
            with open(full, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def _refusal(fn):
    """(exception type name, message) of fn(), or ("accepted", "") when it returns."""
    try:
        fn()
    except BaseException as e:  # noqa: BLE001 - the type is what is checked
        return type(e).__name__, str(e)
    return "accepted", ""


# ------------------------------------------------------------------------- corrupt inputs
CKPT_CASES = {  # name -> (what is damaged, text the message must hold)
    "truncated_distcp": ("iter_0000001/__0_0.distcp", "truncated"),
    "random_distcp": ("iter_0000001/__0_0.distcp", "does not match the checksum"),
    # (megatron-core 0.19 writes one data file per rank: the only one goes)
    "missing_data_file": ("iter_0000001/__0_0.distcp", "missing"),
    "missing_metadata": ("iter_0000001/.metadata", "missing"),
    "latest_to_missing_folder": ("latest", "points to 'iter_0000002'"),
    "broken_config_yaml": ("iter_0000001/xft_config.yaml", "not valid YAML"),
    "config_yaml_bad_value": ("iter_0000001/xft_config.yaml", "has type str, expected int"),
}
ARCH_CASES = {  # model overrides -> text the refusal must hold (tensor and both shapes)
    "hidden_128": (["model.hidden_size=128"],
                   "'embedding.word_embeddings.weight' has shape (512, 64) in the checkpoint "
                   "but (512, 128) in the model"),
    "layers_2": (["model.num_layers=2"],
                 "'decoder.layers.input_layernorm.weight' has shape (4, 64) in the "
                 "checkpoint but (2, 64) in the model"),
    "vocab_1024": (["model.vocab_size=1024"],
                   "'output_layer.weight' has shape (512, 64) in the checkpoint but (1024, 64)"),
    "qkv_bias": (["model.qkv_bias=true"],
                 "'decoder.layers.self_attention.linear_qkv.bias' is not in the checkpoint"),
}
HF_CASES = {  # name -> (file the message must name, text it must hold)
    "missing_shard": ("model-00002-of-00003.safetensors", "do not exist"),
    "index_points_elsewhere": ("model-00001-of-00003.safetensors", "does not hold tensor"),
    "index_lacks_tensor": ("index_lacks_tensor", "'model.norm.weight' is missing"),
    "truncated_safetensors": ("model-00001-of-00003.safetensors", "damaged or incomplete"),
    "random_safetensors": ("model-00001-of-00003.safetensors", "damaged or incomplete"),
    "config_json_missing": ("config.json", "is missing"),
    "config_json_not_json": ("config.json", "is not valid JSON"),
    "config_json_a_list": ("config.json", "not an object"),
    "config_weights_mismatch": ("config.json", "has shape (176, 64)"),
}
TOKENIZER_VOCAB, MODEL_VOCAB = 600, 512  # the tiny preset's vocabulary


def _damage_checkpoint(src, root):
    """A copy of the checkpoint root `src` per CKPT_CASES entry, damaged accordingly."""
    import yaml

    rng = random.Random(0)
    out = {}
    for name in CKPT_CASES:
        d = os.path.join(root, name)
        shutil.copytree(src, d)
        it = os.path.join(d, "iter_0000001")
        if name == "truncated_distcp":
            f = os.path.join(it, "__0_0.distcp")
            data = open(f, "rb").read()
            open(f, "wb").write(data[:len(data) // 2])
        elif name == "random_distcp":
            f = os.path.join(it, "__0_0.distcp")
            noise = bytes(rng.randrange(256) for _ in range(os.path.getsize(f)))  # same size
            open(f, "wb").write(noise)
        elif name == "missing_data_file":
            os.remove(os.path.join(it, "__0_0.distcp"))
        elif name == "missing_metadata":
            os.remove(os.path.join(it, ".metadata"))
        elif name == "latest_to_missing_folder":  # the only checkpoint was deleted
            shutil.rmtree(it)
            open(os.path.join(d, "latest"), "w").write("iter_0000002\n")
        elif name == "broken_config_yaml":
            open(os.path.join(it, "xft_config.yaml"), "w").write("model: [hidden_size: 64\n")
        else:
            f = os.path.join(it, "xft_config.yaml")
            cfg = yaml.safe_load(open(f))
            cfg["model"]["hidden_size"] = "sixty-four"
            open(f, "w").write(yaml.safe_dump(cfg))
        if "config_yaml" in name:  # as an older checkpoint without checksums: the config's
            os.remove(os.path.join(it, "checksums.json"))  # own checks must name the problem
        out[name] = d
    return out


def _hf_dirs(root):
    """A tiny HF Llama (three safetensors shards) and one damaged copy per HF_CASES entry."""
    from tests.common import tiny_hf_llama

    good = os.path.join(root, "good")
    tiny_hf_llama(good, save={"max_shard_size": "200KB"}, intermediate_size=176,
                  vocab_size=384, max_position_embeddings=256)
    index_file = "model.safetensors.index.json"
    shard = "model-00001-of-00003.safetensors"
    weight_map = json.load(open(os.path.join(good, index_file)))["weight_map"]
    assert sorted(set(weight_map.values()))[0] == shard and len(set(weight_map.values())) == 3
    dirs = {"good": good}
    for name in HF_CASES:
        d = dirs[name] = os.path.join(root, name)
        shutil.copytree(good, d)
        index = json.load(open(os.path.join(d, index_file)))
        config = json.load(open(os.path.join(d, "config.json")))
        if name == "missing_shard":
            os.remove(os.path.join(d, "model-00002-of-00003.safetensors"))
        elif name == "index_points_elsewhere":  # a tensor mapped to a shard lacking it
            moved = next(k for k, v in index["weight_map"].items() if v != shard)
            index["weight_map"][moved] = shard
        elif name == "index_lacks_tensor":
            del index["weight_map"]["model.norm.weight"]
        elif name == "truncated_safetensors":
            data = open(os.path.join(d, shard), "rb").read()
            open(os.path.join(d, shard), "wb").write(data[:len(data) // 2])
        elif name == "random_safetensors":
            size = os.path.getsize(os.path.join(d, shard))
            rng = random.Random(1)
            open(os.path.join(d, shard), "wb").write(bytes(rng.randrange(256)
                                                           for _ in range(size)))
        elif name == "config_json_missing":
            os.remove(os.path.join(d, "config.json"))
        elif name == "config_json_not_json":
            open(os.path.join(d, "config.json"), "w").write('{"model_type": "llama",')
        elif name == "config_json_a_list":
            json.dump([config], open(os.path.join(d, "config.json"), "w"))
        elif name == "config_weights_mismatch":
            config["intermediate_size"] = 128
        if "index" in name:
            json.dump(index, open(os.path.join(d, index_file), "w"))
        if name == "config_weights_mismatch":
            json.dump(config, open(os.path.join(d, "config.json"), "w"))
    return dirs


def _big_tokenizer(path):
    """An HF tokenizer of TOKENIZER_VOCAB ids (word level, with EOS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, **{f"w{i}": i + 2 for i in range(TOKENIZER_VOCAB - 2)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>",
                            unk_token="<unk>").save_pretrained(path)
    return path


def _inputs_body(rank, world, root):
    """Builds the inputs and runs every corrupt-input case; returns per-case observations
    (never raises for a case: each one's outcome is reported)."""
    from tests import common
    from xft_megatron.checkpoint import dist as ckpt

    out = {"ckpt": {}, "arch": {}, "hf": {}, "tokenizer": {}}
    cfg = common.tiny_config()
    chunks, _ = common.setup(cfg, ddp=False)
    good = os.path.join(root, "ckpt")
    ckpt.save(chunks, good, 1, cfg)
    cases = _damage_checkpoint(good, os.path.join(root, "ckpt_cases"))
    for name, d in cases.items():
        before = tree_digest(d)
        load = ckpt.load_config if name == "config_yaml_bad_value" else \
            (lambda p: ckpt.load(chunks, p))
        kind, msg = _refusal(lambda: load(d))
        dest = os.path.join(root, "hf_out", name)
        code, _, err = common.run_cli("convert", "mcore-to-hf", "--ckpt", d, "--out", dest,
                                      catch=True)
        out["ckpt"][name] = dict(kind=kind, msg=msg, code=code, stderr=err, dir=d,
                                 out_created=os.path.exists(dest),
                                 unchanged=tree_digest(d) == before)
    for name, (overrides, _) in ARCH_CASES.items():
        before = tree_digest(good)
        other, _ = common.setup(common.tiny_config(*overrides), ddp=False)
        kind, msg = _refusal(lambda: ckpt.load(other, good))
        out["arch"][name] = dict(kind=kind, msg=msg, unchanged=tree_digest(good) == before)

    hf = _hf_dirs(os.path.join(root, "hf"))
    for name, d in hf.items():
        before = tree_digest(d)
        dest = os.path.join(root, "mcore_out", name)
        code, _, err = common.run_cli("convert", "hf-to-mcore", "--hf", d, "--out", dest,
                                      catch=True)
        out["hf"][name] = dict(code=code, stderr=err, dir=d, out_created=os.path.exists(dest),
                               unchanged=tree_digest(d) == before)

    tok = _big_tokenizer(os.path.join(root, "tok600"))
    data = os.path.join(root, "data.jsonl")
    with open(data, "w") as f:
        for i in range(8):
            f.write(json.dumps({"text": f"w{i} w{i + 1} w{i + 2}"}) + "\n")
    save, cache = os.path.join(root, "train_out"), os.path.join(root, "eval_cache")
    before = tree_digest(good)
    train = ["train", "model.preset=tiny", "train.seq_length=32", "train.micro_batch_size=1",
             "train.global_batch_size=1", "train.train_steps=1", f"data.path={data}",
             f"data.tokenizer={tok}", f"checkpoint.save={save}"]
    code, _, err = common.run_cli(*train, catch=True)
    out["tokenizer"]["xft train"] = dict(code=code, stderr=err, out_created=os.path.exists(save))
    code, _, err = common.run_cli("eval", "loss", "--ckpt", good, "--data", data,
                                  "--tokenizer", tok, "--cache-dir", cache, catch=True)
    out["tokenizer"]["xft eval loss"] = dict(code=code, stderr=err,
                                             out_created=os.path.exists(cache),
                                             unchanged=tree_digest(good) == before)
    out["paths"] = dict(random_distcp=cases["random_distcp"], tokenizer=tok,
                        truncated_safetensors=hf["truncated_safetensors"], train=train[:-1])
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    return run_ranks(1, _inputs_body, str(root))[0]


def test_damaged_checkpoints_are_refused_naming_the_file(inputs):
    """Truncated / random-bytes / missing data file, missing .metadata, `latest` naming a
    deleted folder, a broken or invalid xft_config.yaml: refused in process (load) and by
    `xft convert mcore-to-hf` (exit 2), naming the file; no output, sources unchanged."""
    failures = []
    for name, (damaged, problem) in CKPT_CASES.items():
        r = inputs["ckpt"][name]
        file = os.path.join(r["dir"], damaged)
        in_process = r["kind"] in ("CheckpointError", "FileNotFoundError", "ConfigError") \
            and file in r["msg"] and problem in r["msg"]
        by_cli = r["code"] == 2 and file in r["stderr"] and problem in r["stderr"] \
            and "Traceback" not in r["stderr"] and not r["out_created"]
        tally("torch_dist checkpoint damaged: checkpoint.dist.load", 1,
              int(in_process and r["unchanged"]))
        tally("torch_dist checkpoint damaged: xft convert mcore-to-hf", 1,
              int(by_cli and r["unchanged"]))
        if not (in_process and by_cli and r["unchanged"]):
            failures.append((name, r))
    assert not failures, failures


def test_checkpoint_of_another_architecture_names_tensor_and_shapes(inputs):
    """A checkpoint loaded into a model of another hidden size, depth or vocabulary, or one
    with QKV biases the checkpoint lacks: CheckpointError naming the tensor and both shapes
    (or that it is absent); the checkpoint is untouched."""
    failures = []
    for name, (_, expected) in ARCH_CASES.items():
        r = inputs["arch"][name]
        ok = r["kind"] == "CheckpointError" and expected in r["msg"] and r["unchanged"]
        tally("checkpoint of another architecture: load", 1, int(ok))
        if not ok:
            failures.append((name, r))
    assert not failures, failures


def test_damaged_hf_directories_are_refused_before_any_output(inputs):
    """A missing shard, an index mapping a tensor to a shard without it or lacking one the
    config needs, a truncated or random-bytes shard, config.json missing / not JSON / not an
    object / of another size than the weights: `xft convert hf-to-mcore` exits 2 naming the
    file; --out is not created and the directory is unchanged. The intact copy converts."""
    good = inputs["hf"]["good"]
    assert good["code"] == 0 and good["out_created"], good["stderr"][-2000:]
    failures = []
    for name, (file, problem) in HF_CASES.items():
        r = inputs["hf"][name]
        ok = r["code"] == 2 and file in r["stderr"] and problem in r["stderr"] \
            and r["dir"] in r["stderr"] and "Traceback" not in r["stderr"] \
            and not r["out_created"] and r["unchanged"]
        tally("HF directory damaged: xft convert hf-to-mcore", 1, int(ok))
        if not ok:
            failures.append((name, r))
    assert not failures, failures


def test_tokenizer_larger_than_the_model_vocabulary(inputs):
    """`xft train` and `xft eval loss` with a 600-id tokenizer for the 512-id tiny model:
    exit 2 naming the tokenizer and both sizes, before any model, data cache or output."""
    failures = []
    for command, r in inputs["tokenizer"].items():
        err = r["stderr"]
        ok = r["code"] == 2 and inputs["paths"]["tokenizer"] in err \
            and f"{TOKENIZER_VOCAB} ids" in err and f"vocabulary is {MODEL_VOCAB}" in err \
            and "Traceback" not in err and not r["out_created"] and r.get("unchanged", True)
        tally("tokenizer larger than the model vocabulary", 1, int(ok))
        if not ok:
            failures.append((command, r))
    assert not failures, failures


def test_real_command_line_exit_code_and_message(inputs):
    """The same refusals through `python -m xft_megatron.cli` (four processes at once):
    exit status 2, the file named on stderr, no traceback."""
    p = inputs["paths"]
    root = os.path.dirname(os.path.dirname(p["random_distcp"]))
    runs = {
        "mcore-to-hf, random .distcp": (
            ["convert", "mcore-to-hf", "--ckpt", p["random_distcp"], "--out",
             os.path.join(root, "cli_hf_out")],
            os.path.join(p["random_distcp"], "iter_0000001", "__0_0.distcp"),
            os.path.join(root, "cli_hf_out")),
        "hf-to-mcore, truncated shard": (
            ["convert", "hf-to-mcore", "--hf", p["truncated_safetensors"], "--out",
             os.path.join(root, "cli_mcore_out")],
            os.path.join(p["truncated_safetensors"], "model-00001-of-00003.safetensors"),
            os.path.join(root, "cli_mcore_out")),
        "train, tokenizer too large": (
            p["train"] + [f"checkpoint.save={root}/cli_train_out"], p["tokenizer"],
            os.path.join(root, "cli_train_out")),
        "train, a model too big for the machine": (
            p["train"] + ["model.vocab_size=100000000", f"checkpoint.save={root}/cli_big_out"],
            "model.vocab_size dominates", os.path.join(root, "cli_big_out")),
    }
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = {k: subprocess.Popen([sys.executable, "-m", "xft_megatron.cli"] + argv, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k, (argv, _, _) in runs.items()}
    failures = []
    try:
        for name, proc in procs.items():
            _, err = proc.communicate(timeout=300)
            _, file, dest = runs[name]
            ok = proc.returncode == 2 and file in err and "Traceback" not in err \
                and not os.path.exists(dest)
            tally("real command line (exit 2, file named, no traceback)", 1, int(ok))
            if not ok:
                failures.append((name, proc.returncode, err[-3000:]))
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert not failures, failures


# ------------------------------------------------------------------------- fuzzed data
TEXT = st.text(alphabet="abcxyz019 _(){}:;\"\\'\n\té中", min_size=1,
               max_size=16).filter(str.strip)
NOT_STRING = st.one_of(st.integers(-10**30, 10**30), st.floats(allow_nan=False), st.none(),
                       st.booleans(), st.lists(st.integers(0, 9), max_size=3),
                       st.dictionaries(st.sampled_from("ab"), st.integers(), max_size=2))
HUGE = 1 << 20  # bytes of a huge line


def _line(kind, draw_value, rng):
    """(one JSONL line as str or bytes, the error reason it must produce or None for a good
    record)."""
    if kind == "good":
        if rng.random() < 0.5:
            return json.dumps({"instruction": draw_value[0], "response": draw_value[1]}), None
        return json.dumps({"text": draw_value[0]}), None
    if kind == "random bytes":
        raw = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 60)))
        return b"\xff" + raw.replace(b"\n", b" "), "not_utf8"
    if kind == "broken JSON":
        text = json.dumps({"instruction": draw_value[0], "response": draw_value[1]})
        return text[:rng.randrange(1, len(text))], "bad_json"  # any proper prefix of an object
    if kind == "huge line (1 MB)":
        variant = rng.randrange(3)
        if variant == 0:  # a valid record far longer than seq_length
            return json.dumps({"instruction": "write", "response": "x" * HUGE}), "too_long"
        if variant == 1:
            return b"\xfe" * HUGE, "not_utf8"
        return '{"text": "' + "y" * HUGE, "bad_json"
    # wrong types: each field kind with a value of another JSON type
    value = draw_value[2]
    shape = rng.randrange(5)
    if shape == 0:
        return json.dumps({"instruction": value, "response": "ok"}), "wrong_type"
    if shape == 1:
        return json.dumps({"text": value}), "wrong_type"
    if shape == 2:
        return json.dumps({"messages": value if not isinstance(value, list) else 7}), \
            "wrong_type"
    if shape == 3:
        ids = value if not isinstance(value, list) else [0.5]
        return json.dumps({"input_ids": ids}), "wrong_type"
    return json.dumps(value if not isinstance(value, dict) else [value]), "wrong_type"


KINDS = ["good", "random bytes", "broken JSON", "huge line (1 MB)", "wrong types"]
LINE_SPECS = st.lists(st.tuples(st.sampled_from(KINDS + ["good", "good"]),
                                st.tuples(TEXT, TEXT, NOT_STRING)), min_size=1, max_size=8)


@settings(max_examples=150, derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(specs=LINE_SPECS, seed=st.integers(0, 2**16), on_error=st.sampled_from(["skip", "fail"]))
def test_fuzzed_data_files_only_raise_data_error(tmp_path_factory, specs, seed, on_error):
    """JSONL files of random-bytes lines, broken JSON, 1 MB lines and wrong field types mixed
    with good records: skip counts each bad line under its reason and keeps the good ones;
    fail raises DataError naming file:line; nothing usable left is a DataError; never any
    other exception."""
    from xft_megatron.config import DataConfig
    from xft_megatron.data.dataset import build_dataset
    from xft_megatron.data.records import DataError
    from xft_megatron.data.tokenizer import ByteTokenizer

    huge = [i for i, (k, _) in enumerate(specs) if k == "huge line (1 MB)"]
    specs = [("random bytes", v) if i in huge[1:] else (k, v)  # one 1 MB line per file
             for i, (k, v) in enumerate(specs)]
    rng = random.Random(seed)
    tmp = tmp_path_factory.mktemp("data")
    path = str(tmp / "d.jsonl")
    expected, first_bad = Counter(), {}
    with open(path, "wb") as f:
        for lineno, (kind, value) in enumerate(specs, start=1):
            line, reason = _line(kind, value, rng)
            f.write((line.encode() if isinstance(line, str) else line) + b"\n")
            if reason:
                expected[reason] += 1
                first_bad.setdefault(reason, lineno)
    good = sum(1 for k, _ in specs if k == "good")
    per_kind = Counter(k for k, _ in specs)
    cfg = DataConfig(path=path, on_error=on_error, template="plain")
    outcome = "ok"
    try:
        _, report = build_dataset(cfg, ByteTokenizer(), 128, str(tmp / "cache"))
    except DataError as e:
        msg = str(e)
        outcome = "data_error"
    except Exception as e:  # noqa: BLE001 - counted, then failed below
        outcome, msg = f"other:{type(e).__name__}", str(e)
    if outcome == "ok":
        clean = dict(report.errors) == dict(expected) and report.kept == good \
            and (on_error == "skip" or not expected)
    elif outcome == "data_error":
        first = min(first_bad.items(), key=lambda x: x[0]) if first_bad else None
        if on_error == "fail" and expected:
            clean = f"{sum(expected.values())} of {len(specs)} records are bad" in msg \
                and f"{path}:{first[1]}: {first[0]}" in msg
        else:  # nothing usable left
            clean = good == 0 and "no usable samples" in msg
    else:
        clean = False
    for kind in KINDS:
        n = per_kind.get(kind, 0)
        if kind == "good":
            tally("data: good records", n, 0, kept=n if outcome == "ok" and clean else 0,
                  stopped_by_fail=n if outcome == "data_error" and clean else 0,
                  unclean=0 if clean else n)
        else:
            tally(f"data: {kind}", n, n if clean else 0, unclean=0 if clean else n)
    assert clean, (outcome, on_error, specs, dict(expected), msg if outcome != "ok" else
                   (report.errors, report.kept))


# ------------------------------------------------------------------------- fuzzed configs
def _config_keys():
    import dataclasses

    from xft_megatron.config.schema import _SECTIONS

    kinds = {}
    for section, cls in _SECTIONS.items():
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else None
            kinds[f"{section}.{f.name}"] = type(default).__name__
    return kinds


KEY_KINDS = _config_keys()
CHOICES = {"moe.mode": ["xft", "none", "vanilla"], "moe.router_gate": ["mlp", "linear"],
           "moe.renorm": ["probs", "linear"], "moe.balance_loss": ["cv", "aux", "none"],
           "moe.dispatcher": ["alltoall", "allgather"],
           "moe.experts_impl": ["grouped", "sequential"],
           "precision.dtype": ["fp32", "bf16", "fp16"],
           "train.lr_decay_style": ["constant", "linear", "cosine"],
           "train.stage": ["pretrain", "sft", "moe", "merge"], "train.on_nan": ["stop", "skip"],
           "data.format": ["auto", "text", "tokens"], "data.on_error": ["fail", "skip"],
           "data.template": ["magicoder", "chat", "plain"],
           "model.preset": ["tiny", "qwen2-0.5b", "tinyllama-1.1b", "qwen3-0.6b"],
           "model.family": ["llama", "mistral", "qwen2", "qwen3"],
           "model.spec": ["local", "te"], "precision.grad_accum_fusion": [True, False, None]}
WILD = st.one_of(st.integers(-10, 10), st.integers(-2**70, 2**70),
                 st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(),
                 st.text(max_size=6), st.lists(st.integers(-1, 4), max_size=3),
                 st.sampled_from(["{", "[1,", ": :", "1e999", "-.inf", ".nan", "- a", "~",
                                  "0x10", "!!python/object:os.system", "&a [*a]"]))


def _plausible(key):
    kind = KEY_KINDS[key]
    if key in CHOICES:
        return st.sampled_from(CHOICES[key])
    if kind == "bool":
        return st.booleans()
    if kind == "float":
        return st.sampled_from([0.0, 0.5, 1.0, 2.0, 1e-4, 0.01, 1e4])
    return st.sampled_from([0, 1, 2, 3, 4, 8, 16, 32, 64, 128])


def _render(value):
    if isinstance(value, str):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else ("-.inf" if value < 0 else ".inf")
    return json.dumps(value)


PAIRS = st.sampled_from(sorted(KEY_KINDS) + ["model.hidden", "foo.bar", "model.preset.x",
                                             "train.lr.y"]).flatmap(
    lambda k: st.tuples(st.just(k), _plausible(k) if k in KEY_KINDS else WILD, WILD))
BASES = {"dense": [], "moe": ["moe.num_experts=4", "moe.topk=2"],
         "tp2": ["parallel.tensor=2", "parallel.sequence_parallel=true"]}
CONFIG_BASE = ["model.preset=tiny", "train.seq_length=32", "train.micro_batch_size=1",
               "train.global_batch_size=4"]


@settings(max_examples=1500, derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(pairs=st.lists(st.tuples(PAIRS, st.booleans()), min_size=1, max_size=4),
       base=st.sampled_from(sorted(BASES)))
def test_fuzzed_configs_only_raise_config_error(pairs, base):
    """Random values for random keys (plausible ones, and ints, floats, strings, bools, null,
    lists, negative and huge numbers, broken YAML) through load_config: a valid Config or
    ConfigError, nothing else; every valid one builds Megatron's TransformerConfig."""
    from xft_megatron.config import ConfigError, load_config
    from xft_megatron.model.builder import transformer_config

    overrides = CONFIG_BASE + BASES[base] + [
        f"{key}={_render(wild if use_wild else plausible)}"
        for (key, plausible, wild), use_wild in pairs]
    try:
        cfg = load_config(None, overrides)
    except ConfigError:
        tally("config: random overrides (load_config)", 1, 1)
        return
    except Exception as e:  # noqa: BLE001 - counted, then failed
        tally("config: random overrides (load_config)", 1, 0, unclean=1)
        raise AssertionError(f"load_config raised {type(e).__name__}: {e} for {overrides}")
    tally("config: random overrides (load_config)", 1, 0, valid_config=1)
    try:
        transformer_config(cfg)
    except Exception as e:  # noqa: BLE001 - a case the config schema's validation misses
        tally("config: valid ones through TransformerConfig", 1, 0, megatron_error=1)
        raise AssertionError(f"config validation missed a case Megatron refuses: "
                             f"{type(e).__name__}: {e} for {overrides}")
    tally("config: valid ones through TransformerConfig", 1, 0, built=1)
