"""scripts/_venv.sh, which both README commands source: whichever runs first, the other still
gets what it needs (the install stamp records the extras installed)."""

import os
import subprocess

from tests.common import REPO

FAKE_PYTHON = """#!/bin/sh
# stands in for the venv's interpreter: torch "imports", pip calls are logged
echo "$*" >> "$XFT_TEST_LOG"
exit 0
"""


def test_quickstart_then_tests_then_again_installs_each_extra_once(tmp_path):
    venv, log = tmp_path / "venv", tmp_path / "calls.log"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(FAKE_PYTHON)
    (venv / "bin" / "python").chmod(0o755)
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
