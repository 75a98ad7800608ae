"""What the discriminator reads: a response split into its perception and reasoning segments,
the four ``[prompt ; segment]`` sequences of a teacher/student pair, and their batches.

Spec §2.3 splits a response at the first token whose prefix decode covers ``</caption>``;
spec §9.2 (this project's decision) fixes ONE scored-token rule for all four sequences: a segment
ends with its closing tag (``</caption>`` / ``</answer>``), student segments carry no EOS,
teacher segments always carry their tags. Otherwise the discriminator can tell teacher from
student by the last token alone.

Segment token ids are therefore the tokenisation of the segment TEXT (the regex groups of
``rewards.response.split_segments``), for teachers and students alike, not a slice of the sampled
response ids: with a byte-level BPE the token that closes ``</caption>`` in a response usually
also carries the following newline (``">\\n"``), while a teacher caption ends in ``">"``. Encoding
both segments the same way makes them end in the same token id by construction, and it also
hides any non-canonical tokenisation a sampled response may have (another student-only cue).
The §2.3 token boundary is still computed (``caption_boundary``) for callers that place values
on response tokens, and a response whose boundary cannot be found is treated as invalid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prism_megatron.data.collate import PositionFn, collate, segment_attention_mask
from prism_megatron.data.encode import Encoded
from prism_megatron.data.rows import tagged_teacher
from prism_megatron.rewards.response import split_segments

CAPTION, REASONING = 0, 1          # segment types: the perception pass and the reasoning pass
SEGMENT_NAMES = ("caption", "reasoning")
CLOSING_TAGS = {CAPTION: "</caption>", REASONING: "</answer>"}


@dataclass(frozen=True)
class SegmentIds:
    """Token ids of a response's two segments (no special tokens, no EOS)."""

    caption: list[int]
    reasoning: list[int]
    valid: bool                     # format-valid (spec §2.2) and boundary found (§2.3)
    caption_end: int | None = None  # §2.3 boundary in the response ids (responses only)

    def segment(self, kind: int) -> list[int]:
        return self.caption if kind == CAPTION else self.reasoning


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _non_empty(ids: list[int], tokenizer) -> list[int]:
    """A forward needs >= 1 segment token; an empty (invalid) segment reads the EOS token."""
    return ids or [tokenizer.eos_token_id]


def caption_boundary(response_ids: list[int], caption_text: str, tokenizer) -> int | None:
    """Spec §2.3: the smallest k with ``caption_text`` inside ``decode(r[:k])`` (special tokens
    skipped), or None. Containment only grows with k, so a binary search needs O(log V) decodes
    instead of the reference's linear scan; a token straddling ``</caption>`` and the following
    text counts as part of the caption."""
    def covers(k: int) -> bool:
        return caption_text in tokenizer.decode(response_ids[:k], skip_special_tokens=True)

    if not response_ids or not covers(len(response_ids)):
        return None
    lo, hi = 1, len(response_ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if covers(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def text_segments(text: str, tokenizer) -> SegmentIds:
    """A decoded response -> its segments. Invalid responses get the §2.3 fallback split (halfway
    by characters) so every rank still runs the same forwards; their scores are discarded."""
    parts = split_segments(text)
    return SegmentIds(_non_empty(_encode(tokenizer, parts.caption), tokenizer),
                      _non_empty(_encode(tokenizer, parts.reasoning), tokenizer), parts.valid)


def response_segments(response_ids: list[int] | torch.Tensor, tokenizer) -> SegmentIds:
    """A sampled response (token ids, may end in EOS/padding) -> its segments (§2.3 + §9.2)."""
    ids = [int(i) for i in response_ids]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    segments = text_segments(text, tokenizer)
    if not segments.valid:
        return segments
    boundary = caption_boundary(ids, split_segments(text).caption, tokenizer)
    return SegmentIds(segments.caption, segments.reasoning, boundary is not None, boundary)


def pair_segments(caption: str, cot: str, tokenizer, answer: str | None = None) -> SegmentIds:
    """A teacher's (caption, cot) texts as stored in the data -> its segments, tags added by the
    one tagging rule (``rows.tagged_teacher``; ``BadRow`` if the result is not format-valid)."""
    caption, cot = tagged_teacher(caption, cot, answer)
    return text_segments(f"{caption}\n{cot}", tokenizer)


@dataclass
class Sequence:
    """One discriminator input: ``[prompt ; segment]`` and where its score is read."""

    input_ids: torch.Tensor            # [L] long
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    kind: int                          # CAPTION / REASONING (selects the expert half)
    prompt_length: int

    @property
    def score_index(self) -> int:
        """The segment's last token: its closing tag (spec §9.2)."""
        return len(self.input_ids) - 1


def build_sequence(prompt: Encoded, segment_ids: list[int], kind: int) -> Sequence:
    ids = torch.cat([prompt.input_ids, torch.tensor(segment_ids, dtype=torch.long)])
    return Sequence(ids, prompt.pixel_values, prompt.image_grid_thw, kind, len(prompt.input_ids))


def pair_sequences(prompt: Encoded, teacher: SegmentIds, student: SegmentIds
                   ) -> dict[tuple[str, int], Sequence]:
    """The four sequences of one comparison: (teacher|student) x (CAPTION|REASONING)."""
    return {(role, kind): build_sequence(prompt, segs.segment(kind), kind)
            for role, segs in (("teacher", teacher), ("student", student))
            for kind in (CAPTION, REASONING)}


def collate_sequences(seqs: list[Sequence], *, pad_id: int, position_fn: PositionFn,
                      length: int | None = None) -> dict[str, torch.Tensor]:
    """One sequence per row, right-padded. Keys: input_ids, position_ids [3, B, S],
    attention_mask [B, 1, S, S] (True = masked), valid_tokens [B, S], kind [B], score_index [B]
    (+ vision). With causal attention a row's valid tokens never see padding or other rows, and
    MoE routing is per token without capacity limits, so a score does not depend on the batch
    (spec §9.4; tested). Positions: the policy's 3-D M-RoPE ids over ``[prompt ; segment]``
    (spec §9.3)."""
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
