import os
import warnings

import pytest

warnings.filterwarnings("ignore", message=".*Apex is not installed.*")
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")


# What the tests hold at once under their temporary folder (docs/testing.md): the full run at
# most 6.7 GB, measured, the real-model quickstart's 6 GB being most of it; without that module
# a few hundred MB (each test's folder goes when it passes: pytest.ini). Checked before any
# test runs, so a small disk fails in a second with this message, not minutes later on a write.
REAL_MODEL_DISK = 8 * 2**30
OTHER_DISK = 1 * 2**30
REAL_MODEL_TESTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "e2e",
                                "test_real_model.py")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped without one")


def pytest_sessionstart(session):
    if not hasattr(session.config, "workerinput"):  # an xdist worker's controller checks
        _check_disk(session.config)


def _runs_real_model(config) -> bool:
    """Whether the paths asked for include tests/e2e/test_real_model.py."""
    args = [a.split("::")[0] for a in config.args if not a.startswith("-")] or ["."]
    for arg in args:
        path = os.path.abspath(os.path.join(config.invocation_params.dir, arg))
        if path == REAL_MODEL_TESTS or REAL_MODEL_TESTS.startswith(path.rstrip(os.sep) + os.sep):
            return True
    return False


def _check_disk(config):
    import tempfile

    from xft_megatron.checkpoint.space import free_bytes

    where = str(config.option.basetemp or tempfile.gettempdir())
    need = REAL_MODEL_DISK if _runs_real_model(config) else OTHER_DISK
    free = free_bytes(where)  # the nearest existing folder is asked
    if free < need and not os.environ.get("XFT_TEST_IGNORE_DISK"):
        raise pytest.UsageError(
            f"these tests need about {need / 2**30:.0f} GiB free under {where} for their "
            f"temporary files (tests/conftest.py); that disk has {free / 2**30:.1f} GiB free. "
            f"Free some space, or point the tests at a larger disk with --basetemp DIR (or "
            f"TMPDIR=DIR); XFT_TEST_IGNORE_DISK=1 runs them anyway")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run scripts/gpu.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny_hf(tmp_path):
    """A factory of tiny HF Llama folders under tmp_path: tiny_hf(name="hf", **config) -> path
    (tests.common.tiny_hf_llama: seeded, safetensors)."""
    from tests.common import tiny_hf_llama

    def make(name: str = "hf", seed: int = 0, save=None, **config) -> str:
        folder = str(tmp_path / name)
        tiny_hf_llama(folder, seed=seed, save=save, **config)
        return folder

    return make
