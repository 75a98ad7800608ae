"""torch.distributed + megatron parallel_state set-up from a ``torchrun`` environment.

CPU hosts use gloo (with ``megatron_patches`` applied), GPU hosts NCCL. Outside ``torchrun``
a one-process group is created so the same code path runs in a notebook or a unit test.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from prism_megatron.errors import PrismError


class ParallelConfigError(PrismError, ValueError):
    """The requested parallel layout does not fit the world size or the model."""


@dataclass(frozen=True)
class ParallelInfo:
    rank: int
    world_size: int
    local_rank: int
    tp: int
    pp: int
    ep: int
    dp: int
    backend: str

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")


def free_port(any_host: bool = False) -> int:
    """A free TCP port (on every interface with ``any_host``: a master other hosts reach)."""
    with socket.socket() as s:
        s.bind(("" if any_host else "127.0.0.1", 0))
        return s.getsockname()[1]


def _ensure_env() -> bool:
    """A process not started by torchrun becomes rank 0 of a world of one. True when there is
    no rendezvous to join (a world of one without MASTER_ADDR)."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    return os.environ["WORLD_SIZE"] == "1" and "MASTER_ADDR" not in os.environ


def check_layout(world_size: int, tp: int, pp: int, ep: int = 1) -> int:
    """Returns the data-parallel size, or raises a ParallelConfigError that names the fix."""
    if min(tp, pp, ep) < 1:
        raise ParallelConfigError(f"parallel sizes must be >= 1, got tp={tp} pp={pp} ep={ep}")
    if world_size % (tp * pp):
        raise ParallelConfigError(
            f"world size {world_size} is not divisible by tp*pp = {tp}*{pp}; launch with "
            f"torchrun --nproc_per_node a multiple of {tp * pp}")
    dp = world_size // (tp * pp)
    if (dp * tp) % ep:
        raise ParallelConfigError(f"expert parallel size {ep} must divide dp*tp = {dp * tp}")
    return dp


def init_distributed(tp: int = 1, pp: int = 1, ep: int = 1, seed: int = 1234,
                     backend: str | None = None, timeout_minutes: int = 30) -> ParallelInfo:
    """Initialise torch.distributed and megatron's tensor/pipeline/data/expert groups.

    Seeds the default generator with ``seed`` (identical on every rank) and megatron's
    model-parallel RNG tracker (different per TP rank, as megatron expects).
    """
    from megatron.core import parallel_state, tensor_parallel

    import megatron_patches

    alone = _ensure_env()
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dp = check_layout(world_size, tp, pp, ep)
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    else:
        megatron_patches.apply_all(force=True)
    if not dist.is_initialized():
        # A world of one needs no rendezvous: an in-memory store, so no port to pick (a port
        # chosen free can be taken by another process before it is bound).
        store = {"store": dist.HashStore()} if alone else {}
        # On GPUs the small CPU tensors of the bookkeeping collectives (loss sums, token and
        # valid counts, the preemption flag) go over gloo and CUDA tensors over NCCL: an
        # NCCL-only group refuses CPU tensors ("No backend type associated with device type
        # cpu"). Megatron's groups inherit both backends from the default group.
        pg_backend = "cuda:nccl,cpu:gloo" if backend == "nccl" else backend
        dist.init_process_group(backend=pg_backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(minutes=timeout_minutes), **store)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return ParallelInfo(rank, world_size, local_rank, tp, pp, ep, dp, backend)


def destroy_distributed() -> None:
    """Tear down megatron's groups and the process group (safe to call twice)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed(**kwargs):
    """``with distributed(tp=2) as info:`` — init on entry, tear down on exit."""
    info = init_distributed(**kwargs)
    try:
        yield info
    finally:
        destroy_distributed()


def is_main_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def shard_map(fn, items: list) -> list:
    """``fn(items)`` (a list in, a list of the same length out) computed once per item across
    the world: rank r handles items r, r + W, ...; the results (small, picklable) are
    all-gathered in order. Work every rank would otherwise repeat, e.g. rule rewards."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(fn(items))
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = list(fn(items[rank::world])) if items[rank::world] else []
    parts = [None] * world
    dist.all_gather_object(parts, mine)
    out = [None] * len(items)
    for r, part in enumerate(parts):
        out[r::world] = part
    return out
