"""Batching SFT samples: padding or packing, next-token labels, per-sample segments.

A batch is a dict of tensors:
  input_ids [B, S], labels [B, S] (target of position t, IGNORE_INDEX where no loss),
  loss_mask [B, S] float, segment_ids [B, S] (1.. per packed sample, 0 = padding),
  position_ids [3, B, S] (M-RoPE, restarting for every packed sample),
  pixel_values [patches, D] and image_grid_thw [images, 3] in the order the images appear.
Labels are shifted inside each sample before packing, so no sample predicts its neighbour.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import torch

from prism_megatron.data.encode import IGNORE_INDEX, Encoded

# (input_ids [S], image_grid_thw [n, 3] | None) -> position ids [3, S]
PositionFn = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


def shifted_labels(sample: Encoded) -> torch.Tensor:
    """labels[t] = input_ids[t + 1] where token t + 1 is trained on, else IGNORE_INDEX."""
    labels = torch.full_like(sample.input_ids, IGNORE_INDEX)
    targets = sample.trainable[1:]
    labels[:-1][targets] = sample.input_ids[1:][targets]
    return labels


def pack_greedy(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit-decreasing bins of sample indices whose lengths sum to <= capacity."""
    bins: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if lengths[index] > capacity:
            raise ValueError(f"sample of {lengths[index]} tokens exceeds pack length {capacity}")
        for b, free in enumerate(room):
            if lengths[index] <= free:
                bins[b].append(index)
                room[b] -= lengths[index]
                break
        else:
            bins.append([index])
            room.append(capacity - lengths[index])
    return [sorted(b) for b in bins]


def collate(samples: Sequence[Encoded] | Mapping[int, Encoded], rows: list[list[int]], *, pad_id: int,
            position_fn: PositionFn | None, length: int | None = None,
            positions: Mapping[int, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Lay ``samples`` out as ``rows`` (lists of sample indices per batch row). Positions come
    from ``position_fn`` per sample, or precomputed per sample in ``positions`` ([3, S_i])."""
    seq = length or max(sum(len(samples[i].input_ids) for i in row) for row in rows)
    batch = len(rows)
    input_ids = torch.full((batch, seq), pad_id, dtype=torch.long)
    labels = torch.full((batch, seq), IGNORE_INDEX, dtype=torch.long)
    segment_ids = torch.zeros((batch, seq), dtype=torch.long)
    position_ids = torch.zeros((3, batch, seq), dtype=torch.long)
    pixels, grids = [], []
    for r, row in enumerate(rows):
        start = 0
        for segment, index in enumerate(row, start=1):
            sample = samples[index]
            end = start + len(sample.input_ids)
            input_ids[r, start:end] = sample.input_ids
            labels[r, start:end] = shifted_labels(sample)
            segment_ids[r, start:end] = segment
            position_ids[:, r, start:end] = (
                positions[index] if positions is not None
                else position_fn(sample.input_ids, sample.image_grid_thw))
            if sample.pixel_values is not None:
                pixels.append(sample.pixel_values)
                grids.append(sample.image_grid_thw)
            start = end
    out = {"input_ids": input_ids, "labels": labels, "loss_mask": (labels != IGNORE_INDEX).float(),
           "segment_ids": segment_ids, "position_ids": position_ids}
    if pixels:
        out["pixel_values"] = torch.cat(pixels)
        out["image_grid_thw"] = torch.cat(grids)
    return out


def pad_batch(batch: dict[str, torch.Tensor], length: int, *, pad_id: int) -> dict[str, torch.Tensor]:
    """``batch`` right-padded to ``length`` positions: the same tensors ``collate`` would have
    built with that ``length``."""
    extra = length - batch["input_ids"].shape[1]
    if extra < 0:
        raise ValueError(f"batch of {batch['input_ids'].shape[1]} positions exceeds {length}")
    if extra == 0:
        return batch
    fill = {"input_ids": pad_id, "labels": IGNORE_INDEX, "loss_mask": 0.0, "segment_ids": 0,
            "position_ids": 0}
    return {k: torch.nn.functional.pad(v, (0, extra), value=fill[k]) if k in fill else v
            for k, v in batch.items()}


def empty_batch(rows: int, length: int, *, pad_id: int) -> dict[str, torch.Tensor]:
    """A micro-batch of padding only (no loss tokens)."""
    return collate([], [[] for _ in range(rows)], pad_id=pad_id, position_fn=None, length=length)


def collate_padded(samples: Sequence[Encoded], **kwargs) -> dict[str, torch.Tensor]:
    """One sample per row, right-padded to the longest."""
    return collate(samples, [[i] for i in range(len(samples))], **kwargs)


def collate_packed(samples: Sequence[Encoded], capacity: int, **kwargs) -> dict[str, torch.Tensor]:
    """Several samples per row (first-fit-decreasing), rows padded to ``capacity``."""
    rows = pack_greedy([len(s.input_ids) for s in samples], capacity)
    return collate(samples, rows, length=capacity, **kwargs)


def segment_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, S, S] bool, True = masked: causal within a sample, nothing across samples or to
    padding (megatron's convention for an arbitrary attention mask)."""
    seq = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = same & causal & (segment_ids[:, :, None] > 0)
    # Padding rows attend to themselves only, so softmax never sees an all-masked row.
    allowed |= torch.eye(seq, dtype=torch.bool, device=segment_ids.device)
    return ~allowed[:, None]


def padded_length(length: int, multiple: int = 8) -> int:
    """A micro-batch's sequence length: ``length`` rounded up to ``multiple`` (fewer distinct
    shapes for the pipeline schedule and the kernels)."""
    return math.ceil(length / multiple) * multiple


def rank_share(indices: Sequence[int], dp_rank: int, dp_size: int,
               micro: int | None = None) -> list[int | None]:
    """Data-parallel rank ``dp_rank``'s items of a global batch: positions r, r + dp, ... With
    ``micro``, padded with None (filler rows) to a whole number of micro-batches that is equal
    on every rank (the collectives inside a forward need the same count everywhere)."""
    mine = list(indices[dp_rank::dp_size])
    if micro is None:
        return mine
    per_rank = math.ceil(math.ceil(len(indices) / dp_size) / micro) * micro
    return mine + [None] * (per_rank - len(mine))
