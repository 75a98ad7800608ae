"""The weight-update process group between a trainer rank and rollout servers, and its buckets.

SGLang's distributed weight update (``/init_weights_update_group`` +
``/update_weights_from_distributed``) joins the trainer's sending rank (rank 0) and every TP
rank of every server (``rank_offset + tp_rank``) into a process group of its own, independent of
the trainer's default group: a TCP rendezvous at ``master_address:master_port`` (the sender hosts
the store), a ``PrefixStore(group_name)`` and torch's process-group helper, exactly as SGLang's
``init_custom_process_group`` builds it, so a trainer and a real SGLang server meet in the same
group (NCCL on GPUs). The CPU server (``serve.py``) joins the same way with gloo.

A bucket travels as SGLang's ``load_format="flattened_bucket"``: one uint8 tensor, the raw bytes
of each tensor in the order of ``names``, broadcast from rank 0; the receiver allocates it from
``names`` / ``dtypes`` / ``shapes`` and cuts it back into tensors (``unflatten``).
"""

from __future__ import annotations

import inspect
import ipaddress
import socket
from datetime import timedelta
from urllib.parse import urlparse

import torch

FLATTENED = "flattened_bucket"


def join_group(backend: str, master_address: str, master_port: int, rank: int, world_size: int,
               group_name: str, timeout_s: float = 600.0):
    """This process's member of the named group (blocks until all ``world_size`` ranks join)."""
    from torch.distributed.distributed_c10d import (
        Backend, PrefixStore, _new_process_group_helper, rendezvous)

    timeout = timedelta(seconds=timeout_s)
    store, rank, world_size = next(rendezvous(f"tcp://{master_address}:{master_port}", rank,
                                              world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = PrefixStore(group_name, store)
    options = ("backend_options" if "backend_options" in
               inspect.signature(_new_process_group_helper).parameters else "pg_options")
    group, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), store,
                                         group_name=group_name, timeout=timeout,
                                         **{options: None})
    return group


def broadcast(group, tensor: torch.Tensor):
    """Start a broadcast from rank 0 of ``group``; returns the work handle."""
    from torch.distributed import BroadcastOptions

    opts = BroadcastOptions()
    opts.rootRank = 0
    return group.broadcast([tensor], opts)


def dtype_name(dtype: torch.dtype) -> str:
    """SGLang's wire spelling of a dtype (``torch.bfloat16`` -> ``"bfloat16"``)."""
    return str(dtype).removeprefix("torch.")


def flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The bucket's bytes: each tensor's raw bytes, in order, as one uint8 tensor."""
    return torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors])


def unflatten(buffer: torch.Tensor, dtypes: list[str], shapes: list[list[int]]) -> list[torch.Tensor]:
    """The tensors of a bucket received with ``flatten``'s layout (views of ``buffer``)."""
    out, offset = [], 0
    for dtype, shape in zip(dtypes, shapes):
        kind = getattr(torch, dtype)
        numel = 1
        for d in shape:
            numel *= int(d)
        size = torch.empty((), dtype=kind).element_size()
        chunk = buffer[offset:offset + numel * size]
        if offset % size:   # a view must start at a multiple of its element size
            chunk = chunk.clone()
        out.append(chunk.view(kind).view(list(shape)))
        offset += numel * size
    if offset != buffer.numel():
        raise ValueError(f"bucket of {buffer.numel()} bytes, the tensors take {offset}")
    return out


def bucket_bytes(dtypes: list[str], shapes: list[list[int]]) -> int:
    total = 0
    for dtype, shape in zip(dtypes, shapes):
        numel = 1
        for d in shape:
            numel *= int(d)
        total += numel * torch.empty((), dtype=getattr(torch, dtype)).element_size()
    return total


def is_loopback(url: str) -> bool:
    host = urlparse(url if "://" in url else f"http://{url}").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def address_towards(urls: list[str]) -> str:
    """The address of this host that the servers at ``urls`` reach it by (their route back)."""
    if all(is_loopback(u) for u in urls):
        return "127.0.0.1"
    parsed = urlparse(urls[0])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:   # no packet is sent
        s.connect((parsed.hostname, parsed.port or 80))
        return s.getsockname()[0]
