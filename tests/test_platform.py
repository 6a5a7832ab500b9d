"""Platform module: the pinned Megatron-Core version, and CPU support that is scoped and undone."""

import torch

from xft_megatron import platform


def test_megatron_version_is_the_pinned_one():
    # every CPU stand-in in platform.py was checked against this exact release: if this fails,
    # re-check each item listed in the platform module docstring before moving the pin
    from megatron.core import package_info

    assert package_info.__version__ == platform.PINNED_MEGATRON_VERSION == "0.16.1"
    platform.check_megatron_version()


def test_cpu_support_activates_and_restores():
    if torch.cuda.is_available():
        platform.activate_cpu_support()
        assert not platform.cpu_support_active()  # never on GPU machines
        return
    import megatron.core.pipeline_parallel.schedules as schedules

    original_current_device, original_cuda = torch.cuda.current_device, torch.Tensor.cuda
    platform.activate_cpu_support()
    try:
        assert platform.cpu_support_active()
        assert torch.device(torch.cuda.current_device()).type == "cpu"
        # only the listed Megatron modules see the factory proxy
        assert schedules.torch.zeros([], device="cuda").device.type == "cpu"
        assert schedules.torch.nn is torch.nn
        x = torch.ones(2)
        assert x.cuda() is x
        with torch.cuda.stream(torch.cuda.Stream()):
            torch.cuda.current_stream().wait_stream(torch.cuda.Stream())
        assert x.type() == "torch.FloatTensor"
        with platform.optimizer_calls():
            assert x.type() == "torch.cuda.FloatTensor"
            assert x.bfloat16().type() == "torch.cuda.BFloat16Tensor"
        assert x.type() == "torch.FloatTensor"
    finally:
        platform.deactivate_cpu_support()
    assert torch.cuda.current_device is original_current_device
    assert torch.Tensor.cuda is original_cuda
    assert schedules.torch is torch
    assert platform.backend_name() == "gloo"
