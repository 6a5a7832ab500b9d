"""Hugging Face datasets as training data and Hub ids for HF model arguments, all built in the
test (no network): save_to_disk folders, Hub-layout folders (parquet shards + README.md YAML
configs), column mapping, offline misses, cache keys that follow the data, bad rows named by
dataset/split/row, Hub ids resolved from a cache laid out as huggingface_hub lays it, and
`xft convert hf-to-mcore --hf org/name` + `xft train data.path=hf:org/name` from that cache."""

import json
import os
import shutil

import pytest

from xft_megatron.config import ConfigError, DataConfig, load_config
from xft_megatron.data.dataset import build_dataset
from xft_megatron.data.records import DataError
from xft_megatron.data.tokenizer import ByteTokenizer
from xft_megatron.runtime.hub import HubError, HubSettings, parse_hub_id, resolve_model_dir

PAIRS = [{"problem": f"Write a function add_{i} that adds {i}.",
          "solution": f"def add_{i}(x):\n    return x + {i}\n"} for i in range(12)]
COLUMNS = {"instruction": "problem", "response": "solution"}
REV = "0123456789abcdef0123456789abcdef01234567"
README = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*.parquet
  - split: test
    path: data/test-*.parquet
- config_name: small
  data_files:
  - split: train
    path: data/train-00000-of-00002.parquet
---
# pairs
"""


def hub(tmp_path, offline=True) -> HubSettings:
    env = {"HF_HOME": str(tmp_path / "hf_home")}
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return HubSettings.from_env(env)


def hub_layout(folder, rows=PAIRS, test_rows=PAIRS[:3]):
    """A dataset repository as on the Hub: two parquet shards for train, one for test."""
    import datasets

    os.makedirs(os.path.join(folder, "data"), exist_ok=True)
    half = len(rows) // 2
    for name, part in (("train-00000-of-00002", rows[:half]), ("train-00001-of-00002",
                                                                rows[half:]),
                       ("test-00000-of-00001", test_rows)):
        datasets.Dataset.from_list(part).to_parquet(os.path.join(folder, "data",
                                                                 f"{name}.parquet"))
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(README)
    return str(folder)


def cache_snapshot(home, repo, repo_type, rev=REV):
    """HF_HOME/hub/<type>s--org--name/snapshots/REV with refs/main -> REV (huggingface_hub's
    layout); returns the snapshot folder."""
    root = os.path.join(home, "hub", f"{repo_type}s--{repo.replace('/', '--')}")
    snap = os.path.join(root, "snapshots", rev)
    os.makedirs(snap)
    os.makedirs(os.path.join(root, "refs"))
    with open(os.path.join(root, "refs", "main"), "w") as f:
        f.write(rev)
    return snap


def build(path, tmp_path, settings=None, **kw):
    cfg = DataConfig(path=str(path), columns=kw.pop("columns", COLUMNS), **kw)
    return build_dataset(cfg, ByteTokenizer(), 256, str(tmp_path / "cache"),
                         hub=settings or hub(tmp_path))


def decoded(ds):
    return [ByteTokenizer().decode(ds[i][0].tolist()) for i in range(len(ds))]


# ------------------------------------------------------------------------------ datasets
def test_save_to_disk_dataset_and_dict(tmp_path):
    import datasets

    datasets.Dataset.from_list(PAIRS).save_to_disk(str(tmp_path / "saved"))
    ds, report = build(tmp_path / "saved", tmp_path)
    assert (report.read, report.kept, report.dropped) == (len(PAIRS), len(PAIRS), 0)
    assert len(ds) == len(PAIRS)
    assert "add_5(x)" in decoded(ds)[5] and "adds 5." in decoded(ds)[5]

    datasets.DatasetDict({"train": datasets.Dataset.from_list(PAIRS),
                          "test": datasets.Dataset.from_list(PAIRS[:2])}
                         ).save_to_disk(str(tmp_path / "dict"))
    ds, report = build(tmp_path / "dict", tmp_path, split="test")
    assert report.read == 2 and len(ds) == 2
    with pytest.raises(DataError, match=r"no split 'valid'; it has train, test \(set data.split"):
        build(tmp_path / "dict", tmp_path, split="valid")


def test_hub_layout_folder_splits_subsets_and_columns(tmp_path):
    folder = hub_layout(tmp_path / "repo")
    ds, report = build(folder, tmp_path)
    assert report.read == len(PAIRS) and report.dropped == 0
    assert sorted(decoded(ds)) == sorted(decoded(build(folder, tmp_path)[0]))
    assert build(folder, tmp_path, split="test")[1].read == 3
    assert build(folder, tmp_path, subset="small")[1].read == len(PAIRS) // 2
    with pytest.raises(DataError, match="split=valid.*datasets could not load it"):
        build(folder, tmp_path, split="valid")
    # without the mapping, problem/solution is a known pair; with a wrong one, a clear error
    assert build(folder, tmp_path, columns={})[1].kept == len(PAIRS)
    with pytest.raises(DataError, match="has no column 'answer' .*its columns: problem, "
                                        "solution"):
        build(folder, tmp_path, columns={"instruction": "problem", "response": "answer"})


def test_column_mapping_applies_to_files_too(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"q": "Say hi.", "a": "hi"}, {"q": "Say bye."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds, report = build(path, tmp_path, columns={"instruction": "q", "response": "a"},
                       on_error="skip")
    assert report.kept == 1 and report.errors == {"missing_fields": 1}
    assert report.examples["missing_fields"][0].startswith(
        f"{path}:2: missing_fields: no column 'a' (data.columns.response)")
    assert decoded(ds)[0].endswith("hi")


def test_config_fields_and_overrides():
    cfg = load_config(None, ["data.path=hf:ise-uiuc/Magicoder-Evol-Instruct-110K",
                             "data.columns.instruction=problem", "data.columns.response=solution",
                             "data.split=train", "data.revision=main", "data.subset=default"])
    assert cfg.data.columns == COLUMNS and cfg.data.revision == "main"
    with pytest.raises(ConfigError, match="data.columns.prompt: unknown record field"):
        load_config(None, ["data.columns.prompt=x"])
    with pytest.raises(ConfigError, match="data.revision='v1' applies to Hub datasets"):
        load_config(None, ["data.path=a.jsonl", "data.revision=v1"])


def test_offline_miss_names_dataset_and_cache(tmp_path):
    settings = hub(tmp_path)
    with pytest.raises(DataError) as e:
        build("hf:someorg/missing", tmp_path, settings)
    msg = str(e.value)
    assert "'hf:someorg/missing'" in msg and "offline mode is on" in msg
    assert os.path.join(settings.hub_cache, "datasets--someorg--missing") in msg
    assert "hf download someorg/missing --repo-type dataset" in msg
    assert not os.path.exists(tmp_path / "cache")  # stopped before reading anything


def test_a_directory_without_a_dataset_is_named(tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    (code / "a.py").write_text("x = 1\n")
    with pytest.raises(DataError) as e:
        build(str(code), tmp_path, hub(tmp_path))
    msg = str(e.value)
    assert f"'{code}' is a directory without a dataset" in msg and "save_to_disk" in msg
    assert "does not exist" not in msg and not os.path.exists(tmp_path / "cache")


def test_hub_dataset_from_cache_keys_on_revision(tmp_path):
    settings = hub(tmp_path)
    snap = cache_snapshot(str(tmp_path / "hf_home"), "org/pairs", "dataset")
    hub_layout(snap)
    ds, report = build("hf:org/pairs", tmp_path, settings)
    assert report.read == len(PAIRS) and not report.from_cache
    assert build("hf:org/pairs", tmp_path, settings)[1].from_cache
    key = json.load(open(os.path.join(ds.directory, "meta.json")))["inputs"]["files"][0][1]
    assert key["revision"] == REV and key["kind"] == "hub"
    # another commit of the same dataset (data.revision) is another cache entry
    other = "f" * 40
    hub_layout(os.path.join(os.path.dirname(snap), other), rows=PAIRS[:5])
    ds2, r2 = build("hf:org/pairs", tmp_path, settings, revision=other)
    assert not r2.from_cache and ds2.directory != ds.directory and r2.read == 5


def test_changed_dataset_retokenizes(tmp_path):
    import datasets

    saved, folder = str(tmp_path / "saved"), str(tmp_path / "repo")
    datasets.Dataset.from_list(PAIRS).save_to_disk(saved)
    hub_layout(folder)
    for path in (saved, folder):
        assert not build(path, tmp_path)[1].from_cache
        assert build(path, tmp_path)[1].from_cache
    changed = [dict(p, solution=p["solution"] + "# changed\n") for p in PAIRS]
    shutil.rmtree(saved)
    datasets.Dataset.from_list(changed).save_to_disk(saved)
    hub_layout(folder, rows=changed)
    for path in (saved, folder):
        ds, report = build(path, tmp_path)
        assert not report.from_cache and all(s.endswith("# changed\n")
                                              for s in decoded(ds)), path


def test_bad_rows_reported_by_dataset_split_row(tmp_path):
    import datasets

    rows = PAIRS[:4] + [{"problem": "empty answer", "solution": ""}] + PAIRS[4:6] + \
        [{"problem": "x" * 400, "solution": "too long"}]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(
        str(tmp_path / "bad"))
    where = f"{tmp_path / 'bad'} split=train row="
    with pytest.raises(DataError) as e:
        build(tmp_path / "bad", tmp_path)
    assert f"{where}4: empty_response" in str(e.value)
    assert f"{where}7: too_long" in str(e.value)
    ds, report = build(tmp_path / "bad", tmp_path, on_error="skip")
    assert report.errors == {"empty_response": 1, "too_long": 1} and len(ds) == 6


# ------------------------------------------------------------------------------ hub ids
def test_hub_ids_resolve_from_the_cache(tmp_path, monkeypatch):
    settings = hub(tmp_path)
    snap = cache_snapshot(str(tmp_path / "hf_home"), "org/tiny", "model")
    with open(os.path.join(snap, "config.json"), "w") as f:
        f.write("{}")
    assert parse_hub_id("org/tiny@v1.0") == ("org/tiny", "v1.0")
    assert parse_hub_id("/abs/dir") is None and parse_hub_id("../x/y") is None
    assert resolve_model_dir("org/tiny", settings) == snap
    assert resolve_model_dir(f"org/tiny@{REV}", settings) == snap
    with pytest.raises(HubError) as e:
        resolve_model_dir("org/tiny@v2", settings)
    assert "--hf 'org/tiny@v2' is not a local directory" in str(e.value)
    assert "revision 'v2'" in str(e.value) and "offline mode is on (HF_HUB_OFFLINE)" in str(e.value)
    with pytest.raises(HubError) as e:
        resolve_model_dir("org/missing", settings, flag="--model")
    msg = str(e.value)
    assert msg.startswith("--model 'org/missing'") and settings.hub_cache in msg
    assert "hf download org/missing" in msg
    # an existing local directory always wins over the Hub interpretation
    monkeypatch.chdir(tmp_path)
    os.makedirs("org/missing")
    assert resolve_model_dir("org/missing", settings) == "org/missing"


def test_settings_follow_the_environment(tmp_path):
    s = HubSettings.from_env({"HF_HOME": "/h"})
    assert (s.hub_cache, s.datasets_cache, s.offline, s.datasets_offline) == \
        ("/h/hub", "/h/datasets", False, False)
    s = HubSettings.from_env({"HF_HOME": "/h", "HF_HUB_CACHE": "/c", "HF_DATASETS_OFFLINE": "1"})
    assert (s.hub_cache, s.offline, s.datasets_offline) == ("/c", False, True)
    assert HubSettings.from_env({"XDG_CACHE_HOME": "/x", "HF_HUB_OFFLINE": "true"}) == \
        HubSettings("/x/huggingface/hub", "/x/huggingface/datasets", True, True)


# ------------------------------------------------------------------------------ end to end
def _convert_and_train(rank, world, root):
    """Offline, from one HF_HOME: convert a Hub model id, then SFT it on a Hub dataset id with
    a column mapping; a missing dataset stops `xft train` before any model is built."""
    import torch
    import transformers

    from tests.common import run_cli
    from tests.multiprocess.test_convert import HF_CASES

    home = os.path.join(root, "hf_home")
    os.environ.update(HF_HOME=home, HF_HUB_OFFLINE="1")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**HF_CASES["llama"]))
    model.save_pretrained(cache_snapshot(home, "org/tiny-llama", "model"),
                          safe_serialization=True)
    rows = PAIRS * 2 + [{"problem": "no answer", "solution": ""}]
    hub_layout(cache_snapshot(home, "org/pairs", "dataset"), rows=rows)
    runs = {"convert": run_cli("convert", "hf-to-mcore", "--hf", "org/tiny-llama",
                               "--out", os.path.join(root, "mc"))}
    args = ["train", f"checkpoint.load={root}/mc", "train.stage=sft", "train.train_steps=2",
            "train.seq_length=128", "train.micro_batch_size=2", "train.global_batch_size=4",
            "train.lr_warmup_steps=1", "data.template=plain", "data.on_error=skip",
            "data.path=hf:org/pairs", "data.columns.instruction=problem",
            "data.columns.response=solution", f"checkpoint.save={root}/sft"]
    runs["train"] = run_cli(*args)
    runs["missing"] = run_cli(*args[:-4], "data.path=hf:someorg/missing",
                              f"checkpoint.save={root}/never")
    out = {name: run.code for name, run in runs.items()}
    out["missing_log"] = runs["missing"].text
    out["log"] = "".join(run.text for run in runs.values())
    return out


def test_convert_and_train_from_hub_ids(tmp_path):
    from tests.harness import run_ranks

    out = run_ranks(1, _convert_and_train, str(tmp_path))[0]
    log = out["log"]
    assert out["convert"] == 0 and out["train"] == 0, log
    assert f"wrote {tmp_path}/mc" in log
    assert f"{2 * len(PAIRS) + 1} records read, {2 * len(PAIRS)} kept, 1 dropped" in log, log
    assert "hf:org/pairs split=train row=24: empty_response" in log, log
    assert os.path.isfile(tmp_path / "sft" / "latest")
    # stopped before the layout, the data and the model: nothing written, nothing planned
    missing = out["missing_log"]
    assert out["missing"] == 2 and "data.path entry 'hf:someorg/missing'" in missing, missing
    assert "offline mode is on" in missing and "parameters" not in missing
    assert not os.path.exists(tmp_path / "never")
