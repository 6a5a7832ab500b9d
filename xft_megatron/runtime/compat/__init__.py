"""What differs between a GPU machine and a CPU one, and the Megatron-Core release we run on.

    compat            backend and device choice, the pinned megatron-core, the RNG streams
    compat.patches    the CPU support for Megatron-Core: ONE list of (object, attribute,
                      replacement), applied by `parallel.initialize` and reverted by
                      `parallel.shutdown` (its docstring says what each patch does and why)
    compat.cpu        the stand-ins those patches install
    compat.kernels    kernels Megatron-Core takes from apex when installed (the fused
                      weight-gradient accumulation), ours otherwise

On a GPU machine NCCL is the backend and Megatron-Core runs unmodified, apart from the
weight-gradient kernel it finds where apex's would be when apex is missing.
"""

from __future__ import annotations

import torch

PINNED_MEGATRON_VERSION = "0.19.2"


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

    # megatron-core appends `+<git commit>` when its files lie inside a git checkout (a .venv
    # in this repository's folder, say): the release is the part before it
    found = package_info.__version__.split("+")[0]
    if found != PINNED_MEGATRON_VERSION:
        raise RuntimeError(
            f"xft-megatron is pinned to megatron-core=={PINNED_MEGATRON_VERSION} but found "
            f"{found}. Install the pinned version: pip install "
            f"megatron-core=={PINNED_MEGATRON_VERSION}"
        )


def seed_model_parallel_rng(seed: int) -> None:
    """Seed the default, tensor-parallel and expert-parallel RNG streams (Megatron's scheme).

    Call after parallel state is initialized. GPU: Megatron's own function. CPU: the same
    three named streams, offsets as Megatron computes them, on the CPU generator, in the
    tracker that the CPU support installed (compat.patches, item 2).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as mrandom

    from xft_megatron.runtime.compat.cpu import cpu_rng_tracker_class

    if has_cuda():
        mrandom.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
        return
    tracker = mrandom._CUDA_RNG_STATE_TRACKER
    if not isinstance(tracker, cpu_rng_tracker_class()):
        raise RuntimeError("the CPU RNG tracker is not installed: seed the RNG streams "
                           "through parallel.initialize, which activates the CPU support")
    tracker.reset()
    tp_rank = ps.get_tensor_model_parallel_rank()
    ep_rank = ps.get_expert_model_parallel_rank()
    etp_rank = ps.get_expert_tensor_parallel_rank()
    torch.manual_seed(seed)
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(
        mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep_rank + etp_rank
    )
