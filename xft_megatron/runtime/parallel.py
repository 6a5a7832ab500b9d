"""Start torch.distributed and Megatron-Core's parallel state from a ParallelConfig.

Works under torchrun (one or many nodes: RANK/WORLD_SIZE/MASTER_ADDR from the environment),
under Slurm's srun (SLURM_PROCID/SLURM_NTASKS), and as a single process without a launcher.
"""

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from xft_megatron.config import ParallelConfig
from xft_megatron.runtime import compat
from xft_megatron.runtime.compat import patches


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int


def rank_info_from_env() -> RankInfo:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return RankInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return RankInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                        int(env.get("SLURM_LOCALID", 0)))
    return RankInfo(0, 1, 0)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(timeout_s: float = 600.0) -> RankInfo:
    """torch.distributed on NCCL (GPU) or gloo (CPU). A no-op if already initialized."""
    info = rank_info_from_env()
    if dist.is_initialized():
        return RankInfo(dist.get_rank(), dist.get_world_size(), info.local_rank)
    init_method = None  # env:// (torchrun, srun with MASTER_ADDR/PORT exported)
    if info.world_size == 1 and "MASTER_ADDR" not in os.environ:
        # one process: a private store on a free port, without writing MASTER_* into the
        # environment (processes started later would inherit them and collide on the port)
        init_method = f"tcp://127.0.0.1:{free_port()}"
    if compat.has_cuda():
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
    dist.init_process_group(
        backend=compat.backend_name(), init_method=init_method, rank=info.rank,
        world_size=info.world_size, timeout=timedelta(seconds=timeout_s),
    )
    return info


def initialize(parallel: ParallelConfig, seed: int = 1234, timeout_s: float = 600.0) -> RankInfo:
    """Process group + Megatron parallel state + seeded RNG streams. Validates the layout
    against the world size first (ConfigError before any group is built). Called again with
    the same layout, it keeps the existing groups and only reseeds. Without CUDA it applies
    the CPU support for Megatron-Core (compat.patches), and everywhere the kernel stand-ins
    for apex's where apex is missing; `shutdown` reverts both."""
    info = rank_info_from_env() if not dist.is_initialized() else \
        RankInfo(dist.get_rank(), dist.get_world_size(), 0)
    parallel.data_parallel_size(info.world_size)  # raises ConfigError on a bad fit
    patches.activate_cpu_support()  # reverted by shutdown()
    patches.activate_kernels()  # likewise
    info = init_process_group(timeout_s)
    if _current_layout() == _layout(parallel):  # the groups exist already: only reseed
        compat.seed_model_parallel_rng(seed)
        return info
    _destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor,
        pipeline_model_parallel_size=parallel.pipeline,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
        expert_model_parallel_size=parallel.expert,
        expert_tensor_parallel_size=parallel.expert_tensor,
    )
    compat.seed_model_parallel_rng(seed)
    return info


def _layout(parallel: ParallelConfig):
    return (parallel.tensor, parallel.pipeline, parallel.virtual_pipeline, parallel.expert,
            parallel.expert_tensor)


def _current_layout():
    """The layout Megatron's parallel state was built for, or None."""
    if not ps.model_parallel_is_initialized():
        return None
    return (ps.get_tensor_model_parallel_world_size(),
            ps.get_pipeline_model_parallel_world_size(),
            ps.get_virtual_pipeline_model_parallel_world_size(),
            ps.get_expert_model_parallel_world_size(),
            ps.get_expert_tensor_parallel_world_size())


def _megatron_groups():
    """The process groups Megatron's parallel state holds on this rank (each once)."""
    found = {}
    for value in vars(ps).values():
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if isinstance(v, dist.ProcessGroup):
                found[id(v)] = v
    return list(found.values())


def _destroy_model_parallel() -> None:
    """Forget Megatron's parallel state AND release its process groups. Megatron's own
    `destroy_model_parallel` only drops its references, so every re-initialization (a new
    layout in one process: tests, conversions) would leave its groups alive, with their
    communication threads and sockets."""
    if not ps.model_parallel_is_initialized():
        return
    groups = _megatron_groups()
    ps.destroy_model_parallel()
    world = dist.distributed_c10d._get_default_group()
    for g in groups:
        if g is not world and g in dist.distributed_c10d._world.pg_map:
            dist.destroy_process_group(g)


def say(*args) -> None:
    """Print once per job (rank 0), however many processes run it."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)


def shutdown() -> None:
    """Release Megatron's parallel state and the process group, and revert the CPU support
    that `initialize` applied: afterwards torch and Megatron-Core are as imported."""
    try:
        _destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()
    finally:
        patches.deactivate_kernels()
        patches.deactivate_cpu_support()
