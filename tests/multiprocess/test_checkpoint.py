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
    expected = {k: v.clone() for k, v in ckpt.local_state_dict(chunks).items()}

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
    got = ckpt.local_state_dict(fresh)
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


def _flip(path, offset, count=1, seed=0):
    """XOR `count` bytes from `offset` with non-zero values; returns the original bytes."""
    import random

    rnd = random.Random(seed)
    with open(path, "r+b") as f:
        f.seek(offset)
        before = f.read(count)
        f.seek(offset)
        f.write(bytes(b ^ rnd.randrange(1, 256) for b in before))
    return before


def _restore(path, offset, before):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(before)


def _damage_body(rank, world, root):
    import contextlib
    import io
    import random
    import shutil

    from tests import common
    from xft_megatron.checkpoint import checksums, stream
    from xft_megatron.checkpoint import dist as ckpt
    from xft_megatron.training.loop import train

    data = os.path.join(root, "data.jsonl")
    with open(data, "w") as f:
        for i in range(40):
            f.write('{"text": "def f%d(x):\\n    return x * %d\\n"}\n' % (i, i))
    overrides = ["train.train_steps=2", "checkpoint.save_interval=1",
                 f"checkpoint.save={root}/train", f"data.path={data}"]
    cfg = common.tiny_config(*overrides)
    train(cfg, common.RandomBatches(cfg), progress=False)
    trained = ckpt.resolve(f"{root}/train")
    # the streaming tools' files (as hf-to-mcore, upcycle and merge write them)
    stream.initialize_single_rank_layout()
    layout = stream.layout_of(cfg)
    chunks, _ = common.setup(cfg, ddp=False)
    state = ckpt.local_state_dict(chunks)
    extra = os.path.join(root, "generation_config.json")
    open(extra, "w").write('{"bos_token_id": 1, "eos_token_id": 2}')
    streamed = ckpt.save_streamed(lambda f: stream.write(
        f, layout, stream.GroupCache(lambda g: {n: state[n] for n in layout.groups()[g]})),
        f"{root}/stream", 0, cfg, extra_files={"generation_config.json": extra})

    kinds = {}  # every file of both checkpoints, 64 bytes flipped in its middle
    for folder in (trained, streamed):
        for name in checksums.list_files(folder):
            path = os.path.join(folder, name)
            size = os.path.getsize(path)
            offset = max(0, size // 2 - 32)
            before = _flip(path, offset, min(64, size - offset))
            try:
                ckpt.verify(folder)
                kinds[name] = None
            except ckpt.CheckpointError as e:
                kinds[name] = path in str(e)
            _restore(path, offset, before)

    xft = common.run_cli
    commands = {}
    shard = os.path.join(trained, "__0_0.distcp")
    before = _flip(shard, os.path.getsize(shard) // 2, 64)
    commands["eval loss"] = xft("eval", "loss", "--ckpt", f"{root}/train", "--data", data,
                                "--cache-dir", f"{root}/cache")
    commands["--resume"] = xft("train", *common.BASE, *overrides,
                               "train.train_steps=3", "--resume")
    _restore(shard, os.path.getsize(shard) // 2, before)
    config = os.path.join(trained, ckpt.CONFIG_FILE)
    text = open(config).read()
    open(config, "w").write(text.replace("hidden_size: 64", "hidden_size: 65"))
    commands["eval loss (config)"] = xft("eval", "loss", "--ckpt", f"{root}/train", "--data",
                                         data, "--cache-dir", f"{root}/cache")
    open(config, "w").write(text)
    shard = os.path.join(streamed, sorted(n for n in os.listdir(streamed)
                                          if n.endswith(".distcp"))[0])
    before = _flip(shard, os.path.getsize(shard) - 8, 4)
    commands["mcore-to-hf"] = xft("convert", "mcore-to-hf", "--ckpt", streamed, "--out",
                                  f"{root}/hf")
    _restore(shard, os.path.getsize(shard) - 8, before)
    hf_created = os.path.exists(f"{root}/hf")

    # random single-byte flips at random positions over every file of both checkpoints
    rnd = random.Random(17)
    files = [os.path.join(f, n) for f in (trained, streamed) for n in checksums.list_files(f)]
    trials = detected = 0
    for i in range(3 * len(files)):
        path = files[i % len(files)]
        folder = trained if path.startswith(trained) else streamed
        offset = rnd.randrange(os.path.getsize(path))
        before = _flip(path, offset, 1, seed=i)
        found = checksums.problem(folder, collective=False)
        trials += 1
        detected += bool(found) and os.path.relpath(path, folder) in found
        _restore(path, offset, before)

    # a checkpoint without a manifest (older, or Megatron's own) loads with a notice
    bare = f"{root}/bare"
    shutil.copytree(streamed, bare)
    os.remove(os.path.join(bare, checksums.MANIFEST))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        fresh, _ = common.setup(cfg, bare, ddp=False, seed=99)
    loaded = ckpt.local_state_dict(fresh)
    return {"kinds": kinds, "commands": commands, "hf_created": hf_created,
            "trials": trials, "detected": detected, "notice": err.getvalue(),
            "bare_equal": all(torch.equal(loaded[k], state[k]) for k in state),
            "trained": trained, "streamed": streamed}


def test_checksums_refuse_damaged_files_of_every_kind(tmp_path):
    r = run_ranks(1, _damage_body, str(tmp_path))[0]
    kinds = r["kinds"]
    # (megatron-core 0.19 stores its non-tensor state in the .distcp files: no common.pt)
    for must in ("__0_0.distcp", ".metadata", "metadata.json", "xft_config.yaml",
                 "train_state.json", "rank_state/rank_00000.pt", "generation_config.json"):
        assert kinds.get(must), (must, kinds)
    assert all(kinds.values()), kinds
    for what, run in r["commands"].items():
        code, err = run.code, run.err
        assert code == 2 and "is damaged" in err and "does not match the checksum" in err, \
            (what, code, err[-2000:])
    assert r["trained"] + "/__0_0.distcp" in r["commands"]["eval loss"].err
    assert r["trained"] + "/__0_0.distcp" in r["commands"]["--resume"].err
    assert "xft_config.yaml" in r["commands"]["eval loss (config)"].err
    assert r["streamed"] in r["commands"]["mcore-to-hf"].err and not r["hf_created"]
    assert r["trials"] >= 50 and r["detected"] == r["trials"], r
    assert "has no checksums.json" in r["notice"] and r["bare_equal"]
    print("FIGURES flipped-bytes", {"file kinds": len(kinds), "random trials": r["trials"],
                                    "detected": r["detected"]})


def test_latest_naming_a_missing_folder_says_which_checkpoint_is_used(tmp_path, capsys):
    from xft_megatron.checkpoint import dist as ckpt

    (tmp_path / "iter_0000002").mkdir()
    (tmp_path / "iter_0000002" / ckpt.CONFIG_FILE).write_text("iteration: 2\n")
    (tmp_path / "latest").write_text("iter_0000009\n")
    assert ckpt.resolve(str(tmp_path)) == str(tmp_path / "iter_0000002")
    err = capsys.readouterr().err
    assert "names 'iter_0000009', which is not a complete checkpoint" in err
    assert str(tmp_path / "iter_0000002") in err
