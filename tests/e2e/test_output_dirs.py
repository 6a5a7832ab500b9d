"""No tool writes into another run's directory: checkpoint-writing tools refuse a non-empty
--out before any work, and `xft train` without --resume refuses a checkpoint.save that holds a
run (it would restart from step 0 and move `latest` back). One writer per directory: the
directory lock, and save clean-up that removes only provably stale partial folders."""

import os

import pytest

from xft_megatron.checkpoint import dist as ckpt
from xft_megatron.checkpoint import directory, lock
from xft_megatron.config import ConfigError, MoEConfig, load_config, require_runnable
from xft_megatron.hf import convert
from xft_megatron.training.run import check_save_dir
from xft_megatron.xft.checkpoints import merge_checkpoint, upcycle_checkpoint


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    (run / "iter_0000007").mkdir(parents=True)
    (run / "latest").write_text("iter_0000007")
    return run


def test_checkpoint_tools_refuse_a_directory_holding_a_run(run_dir, tmp_path):
    missing = str(tmp_path / "no_such_source")  # refused before the source is even read
    for call in (lambda: convert.hf_to_mcore(missing, str(run_dir)),
                 lambda: convert.mcore_to_hf(missing, str(run_dir)),
                 lambda: upcycle_checkpoint(missing, str(run_dir), MoEConfig(num_experts=4,
                                                                              topk=2)),
                 lambda: merge_checkpoint(missing, str(run_dir))):
        with pytest.raises(FileExistsError, match="not empty; choose a new --out"):
            call()
    with pytest.raises(FileExistsError, match="--hf-out"):
        merge_checkpoint(missing, str(tmp_path / "new"), hf_out=str(run_dir))
    assert sorted(p.name for p in run_dir.iterdir()) == ["iter_0000007", "latest"]
    directory.require_empty_dir(str(tmp_path / "fresh"))  # new or empty directories are fine
    (tmp_path / "empty").mkdir()
    directory.require_empty_dir(str(tmp_path / "empty"))
    # nor inside a checkpoint's iter folder, however deep; next to it in the root is fine
    (run_dir / "iter_0000007" / ckpt.CONFIG_FILE).write_text("iteration: 7\n")
    inside = run_dir / "iter_0000007" / "hf" / "x"
    for call in (lambda: convert.mcore_to_hf(missing, str(inside)),
                 lambda: merge_checkpoint(missing, str(tmp_path / "new"), hf_out=str(inside))):
        with pytest.raises(FileExistsError, match="is inside the checkpoint .*iter_0000007"):
            call()
    assert not (run_dir / "iter_0000007" / "hf").exists()
    directory.require_empty_dir(str(run_dir / "hf"))


def test_train_without_resume_refuses_an_existing_run(run_dir, tmp_path):
    cfg = lambda *extra: load_config(None, [f"checkpoint.save={run_dir}", *extra])  # noqa
    with pytest.raises(ConfigError, match=r"iter_0000007.*--resume.*checkpoint.overwrite"):
        check_save_dir(cfg(), resume=False)
    check_save_dir(cfg(), resume=True)
    check_save_dir(cfg("checkpoint.overwrite=true"), resume=False)
    check_save_dir(load_config(None, [f"checkpoint.save={tmp_path / 'other'}"]), resume=False)


def _lock_record(path, **fields):
    import json

    path.write_text(json.dumps({"host": lock.HOST, "pid": 1, "start": 0.0,
                                "command": "xft train", **fields}))


def test_directory_lock_refuses_a_second_holder_and_takes_over_a_dead_one(tmp_path, capsys):
    import subprocess
    import sys

    d = tmp_path / "out"
    with lock.hold(str(d), "xft train first"):
        with lock.hold(str(d)):  # re-entrant within the holding process
            pass
        other = subprocess.run(  # another process: refused, naming this one
            [sys.executable, "-c", "import sys; from xft_megatron.checkpoint import lock; "
             f"lock.acquire({str(d)!r})"], capture_output=True, text=True)
        assert other.returncode != 0
        assert f"pid {os.getpid()}" in other.stderr and lock.HOST in other.stderr
        assert "xft train first" in other.stderr and "in use by another run" in other.stderr
    assert not d.exists()  # released: lock file and the directory it created are gone

    d.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    _lock_record(d / lock.LOCK_FILE, pid=int(dead))  # left by a killed run of this host
    with lock.hold(str(d)):
        assert f"pid {dead}" in capsys.readouterr().err
    _lock_record(d / lock.LOCK_FILE, host="elsewhere", pid=int(dead))
    with pytest.raises(lock.DirectoryInUse, match=r"another host.*elsewhere.*delete"):
        lock.acquire(str(d))
    assert (d / lock.LOCK_FILE).exists() and not lock.held(str(d))


def test_temp_cleanup_removes_only_provably_stale_folders(tmp_path):
    import subprocess
    import sys

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout.strip()
        names = {"live": f".tmp-iter_0000003-{lock.HOST}-{live.pid}-1a2b3c4d",
                 "dead": f".tmp-iter_0000003-{lock.HOST}-{dead}-1a2b3c4d",
                 "own": f".tmp-iter_0000002-{lock.HOST}-{os.getpid()}-1a2b3c4d",
                 "other host": ".tmp-iter_0000003-node-7-123-1a2b3c4d",
                 "older name": ".tmp-iter_0000003-1a2b3c4d"}
        for n in names.values():
            (tmp_path / n).mkdir()
        directory.remove_stale(str(tmp_path))
        left = {k for k, n in names.items() if (tmp_path / n).exists()}
        assert left == {"live", "other host", "older name"}
    finally:
        live.kill()
        live.wait()


def test_model_keys_that_disagree_with_the_loaded_checkpoint_are_refused(tmp_path):
    """checkpoint.load of a bigger model with model.preset=tiny would train the stored
    architecture without a word: refused, naming each key and the stored value."""
    import yaml

    def assemble_config(path, overrides):  # as `xft train` builds its config
        return require_runnable(load_config(path, overrides, read_stored=ckpt.read_config))

    big = load_config(None, ["model.preset=tiny", "model.num_layers=6", "model.hidden_size=128",
                             "model.num_attention_heads=8"])
    root = tmp_path / "big"
    (root / "iter_0000003").mkdir(parents=True)
    (root / "iter_0000003" / ckpt.CONFIG_FILE).write_text(
        yaml.safe_dump({"iteration": 3, **big.to_dict()}))
    (root / "latest").write_text("iter_0000003")
    base = [f"checkpoint.load={root}", f"checkpoint.save={tmp_path / 'out'}",
            "data.path=x.jsonl"]
    with pytest.raises(ConfigError) as e:
        assemble_config(None, base + ["model.preset=tiny"])
    msg = str(e.value)
    assert "(model.preset=tiny)" in msg and "model.num_layers=4 (stored: 6)" in msg
    assert "model.hidden_size=64 (stored: 128)" in msg
    with pytest.raises(ConfigError, match="model.num_layers=2 \\(stored: 6\\)"):
        assemble_config(None, base + ["model.num_layers=2"])
    # the stored values, or keys a run may change (positions, RoPE), are accepted
    cfg = assemble_config(None, base + ["model.num_layers=6", "model.max_position_embeddings=512",
                                        "model.rope_theta=5e5"])
    assert (cfg.model.num_layers, cfg.model.hidden_size) == (6, 128)
    assert (cfg.model.max_position_embeddings, cfg.model.rope_theta) == (512, 5e5)


def _hf_export_body(rank, world, root):
    """An HF export carries its shards' checksums and is written under a lock beside it."""
    import json
    import subprocess
    import sys

    from xft_megatron.errors import HFFormatError

    from tests.common import tiny_hf_llama

    src, mc, out = (os.path.join(root, n) for n in ("src", "mc", "export"))
    tiny_hf_llama(src)
    convert.hf_to_mcore(src, mc)  # transformers' own directory: no manifest, no notice
    convert.mcore_to_hf(mc, out, dtype="fp32", shard_bytes=200_000)
    r = {"listed": sorted(json.load(open(os.path.join(out, "checksums.json")))["files"]),
         "shards": sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))}
    with open(os.path.join(out, "config.json")) as f:  # a hand edit of the JSON files is fine
        cfg = json.load(f)
    cfg["use_cache"] = False
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f)
    convert.hf_to_mcore(out, os.path.join(root, "edited"))
    shard = os.path.join(out, r["shards"][1])
    with open(shard, "r+b") as f:  # one flipped byte inside tensor data
        f.seek(os.path.getsize(shard) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x10]))
    try:
        convert.hf_to_mcore(out, os.path.join(root, "damaged"))
        r["damaged"] = None
    except HFFormatError as e:
        r["damaged"] = str(e)
    r["damaged_out"] = os.path.exists(os.path.join(root, "damaged"))
    # a second writer of the same export is refused at start, naming the holder
    second = os.path.join(root, "second")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from xft_megatron.checkpoint import lock; "
         f"lock.acquire({second!r}, 'xft convert mcore-to-hf first', beside=True); "
         "print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        try:
            convert.mcore_to_hf(mc, second)
            r["in_use"] = None
        except lock.DirectoryInUse as e:
            r["in_use"] = str(e)
    finally:
        holder.kill()
        holder.wait()
    r["second_exists"] = os.path.exists(second)
    convert.mcore_to_hf(mc, second)  # the holder is gone: its lock goes with it
    r["after"] = sorted(os.listdir(root))
    return r


def test_hf_exports_carry_shard_checksums_and_one_writer(tmp_path):
    from tests.harness import run_ranks

    r = run_ranks(1, _hf_export_body, str(tmp_path))[0]
    assert len(r["shards"]) >= 2 and r["listed"] == r["shards"]  # the shards, not the JSON
    assert r["damaged"] and r["shards"][1] in r["damaged"] and "does not match" in \
        r["damaged"], r["damaged"]
    assert not r["damaged_out"]  # refused before any output
    assert r["in_use"] and "xft convert mcore-to-hf first" in r["in_use"], r["in_use"]
    assert not r["second_exists"]
    assert not [n for n in r["after"] if "lock" in n or ".tmp-" in n], r["after"]


def _dead_pid():
    import subprocess
    import sys

    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout.strip())


def test_a_killed_writers_leftovers_do_not_block_or_litter_its_rerun(tmp_path):
    """A partial checkpoint folder (or a temporary sibling: mcore-to-hf's folder, upcycle
    --hf's converted copy) of a dead writer of this host lets the same --out be used again
    and is cleared; a live writer's, or another host's, is left and still refuses."""
    import subprocess
    import sys

    dead = _dead_pid()
    out = tmp_path / "out"
    out.mkdir()
    (out / lock.LOCK_FILE).write_text("{}")
    (out / f".tmp-iter_0000000-{lock.HOST}-{dead}-1a2b3c4d").mkdir()
    directory.require_empty_dir(str(out))  # the rerun may write here
    (out / ".tmp-iter_0000000-node-7-123-1a2b3c4d").mkdir()
    with pytest.raises(FileExistsError, match="not empty"):
        directory.require_empty_dir(str(out))
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {"dead": f"hf.tmp-{lock.HOST}-{dead}-1a2b3c4d",
                 "live": f"hf.tmp-{lock.HOST}-{live.pid}-1a2b3c4d",
                 "other host": f"hf.tmp-node-7-{dead}-1a2b3c4d",
                 "another folder's": f"hf2.tmp-{lock.HOST}-{dead}-1a2b3c4d"}
        for n in names.values():
            (tmp_path / n).mkdir()
        removed = directory.remove_dead_siblings(str(tmp_path / "hf"))
        left = {k for k, n in names.items() if (tmp_path / n).exists()}
        assert left == {"live", "other host", "another folder's"}
        assert removed == [str(tmp_path / names["dead"])]
        fresh = directory.sibling_tmp(str(tmp_path / "hf"))
        assert os.path.basename(fresh).startswith(f"hf.tmp-{lock.HOST}-{os.getpid()}-")
    finally:
        live.kill()
        live.wait()


def test_a_failed_write_is_named_for_what_failed(tmp_path):
    """torch's writer wraps what went wrong in a CheckpointException: Ctrl-C inside it is an
    interruption (not a disk error), a full disk says so, anything else is not called a full
    disk. Each time nothing partial is left and `latest` is unchanged."""
    import errno
    import traceback

    from torch.distributed.checkpoint.api import CheckpointException

    cfg = load_config(None, [])
    stack = traceback.StackSummary()

    def failing(exc):
        def write(folder):
            with open(os.path.join(folder, "part"), "w") as f:
                f.write("x")
            raise exc
        return write

    root = str(tmp_path / "c")
    cases = {
        "interrupted": CheckpointException("save", {0: (KeyboardInterrupt(), stack)}),
        "disk": CheckpointException("save", {0: (OSError(errno.ENOSPC, "No space left on "
                                                         "device"), stack)}),
        "plain disk": OSError(errno.EFBIG, "File too large"),
        "bug": AssertionError("optimizer state is empty"),
        "short write": CheckpointException("save", {0: (RuntimeError(
            "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"), stack)}),
    }
    seen = {}
    for name, exc in cases.items():
        try:
            ckpt.save_streamed(failing(exc), root, 3, cfg)
        except BaseException as e:  # noqa: BLE001 - the kind is what is tested
            seen[name] = e
        assert not os.path.exists(root) or os.listdir(root) == [], os.listdir(root)
    assert type(seen["interrupted"]) is KeyboardInterrupt
    for name in ("disk", "plain disk", "short write"):  # torch's zip writer at a size limit
        assert isinstance(seen[name], ckpt.CheckpointWriteError)
        assert "is it full" in str(seen[name]), seen[name]
    assert isinstance(seen["bug"], ckpt.CheckpointWriteError)
    assert "AssertionError" in str(seen["bug"]) and "full" not in str(seen["bug"])
    assert "not a file-system error" in str(seen["bug"])


_STOPPED_CHILD = """
import errno, os, signal, sys
from xft_megatron import cli
from xft_megatron.checkpoint import stream
from xft_megatron.hf import convert, files
how, at, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
calls = []
def stop(real):
    def wrapper(*a, **kw):
        calls.append(1)
        if len(calls) == at:
            if how == "enospc":
                raise OSError(errno.ENOSPC, "No space left on device")
            os.kill(os.getpid(), getattr(signal, how))
        return real(*a, **kw)
    return wrapper
stream.write = stop(stream.write)  # dense copy (upcycle --hf) / the checkpoint
files._write_safetensors = stop(files._write_safetensors)  # an HF export's shards
sys.exit(cli.main(argv))
"""


def test_a_stopped_tool_leaves_nothing_and_its_rerun_works(tmp_path, tiny_hf):
    """SIGKILL, SIGTERM, Ctrl-C or a full disk in the middle of `upcycle --hf`,
    `convert mcore-to-hf` and `merge --hf-out`: the same command run again succeeds and no
    temporary folder is left; SIGTERM and Ctrl-C are reported as such (143, 130), not as a
    disk error; a failed export of merge --hf-out takes its dense checkpoint with it."""
    import subprocess
    import sys

    from tests.common import run_cli

    d = lambda n: str(tmp_path / n)  # noqa: E731
    tiny_hf("hf")
    up = ["upcycle", "--hf", d("hf"), "--out", d("moe"), "--num-experts", "4", "--topk", "2"]
    export = ["convert", "mcore-to-hf", "--ckpt", d("moe"), "--out", d("moe_hf")]
    merge = ["merge", "--ckpt", d("moe"), "--out", d("dense"), "--hf-out", d("dense_hf")]

    def child(how, at, argv):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
             os.environ.get("PYTHONPATH", "")])}
        from tests.common import sigint_as_usual

        return subprocess.run([sys.executable, "-c", _STOPPED_CHILD, how, str(at), *argv],
                              capture_output=True, text=True, timeout=300, env=env,
                              preexec_fn=sigint_as_usual)

    def temporaries():
        return sorted(n for n in os.listdir(tmp_path) if ".tmp-" in n) + sorted(
            f"{n}/{m}" for n in os.listdir(tmp_path) if os.path.isdir(d(n))
            for m in os.listdir(d(n)) if m.startswith(".tmp-"))

    killed = child("SIGKILL", 2, up)  # killed while writing the MoE, after the dense copy
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert temporaries(), "the kill left no partial folder: the test hit no write"
    rerun = run_cli(*up)
    assert rerun.code == 0, rerun.text
    assert temporaries() == []

    termed = child("SIGTERM", 1, export)
    assert termed.returncode == 143, termed.stderr[-2000:]
    assert "terminated (SIGTERM)" in termed.stderr and "disk" not in termed.stderr
    assert temporaries() == [] and not os.path.exists(d("moe_hf"))
    killed = child("SIGKILL", 1, export)
    assert killed.returncode == -9 and temporaries()
    rerun = run_cli(*export)
    assert rerun.code == 0, rerun.text
    assert temporaries() == []

    ctrl_c = child("SIGINT", 1, merge)  # inside the dense checkpoint's write
    assert ctrl_c.returncode == 130, ctrl_c.stderr[-2000:]
    assert "interrupted" in ctrl_c.stderr and "disk" not in ctrl_c.stderr, ctrl_c.stderr
    full = child("enospc", 2, merge)  # at the HF export's first shard, after the checkpoint
    assert full.returncode != 0 and "removed with it" in full.stderr, full.stderr[-2000:]
    assert not os.path.exists(d("dense")) or os.listdir(d("dense")) == []
    rerun = run_cli(*merge)
    assert rerun.code == 0, rerun.text
    assert temporaries() == [] and os.path.isfile(d("dense_hf") + "/config.json")


def test_tokenizer_links_out_of_the_model_folder_are_refused(tmp_path):
    """A `tokenizer*` link to a file outside the model folder is never copied into a
    checkpoint or export (it could carry any file of the machine along); links inside the
    folder and a Hugging Face cache snapshot's links into its repository's blobs are fine."""
    from xft_megatron.errors import HFFormatError

    secret = tmp_path / "secret.txt"
    secret.write_text("not a tokenizer")
    model = tmp_path / "model"
    model.mkdir()
    (model / "tokenizer.json").write_text("{}")
    (model / "vocab.json").symlink_to(model / "tokenizer.json")  # inside: fine
    assert sorted(convert.tokenizer_files(str(model))) == ["tokenizer.json", "vocab.json"]
    (model / "tokenizer_config.json").symlink_to(secret)
    with pytest.raises(HFFormatError, match="tokenizer_config.json is a link to .*secret.txt"):
        convert.tokenizer_files(str(model))
    os.remove(model / "tokenizer_config.json")
    os.mkfifo(model / "tokenizer.model")  # not a regular file: never read (it would block)
    with pytest.raises(HFFormatError, match="tokenizer.model is not a regular file"):
        convert.tokenizer_files(str(model))
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "abc123").write_text("{}")
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (snap / "tokenizer.json").symlink_to("../../blobs/abc123")
    assert list(convert.tokenizer_files(str(snap))) == ["tokenizer.json"]
    (snap / "tokenizer_config.json").symlink_to(secret)
    with pytest.raises(HFFormatError, match="outside the model folder"):
        convert.tokenizer_files(str(snap))
