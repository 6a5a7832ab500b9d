"""Hostile source trees for `xft data mine-code`: a `*.py` symlink to /dev/zero, a named pipe
called `*.py`, an oversized file, symlinks out of the tree and dangling ones. The miner must
finish quickly, mine the normal files and report what it skipped and why."""

import os
import subprocess
import sys
import textwrap

import pytest

from tests import common
from xft_megatron.data import code_corpus

DOCUMENTED = textwrap.dedent('''
    def {name}(x):
        """Return x plus one."""
        y = x + len("{name}")
        return y
''')
LIMIT = 4000  # --max-file-bytes of these tests


def _hostile_tree(tmp_path, limit=LIMIT):
    root = tmp_path / "src"
    (root / "pkg").mkdir(parents=True)
    (root / "data").mkdir()
    (root / "good.py").write_text(DOCUMENTED.format(name="good"))
    (root / "pkg" / "__init__.py").write_text(DOCUMENTED.format(name="in_pkg"))
    (root / "data" / "source.txt").write_text(DOCUMENTED.format(name="linked_inside"))
    os.symlink(root / "data" / "source.txt", root / "inside_link.py")  # stays in the tree
    os.symlink("/dev/zero", root / "evil.py")
    os.mkfifo(root / "pipe.py")
    padding = "# padding\n" * (limit // 10 + 1)  # one line more than the limit allows
    (root / "big.py").write_text(DOCUMENTED.format(name="big") + padding)
    outside = tmp_path / "elsewhere" / "secret.py"
    outside.parent.mkdir()
    outside.write_text(DOCUMENTED.format(name="outside"))
    os.symlink(outside, root / "outside_link.py")
    os.symlink(root / "missing.py", root / "dangling.py")
    return root


def test_the_miner_skips_devices_pipes_oversized_and_outside_files(tmp_path):
    limit = code_corpus.MAX_SOURCE_BYTES if hasattr(code_corpus, "MAX_SOURCE_BYTES") \
        else 8 * 1024 ** 2  # the default limit, as a user meets it
    root = _hostile_tree(tmp_path, limit)
    out = tmp_path / "train.jsonl"
    # 2 GiB of address space beyond what the imports map (torch's standard build maps several
    # GiB of CUDA libraries): a reader that takes /dev/zero whole dies instead of eating the RAM
    program = ("import resource, sys\nfrom xft_megatron.data.mine_code import mine_code_main\n"
               "vm = next(int(line.split()[1]) * 1024 for line in open('/proc/self/status')\n"
               "          if line.startswith('VmSize:'))\n"
               "resource.setrlimit(resource.RLIMIT_AS, (vm + 2 * 1024 ** 3,) * 2)\n"
               "sys.exit(mine_code_main(sys.argv[1:]))\n")
    run = subprocess.run(
        [sys.executable, "-c", program, "--src", str(root), "--out", str(out),
         "--heldout-out", str(tmp_path / "heldout.jsonl"), "--heldout-every", "1000"],
        capture_output=True, text=True, timeout=120,
        cwd=common.REPO)
    assert run.returncode == 0, run.stderr
    mined = out.read_text() + (tmp_path / "heldout.jsonl").read_text()
    for name in ("good", "in_pkg", "linked_inside"):
        assert f"def {name}(x)" in mined, name
    for name in ("big", "outside"):
        assert f"def {name}(x)" not in mined, name
    sections = {}  # the report: "skipped N file(s), WHY:" then the paths, indented
    for line in run.stderr.splitlines():
        if line.startswith("skipped "):
            header = line
            sections[header] = []
        elif line.startswith("  "):
            sections[header].append(os.path.basename(line.strip()))
    expected = {"not a regular file": ["evil.py", "pipe.py"],
                f"larger than the per-file limit of {limit} bytes": ["big.py"],
                "outside its source root": ["outside_link.py"],
                "could not be read": ["dangling.py"]}
    assert len(sections) == len(expected), run.stderr
    for why, names in expected.items():
        (header,) = [h for h in sections if why in h]
        assert header.startswith(f"skipped {len(names)} file(s)"), header
        assert sorted(sections[header]) == names, (why, run.stderr)
    assert "skipped 5)" in run.stdout, run.stdout


def test_mine_tree_counts_each_reason(tmp_path):
    from xft_megatron.data.mine_code import mine_tree
    root = _hostile_tree(tmp_path)
    train, held, stats = mine_tree(str(root), heldout_every=1000, max_bytes=LIMIT)
    assert {r["name"] for r in train + held} == {"good", "in_pkg", "linked_inside"}
    assert stats["files"] == 3
    assert (stats["skipped_not_regular"], stats["skipped_too_large"],
            stats["skipped_outside_root"], stats["skipped_unreadable"]) == (2, 1, 1, 1), stats
    skipped = {}
    assert len(code_corpus.python_files(str(root), skipped=skipped, max_bytes=LIMIT)) == 3
    assert {k: sorted(os.path.basename(p) for p in v) for k, v in skipped.items()} == {
        "not_regular": ["evil.py", "pipe.py"], "too_large": ["big.py"],
        "outside_root": ["outside_link.py"], "unreadable": ["dangling.py"]}


def test_read_regular_never_blocks_or_reads_past_the_limit(tmp_path):
    SkippedFile, read_regular = code_corpus.SkippedFile, code_corpus.read_regular
    fifo = tmp_path / "pipe.py"
    os.mkfifo(fifo)
    with pytest.raises(SkippedFile, match="not a regular file") as e:
        read_regular(str(fifo))
    assert e.value.reason == "not_regular"
    for device in ("/dev/zero", "/dev/null"):
        with pytest.raises(SkippedFile, match="not a regular file"):
            read_regular(device)
    small = tmp_path / "small.py"
    small.write_bytes(b"x = 1\n" * 10)
    assert read_regular(str(small), max_bytes=60) == b"x = 1\n" * 10
    with pytest.raises(SkippedFile, match="61 > 60 bytes"):
        small.write_bytes(b"x = 1\n" * 10 + b"\n")
        read_regular(str(small), max_bytes=60)
    with pytest.raises(SkippedFile, match="outside its source root"):
        read_regular(str(small), root=str(tmp_path / "elsewhere"))
