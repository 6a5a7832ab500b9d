"""The CPU/gloo support for Megatron-Core: ONE list of patches, applied and reverted together.

On a machine without CUDA, Megatron-Core 0.19.2 still reaches for CUDA in a few places.
`cpu_patches()` lists every replacement as (object, attribute, replacement);
`activate_cpu_support()` (called by `parallel.initialize` when `torch.cuda.is_available()` is
False) records each original and applies the list, `deactivate_cpu_support()` (called by
`parallel.shutdown`) puts every original back, in reverse order. Between the two, code outside
Megatron (transformers, our own) sees the changed `torch.cuda` and `Tensor.cuda` too; after
`parallel.shutdown` nothing of it is left.

What is changed on CPU, and why (tied to megatron-core PINNED_MEGATRON_VERSION; a test fails
if the installed version differs, so each item gets re-checked when the pin moves):

  1. `torch.cuda.current_device` answers the CPU device. Megatron-Core allocates buffers with
     `device=torch.cuda.current_device()` in ~20 places (tensor-parallel linear layers'
     sequence-parallel all-gathers, the global memory buffer, rotary embedding, DDP grad
     buffers, pipeline p2p). Without CUDA the original raises, so answering "cpu" only turns
     a crash into CPU placement.
  2. The RNG tracker: Megatron's `CudaRNGStatesTracker` forks CUDA generator states. A
     `CpuRNGStatesTracker` (a subclass, compat.cpu) goes into the tracker slot Megatron
     provides (`megatron.core.tensor_parallel.random._CUDA_RNG_STATE_TRACKER`, with
     `_CUDA_RNG_STATE_TRACKER_INITIALIZED` set), so `get_cuda_rng_tracker().fork()` forks the
     CPU generator instead; `compat.seed_model_parallel_rng` seeds its streams. Both globals
     are restored like every other patched attribute.
  3. `torch.cuda.Stream`/`Event`/`synchronize`/`current_stream`/`default_stream`/`stream`,
     used by the alltoall token dispatcher and p2p communication: no-op stand-ins
     (`NullStream`, `NullEvent`); CPU ops run in program order, which is what those streams
     order on a GPU.
  4. Tensors created with an explicit `device="cuda"` in the Megatron modules listed in
     `MODULES_WITH_CUDA_FACTORIES` (loss-token counters in the schedules, optimizer
     found-inf/scale flags, grad-norm buffers, masks): those modules see `TorchOnCpu`, a
     proxy of `torch` whose tensor factories place such tensors on the CPU. Only these
     modules are affected; everything else sees the real torch. (The MoE layer-wise loss
     tracker, which needed it up to 0.16, moved to `moe_logging` in 0.19 and places its
     tensors on the CPU itself when CUDA is absent.)
  5. `torch.Tensor.cuda()` (used e.g. to sync tied embeddings across pipeline stages)
     returns the tensor itself, as the CPU is the only device.
  6. Megatron's optimizer (constructor, and grad clipping in `step`) accepts only tensors
     whose `Tensor.type()` names a CUDA type ('torch.cuda.FloatTensor', ...). This one is NOT
     in the list: `optimizer_calls()` is a context manager wrapped around those two calls
     alone, which swaps `Tensor.type` for its duration (see there: a lock and the calling
     thread scope it). Elsewhere `Tensor.type()` is untouched.
  7. The alltoall token dispatcher copies its all-to-all split sizes to the host with
     `maybe_move_tensor_to_cpu(..., as_numpy=True)`, which converts only CUDA tensors; a CPU
     tensor stays a tensor, and `all_to_all_single` rejects tensors as split sizes. The
     dispatcher module's reference is replaced by `host_copy`, which also converts CPU
     tensors when asked for numpy.
  8. With expert tensor parallelism the alltoall dispatcher all-gathers and reduce-scatters
     token blocks of UNEQUAL sizes per rank (`torch.distributed.all_gather` with a list of
     different shapes, `torch.distributed.reduce_scatter` with a list). NCCL does both; gloo
     does neither. `megatron.core.tensor_parallel.mappings` sees `MappingsTorch`, whose
     `distributed` namespace pads unequal blocks for the gather and implements the list
     reduce-scatter as an all-reduce of the concatenation followed by taking this rank's
     block. Results are exactly what NCCL computes (sum order aside).

  9. With Transformer Engine or apex installed, Megatron's optimizer takes their fused Adam
     (`USING_PYTORCH_OPTIMIZER` false), a CUDA kernel whose constructor initializes CUDA, and
     the distributed optimizer follows that choice (`USING_TE_OPTIMIZER`,
     `USING_APEX_OPTIMIZER`, `HAVE_APEX_OR_TE`): on the CPU both take torch's AdamW, as
     without them.
 10. With Transformer Engine installed, Megatron's linear layers take the placeholder weight
     gradient of `gradient_accumulation_fusion` from TE's `get_dummy_wgrad`, which allocates
     on CUDA: `cpu.dummy_wgrad` allocates it on the CPU.
 11. With Transformer Engine or apex installed, gradient clipping and the optimizer's
     gradient scaling take their multi-tensor kernels (CUDA): on the CPU, Megatron's own
     local implementations, which it uses without them.
     Items 9-11 are listed only where TE or apex is installed (tested with TE 2.20.2 on the
     CPU: the suite passes as without it).

Apart from that list, on every machine:
  - `kernel_patches()`, applied by `parallel.initialize` and reverted by `parallel.shutdown`
    (`activate_kernels`/`deactivate_kernels`), only where apex is missing: Megatron's linear
    layers take their fused weight-gradient accumulation kernel from apex's
    `fused_weight_gradient_mlp_cuda`; `compat.kernels.ApexWgradStandIn` goes in its place
    (one GEMM accumulating in the fp32 gradient buffer), so `gradient_accumulation_fusion`
    (precision.grad_accum_fusion) runs without apex.
  - `plain_data_loads()`, a context manager around
`dist_checkpointing.load`. torch's `DefaultLoadPlanner.load_bytes` (which Megatron's load
planner inherits) unpickles every stored object of a torch_dist checkpoint with
`weights_only=False`, Megatron's non-tensor state among them (one stored object since 0.19),
and Megatron's common strategy still reads the `common.pt` of earlier checkpoints (present
in a folder, it is read instead) with `torch.load` under torch's default: a planted pickle
would run code. Those two modules see `PlainDataTorch`, a proxy of `torch` whose `load`
always passes `weights_only=True`.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import threading
from typing import Any, Iterable, List, Optional, Tuple

import torch

from xft_megatron.runtime.compat import check_megatron_version, cpu, has_cuda, kernels

Patch = Tuple[Any, str, Any]  # (object, attribute, replacement)
_INHERITED = object()  # the attribute came from a base class: revert deletes the override


class Patches:
    """Replacements applied together and reverted together. `apply` records each original
    and sets the replacement; `revert` restores the originals in reverse order. Also a
    context manager (apply on enter, revert on exit). Every attribute must exist, except the
    names in `added` (set where absent, deleted again by `revert`): a patch naming one that
    does not means the pinned release changed, and nothing is applied."""

    def __init__(self, patches: Iterable[Patch], added: Iterable[str] = ()):
        self.patches: List[Patch] = list(patches)
        self.added = frozenset(added)
        self._originals: Optional[List[Patch]] = None

    @property
    def applied(self) -> bool:
        return self._originals is not None

    def apply(self) -> "Patches":
        if self.applied:
            raise RuntimeError("these patches are applied already")
        for obj, name, _ in self.patches:
            if not hasattr(obj, name) and name not in self.added:
                raise AttributeError(f"{obj!r} has no attribute {name!r} to patch")
        done: List[Patch] = []
        try:
            for obj, name, value in self.patches:
                own = name in getattr(obj, "__dict__", {name: None})
                original = getattr(obj, name) if own else _INHERITED
                setattr(obj, name, value)
                done.append((obj, name, original))
        except BaseException:
            _restore(done)
            raise
        self._originals = done
        return self

    def revert(self) -> None:
        if not self.applied:
            return
        originals, self._originals = self._originals, None
        _restore(originals)

    def __enter__(self) -> "Patches":
        return self.apply()

    def __exit__(self, *exc) -> bool:
        self.revert()
        return False


def _restore(originals: List[Patch]) -> None:
    for obj, name, original in reversed(originals):
        if original is _INHERITED:
            delattr(obj, name)
        else:
            setattr(obj, name, original)


MODULES_WITH_CUDA_FACTORIES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.transformer.utils",
    "megatron.core.tensor_parallel.data",
    "megatron.core.utils",
    "megatron.core.rerun_state_machine",
    "megatron.core.pipeline_parallel.utils",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.exchange_utils",
)
DISPATCHER_MODULE = "megatron.core.transformer.moe.token_dispatcher"
LAYERS_MODULE = "megatron.core.tensor_parallel.layers"
OPTIMIZER_MODULE = "megatron.core.optimizer"
MAPPINGS_MODULE = "megatron.core.tensor_parallel.mappings"
RANDOM_MODULE = "megatron.core.tensor_parallel.random"


def cpu_patches() -> List[Patch]:
    """Every CPU replacement (items 1-5, 7-11 of the module docstring), built fresh."""
    cuda = torch.cuda
    mrandom = importlib.import_module(RANDOM_MODULE)
    dispatcher = importlib.import_module(DISPATCHER_MODULE)
    proxy = cpu.TorchOnCpu()
    return [
        (cuda, "current_device", cpu.cpu_device),                                  # 1
        (mrandom, "_CUDA_RNG_STATE_TRACKER", cpu.cpu_rng_tracker_class()()),       # 2
        (mrandom, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", True),
        (cuda, "Stream", cpu.NullStream),                                          # 3
        (cuda, "Event", cpu.NullEvent),
        (cuda, "current_stream", cpu.the_null_stream),
        (cuda, "default_stream", cpu.the_null_stream),
        (cuda, "stream", cpu.null_stream_ctx),
        (cuda, "synchronize", cpu.no_synchronize),
        *[(importlib.import_module(m), "torch", proxy)                             # 4
          for m in MODULES_WITH_CUDA_FACTORIES],
        (torch.Tensor, "cuda", cpu.tensor_cuda_on_cpu),                            # 5
        (dispatcher, "maybe_move_tensor_to_cpu",                                   # 7
         cpu.host_copy(dispatcher.maybe_move_tensor_to_cpu)),
        (importlib.import_module(MAPPINGS_MODULE), "torch", cpu.MappingsTorch()),  # 8
        *_te_or_apex_patches(),                                                    # 9-11
    ]


def _te_or_apex_patches() -> List[Patch]:
    """Items 9-11: only where Transformer Engine or apex is installed."""
    from megatron.core import utils

    optimizer = importlib.import_module(OPTIMIZER_MODULE)
    distrib = importlib.import_module(OPTIMIZER_MODULE + ".distrib_optimizer")
    clip = importlib.import_module(OPTIMIZER_MODULE + ".clip_grads")
    scaling = importlib.import_module(OPTIMIZER_MODULE + ".optimizer")
    layers = importlib.import_module(LAYERS_MODULE)
    out = []
    if not optimizer.USING_PYTORCH_OPTIMIZER:                                      # 9
        out += [(optimizer, "USING_PYTORCH_OPTIMIZER", True),
                (distrib, "USING_TE_OPTIMIZER", False),
                (distrib, "USING_APEX_OPTIMIZER", False),
                (distrib, "HAVE_APEX_OR_TE", False)]
    if layers.HAVE_TE:                                                             # 10
        out.append((layers, "get_dummy_wgrad", cpu.dummy_wgrad))
    if clip.multi_tensor_applier is not utils.local_multi_tensor_applier:          # 11
        out += [(clip, "multi_tensor_applier", utils.local_multi_tensor_applier),
                (clip, "l2_norm_impl", utils.local_multi_tensor_l2_norm),
                (clip, "multi_tensor_scale_impl", utils.local_multi_tensor_scale),
                (clip, "multi_tensor_scale_tensor_impl", None),
                (scaling, "multi_tensor_applier", utils.local_multi_tensor_applier),
                (scaling, "multi_tensor_scale_impl", utils.local_multi_tensor_scale)]
    return out


def kernel_patches() -> Patches:
    """On every machine without apex: Megatron's linear layers find `kernels.ApexWgradStandIn`
    where they look for apex's `fused_weight_gradient_mlp_cuda` (a name their module defines
    only when apex imports), so `gradient_accumulation_fusion` works without apex. Nothing
    when apex is installed: its kernel is used."""
    layers = importlib.import_module(LAYERS_MODULE)
    if hasattr(layers, "fused_weight_gradient_mlp_cuda"):
        return Patches([])
    return Patches([(layers, "fused_weight_gradient_mlp_cuda", kernels.ApexWgradStandIn),
                    (layers, "_grad_accum_fusion_available", True)],
                   added=("fused_weight_gradient_mlp_cuda",))


_active: Optional[Patches] = None  # the applied CPU support, between activate and deactivate
_kernels: Optional[Patches] = None  # the applied kernel stand-ins (every machine)


def activate_kernels() -> None:
    """Apply `kernel_patches()` (on every machine); a no-op when already active."""
    global _kernels
    if _kernels is None:
        _kernels = kernel_patches().apply()


def deactivate_kernels() -> None:
    global _kernels
    if _kernels is not None:
        patches, _kernels = _kernels, None
        patches.revert()


def activate_cpu_support() -> None:
    """Apply `cpu_patches()`. A no-op with CUDA, or when already active."""
    global _active
    if has_cuda() or _active is not None:
        return
    check_megatron_version()
    _active = Patches(cpu_patches()).apply()


def deactivate_cpu_support() -> None:
    """Put back every original that `activate_cpu_support` replaced. A no-op when inactive."""
    global _active
    if _active is None:
        return
    patches, _active = _active, None
    patches.revert()


def cpu_support_active() -> bool:
    return _active is not None


_TYPE_LOCK = threading.RLock()


@contextlib.contextmanager
def optimizer_calls():
    """Wrap Megatron optimizer construction and `step` (item 6). A no-op with CUDA (or
    without the CPU support active).

    `Tensor.type` is a class attribute, so swapping it is seen by the whole process. Two
    things keep that safe while other threads run (the training loop's batch prefetcher,
    checksum threads): the swap is held under a process-wide lock, so two callers never
    interleave their swap and restore (re-entrant on one thread), and the replacement names
    CUDA types only on the thread that holds it; any other thread gets the real answer."""
    if _active is None:
        yield
        return
    with _TYPE_LOCK:
        original = torch.Tensor.type
        replacement = cpu.type_as_cuda(original, threading.get_ident())
        with Patches([(torch.Tensor, "type", replacement)]):
            yield


# the modules whose `torch.load` unpickles a checkpoint's stored objects (`plain_data_loads`)
UNPICKLING_MODULES = ("megatron.core.dist_checkpointing.strategies.common",
                      "torch.distributed.checkpoint.default_planner")


class PlainDataTorch:
    """`torch` for `UNPICKLING_MODULES`: everything as in torch, but `load` reads tensors and
    plain values only (`weights_only=True`, whatever the caller asked). A refused object's
    pickle.UnpicklingError carries `where`: the file, or "a stored object"."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            return torch.load(f, *args, **kwargs)
        except pickle.UnpicklingError as e:
            e.where = os.fspath(f) if isinstance(f, (str, os.PathLike)) else "a stored object"
            raise


def plain_data_loads() -> Patches:
    """Patches (a context manager) under which Megatron's checkpoint load runs no pickled
    code (see the module docstring)."""
    proxy = PlainDataTorch()
    return Patches([(importlib.import_module(m), "torch", proxy) for m in UNPICKLING_MODULES])
