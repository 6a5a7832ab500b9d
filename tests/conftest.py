import warnings

import pytest

warnings.filterwarnings("ignore", message=".*Apex is not installed.*")
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped without one")


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
