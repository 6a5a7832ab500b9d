"""No foreign code runs when a model folder is loaded: only this project's own, unchanged XFT
MoE modeling file is ever trusted (`hf/files.py` `remote_code_trusted`), tokenizers never
load code. An XFT MoE export plus a tokenizer `auto_map` naming a Python file, or with its
modeling file edited, is refused with a message by `xft eval humaneval` and the shared loaders,
and the planted code never runs; the unmodified export loads and computes Megatron's logits."""

import json
import os
import shutil

import pytest
import torch

from tests.harness import run_ranks
from tests.tiny_tokenizer import byte_bpe_tokenizer

MOE = ["moe.num_experts=4", "moe.topk=2"]


def _export_body(rank, world, root):
    """A tiny XFT MoE exported to HF the way test_hf_moe does, with an HF tokenizer, and
    Megatron's logits on fixed tokens."""
    from tests import common
    from tests.multiprocess.test_hf_moe import _randomize
    from xft_megatron.checkpoint import dist as ckpt
    from xft_megatron.hf import convert

    cfg = common.tiny_config(*MOE)
    chunks, _ = common.setup(cfg, ddp=False)
    _randomize(chunks, seed=5)
    src, out = os.path.join(root, "moe"), os.path.join(root, "moe_hf")
    ckpt.save(chunks, src, 0, cfg)
    convert.mcore_to_hf(src, out, dtype="fp32")
    byte_bpe_tokenizer(400).save_pretrained(out)
    ids = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(24).unsqueeze(0).expand(2, -1)
    with torch.no_grad():
        ref = chunks[0].eval()(ids, pos, None).float()
    return {"ids": ids, "ref": ref}


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote_code")
    return str(root / "moe_hf"), run_ranks(1, _export_body, str(root))[0]


def _copy(export_dir, tmp_path, name):
    dst = str(tmp_path / name)
    shutil.copytree(export_dir, dst)
    return dst


def _evil(folder, marker):
    """A Python file that leaves `marker` behind when imported."""
    with open(os.path.join(folder, "evil.py"), "w") as f:
        f.write(f"open({str(marker)!r}, 'w').write('ran')\n"
                "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")


def _humaneval(model_dir, tmp_path):
    from tests.common import run_cli

    return run_cli("eval", "humaneval", "--model", model_dir, "--limit", "1",
                   "--max-new-tokens", "2", "--out", str(tmp_path / "he"), catch=True)


def test_a_tokenizer_auto_map_is_refused_and_its_code_never_runs(export, tmp_path):
    from xft_megatron.hf.files import (RemoteCodeError, load_hf_model, load_hf_tokenizer,
                                       own_remote_code)

    folder, marker = _copy(export[0], tmp_path, "evil_tok"), tmp_path / "ran"
    _evil(folder, marker)
    path = os.path.join(folder, "tokenizer_config.json")
    with open(path) as f:
        config = json.load(f)
    config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]}
    with open(path, "w") as f:
        json.dump(config, f)
    run = _humaneval(folder, tmp_path)
    assert run.code == 2 and "tokenizer_config.json" in run.text and "evil.EvilTokenizer" in \
        run.text and "Traceback" not in run.text, run.text
    for load in (load_hf_tokenizer, load_hf_model):
        with pytest.raises(RemoteCodeError, match="names Python code"):
            load(folder)
    assert not own_remote_code(folder)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["generation_config.json", "processor_config.json",
                                  "preprocessor_config.json"])
def test_any_other_config_naming_code_is_refused(export, tmp_path, name):
    from xft_megatron.hf.files import RemoteCodeError, remote_code_trusted

    folder = _copy(export[0], tmp_path, "evil_cfg")
    with open(os.path.join(folder, name), "w") as f:
        json.dump({"auto_map": {"AutoProcessor": "evil.Processor"}}, f)
    with pytest.raises(RemoteCodeError, match=name):
        remote_code_trusted(folder)


def test_a_config_naming_another_module_is_refused(export, tmp_path):
    from xft_megatron.hf.files import RemoteCodeError, remote_code_trusted

    folder = _copy(export[0], tmp_path, "other_module")
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["auto_map"]["AutoModelForCausalLM"] = "evil.Model"
    with open(path, "w") as f:
        json.dump(config, f)
    with pytest.raises(RemoteCodeError, match="evil.Model"):
        remote_code_trusted(folder)


def test_an_edited_modeling_file_is_refused_with_a_message(export, tmp_path):
    from xft_megatron.hf.files import RemoteCodeError, load_hf_model

    folder, marker = _copy(export[0], tmp_path, "edited"), tmp_path / "ran"
    with open(os.path.join(folder, "modeling_xft_moe.py"), "a") as f:
        f.write(f"\nopen({str(marker)!r}, 'w').write('ran')\n")
    run = _humaneval(folder, tmp_path)
    assert run.code == 2 and "modeling_xft_moe.py" in run.text and "edited" in run.text and \
        "xft convert mcore-to-hf" in run.text, run.text
    assert "Traceback" not in run.text and "trust_remote_code=True" not in run.text, run.text
    with pytest.raises(RemoteCodeError, match="differs from the modeling file"):
        load_hf_model(folder)
    os.remove(os.path.join(folder, "modeling_xft_moe.py"))
    with pytest.raises(RemoteCodeError, match="incomplete"):
        load_hf_model(folder)
    assert not marker.exists()


def test_the_unmodified_export_loads_with_megatron_logits(export):
    from xft_megatron.eval.humaneval import generate_completions, load_problems
    from xft_megatron.hf.files import load_hf_model, load_hf_tokenizer, remote_code_trusted

    folder, r = export
    assert remote_code_trusted(folder)
    model = load_hf_model(folder, dtype=torch.float32).eval()
    assert type(model).__name__ == "XFTLlamaMoeForCausalLM"
    with torch.no_grad():
        got = model(r["ids"]).logits.float()
    assert (got - r["ref"]).abs().max().item() <= 1e-5 * max(1.0, r["ref"].abs().max().item())
    assert load_hf_tokenizer(folder).eos_token == "</s>"
    completions = generate_completions(folder, load_problems(limit=1), max_new_tokens=2)
    assert len(completions) == 1


def test_a_plain_folder_needs_no_remote_code(tmp_path):
    from xft_megatron.hf.files import remote_code_trusted

    with open(tmp_path / "config.json", "w") as f:
        json.dump({"model_type": "llama"}, f)
    byte_bpe_tokenizer(300).save_pretrained(str(tmp_path))
    assert remote_code_trusted(str(tmp_path)) is False
