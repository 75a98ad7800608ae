"""Batches of discriminator sequences: right padding, M-RoPE positions, where scores are read.

Every row is ``[prompt ; segment]`` right-padded: with causal attention a row's valid tokens never
see padding or other rows, and MoE routing is per token without capacity limits, so a score does
not depend on batch composition or padding (spec §9.4; tested). Positions are the policy's 3-D
M-RoPE ids over the whole ``[prompt ; segment]`` (spec §9.3), from the one rope-index function.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence as Seq

import torch

from prism_megatron.data.collate import collate, segment_attention_mask
from prism_megatron.data.encode import Encoded
from prism_megatron.models.discriminator.segments import Sequence

PositionFn = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]   # ids, grid -> [3, S]


def padded_length(lengths: Seq[int], multiple: int = 8) -> int:
    return math.ceil(max(lengths) / multiple) * multiple


def collate_sequences(seqs: Seq[Sequence], *, pad_id: int, position_fn: PositionFn,
                      length: int | None = None) -> dict[str, torch.Tensor]:
    """One sequence per row. Keys: input_ids, position_ids [3, B, S], attention_mask
    [B, 1, S, S] (True = masked), valid_tokens [B, S], kind [B], score_index [B] (+ vision)."""
    encoded = [Encoded(s.input_ids, torch.zeros_like(s.input_ids, dtype=torch.bool),
                       s.pixel_values, s.image_grid_thw) for s in seqs]
    batch = collate(encoded, [[i] for i in range(len(seqs))], pad_id=pad_id,
                    position_fn=position_fn, length=length)
    out = {
        "input_ids": batch["input_ids"],
        "position_ids": batch["position_ids"],
        "attention_mask": segment_attention_mask(batch["segment_ids"]),
        "valid_tokens": batch["segment_ids"] > 0,
        "kind": torch.tensor([s.kind for s in seqs], dtype=torch.long),
        "score_index": torch.tensor([s.score_index for s in seqs], dtype=torch.long),
    }
    for key in ("pixel_values", "image_grid_thw"):
        if key in batch:
            out[key] = batch[key]
    return out


def read_scores(values: torch.Tensor, score_index: torch.Tensor) -> torch.Tensor:
    """values [B, S] -> the score of each row at its segment's last token, [B]."""
    return values.gather(1, score_index.to(values.device)[:, None]).squeeze(1)


def clean_scores(scores: torch.Tensor, score_clip: float | None) -> torch.Tensor:
    """Spec §3.3: NaN/Inf -> 0, then clamp to [-clip, clip] (no clamp when clip is None)."""
    scores = torch.nan_to_num(scores.float(), nan=0.0, posinf=0.0, neginf=0.0)
    return scores if score_clip is None else scores.clamp(-score_clip, score_clip)
