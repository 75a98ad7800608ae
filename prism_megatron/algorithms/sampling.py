"""DAPO's sampling-side pieces: dynamic sampling and overlong reward shaping (spec §6.3)."""

from __future__ import annotations

from typing import Hashable, Sequence

import torch
from torch import Tensor

from prism_megatron.algorithms.advantages import group_index

__all__ = ["keep_informative_groups", "overlong_penalty"]


def keep_informative_groups(metric: Tensor, group_ids: Sequence[Hashable] | Tensor) -> Tensor:
    """DAPO dynamic sampling mask [B]: False for every member of a group whose ``metric``
    (e.g. accuracy) has population std 0, i.e. all members equal; singleton groups are kept.

    "All equal" is tested exactly (max == min) rather than through a floating-point std.
    """
    index, num_groups = group_index(group_ids)
    if index.numel() != metric.numel():
        raise ValueError(f"{metric.numel()} values but {index.numel()} group ids")
    index = index.to(metric.device)
    values = metric.detach().to(torch.float64)
    init = torch.full((num_groups,), float("inf"), dtype=torch.float64, device=metric.device)
    group_min = init.scatter_reduce(0, index, values, reduce="amin")
    group_max = (-init).scatter_reduce(0, index, values, reduce="amax")
    counts = torch.bincount(index, minlength=num_groups)
    informative = (group_max > group_min) | (counts == 1)
    return informative[index]


def overlong_penalty(
    response_lengths: Tensor,
    max_response_length: int,
    buffer_length: int,
    penalty_factor: float = 1.0,
) -> Tensor:
    """DAPO overlong shaping term added to the reward [B] (spec §6.3).

    ``min(-(L - (L_max - buffer)) / buffer * factor, 0)``: 0 up to ``L_max - buffer`` tokens,
    then linearly down to ``-factor`` at ``L_max``. ``buffer_length <= 0`` disables it (zeros).
    """
    lengths = response_lengths.to(torch.float32)
    if buffer_length <= 0:
        return torch.zeros_like(lengths)
    expected = max_response_length - buffer_length
    penalty = -(lengths - expected) / buffer_length * penalty_factor
    return penalty.clamp(max=0.0)
