"""Distributed checkpoints: round trip, `latest` pointer, and a crash mid-save losing nothing."""

import os

import pytest
import torch

from tests.harness import run_ranks


def _body(rank, world, root):
    from megatron.core import dist_checkpointing

    from tests import common
    from xft_megatron.checkpoint import dist as ckpt

    cfg = common.tiny_config()
    chunks, _ = common.setup(cfg, ddp=False)
    first = ckpt.save(chunks, root, 1, cfg)
    with torch.no_grad():
        for p in chunks[0].parameters():
            p.add_(1.0)
    second = ckpt.save(chunks, root, 2, cfg)
    expected = {k: v.clone() for k, v in ckpt.gather_full_state_dict(chunks).items()}

    # a crash in the middle of writing the third checkpoint
    real_save = dist_checkpointing.save

    def crashing_save(state, directory, *a, **k):
        open(os.path.join(directory, "__0_0.distcp"), "wb").write(b"partial")
        raise KeyboardInterrupt("simulated Ctrl-C during save")

    dist_checkpointing.save = crashing_save
    try:
        ckpt.save(chunks, root, 3, cfg)
        crashed = False
    except KeyboardInterrupt:
        crashed = True
    finally:
        dist_checkpointing.save = real_save

    fresh, _ = common.setup(cfg, ddp=False, seed=99)
    iteration = ckpt.load(fresh, root)
    got = ckpt.gather_full_state_dict(fresh)
    return {
        "crashed": crashed,
        "iteration": iteration,
        "first": os.path.basename(first), "second": os.path.basename(second),
        "latest": open(os.path.join(root, "latest")).read().strip(),
        "same": all(torch.equal(got[k], expected[k]) for k in expected),
        "listing": sorted(os.listdir(root)),
        "config_model": ckpt.read_config(root)["model"]["hidden_size"],
    }


def test_save_load_and_crash_mid_save(tmp_path):
    root = str(tmp_path / "ckpt")
    r = run_ranks(1, _body, root)[0]
    assert r["crashed"]
    assert (r["first"], r["second"]) == ("iter_0000001", "iter_0000002")
    assert r["latest"] == "iter_0000002" and r["iteration"] == 2
    assert r["same"], "weights after reload differ from those saved"
    assert "iter_0000003" not in r["listing"]
    assert r["config_model"] == 64


def test_resolve_errors(tmp_path):
    from xft_megatron.checkpoint import dist as ckpt

    with pytest.raises(FileNotFoundError, match="is not a checkpoint"):
        ckpt.resolve(str(tmp_path))
    (tmp_path / "latest").write_text("iter_0000009\n")
    with pytest.raises(FileNotFoundError, match="points to 'iter_0000009', which is not"):
        ckpt.resolve(str(tmp_path))
