"""compat: the pinned Megatron-Core version, and CPU support that is scoped and undone."""

import importlib
import inspect
import re
import threading
import types

import pytest
import torch

from xft_megatron.config import ParallelConfig
from xft_megatron.runtime import compat, parallel
from xft_megatron.runtime.compat import patches

ON_GPU = torch.cuda.is_available()


@pytest.fixture
def inactive():
    """Start from torch and Megatron as imported, whatever ran before in this process."""
    parallel.shutdown()
    yield
    parallel.shutdown()


def test_megatron_version_is_the_pinned_one():
    # every CPU stand-in in runtime/compat/ was checked against this exact release: if this fails,
    # re-check each item listed in the compat.patches docstring before moving the pin
    from megatron.core import package_info

    assert package_info.__version__.split("+")[0] == compat.PINNED_MEGATRON_VERSION == "0.19.2"
    compat.check_megatron_version()


def test_every_module_given_cpu_tensor_factories_still_creates_cuda_tensors():
    # item 4 of the compat.patches docstring is still needed in each module it lists: each
    # creates tensors with device="cuda" (0.19 moved the MoE loss tracker's out of moe_utils)
    for name in patches.MODULES_WITH_CUDA_FACTORIES:
        source = inspect.getsource(importlib.import_module(name))
        assert re.search(r"device\s*=\s*['\"]cuda['\"]", source), name


def test_cpu_support_activates_and_restores(inactive):
    if ON_GPU:
        patches.activate_cpu_support()
        assert not patches.cpu_support_active()  # never on GPU machines
        return
    import megatron.core.pipeline_parallel.schedules as schedules

    original_current_device, original_cuda = torch.cuda.current_device, torch.Tensor.cuda
    patches.activate_cpu_support()
    try:
        assert patches.cpu_support_active()
        assert torch.device(torch.cuda.current_device()).type == "cpu"
        # only the listed Megatron modules see the factory proxy
        assert schedules.torch.zeros([], device="cuda").device.type == "cpu"
        assert schedules.torch.nn is torch.nn
        x = torch.ones(2)
        assert x.cuda() is x
        with torch.cuda.stream(torch.cuda.Stream()):
            torch.cuda.current_stream().wait_stream(torch.cuda.Stream())
        assert x.type() == "torch.FloatTensor"
        with patches.optimizer_calls():
            assert x.type() == "torch.cuda.FloatTensor"
            assert x.bfloat16().type() == "torch.cuda.BFloat16Tensor"
        assert x.type() == "torch.FloatTensor"
    finally:
        patches.deactivate_cpu_support()
    assert torch.cuda.current_device is original_current_device
    assert torch.Tensor.cuda is original_cuda
    assert schedules.torch is torch
    assert compat.backend_name() == "gloo"


def _patched_attributes():
    """label -> (object, attribute): everything the CPU support replaces."""
    mrandom = importlib.import_module(patches.RANDOM_MODULE)
    out = {f"torch.cuda.{n}": (torch.cuda, n) for n in (
        "current_device", "Stream", "Event", "current_stream", "default_stream", "stream",
        "synchronize")}
    out["Tensor.cuda"] = (torch.Tensor, "cuda")
    out["Tensor.type"] = (torch.Tensor, "type")
    out.update({f"{m}.torch": (importlib.import_module(m), "torch")
                for m in patches.MODULES_WITH_CUDA_FACTORIES})
    dispatcher = importlib.import_module(patches.DISPATCHER_MODULE)
    out["dispatcher.maybe_move_tensor_to_cpu"] = (dispatcher, "maybe_move_tensor_to_cpu")
    out["mappings.torch"] = (importlib.import_module(patches.MAPPINGS_MODULE), "torch")
    for name in ("_CUDA_RNG_STATE_TRACKER", "_CUDA_RNG_STATE_TRACKER_INITIALIZED"):
        out[f"random.{name}"] = (mrandom, name)
    return out


@pytest.mark.skipif(ON_GPU, reason="the CPU support is never applied with CUDA")
def test_initialize_then_shutdown_leaves_every_patched_attribute_as_imported(inactive):
    from megatron.core.transformer.moe import moe_utils

    watched = _patched_attributes()
    before = {k: getattr(o, a) for k, (o, a) in watched.items()}
    # what is watched is the genuine article
    assert before["torch.cuda.current_device"].__module__ == "torch.cuda"
    assert before["dispatcher.maybe_move_tensor_to_cpu"] is moe_utils.maybe_move_tensor_to_cpu
    assert all(v is torch for k, v in before.items() if k.endswith(".torch"))
    assert "cuda" not in vars(torch.Tensor) and "type" not in vars(torch.Tensor)

    parallel.initialize(ParallelConfig(), seed=5)
    during = {k: getattr(o, a) for k, (o, a) in watched.items()}
    unchanged = [k for k in watched if during[k] is before[k] and k != "Tensor.type"]
    assert unchanged == [], f"not patched by initialize: {unchanged}"
    assert during["Tensor.type"] is before["Tensor.type"]  # only inside optimizer_calls
    assert len(during["random._CUDA_RNG_STATE_TRACKER"].states_) == 3  # seeded streams

    parallel.shutdown()
    after = {k: getattr(o, a) for k, (o, a) in watched.items()}
    changed = [k for k in watched if after[k] is not before[k]]
    assert changed == [], f"not restored by shutdown: {changed}"
    assert "cuda" not in vars(torch.Tensor)  # the class attribute is inherited again
    assert not patches.cpu_support_active()


@pytest.mark.skipif(ON_GPU, reason="the CPU support is never applied with CUDA")
def test_optimizer_calls_name_cuda_types_on_their_own_thread_one_holder_at_a_time(inactive):
    patches.activate_cpu_support()
    x = torch.ones(2)
    seen, order = {}, []

    def other_thread():
        seen["type"] = x.type()

    def second_holder():
        with patches.optimizer_calls():
            order.append(("second", x.type()))

    with patches.optimizer_calls():
        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
        second = threading.Thread(target=second_holder)
        second.start()
        second.join(timeout=0.3)
        assert second.is_alive() and order == []  # waits for the first holder
        order.append(("first", x.type()))
    second.join()
    assert seen["type"] == "torch.FloatTensor"  # another thread, meanwhile: the real answer
    assert order == [("first", "torch.cuda.FloatTensor"), ("second", "torch.cuda.FloatTensor")]
    assert x.type() == "torch.FloatTensor" and "type" not in vars(torch.Tensor)


def test_patches_apply_and_revert_in_reverse_order_or_not_at_all():
    class Base:
        def method(self):
            return "base"

    class Obj(Base):
        @property
        def read_only(self):
            return 0

    ns = types.SimpleNamespace(a=1, b=2)
    with patches.Patches([(ns, "a", 10), (Obj, "method", lambda self: "patched"),
                          (ns, "a", 20)]) as p:
        assert p.applied and ns.a == 20 and Obj().method() == "patched"
    assert not p.applied and ns.a == 1  # the same attribute twice: the first original wins
    assert "method" not in vars(Obj) and Obj.method is Base.method
    with pytest.raises(AttributeError, match="no attribute 'missing'"):
        patches.Patches([(ns, "b", 3), (ns, "missing", 0)]).apply()
    assert ns.b == 2
    obj = Obj()
    with pytest.raises(AttributeError):  # fails midway: what was applied is reverted
        patches.Patches([(ns, "b", 3), (obj, "read_only", 1)]).apply()
    assert ns.b == 2
