"""The CPU stand-ins for what Megatron-Core 0.19.2 takes from CUDA. Nothing here is installed
by importing it: `compat.patches` lists where each one goes and why, and installs them."""

from __future__ import annotations

import contextlib
import functools
import threading
import types

import torch


# --------------------------------------------------------------------------------------------
# 1 and 3. torch.cuda stand-ins
# --------------------------------------------------------------------------------------------
def cpu_device():
    return torch.device("cpu")


class NullEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


class NullStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event if event is not None else NullEvent()

    def synchronize(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


NULL_STREAM = NullStream()


def the_null_stream(device=None):
    return NULL_STREAM


@contextlib.contextmanager
def null_stream_ctx(stream=None):
    yield


def no_synchronize(device=None):
    return None


# --------------------------------------------------------------------------------------------
# 2. RNG tracker on the CPU generator
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def cpu_rng_tracker_class():
    """Megatron's tracker class with its CUDA generator calls on the CPU generator (one class
    per process, so that `isinstance` recognizes the installed tracker)."""
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """Megatron's RNG tracker, forking the CPU generator instead of the CUDA one."""

        def add(self, name, seed):
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    return CpuRNGStatesTracker


# --------------------------------------------------------------------------------------------
# 4. `torch` with tensor factories that place device="cuda" on the CPU
# --------------------------------------------------------------------------------------------
FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "zeros_like", "ones_like",
             "empty_like", "full_like", "randn", "rand", "randint")


def _on_cpu(fn):
    def wrapped(*args, **kwargs):
        dev = kwargs.get("device")
        if dev is not None and torch.device(dev).type == "cuda":
            kwargs["device"] = "cpu"
        return fn(*args, **kwargs)

    wrapped.__name__ = fn.__name__
    return wrapped


class TorchOnCpu(types.ModuleType):
    """`torch`, except that tensor factories map device="cuda" to the CPU."""

    def __init__(self):
        super().__init__("torch")
        for name in FACTORIES:
            setattr(self, name, _on_cpu(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


# --------------------------------------------------------------------------------------------
# 5. Tensor.cuda
# --------------------------------------------------------------------------------------------
def tensor_cuda_on_cpu(self, *args, **kwargs):
    return self


# --------------------------------------------------------------------------------------------
# 6. Tensor.type naming CUDA types (only inside `patches.optimizer_calls`)
# --------------------------------------------------------------------------------------------
CPU_TO_CUDA_TYPE = {"torch.FloatTensor": "torch.cuda.FloatTensor",
                    "torch.HalfTensor": "torch.cuda.HalfTensor",
                    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor"}


def type_as_cuda(original, owner: int):
    """`Tensor.type` that, called without arguments on the thread `owner`, names the CUDA type
    of a CPU tensor's dtype; every other call (another thread, a conversion) is `original`."""

    def tensor_type(self, *args, **kwargs):
        name = original(self, *args, **kwargs)
        if args or kwargs or threading.get_ident() != owner:
            return name
        return CPU_TO_CUDA_TYPE.get(name, name)

    return tensor_type


# --------------------------------------------------------------------------------------------
# 7. host copies of all-to-all split sizes
# --------------------------------------------------------------------------------------------
def host_copy(original):
    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    return maybe_move_tensor_to_cpu


# --------------------------------------------------------------------------------------------
# 8. uneven all-gather and list reduce-scatter over gloo
# --------------------------------------------------------------------------------------------
def uneven_all_gather(tensor_list, tensor, group=None, async_op=False):
    if all(t.shape == tensor.shape for t in tensor_list):
        return torch.distributed.all_gather(tensor_list, tensor, group=group)
    rows = max(t.shape[0] for t in tensor_list)
    padded = tensor.new_zeros((rows,) + tuple(tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in tensor_list]
    torch.distributed.all_gather(gathered, padded, group=group)
    for out, got in zip(tensor_list, gathered):
        out.copy_(got[: out.shape[0]])


def list_reduce_scatter(output, input_list, op=None, group=None, async_op=False):
    full = torch.cat([t.reshape(t.shape[0], -1) for t in input_list], dim=0)
    torch.distributed.all_reduce(full, group=group)
    rank = torch.distributed.get_rank(group)
    start = sum(t.shape[0] for t in input_list[:rank])
    output.copy_(full[start:start + output.shape[0]].reshape(output.shape))


class MappingsDistributed(types.ModuleType):
    def __init__(self):
        super().__init__("torch.distributed")
        self.all_gather = uneven_all_gather
        self.reduce_scatter = list_reduce_scatter

    def __getattr__(self, name):
        return getattr(torch.distributed, name)


class MappingsTorch(types.ModuleType):
    """`torch` for Megatron's mappings module on CPU: gloo-capable uneven collectives."""

    def __init__(self):
        super().__init__("torch")
        self.distributed = MappingsDistributed()

    def __getattr__(self, name):
        return getattr(torch, name)


# --------------------------------------------------------------------------------------------
# 10. Transformer Engine installed: its placeholder weight gradient
# --------------------------------------------------------------------------------------------
def dummy_wgrad(shape, dtype, zero=False):
    """TE's `get_dummy_wgrad` (the placeholder gradient of a weight whose gradient went into
    `main_grad`), on the CPU: TE's allocates it on the current CUDA device."""
    return (torch.zeros if zero else torch.empty)(shape, dtype=dtype)
