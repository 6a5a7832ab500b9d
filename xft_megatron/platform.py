"""Backend selection and the CPU/gloo support for Megatron-Core, in one place.

On a GPU machine nothing here changes anything: NCCL is the backend and Megatron-Core runs
unmodified. On a machine without CUDA, Megatron-Core 0.16.1 still reaches for CUDA in a few
places. Each is handled below; everything is activated only by `activate_cpu_support()`,
which `parallel.initialize()` calls when `torch.cuda.is_available()` is False.

What is changed on CPU, and why (tied to megatron-core PINNED_MEGATRON_VERSION; a test fails
if the installed version differs, so each item gets re-checked when the pin moves):

  1. `torch.cuda.current_device` answers the CPU device. Megatron-Core allocates buffers with
     `device=torch.cuda.current_device()` in ~20 places (tensor-parallel linear layers'
     sequence-parallel all-gathers, the global memory buffer, rotary embedding, DDP grad
     buffers, pipeline p2p). Without CUDA the original raises, so answering "cpu" only turns
     a crash into CPU placement. Undone by `deactivate_cpu_support()`.
  2. The RNG tracker: Megatron's `CudaRNGStatesTracker` forks CUDA generator states. We
     install `CpuRNGStatesTracker` (a subclass) into the tracker slot Megatron provides, so
     `get_cuda_rng_tracker().fork()` forks the CPU generator instead.
  3. `torch.cuda.Stream`/`Event`/`synchronize`/`current_stream` used by the alltoall token
     dispatcher and p2p communication: no-op stand-ins (`_NullStream`, `_NullEvent`); CPU ops
     run in program order, which is what those streams order on a GPU.
  4. Tensors created with an explicit `device="cuda"` in the Megatron modules listed in
     `_MODULES_WITH_CUDA_FACTORIES` (loss-token counters in the schedules, optimizer
     found-inf/scale flags, grad-norm buffers, masks): those modules see `_TorchOnCpu`, a
     proxy of `torch` whose tensor factories place such tensors on the CPU. Only these
     modules are affected; everything else sees the real torch.
  6. Megatron's optimizer (constructor, and grad clipping in `step`) accepts only tensors
     whose `Tensor.type()` names a CUDA type ('torch.cuda.FloatTensor', ...).
     `optimizer_calls()` is a context manager wrapped around those two calls alone: inside
     it, CPU tensors report the CUDA type names of their dtype. Elsewhere `Tensor.type()` is
     untouched.
  5. `torch.Tensor.cuda()` (used e.g. to sync tied embeddings across pipeline stages)
     returns the tensor itself, as the CPU is the only device.
  7. The alltoall token dispatcher copies its all-to-all split sizes to the host with
     `maybe_move_tensor_to_cpu(..., as_numpy=True)`, which converts only CUDA tensors; a CPU
     tensor stays a tensor, and `all_to_all_single` rejects tensors as split sizes. The
     dispatcher module's reference is replaced by `_host_copy`, which also converts CPU
     tensors when asked for numpy.
  8. With expert tensor parallelism the alltoall dispatcher all-gathers and reduce-scatters
     token blocks of UNEQUAL sizes per rank (`torch.distributed.all_gather` with a list of
     different shapes, `torch.distributed.reduce_scatter` with a list). NCCL does both; gloo
     does neither. `megatron.core.tensor_parallel.mappings` sees `_MappingsTorch`, whose
     `distributed` namespace pads unequal blocks for the gather and implements the list
     reduce-scatter as an all-reduce of the concatenation followed by taking this rank's
     block. Results are exactly what NCCL computes (sum order aside).
"""

from __future__ import annotations

import contextlib
import importlib
import types
from typing import Optional

import torch

PINNED_MEGATRON_VERSION = "0.16.1"


def has_cuda() -> bool:
    return torch.cuda.is_available()


def backend_name() -> str:
    """torch.distributed backend: NCCL on GPU, gloo on CPU."""
    return "nccl" if has_cuda() else "gloo"


def device() -> torch.device:
    """The device this process computes on (its local GPU, or the CPU)."""
    if has_cuda():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_megatron_version() -> None:
    """Refuse to run against a megatron-core other than the pinned one."""
    from megatron.core import package_info

    found = package_info.__version__
    if found != PINNED_MEGATRON_VERSION:
        raise RuntimeError(
            f"xft-megatron is pinned to megatron-core=={PINNED_MEGATRON_VERSION} but found "
            f"{found}. Install the pinned version: pip install "
            f"megatron-core=={PINNED_MEGATRON_VERSION}"
        )


# --------------------------------------------------------------------------------------------
# 2. RNG tracker on the CPU generator
# --------------------------------------------------------------------------------------------
def _make_cpu_tracker_class():
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


def seed_model_parallel_rng(seed: int) -> None:
    """Seed the default, tensor-parallel and expert-parallel RNG streams (Megatron's scheme).

    Call after parallel state is initialized. GPU: Megatron's own function. CPU: the same
    three named streams, offsets as Megatron computes them, on the CPU generator.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as mrandom

    if has_cuda():
        mrandom.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
        return
    tracker = _make_cpu_tracker_class()()
    mrandom._CUDA_RNG_STATE_TRACKER = tracker
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    tp_rank = ps.get_tensor_model_parallel_rank()
    ep_rank = ps.get_expert_model_parallel_rank()
    etp_rank = ps.get_expert_tensor_parallel_rank()
    torch.manual_seed(seed)
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(
        mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep_rank + etp_rank
    )


# --------------------------------------------------------------------------------------------
# 1 and 3. torch.cuda stand-ins, installed only without CUDA
# --------------------------------------------------------------------------------------------
class _NullEvent:
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


class _NullStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event if event is not None else _NullEvent()

    def synchronize(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_NULL_STREAM = _NullStream()
_saved: Optional[dict] = None


def _cpu_device():
    return torch.device("cpu")


@contextlib.contextmanager
def _null_stream_ctx(stream=None):
    yield


_MODULES_WITH_CUDA_FACTORIES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.transformer.utils",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.tensor_parallel.data",
    "megatron.core.utils",
    "megatron.core.rerun_state_machine",
    "megatron.core.pipeline_parallel.utils",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.exchange_utils",
)
_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "zeros_like",
              "ones_like", "empty_like", "full_like", "randn", "rand", "randint")


def _on_cpu(fn):
    def wrapped(*args, **kwargs):
        dev = kwargs.get("device")
        if dev is not None and torch.device(dev).type == "cuda":
            kwargs["device"] = "cpu"
        return fn(*args, **kwargs)

    wrapped.__name__ = fn.__name__
    return wrapped


class _TorchOnCpu(types.ModuleType):
    """`torch`, except that tensor factories map device="cuda" to the CPU."""

    def __init__(self):
        super().__init__("torch")
        for name in _FACTORIES:
            setattr(self, name, _on_cpu(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


def _tensor_cuda_on_cpu(self, *args, **kwargs):
    return self


_DISPATCHER_MODULE = "megatron.core.transformer.moe.token_dispatcher"
_MAPPINGS_MODULE = "megatron.core.tensor_parallel.mappings"


def _uneven_all_gather(tensor_list, tensor, group=None, async_op=False):
    if all(t.shape == tensor.shape for t in tensor_list):
        return torch.distributed.all_gather(tensor_list, tensor, group=group)
    rows = max(t.shape[0] for t in tensor_list)
    padded = tensor.new_zeros((rows,) + tuple(tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in tensor_list]
    torch.distributed.all_gather(gathered, padded, group=group)
    for out, got in zip(tensor_list, gathered):
        out.copy_(got[: out.shape[0]])


def _list_reduce_scatter(output, input_list, op=None, group=None, async_op=False):
    full = torch.cat([t.reshape(t.shape[0], -1) for t in input_list], dim=0)
    torch.distributed.all_reduce(full, group=group)
    rank = torch.distributed.get_rank(group)
    start = sum(t.shape[0] for t in input_list[:rank])
    output.copy_(full[start:start + output.shape[0]].reshape(output.shape))


class _MappingsDistributed(types.ModuleType):
    def __init__(self):
        super().__init__("torch.distributed")
        self.all_gather = _uneven_all_gather
        self.reduce_scatter = _list_reduce_scatter

    def __getattr__(self, name):
        return getattr(torch.distributed, name)


class _MappingsTorch(types.ModuleType):
    """`torch` for Megatron's mappings module on CPU: gloo-capable uneven collectives."""

    def __init__(self):
        super().__init__("torch")
        self.distributed = _MappingsDistributed()

    def __getattr__(self, name):
        return getattr(torch, name)


def _host_copy(original):
    def host_copy(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    return host_copy


_CPU_TO_CUDA_TYPE = {"torch.FloatTensor": "torch.cuda.FloatTensor",
                     "torch.HalfTensor": "torch.cuda.HalfTensor",
                     "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor"}


@contextlib.contextmanager
def optimizer_calls():
    """Wrap Megatron optimizer construction and `step` (item 6). A no-op with CUDA."""
    if _saved is None:
        yield
        return
    original = torch.Tensor.type

    def type_as_cuda(self, *args, **kwargs):
        name = original(self, *args, **kwargs)
        if args or kwargs:
            return name
        return _CPU_TO_CUDA_TYPE.get(name, name)

    torch.Tensor.type = type_as_cuda
    try:
        yield
    finally:
        torch.Tensor.type = original


def activate_cpu_support() -> None:
    """Install the CPU stand-ins listed in the module docstring. No-op when CUDA exists."""
    global _saved
    if has_cuda() or _saved is not None:
        return
    check_megatron_version()
    replaced = {
        "current_device": _cpu_device,
        "Stream": _NullStream,
        "Event": _NullEvent,
        "current_stream": lambda device=None: _NULL_STREAM,
        "default_stream": lambda device=None: _NULL_STREAM,
        "stream": _null_stream_ctx,
        "synchronize": lambda device=None: None,
    }
    _saved = {name: getattr(torch.cuda, name) for name in replaced}
    for name, value in replaced.items():
        setattr(torch.cuda, name, value)
    proxy = _TorchOnCpu()
    _saved["modules"] = [importlib.import_module(m) for m in _MODULES_WITH_CUDA_FACTORIES]
    for mod in _saved["modules"]:
        mod.torch = proxy
    _saved["Tensor.cuda"] = torch.Tensor.cuda
    torch.Tensor.cuda = _tensor_cuda_on_cpu
    mappings = importlib.import_module(_MAPPINGS_MODULE)
    mappings.torch = _MappingsTorch()
    dispatcher = importlib.import_module(_DISPATCHER_MODULE)
    _saved["dispatcher host copy"] = dispatcher.maybe_move_tensor_to_cpu
    dispatcher.maybe_move_tensor_to_cpu = _host_copy(dispatcher.maybe_move_tensor_to_cpu)


def deactivate_cpu_support() -> None:
    """Restore torch.cuda as it was."""
    global _saved
    if _saved is None:
        return
    for mod in _saved.pop("modules"):
        mod.torch = torch
    torch.Tensor.cuda = _saved.pop("Tensor.cuda")
    importlib.import_module(_MAPPINGS_MODULE).torch = torch
    importlib.import_module(_DISPATCHER_MODULE).maybe_move_tensor_to_cpu = _saved.pop(
        "dispatcher host copy")
    for name, value in _saved.items():
        setattr(torch.cuda, name, value)
    _saved = None


def cpu_support_active() -> bool:
    return _saved is not None
