"""`xft eval humaneval --model RUN` scores the checkpoint RUN holds now: its cached HF
conversion (`RUN_humaneval/hf_model`) is reused only while it was made from the same iter_*
folder with the same content (`eval/humaneval.py` `converted_model`); after the run trains
further, the conversion is redone and the new weights are what gets scored."""

import json
import os

from tests.harness import run_ranks


def _body(rank, world, root):
    from tests import common
    from xft_megatron.checkpoint import dist as ckpt
    from xft_megatron.eval.humaneval import converted_model
    from xft_megatron.training.loop import train

    run, hf_dir = os.path.join(root, "run"), os.path.join(root, "run_humaneval", "hf_model")
    said = []
    out = {}

    def convert(name):
        said.clear()
        converted_model(run, hf_dir, report=said.append)
        with open(hf_dir + ".source.json") as f:
            out[name] = {"said": list(said), "source": json.load(f)["checkpoint"],
                         "tensors": common.hf_tensors(hf_dir),
                         "config_mtime": os.stat(os.path.join(hf_dir, "config.json")).st_mtime_ns}

    cfg = common.tiny_config("train.train_steps=2", f"checkpoint.save={run}")
    train(cfg, common.RandomBatches(cfg), progress=False)
    convert("first")
    convert("again")  # unchanged: reused
    more = common.tiny_config("train.train_steps=3", f"checkpoint.save={run}")
    train(more, common.RandomBatches(more), progress=False, resume=True)
    convert("trained")
    out["latest"] = os.path.abspath(ckpt.resolve(run))
    # the same iter_* folder rewritten with other weights (same name, other content)
    chunks, _ = common.setup(more, ddp=False)
    import torch

    with torch.no_grad():
        for p in chunks[0].parameters():
            p.add_(1.0)
    ckpt.save(chunks, run, 3, more)
    convert("rewritten")
    return out


def test_a_run_trained_further_is_converted_again_and_scored_anew(tmp_path):
    r = run_ranks(1, _body, str(tmp_path))[0]
    first, again, trained, rewritten = r["first"], r["again"], r["trained"], r["rewritten"]
    assert first["source"].endswith("iter_0000002") and "converting" in first["said"][0] and \
        first["source"] in first["said"][0], first["said"]
    assert "converted earlier" in again["said"][0] and \
        again["config_mtime"] == first["config_mtime"], again["said"]
    assert trained["source"] == r["latest"] and trained["source"].endswith("iter_0000003")
    assert "converting" in trained["said"][0] and trained["source"] in trained["said"][0]
    changed = [k for k in first["tensors"]
               if not (first["tensors"][k] == trained["tensors"][k]).all()]
    assert changed, "the conversion still holds the weights of the first checkpoint"
    assert rewritten["source"] == trained["source"] and "converting" in rewritten["said"][0]
    assert all((rewritten["tensors"][k] != trained["tensors"][k]).any()
               for k in trained["tensors"])
