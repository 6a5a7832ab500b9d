"""scripts/_venv.sh, which both README commands source: whichever runs first, the other still
gets what it needs (the install stamp records the extras installed)."""

import os
import subprocess

from tests.common import REPO

FAKE_PYTHON = """#!/bin/sh
# stands in for the venv's interpreter: Python VERSION, torch "imports", pip calls are logged
case "$*" in *version_info*) echo "VERSION"; exit 0;; esac
echo "$*" >> "$XFT_TEST_LOG"
exit 0
"""
# stands in for a Python 3.12 outside the venv: `-m venv [--clear] DIR` makes DIR's interpreter
FAKE_PYTHON312 = """#!/bin/sh
case "$*" in *version_info*) echo "3.12"; exit 0;; esac
echo "$*" >> "$XFT_TEST_LOG"
if [ "$1 $2" = "-m venv" ]; then
  for dir; do :; done  # the last argument
  rm -rf "$dir" && mkdir -p "$dir/bin" && cp "$XFT_TEST_VENV_PYTHON" "$dir/bin/python"
fi
exit 0
"""


def fake(path, text, version="3.12"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.replace("VERSION", version))
    path.chmod(0o755)
    return path


def test_quickstart_then_tests_then_again_installs_each_extra_once(tmp_path):
    venv, log = tmp_path / "venv", tmp_path / "calls.log"
    fake(venv / "bin" / "python", FAKE_PYTHON)
    env = {**os.environ, "XFT_VENV": str(venv), "XFT_TEST_LOG": str(log)}

    def setup(extra):  # what scripts/quickstart.sh ("") and scripts/test.sh ("test") do
        before = log.read_text().splitlines() if log.exists() else []
        r = subprocess.run(["bash", "-c", f'source "{REPO}/scripts/_venv.sh" "{extra}"'],
                           env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        after = log.read_text().splitlines()
        return [c for c in after[len(before):] if c.startswith("-m pip install")]

    assert setup("") == [f"-m pip install -q -e {REPO}"]  # quickstart first: no extras
    assert setup("test") == [f"-m pip install -q -e {REPO}[test]"]  # then the tests
    assert setup("test") == [] and setup("") == []  # nothing more to install
    assert (venv / ".xft-installed").read_text().split() == ["test"]
    assert setup("te") == [f"-m pip install -q -e {REPO}[te,test]"]  # extras accumulate
    assert setup("test") == []


def _source(extra, env):
    return subprocess.run(["bash", "-c", f'source "{REPO}/scripts/_venv.sh" "{extra}"'],
                          env=env, capture_output=True, text=True, timeout=60)


def test_a_venv_of_another_python_is_made_again_with_python_3_12(tmp_path):
    venv, log = tmp_path / "venv", tmp_path / "calls.log"
    fake(venv / "bin" / "python", FAKE_PYTHON, version="3.11")
    (venv / ".xft-installed").write_text("test\n")
    py312 = fake(tmp_path / "py" / "python3.12", FAKE_PYTHON312)
    env = {**os.environ, "XFT_VENV": str(venv), "XFT_TEST_LOG": str(log), "PYTHON": str(py312),
           "XFT_TEST_VENV_PYTHON": str(fake(tmp_path / "new-python", FAKE_PYTHON))}
    r = _source("test", env)
    assert r.returncode == 0, r.stderr
    assert f"{venv} has Python 3.11, this project needs 3.12: creating it again" in r.stderr
    calls = [c for c in log.read_text().splitlines() if c.startswith("-m ")]
    assert calls == [f"-m venv --clear {venv}", f"-m pip install -q -e {REPO}[test]"]
    assert _source("test", env).stderr == ""  # now it is a 3.12 venv: kept


def test_without_python_3_12_the_set_up_says_how_to_get_it(tmp_path):
    venv = tmp_path / "venv"
    # a PATH without python3.12 and without pyenv, an empty pyenv root
    path = tmp_path / "bin"
    for tool in ("bash", "dirname", "ls", "sort", "cat", "grep", "sed", "paste"):
        for d in ("/usr/bin", "/bin"):
            if os.path.exists(f"{d}/{tool}"):
                (path / tool).parent.mkdir(exist_ok=True)
                if not (path / tool).exists():
                    (path / tool).symlink_to(f"{d}/{tool}")
    env = {"PATH": str(path), "HOME": str(tmp_path), "XFT_VENV": str(venv),
           "PYENV_ROOT": str(tmp_path / "pyenv")}
    r = subprocess.run([str(path / "bash"), "-c", f'source "{REPO}/scripts/_venv.sh" ""'],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and not venv.exists()
    assert "Python 3.12 is needed" in r.stderr and "pyenv install 3.12" in r.stderr, r.stderr
    env["PYTHON"] = "/usr/bin/false"  # a PYTHON that is not Python 3.12 is refused
    r = subprocess.run([str(path / "bash"), "-c", f'source "{REPO}/scripts/_venv.sh" ""'],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "PYTHON=/usr/bin/false is not a working Python 3.12" in r.stderr
