"""Outcome advantages: GRPO (spec §6.1) and PRISM's alignment advantage (spec §4, mode 1).

Both are built on :func:`group_normalize`, the one implementation of per-group normalisation.
Advantages carry no gradient. They are per response ([B]); :func:`broadcast_to_tokens` spreads
them over the response tokens for the policy loss.
"""

from __future__ import annotations

from typing import Hashable, Sequence

import torch
from torch import Tensor

__all__ = [
    "broadcast_to_tokens",
    "group_index",
    "group_normalize",
    "group_spread",
    "grpo_advantages",
    "prism_advantages",
]


def group_index(group_ids: Sequence[Hashable] | Tensor) -> tuple[Tensor, int]:
    """Maps arbitrary hashable group ids (ints, strings, uuids, a tensor) to ``0..G-1``.

    Returns ``(index[B] long, G)``; groups are numbered in order of first appearance.
    """
    if isinstance(group_ids, Tensor):
        group_ids = group_ids.tolist()
    numbering: dict[Hashable, int] = {}
    index = [numbering.setdefault(gid, len(numbering)) for gid in group_ids]
    return torch.tensor(index, dtype=torch.long), len(numbering)


def _output_dtype(values: Tensor) -> torch.dtype:
    return values.dtype if values.is_floating_point() else torch.float32


def group_normalize(
    values: Tensor,
    group_ids: Sequence[Hashable] | Tensor,
    *,
    eps: float = 1e-6,
    norm_by_std: bool = True,
) -> Tensor:
    """``(x_i - mean_g) / (std_g + eps)`` per group (spec §4.2 step 3, §6.1).

    ``std`` is the UNBIASED sample std (n - 1). A singleton group uses mean 0 and std 1, so it
    returns ``x / (1 + eps)``. A group of identical values returns exactly 0. With
    ``norm_by_std=False`` only the mean is removed. Computed in float64 with each group shifted by
    its first member (exact zeros for constant groups); returned in the input's float dtype.
    """
    if values.dim() != 1:
        raise ValueError(f"expected a [B] tensor of scores, got shape {tuple(values.shape)}")
    index, num_groups = group_index(group_ids)
    if index.numel() != values.numel():
        raise ValueError(f"{values.numel()} scores but {index.numel()} group ids")
    x = values.detach().to(torch.float64)
    normalized = _normalize(x, index.to(x.device), num_groups, eps=eps, norm_by_std=norm_by_std)
    return normalized.to(_output_dtype(values))


def _normalize(
    x: Tensor, index: Tensor, num_groups: int, *, eps: float, norm_by_std: bool = True
) -> Tensor:
    """:func:`group_normalize` on float64 ``x`` with a precomputed group index."""
    size = x.shape[0]

    def group_sum(values: Tensor) -> Tensor:
        return torch.zeros(num_groups, dtype=x.dtype, device=x.device).index_add_(0, index, values)

    first = torch.full((num_groups,), size, dtype=torch.long, device=x.device)
    first = first.scatter_reduce(0, index, torch.arange(size, device=x.device), reduce="amin")
    shifted = x - x[first][index]  # exact 0 for members equal to their group's first member
    counts = group_sum(torch.ones_like(x))
    deviations = shifted - (group_sum(shifted) / counts)[index]
    variance = group_sum(deviations**2) / (counts - 1).clamp(min=1)  # unbiased (n - 1)

    singleton = counts[index] == 1
    centred = torch.where(singleton, x, deviations)  # singleton: mean 0
    if norm_by_std:
        std = torch.where(singleton, torch.ones_like(x), variance.sqrt()[index])
        centred = centred / (std + eps)
    return centred


def grpo_advantages(
    scores: Tensor,
    group_ids: Sequence[Hashable] | Tensor,
    *,
    norm_by_std: bool = True,
    eps: float = 1e-6,
) -> Tensor:
    """GRPO outcome advantage ``A_i = (r_i - mean_g) / (std_g + eps)`` (spec §6.1).

    ``scores`` are per-response rewards ([B], e.g. the §5 score plus DAPO's overlong term).
    """
    return group_normalize(scores, group_ids, eps=eps, norm_by_std=norm_by_std)


def _rescore_invalid(scores: Tensor, invalid: Tensor, index: Tensor, num_groups: int) -> Tensor:
    """Invalid members get (group min over VALID members) - 1, or -1 without valid members."""
    inf = torch.full((num_groups,), float("inf"), dtype=scores.dtype, device=scores.device)
    valid_scores = torch.where(invalid, torch.full_like(scores, float("inf")), scores)
    group_min = inf.scatter_reduce(0, index, valid_scores, reduce="amin")
    no_valid_member = torch.isinf(group_min)
    replacement = torch.where(no_valid_member, torch.full_like(group_min, -1.0), group_min - 1)
    return torch.where(invalid, replacement[index], scores)


def prism_advantages(
    caption_scores: Tensor,
    reasoning_scores: Tensor,
    format_ok: Tensor,
    group_ids: Sequence[Hashable] | Tensor,
    *,
    caption_weight: float = 0.5,
    reasoning_weight: float = 0.5,
    format_penalty: float = 1.5,
    eps: float = 1e-6,
) -> Tensor:
    """PRISM alignment advantage, default mode (spec §4.2 mode 1; §9.1 follows the code).

    ``A_i = w_cap * GN(c')_i + w_cot * GN(t')_i - format_penalty * F_i`` where ``F_i`` flags a
    format-invalid response and ``c'``/``t'`` replace an invalid member's score by its group's
    minimum over valid members minus 1 (or -1 when the group has none) BEFORE normalisation.
    Invalid samples keep their (lowest-in-group) alignment term: ``A_align`` is NOT multiplied by
    ``(1 - F)`` (§8.3). ``format_ok`` is bool, or a numeric format score where ``<= 0`` is invalid.
    """
    if format_ok.dtype == torch.bool:
        invalid = ~format_ok
    else:
        invalid = format_ok <= 0
    index, num_groups = group_index(group_ids)
    if not (index.numel() == caption_scores.numel() == reasoning_scores.numel() == invalid.numel()):
        raise ValueError("caption_scores, reasoning_scores, format_ok, group_ids differ in length")
    device = caption_scores.device
    index, invalid = index.to(device), invalid.to(device)
    c = caption_scores.detach().to(torch.float64)
    t = reasoning_scores.detach().to(torch.float64)
    c_prime = _rescore_invalid(c, invalid, index, num_groups)
    t_prime = _rescore_invalid(t, invalid, index, num_groups)
    caption_term = _normalize(c_prime, index, num_groups, eps=eps)
    reasoning_term = _normalize(t_prime, index, num_groups, eps=eps)
    advantages = (
        caption_weight * caption_term
        + reasoning_weight * reasoning_term
        - format_penalty * invalid.to(torch.float64)
    )
    return advantages.to(_output_dtype(caption_scores))


def group_spread(
    caption_scores: Tensor,
    reasoning_scores: Tensor,
    valid: Tensor,
    group_ids: Sequence[Hashable] | Tensor,
    advantages: Tensor,
    *,
    eps: float = 1e-6,
) -> dict[str, float]:
    """How much signal group normalisation has to work with in one step.

    ``caption`` / ``reasoning``: the mean over groups of the within-group std (unbiased, as
    :func:`group_normalize` uses) of the VALID members' scores; groups with fewer than two valid
    members have no spread to measure and are left out (0.0 when no group has two). A saturated
    judge drives these towards 0 while ``group_normalize`` still spreads the advantages to unit
    std, i.e. ranks noise. ``flat_groups``: the share of groups whose advantages have a std
    below ``eps`` (all invalid, identical scores, a singleton): those groups give no gradient.
    """
    index, num_groups = group_index(group_ids)
    if not (index.numel() == caption_scores.numel() == reasoning_scores.numel()
            == valid.numel() == advantages.numel()):
        raise ValueError("scores, valid, group_ids and advantages differ in length")
    ok = valid.detach().cpu().bool()

    def std(x: Tensor) -> float:
        return float(x.std()) if x.numel() > 1 else 0.0

    spreads: dict[str, list[float]] = {"caption": [], "reasoning": []}
    flat = 0
    adv, caption, reasoning = (x.detach().cpu().to(torch.float64)
                               for x in (advantages, caption_scores, reasoning_scores))
    for g in range(num_groups):
        members = index == g
        for name, scores in (("caption", caption), ("reasoning", reasoning)):
            kept = scores[members & ok]
            if kept.numel() > 1:
                spreads[name].append(std(kept))
        flat += std(adv[members]) < eps
    return {"caption": sum(spreads["caption"]) / max(len(spreads["caption"]), 1),
            "reasoning": sum(spreads["reasoning"]) / max(len(spreads["reasoning"]), 1),
            "flat_groups": flat / max(num_groups, 1)}


def broadcast_to_tokens(advantages: Tensor, response_mask: Tensor) -> Tensor:
    """Per-response advantages [B] -> per-token [B, T], zero outside the response mask."""
    return advantages[:, None] * response_mask.to(advantages.dtype)
