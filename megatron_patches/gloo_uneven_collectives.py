"""Uneven first-dimension all-gather / reduce-scatter on gloo (CPU)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def uneven_first_dim_collectives_on_gloo() -> None:
    """With tensor (and sequence) parallelism and expert parallelism together, the alltoall MoE
    dispatcher gathers each TP rank's received tokens with ``gather_from_sequence_parallel_region
    (..., output_split_sizes=...)`` and scatters the expert outputs back with
    ``reduce_scatter_to_sequence_parallel_region(..., input_split_sizes=...)``: per-rank sizes
    differ. megatron runs them as list ``all_gather`` / ``reduce_scatter`` of unequal tensors,
    which NCCL accepts and gloo does not (``ProcessGroupGloo::allgather: invalid tensor size``;
    gloo has no list ``reduce_scatter``). For CPU tensors the uneven cases run here as an
    all-gather of tensors padded to the largest split and as an all-reduce followed by taking this
    rank's split: the same values, more traffic (CPU tests only). megatron-core 0.16.1; can go
    when gloo supports uneven collectives, or megatron pads them itself."""
    from megatron.core.tensor_parallel import mappings

    if getattr(mappings._gather_along_first_dim, "__prism_patched__", False):
        return
    gather, reduce_scatter = (mappings._gather_along_first_dim,
                              mappings._reduce_scatter_along_first_dim)

    def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or input_.is_cuda or group.size() == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        longest = max(output_split_sizes)
        padded = input_.new_zeros(longest, *input_.shape[1:])
        padded[:input_.shape[0]] = input_
        out = input_.new_empty(group.size() * longest, *input_.shape[1:])
        dist.all_gather_into_tensor(out, padded.contiguous(), group=group)
        return torch.cat([out[r * longest:r * longest + n]
                          for r, n in enumerate(output_split_sizes)])

    def _reduce_scatter_along_first_dim(input_, group, input_split_sizes=None,
                                        use_global_buffer=False):
        if input_split_sizes is None or input_.is_cuda or group.size() == 1:
            return reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        total = input_.clone().contiguous()
        dist.all_reduce(total, group=group)
        start = sum(input_split_sizes[:group.rank()])
        return total[start:start + input_split_sizes[group.rank()]].clone()

    _gather_along_first_dim.__prism_patched__ = True
    mappings._gather_along_first_dim = _gather_along_first_dim
    mappings._reduce_scatter_along_first_dim = _reduce_scatter_along_first_dim
